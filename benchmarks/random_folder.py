"""Write a random model of a ``chess-mlx bench`` preset's shape as an ordinary model folder, so the
whole user path (``convert`` -> ``bench MODEL`` / ``chat``) can be timed at a real model's size
where no checkpoint can be downloaded (the lent GPU has no network).

The weights are ``bench.random_model``'s; config.json is ``bench.preset_config``; the tokenizer
files are copied from ``--tokenizer-from`` (default: the shipped model's, a real BPE tokenizer with
a chat template; its ids are below every preset's vocabulary).

    python benchmarks/random_folder.py OUT [--preset llama3-8b] [--layers N] [--dtype float16]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chess_mlx.bench import PRESETS, preset_config, random_model  # noqa: E402
from chess_mlx.convert import TOKENIZER_FILES  # noqa: E402
from chess_mlx.paths import default_model_dir  # noqa: E402


def write_folder(out: Path, preset: str, layers: int | None, dtype: str, tokenizer_from: Path, seed: int = 0) -> Path:
    """Write the folder; refuses an existing OUT and a tokenizer folder without tokenizer.json."""
    from mlx_lm.utils import save_config, save_model

    if out.exists():
        raise SystemExit(f"error: {out} already exists")
    if not (tokenizer_from / "tokenizer.json").is_file():
        raise SystemExit(f"error: {tokenizer_from} has no tokenizer.json (pass --tokenizer-from)")
    from tokenizers import Tokenizer

    n_tok = Tokenizer.from_file(str(tokenizer_from / "tokenizer.json")).get_vocab_size(with_added_tokens=False)
    if n_tok > PRESETS[preset]["vocab_size"]:
        raise SystemExit(f"error: {tokenizer_from}'s tokenizer has {n_tok} tokens, more than {preset}'s "
                         f"{PRESETS[preset]['vocab_size']} embedding rows")
    model = random_model(preset, layers, getattr(mx, dtype), seed=seed)
    cfg = dict(preset_config(preset, layers), torch_dtype=dtype)
    out.mkdir(parents=True)
    save_model(out, model, donate_model=True)
    save_config(cfg, out / "config.json")
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).is_file():
            shutil.copy2(tokenizer_from / name, out / name)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--preset", default="llama3-8b", choices=sorted(PRESETS))
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    ap.add_argument("--tokenizer-from", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    t0 = time.perf_counter()
    write_folder(a.out, a.preset, a.layers, a.dtype, a.tokenizer_from or default_model_dir(), a.seed)
    size = sum(p.stat().st_size for p in a.out.iterdir())
    print(f"wrote {a.out}: {a.preset}, {a.layers or PRESETS[a.preset]['num_hidden_layers']} layers, "
          f"{size / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
