"""The joint key/value cache (``kv_cache.JointKVCache``) against mlx-lm's ``KVCache``.

The joint cache must hold exactly what mlx-lm's holds (keys and values per position, growth past
its 256-position steps, trimming, masks, state), stay mlx-lm's own until k and v come side by side
from CHESS+attention's split launch, then take them in one write, give the same decode as mlx-lm's
cache through the model, and add no node to a decode step's graph."""

from __future__ import annotations

import collections
import re
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache, trim_prompt_cache

from chess_mlx import block_step, kv_cache, set_method
from chess_mlx.kv_cache import JointKVCache, make_cache
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


def test_joint_cache_holds_what_mlx_lm_holds():
    """A prompt, single steps across the 256-position growth, a trim and more steps, and the
    joint write of k and v side by side: every fetch equals mlx-lm's, as do offsets and masks."""
    rng = np.random.default_rng(0)
    ref, joint = KVCache(), JointKVCache()
    assert joint.empty() and joint.keys is None and joint.state == ref.state
    k, v = _kv(rng, 250)
    _same(joint.update_and_fetch(k, v), ref.update_and_fetch(k, v))
    assert joint.kv is None and joint.keys.shape == ref.keys.shape  # mlx-lm's buffers until a joint write
    for i in range(12):  # past the first 256 positions: the buffer grows
        k, v = _kv(rng, 1)
        if i % 2:  # what the head gives under CHESS+attention: [k; v] heads in one array
            got = joint.update_joint(mx.concatenate([k, v], axis=1), 2)
        else:
            got = joint.update_and_fetch(k, v)
        _same(got, ref.update_and_fetch(k, v))
    assert joint.offset == ref.offset == 262 and joint.size() == 262 and joint.keys is None
    assert joint.kv.shape == (1, 4, 512, 8) and joint.nbytes == joint.kv.nbytes
    assert trim_prompt_cache([joint], 5) == 5 and trim_prompt_cache([ref], 5) == 5
    k, v = _kv(rng, 3)
    _same(joint.update_and_fetch(k, v), ref.update_and_fetch(k, v))
    _same(joint.keys_and_values(), ref.keys_and_values())
    for n, arr, window in ((1, False, None), (4, False, None), (4, True, None), (3, False, 8)):
        a = joint.make_mask(n, return_array=arr, window_size=window)
        b = ref.make_mask(n, return_array=arr, window_size=window)
        assert a == b if a is None or isinstance(a, str) else np.array_equal(np.array(a), np.array(b))
    restored = JointKVCache.from_state(joint.state)
    _same(restored.keys_and_values(), ref.keys_and_values())
    assert restored.offset == ref.offset


def test_joint_cache_refuses_what_it_cannot_hold():
    """Joint writes take one sequence and fixed heads; before one, anything mlx-lm's cache takes."""
    rng = np.random.default_rng(1)
    k, v = _kv(rng, 2)
    batch = JointKVCache()
    batch.update_and_fetch(mx.concatenate([k, k]), mx.concatenate([v, v]))  # mlx-lm's code: fine
    with pytest.raises(ValueError, match="one sequence"):
        batch.update_joint(mx.repeat(mx.concatenate([k, v], axis=1), 2, axis=0), 2)
    c = JointKVCache()
    c.update_joint(mx.concatenate([k, v], axis=1), 2)
    with pytest.raises(ValueError, match="one head size"):
        c.update_and_fetch(k, v[..., :4])
    with pytest.raises(ValueError, match="heads changed"):
        c.update_joint(mx.concatenate(_kv(rng, 1), axis=1), 1)


