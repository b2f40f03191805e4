"""An independent float64 numpy implementation of a Llama-style model and of every method.

Nothing here imports chess_mlx: tests compare the library against this.
"""

from __future__ import annotations

import numpy as np


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x, base):
    """Half-split (non-interleaved) rotary embedding, x: (heads, T, D)."""
    T, D = x.shape[-2], x.shape[-1]
    half = D // 2
    inv = base ** (-np.arange(half, dtype=np.float64) / half)
    ang = np.arange(T, dtype=np.float64)[:, None] * inv[None, :]
    cos, sin = np.cos(ang), np.sin(ang)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def silu(x):
    return x / (1.0 + np.exp(-x))


def keep_mask(x, t):
    return np.abs(x) >= t


class RefModel:
    """Weights as float64 numpy arrays, taken from a flat {name: array} dict (HF names)."""

    def __init__(self, weights: dict, config: dict):
        self.w = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
        self.c = config
        self.n_layers = config["num_hidden_layers"]
        self.n_heads = config["num_attention_heads"]
        self.n_kv = config.get("num_key_value_heads", self.n_heads)
        self.head_dim = config.get("head_dim") or config["hidden_size"] // self.n_heads
        self.eps = config["rms_norm_eps"]
        self.base = config.get("rope_theta", 10000.0)

    def W(self, i, name):
        return self.w[f"model.layers.{i}.{name}.weight"]

    def lin(self, x, i, name):
        """x W^T (+ bias, as in Qwen2's q/k/v)."""
        y = x @ self.W(i, name).T
        b = self.w.get(f"model.layers.{i}.{name}.bias")
        return y if b is None else y + b

    def head_norm(self, x, i, name):
        """Qwen3's per-head RMSNorm of q and k (absent in Llama/Qwen2)."""
        w = self.w.get(f"model.layers.{i}.self_attn.{name}.weight")
        return x if w is None else rms_norm(x, w, self.eps)

    def attention(self, i, h, t_q=None, t_kv=None, t_o=None, record=None):
        """Attention of layer i on normalized input h (T, d). Thresholds optional."""
        T = h.shape[0]
        hq = h if t_q is None else np.where(keep_mask(h, t_q), h, 0.0)
        hkv = h if t_kv is None else np.where(keep_mask(h, t_kv), h, 0.0)
        q = self.head_norm(self.lin(hq, i, "self_attn.q_proj").reshape(T, self.n_heads, self.head_dim), i, "q_norm")
        k = self.head_norm(self.lin(hkv, i, "self_attn.k_proj").reshape(T, self.n_kv, self.head_dim), i, "k_norm")
        v = self.lin(hkv, i, "self_attn.v_proj").reshape(T, self.n_kv, self.head_dim)
        q, k, v = (t.transpose(1, 0, 2) for t in (q, k, v))
        q, k = rope(q, self.base), rope(k, self.base)
        rep = self.n_heads // self.n_kv
        k, v = np.repeat(k, rep, axis=0), np.repeat(v, rep, axis=0)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(self.head_dim)
        s = s + np.triu(np.full((T, T), -np.inf), 1)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        o = (p @ v).transpose(1, 0, 2).reshape(T, -1)
        if record is not None:
            record["attn_in"], record["attn_out"] = h, o
        if t_o is not None:
            o = np.where(keep_mask(o, t_o), o, 0.0)
        return self.lin(o, i, "self_attn.o_proj")

    def mlp(self, i, x, method="dense", t=None, record=None):
        g_w, u_w, d_w = self.W(i, "mlp.gate_proj"), self.W(i, "mlp.up_proj"), self.W(i, "mlp.down_proj")
        if method == "teal":
            x = np.where(keep_mask(x, t["mlp_in"]), x, 0.0)
        a = silu(x @ g_w.T)
        u = x @ u_w.T
        if record is not None:
            record.update(mlp_in=x, act=a, up=u, down_in=a * u)
        if method in ("cats", "chess", "chess-attn"):
            a = np.where(keep_mask(a, t["act"]), a, 0.0)
        h = a * u
        if method == "teal":
            h = np.where(keep_mask(h, t["down_in"]), h, 0.0)
        return h @ d_w.T

    def embed(self, tokens):
        return self.w["model.embed_tokens.weight"][np.asarray(tokens)]

    def block(self, i, x, method="dense", th=None, record=None):
        t = {}
        if th is not None:
            t = {name: th[name][i] for name in th}
            t["act"] = t["cats"] if method == "cats" else t.get("chess")
        h = rms_norm(x, self.W(i, "input_layernorm"), self.eps)
        kw = {}
        if method == "chess-attn":
            kw = dict(t_q=t["attn_in"], t_o=t["attn_out"])
        elif method == "teal":
            kw = dict(t_q=t["attn_in"], t_kv=t["attn_in"], t_o=t["attn_out"])
        x = x + self.attention(i, h, record=record, **kw)
        m = rms_norm(x, self.W(i, "post_attention_layernorm"), self.eps)
        return x + self.mlp(i, m, method, t, record=record)

    def logits(self, tokens, method="dense", th=None):
        x = self.embed(tokens)
        for i in range(self.n_layers):
            x = self.block(i, x, method, th)
        x = rms_norm(x, self.w["model.norm.weight"], self.eps)
        head = self.w.get("lm_head.weight", self.w["model.embed_tokens.weight"])
        return x @ head.T

    def calibrate(self, sequences, sparsities):
        """Exact per-layer thresholds over all tokens of all sequences, as the paper defines them."""
        qs = np.asarray(sparsities, dtype=np.float64)
        xs = [self.embed(s) for s in sequences]
        out = {k: [] for k in ("cats", "chess", "attn_in", "attn_out", "mlp_in", "down_in", "up_mean")}
        for i in range(self.n_layers):
            recs = []
            for j, x in enumerate(xs):
                rec = {}
                xs[j] = self.block(i, x, record=rec)
                recs.append(rec)
            cat = {k: np.abs(np.concatenate([r[k] for r in recs])) for k in recs[0]}
            m = cat["up"].mean(axis=0)
            out["cats"].append(np.quantile(cat["act"], qs))
            out["chess"].append(np.quantile(cat["act"] * m, qs)[:, None] / m[None, :])
            for k in ("attn_in", "attn_out", "mlp_in", "down_in"):
                out[k].append(np.quantile(cat[k], qs))
            out["up_mean"].append(m)
        res = {}
        for j, s in enumerate(sparsities):
            res[s] = {k: np.stack([v[j] for v in out[k]]) for k in ("cats", "chess", "attn_in", "attn_out", "mlp_in", "down_in")}
        return res, np.stack(out["up_mean"])
