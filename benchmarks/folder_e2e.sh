#!/usr/bin/env bash
# The user's whole path at Llama-3-8B's size on the GPU, where no checkpoint can be downloaded: a
# random llama3-8b folder with the shipped model's tokenizer (random_folder.py), `chess-mlx convert`
# (float16, or --quantize 4) calibrating on the shipped text, then `chess-mlx bench FOLDER` with the
# folder's own thresholds on 32 held-out tokens. Each step fits one 600 s device call:
#   bash benchmarks/folder_e2e.sh make|convert16|convert4|bench16|bench4|generate4|app4 OUTDIR   (MLX CUDA staged)
# generate4: `chess-mlx generate` on the 4-bit folder, a process per method (what a user's one-shot
# reply sees, beside bench's rows); app4: the chat app's first replies there (app_probe.py, needs
# textual: carry its wheels).
# The folders live in $ROOT (default /tmp/e2e); each step's output goes to OUTDIR/<step>.txt.
set -uo pipefail
step=${1:?usage: folder_e2e.sh make|convert16|convert4|bench16|bench4|generate4|app4 OUTDIR}
out=${2:?usage: folder_e2e.sh STEP OUTDIR}
root=${ROOT:-/tmp/e2e}
mkdir -p "$root" "$out"
run() {  # the step's output, then its wall time and peak host memory where GNU time is there
  if [ -x /usr/bin/time ]; then /usr/bin/time -f "wall %e s, peak RSS %M KB" "$@" 2>&1 | tee "$out/$step.txt"
  else { time "$@"; } 2>&1 | tee "$out/$step.txt"; fi
}
case $step in
  make) run python3 benchmarks/random_folder.py "$root/src" --preset llama3-8b ;;
  convert16) run python3 -m chess_mlx convert "$root/src" "$root/f16" --force ;;
  convert4) run python3 -m chess_mlx convert "$root/src" "$root/q4" --quantize 4 --force ;;
  bench16) run python3 -m chess_mlx bench "$root/f16" --runs 5 --json "$out/bench16.json" ;;
  bench4) run python3 -m chess_mlx bench "$root/q4" --runs 5 --json "$out/bench4.json" ;;
  generate4) for m in dense chess chess-attn; do
      echo "== $m"; python3 -m chess_mlx generate "$root/q4" --method $m --max-tokens 256 \
        --prompt "Write a short story about a lighthouse keeper who finds a message in a bottle."
    done 2>&1 | tee "$out/$step.txt" ;;
  app4) run python3 benchmarks/app_probe.py "$root/q4" --method chess --tokens 256 --json "$out/app4.json" ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
esac