def test_make_cache_gives_joint_caches_to_patched_families_when_switched_on():
    """Off by default (it slowed long contexts, RESULTS.md session 34): mlx-lm's own caches."""
    model, cfg = tiny_model("llama", 3)
    assert not kv_cache.enabled() and all(type(c) is KVCache for c in make_cache(model))
    kv_cache.enable(True)
    try:
        caches = make_cache(model)
        assert len(caches) == cfg["num_hidden_layers"] and all(type(c) is JointKVCache for c in caches)
    finally:
        kv_cache.enable(False)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_decode_with_the_joint_cache(model_type, monkeypatch):
    """CHESS+attention through the compiled block with joint caches gives the logits and densities
    of the op-by-op path with mlx-lm's caches. Where the split launch rotates q and k itself
    (Llama), every decode step writes k and v with one ``update_joint`` of the head's [k; v]
    output; Qwen3 (q/k norms, MLX's rope) writes them apart (``update_and_fetch``)."""
    model, cfg, th, prompt = chess_attn_on_the_cpu(model_type, 5, monkeypatch)
    want = op_by_op_decode(model, th, prompt, 4)
    joined, direct = [], []  # positions per update_and_fetch / update_joint call
    real_fetch, real_joint = JointKVCache.update_and_fetch, JointKVCache.update_joint

    def fetch(self, k, v):
        joined.append(k.shape[2])
        return real_fetch(self, k, v)

    def joint(self, kv, n):
        direct.append(kv.shape[2])
        return real_joint(self, kv, n)

    monkeypatch.setattr(JointKVCache, "update_and_fetch", fetch)
    monkeypatch.setattr(JointKVCache, "update_joint", joint)
    set_method(model, "chess-attn", th, 0.5)
    kv_cache.enable(True)  # off by default
    try:
        got, dens = _decode(model, prompt, 4, make_cache=make_cache)
    finally:
        kv_cache.enable(False)
        set_method(model, "dense")
    np.testing.assert_allclose(got, want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dens, want[1], atol=1e-7)
    layers = cfg["num_hidden_layers"]
    if model_type == "llama":  # the prompt written apart once per layer, then one write per step and layer
        assert joined == [len(prompt)] * layers and direct == [1] * (4 * layers)
    else:
        assert sorted(joined) == [1] * (4 * layers) + [len(prompt)] * layers and direct == []
    assert block_step.enabled()


def _step_nodes(model, prompt, make) -> collections.Counter:
    """Primitives of the second decode token's graph (views included: MLX encodes them too)
    after a prefill with the caches ``make(model)`` gives (the first step may move a joint
    cache's content once)."""
    cache = make(model)
    mx.eval(model(prompt[None], cache=cache))
    mx.eval(model(prompt[-1:][None], cache=cache))
    out = model(prompt[-2:-1][None], cache=cache)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "step.dot"
        mx.export_to_dot(str(path), out)
        labels = re.findall(r'label\s*=\s*"([A-Za-z]+)', path.read_text())
    mx.eval(out)
    return collections.Counter(labels)


@pytest.mark.parametrize("method", ["dense", "chess-attn"])
def test_joint_cache_adds_no_graph_nodes(method, monkeypatch):
    """The host builds and encodes every node of a decode step: against mlx-lm's caches the joint
    ones add none, and where the split launch gives [k; v] (Llama, rope inside) they save one
    write per layer."""
    from mlx_lm.models.cache import make_prompt_cache

    model, cfg, th, prompt = chess_attn_on_the_cpu("llama", 9, monkeypatch)
    set_method(model, method, th, 0.5)
    kv_cache.enable(True)  # off by default
    try:
        theirs, ours = _step_nodes(model, prompt, make_prompt_cache), _step_nodes(model, prompt, make_cache)
    finally:
        kv_cache.enable(False)
        set_method(model, "dense")
    layers = cfg["num_hidden_layers"]
    joint = method == "chess-attn"  # per layer: one write, and the two slices that split [k; v], saved
    assert theirs["SliceUpdate"] >= 2 * layers
    assert ours["SliceUpdate"] == theirs["SliceUpdate"] - (layers if joint else 0)
    assert sum(ours.values()) == sum(theirs.values()) - (3 * layers if joint else 0), (ours - theirs, theirs - ours)


# -- the in-place cache (InPlaceKVCache) ---------------------------------------------------------

def test_in_place_cache_on_the_cpu_holds_what_mlx_lm_holds():
    """Without kernels (the CPU, the reference switch) a one-token ``write`` is mlx-lm's update:
    fetches, growth past 256 positions, trimming, masks and a restored state all equal mlx-lm's,
    and q comes back as it went in."""
    from chess_mlx.kv_cache import InPlaceKVCache, append_token

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
    from chess_mlx import sparse_gemv as G
    from chess_mlx.kv_cache import InPlaceKVCache
    from test_kernels_emulated import _recording

    launches = _recording(monkeypatch, kind)
    monkeypatch.setattr(G, "backend", lambda: kind)
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
