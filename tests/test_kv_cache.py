"""The in-place KV cache (``kv_cache.InPlaceKVCache``) against mlx-lm's ``KVCache``.

It must hold exactly what mlx-lm's holds (keys and values per position, growth past its
256-position steps, trimming, masks, state), take every one-token step through its write (prompts
through mlx-lm's code), give the same decode as mlx-lm's cache through the model, and its kernels
must write in place what they are documented to write (run in the CPU emulation of CUDA and Metal).
Whether the writes are ordered on a real GPU is checked there (``benchmarks/kv_inplace_check.py``)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache, trim_prompt_cache

from chess_mlx import block_step, kv_cache, set_method
from chess_mlx.kv_cache import InPlaceKVCache, make_cache
from test_decode_paths import _decode
from test_qkv_launch import chess_attn_on_the_cpu, op_by_op_decode
from tiny import tiny_model


def _kv(rng, L: int, hk: int = 2, hv: int = 2, d: int = 8):
    return (mx.array(rng.standard_normal((1, hk, L, d)).astype(np.float32)),
            mx.array(rng.standard_normal((1, hv, L, d)).astype(np.float32)))


def _same(a: tuple, b: tuple) -> None:
    for x, y in zip(a, b):
        assert x.shape == y.shape
        np.testing.assert_array_equal(np.array(x), np.array(y))


def test_make_cache_gives_in_place_caches_to_patched_families():
    """On by default; switched off, mlx-lm's own caches."""
    model, cfg = tiny_model("llama", 3)
    caches = make_cache(model)
    assert len(caches) == cfg["num_hidden_layers"] and all(type(c) is InPlaceKVCache for c in caches)
    kv_cache.enable_inplace(False)
    try:
        assert all(type(c) is KVCache for c in make_cache(model))
    finally:
        kv_cache.enable_inplace(True)


def _python_kernels(monkeypatch) -> list:
    """Stand-ins for the kv_write / kv_grow launches, as a GPU would take them, that do in Python
    what the kernels do (tested against the emulation below): write into the cache's own buffer
    objects, or give grown ones. Returns the (kernel, position) of each call."""
    calls = []

    def write(kind, q, k, v, kb, vb, p):
        calls.append(("kv_write", p))
        kb[:, :, p:p + 1] = k
        vb[:, :, p:p + 1] = v
        return q

    def grow(kind, q, k, v, kb, vb, p, cap2):
        calls.append(("kv_grow", p))
        pad = mx.zeros((1, kb.shape[1], cap2 - p - 1, kb.shape[3]), dtype=kb.dtype)
        return (q, mx.concatenate([kb[:, :, :p], k, pad], axis=2), mx.concatenate([vb[:, :, :p], v, pad], axis=2))

    monkeypatch.setattr(kv_cache, "_backend", lambda: "cuda")
    monkeypatch.setattr(kv_cache, "_launch_write", write)
    monkeypatch.setattr(kv_cache, "_launch_grow", grow)
    return calls


@pytest.mark.parametrize("model_type,block", [("llama", True), ("qwen3", True), ("llama", False)])
def test_decode_with_the_in_place_cache(model_type, block, monkeypatch):
    """CHESS+attention through the compiled block (or, with it off, the fused attention's own
    one-token call), with in-place caches taking every one-token step as a GPU would (in-place
    writes, then growth past 256 positions), gives the logits and densities of the op-by-op path
    with mlx-lm's caches; the prompt goes through mlx-lm's code."""
    model, cfg, th, prompt = chess_attn_on_the_cpu(model_type, 5, monkeypatch)
    monkeypatch.setattr(block_step, "enabled", lambda: block)
    prompt = mx.concatenate([prompt] * 32)[:254]  # two steps to the first growth
    kv_cache.enable_inplace(False)
    try:
        want = op_by_op_decode(model, th, prompt, 4)
    finally:
        kv_cache.enable_inplace(True)
    calls = _python_kernels(monkeypatch)
    set_method(model, "chess-attn", th, 0.5)
    try:
        got, dens = _decode(model, prompt, 4, make_cache=make_cache)
    finally:
        set_method(model, "dense")
    np.testing.assert_allclose(got, want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dens, want[1], atol=1e-7)
    layers = cfg["num_hidden_layers"]
    assert sorted(calls) == sorted([("kv_write", 254), ("kv_write", 255), ("kv_grow", 256), ("kv_write", 257)] * layers)


# -- the in-place cache (InPlaceKVCache) ---------------------------------------------------------

