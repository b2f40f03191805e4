"""The two-thread decode (chess_mlx/pipelined.py) over many replies in one process: no crash.

Reading the sampled token on the building thread (``item``) cleared its completion event while
the encoder thread's eval of the next step read it as an input: a segmentation fault in
``Event::is_signaled`` in about one 30-second run in three (RESULTS.md session 16). The next step
now takes its own array. The run is a subprocess, so a crash fails this test instead of the suite.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

_SCRIPT = textwrap.dedent('''
    import sys, time
    sys.path.insert(0, sys.argv[2])
    import mlx.core as mx
    from chess_mlx import calibrate, decode_paths, pipelined, set_method, sparsify
    from chess_mlx import sparse_layers as SL
    from mlx_lm.models.cache import make_prompt_cache
    from tiny import tiny_model

    # the compiled one-token paths on the CPU (wrapping the reference products), as on a GPU
    SL.compiled_path_ok = lambda x, *p: x.size == x.shape[-1] and decode_paths.enabled()
    model, _ = tiny_model("llama", seed=11)
    sparsify(model)
    th = calibrate(model, mx.random.randint(0, 256, (2, 64), key=mx.random.key(3)), [0.5])
    start, replies, tokens = time.time(), 0, 0
    while time.time() - start < float(sys.argv[1]):
        for m in ("dense", "chess", "chess-attn", "teal"):
            set_method(model, m, None if m == "dense" else th, 0.5)
            rec = sparsify(model).recorder
            rec.clear()
            rec.enabled = True
            for t, _ in pipelined.generate_step(mx.array([1, 2, 3, 4]), model, max_tokens=64,
                                                 prompt_cache=make_prompt_cache(model), also=rec.current):
                tokens += 1
                rec.pop(closed_only=True)  # the stats read on this thread, as chess_mlx.generate does
            rec.enabled = False
            replies += 1
    print("replies", replies, "tokens", tokens)
''')


def test_many_two_thread_replies_in_one_process(tmp_path):
    script = tmp_path / "stress.py"
    script.write_text(_SCRIPT)
    r = subprocess.run([sys.executable, "-X", "faulthandler", str(script), "20", str(Path(__file__).parent)],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-3000:]}"
    words = r.stdout.split()
    assert words[0] == "replies" and int(words[1]) >= 20 and int(words[3]) >= 20 * 64
