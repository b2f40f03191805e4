"""The chat app's first replies on a real device, driven headless by Textual's Pilot: how long the
start's preparation takes, then per reply its TTFT, tokens/s, sparsity and stats panel, for the
folder's method, the next method after F2, and one compare-mode turn (F4). Each reply is set beside
``generate.stream`` run directly on the main thread with the same prompt and length, so a gap
between the app (generation on its worker thread) and the library shows.

    python benchmarks/app_probe.py FOLDER [--method chess] [--tokens 128] [--json OUT]

Needs textual (carry its wheels to a GPU machine). Prints one line per event; --json also writes them all.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def _reply_record(step, t_sent: float, t_done: float) -> dict:
    s = step.stats
    return {"tokens": step.generation_tokens, "tok_s": round(step.generation_tps, 1), "ttft_s": round(step.ttft, 3),
            "setup_s": round(step.setup_s, 3), "ffn_sparsity": round(s.ffn_sparsity, 4),
            "attn_sparsity": round(s.attn_sparsity, 4), "bytes_fraction": round(s.bytes_fraction, 4),
            "wall_s": round(t_done - t_sent, 3)}


def _direct(session, tokens: int) -> dict:
    """The same prompt through ``generate.stream`` on this thread (the library, no app)."""
    from mlx_lm.sample_utils import make_sampler

    from chess_mlx.generate import from_steps, stream
    from chess_mlx.sparse_layers import sparsify

    prompt = session._template([{"role": "user", "content": PROMPT}])  # the prompt the app's first reply fed

    t0 = time.perf_counter()
    g = from_steps(stream(session.model, session.tokenizer, prompt, max_tokens=tokens, sampler=make_sampler(0.0)),
                   sparsify(session.model).weight_bytes)
    return {"tokens": g.steps, "tok_s": round(g.generation_tps, 1), "ttft_s": round(g.ttft, 3),
            "setup_s": round(g.setup_s, 3), "wall_s": round(time.perf_counter() - t0, 3)}


async def _until(pilot, cond, seconds: float = 300.0) -> None:
    t0 = time.perf_counter()
    while not cond():
        if time.perf_counter() - t0 > seconds:
            raise TimeoutError("the app did not get there in time")
        await pilot.pause(0.02)


async def _drive(folder: Path, method: str, tokens: int) -> dict:
    from app.chat import ChatApp
    from textual.widgets import Static

    from chess_mlx import thresholds as T
    from chess_mlx.chat_session import ChatSession
    from chess_mlx.model_io import fingerprint, load_model
    from chess_mlx.sampling import Sampling

    out: dict = {}
    t0 = time.perf_counter()
    model, tok, _ = load_model(folder)
    th = T.load(folder, fingerprint(model))
    session = ChatSession(model, tok, th, method)
    out["load_s"] = round(time.perf_counter() - t0, 2)
    print(f"loaded {folder} in {out['load_s']} s; method {session.label}", flush=True)
    app = ChatApp(session, Sampling(max_tokens=tokens), model_name=folder.name)
    async with app.run_test(size=(140, 45)) as pilot:
        t = time.perf_counter()
        await _until(pilot, lambda: not app.preparing)
        out["prepare_s"] = round(time.perf_counter() - t, 2)
        print(f"app: prepared {session.label} in {out['prepare_s']} s", flush=True)
        replies = []
        for turn in range(3):  # the folder's method twice, then the next method after F2
            if turn == 2:
                t = time.perf_counter()
                await pilot.press("f2")  # the press returns once the app is idle: maybe prepared already
                await _until(pilot, lambda: not app.preparing)
                out["prepare_next_s"] = round(time.perf_counter() - t, 2)
                print(f"app: F2 -> {app.session.label}, prepared in {out['prepare_next_s']} s", flush=True)
                app.action_clear()  # the same one-turn prompt as the first reply
            app.query_one("#prompt").value = PROMPT
            t = time.perf_counter()
            n = app.replies
            await pilot.press("enter")
            await _until(pilot, lambda: app.replies > n)
            rec = _reply_record(app.last_step, t, time.perf_counter())
            rec["method"] = app.session.label
            rec["panel"] = str(app.query_one("#stats", Static).render())
            replies.append(rec)
            print(f"app reply {turn + 1} [{rec['method']}]: {rec['tokens']} tok {rec['tok_s']} tok/s, TTFT "
                  f"{rec['ttft_s']} s, setup {rec['setup_s']} s, FFN {rec['ffn_sparsity']:.1%}, attn "
                  f"{rec['attn_sparsity']:.1%}, weights {rec['bytes_fraction']:.1%}, wall {rec['wall_s']} s", flush=True)
        out["replies"] = replies
        await pilot.press("f4")
        await pilot.pause()
        await _until(pilot, lambda: not app.preparing)
        app.screen.query_one("#cmp-prompt").value = PROMPT
        t = time.perf_counter()
        n = app.replies
        await pilot.press("enter")
        await _until(pilot, lambda: app.replies > n)
        await pilot.pause()
        cmp = app.compare.last
        out["compare"] = {"summary": cmp.summary() if cmp else None, "wall_s": round(time.perf_counter() - t, 2),
                          "verdict": str(app.screen.query_one("#verdict").render())}
        print(f"app compare: {out['compare']['summary']} (wall {out['compare']['wall_s']} s)", flush=True)
        await pilot.press("f4")
        await pilot.pause()
        out["panel_last"] = replies[-1]["panel"]
        last_session = app.session
    # the library on the main thread, same prompt, greedy, for both methods the app ran
    direct = {}
    for m in (method, last_session.method):
        last_session.set_method(m, last_session.sparsity)
        d = _direct(last_session, tokens)
        direct[m] = d
        print(f"direct stream [{m}]: {d['tokens']} tok {d['tok_s']} tok/s, TTFT {d['ttft_s']} s, "
              f"setup {d['setup_s']} s", flush=True)
    out["direct"] = direct
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--method", default="chess")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import mlx.core as mx

    print(f"mlx {mx.__version__} on {mx.default_device()}", flush=True)
    out = asyncio.run(_drive(args.folder, args.method, args.tokens))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