def test_in_place_cache_on_the_cpu_holds_what_mlx_lm_holds():
    """Without kernels (the CPU, the reference switch) a one-token ``write`` is mlx-lm's update:
    fetches, growth past 256 positions, trimming, masks and a restored state all equal mlx-lm's,
    and q comes back as it went in."""
    from chess_mlx.kv_cache import append_token

    rng = np.random.default_rng(2)
    ref, c = KVCache(), InPlaceKVCache()
    k, v = _kv(rng, 250)
    _same(c.update_and_fetch(k, v), ref.update_and_fetch(k, v))
    for _ in range(9):
        q = mx.array(rng.standard_normal((1, 4, 1, 8)).astype(np.float32))
        k, v = _kv(rng, 1)
        q2, *got = append_token(c, q, k, v)
        assert q2 is q
        _same(got, ref.update_and_fetch(k, v))
    assert c.offset == ref.offset == 259 and c.keys.shape == ref.keys.shape == (1, 2, 512, 8)
    assert trim_prompt_cache([c], 4) == 4 and trim_prompt_cache([ref], 4) == 4
    k, v = _kv(rng, 1)
    _same(c.write(q, k, v)[1:], ref.update_and_fetch(k, v))
    restored = InPlaceKVCache.from_state(c.state)
    _same(restored.keys_and_values(), ref.keys_and_values())
    assert not restored.own and c.own


def _recorded_writes(monkeypatch, kind: str):
    """(launches, cache, the tokens written): a float16 cache of 254 positions (capacity 256),
    then three one-token writes as a GPU of ``kind`` takes them, recorded (test_kernels_emulated),
    not run; a state set from outside, then a fourth write."""
    from test_kernels_emulated import _recording

    launches = _recording(monkeypatch, kind)
    monkeypatch.setattr(kv_cache, "_backend", lambda: kind)
    rng = np.random.default_rng(3)
    c = InPlaceKVCache()
    k, v = (a.astype(mx.float16) for a in _kv(rng, 254))
    c.update_and_fetch(k, v)
    tokens = []
    for _ in range(3):
        q = mx.array(rng.standard_normal((1, 4, 1, 8))).astype(mx.float16)
        k, v = (a.astype(mx.float16) for a in _kv(rng, 1))
        tokens.append((q, k, v))
        q2, keys, values = c.write(q, k, v)
        assert keys.shape == values.shape == (1, 2, c.offset, 8) and q2.shape == q.shape
    c.state = (c.keys[..., :c.offset, :], c.values[..., :c.offset, :], c.offset)  # views, not its own
    tokens.append(tuple(a.astype(mx.float16) for a in (mx.ones((1, 4, 1, 8)), *_kv(rng, 1))))
    c.write(*tokens[-1])
    return launches, c, tokens


@pytest.mark.parametrize("kind", ["cuda", "metal"])
def test_in_place_writes_and_growth_run_in_the_emulator(kind, monkeypatch, tmp_path):
    """The kernels a GPU decode launches (cuda/kv_write.cu, cuda/kv_grow.cu and their Metal twins),
    run in the CPU emulation of that backend (tests/test_kernels_emulated.py): a write puts k and v
    at its position of the cache's own buffers and changes nothing else there; growth (at the
    256-position capacity, and after a state set from outside) gives new buffers with the old
    positions, the token, then zeros; both hand q on unchanged."""
    from test_kernels_emulated import _build, _run

    launches, c, tokens = _recorded_writes(monkeypatch, kind)
    assert [(l.name, int(np.array(l.inputs[-1])[0])) for l in launches] == [
        ("kv_write", 254), ("kv_write", 255), ("kv_grow", 256), ("kv_grow", 257)]
    assert c.offset == 258 and c.own and c.keys.shape == (1, 2, 257 + 256, 8)
    exe = _build(kind, tmp_path, launches)
    for i, (launch, (q, k, v)) in enumerate(zip(launches, tokens)):
        outs, after = _run(exe, i, launch, tmp_path)
        p = 254 + i
        np.testing.assert_array_equal(np.array(outs[0]), np.array(q))  # q handed on
        kb, vb = (np.array(a.astype(mx.float32)) for a in launch.inputs[3:5])
        if launch.name == "kv_write":
            want_k, want_v = kb.copy(), vb.copy()
            want_k[:, :, p], want_v[:, :, p] = np.array(k)[:, :, 0], np.array(v)[:, :, 0]
            np.testing.assert_array_equal(np.array(after[3].astype(mx.float32)), want_k)
            np.testing.assert_array_equal(np.array(after[4].astype(mx.float32)), want_v)
        else:
            cap2 = launch.out_shapes[1][2]
            assert cap2 == p + 256
            for got, old, new in ((outs[1], kb, k), (outs[2], vb, v)):
                got = np.array(got.astype(mx.float32))
                np.testing.assert_array_equal(got[:, :, :p], old[:, :, :p])
                np.testing.assert_array_equal(got[:, :, p], np.array(new.astype(mx.float32))[:, :, 0])
                assert not got[:, :, p + 1:].any()
