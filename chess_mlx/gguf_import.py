"""Turn a llama-architecture GGUF file into a Hugging Face style model folder.

The shipped default model only exists on the package registries as a GGUF (Q4_1) file, so this is
how it becomes a folder that mlx-lm, ``calibrate`` and ``convert`` read like any other model.
MLX reads GGUF's Q4_1 / Q8_0 blocks natively as its own affine quantization (group size 32), so
dequantizing here is exact up to the float16 rounding of the result.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from .errors import ChessError

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def _scalar(meta: dict, key: str):
    value = meta[key]
    return value.item() if isinstance(value, mx.array) else value


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of q/k weights (interleaved RoPE -> half-split RoPE).

    llama.cpp stores each head's rows as (head_dim/2, 2) pairs; Hugging Face and mlx-lm expect
    (2, head_dim/2). Only rows move, so quantization groups (along the input axis) stay intact.
    """
    out_dim = w.shape[0]
    head_dim = out_dim // n_heads
    return (
        w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _dequantized(weights: dict, name: str) -> mx.array:
    w = weights[f"{name}.weight"]
    scales = weights.get(f"{name}.scales")
    if scales is None:
        return w.astype(mx.float32)
    biases = weights[f"{name}.biases"]
    bits = w.shape[-1] // scales.shape[-1]
    group_size = 32
    return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits).astype(mx.float32)


def _tokenizer_json(meta: dict) -> str:
    """Build a byte-level BPE tokenizer identical to the GGUF's (llama.cpp pre-tokenizer 'smollm')."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ChessError("only byte-level BPE ('gpt2') GGUF tokenizers are supported")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    types = np.array(meta["tokenizer.ggml.token_type"])
    tok = Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    )
    # 'smollm' in llama.cpp = single digits, then the GPT-2 split regex.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    control = [tokens[i] for i in np.nonzero(types == 3)[0]]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    return tok.to_str()


def import_gguf(gguf_path: Path, out_dir: Path, dtype: str = "float16") -> None:
    """Write ``config.json``, ``model.safetensors`` and the tokenizer files into ``out_dir``."""
    weights, meta = mx.load(str(gguf_path), return_metadata=True)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ChessError(f"GGUF architecture {arch!r} is not supported (llama only)")
    n_layers = int(_scalar(meta, "llama.block_count"))
    n_heads = int(_scalar(meta, "llama.attention.head_count"))
    n_kv = int(_scalar(meta, "llama.attention.head_count_kv"))
    hidden = int(_scalar(meta, "llama.embedding_length"))
    vocab = len(meta["tokenizer.ggml.tokens"])
    target = getattr(mx, dtype)

    out: dict[str, mx.array] = {}
    out["model.embed_tokens.weight"] = _dequantized(weights, "token_embd").astype(target)
    out["model.norm.weight"] = weights["output_norm.weight"].astype(target)
    tied = "output.weight" not in weights
    if not tied:
        out["lm_head.weight"] = _dequantized(weights, "output").astype(target)
    for i in range(n_layers):
        for src, dst in _LAYER_NAMES.items():
            w = _dequantized(weights, f"blk.{i}.{src}")
            if src in ("attn_q", "attn_k"):
                heads = n_heads if src == "attn_q" else n_kv
                w = mx.array(unpermute_rope_rows(np.array(w), heads))
            out[f"model.layers.{i}.{dst}.weight"] = w.astype(target)
    mx.save_safetensors(str(out_dir / "model.safetensors"), out, metadata={"format": "mlx"})

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_scalar(meta, "llama.feed_forward_length")),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": hidden // n_heads,
        "rms_norm_eps": float(_scalar(meta, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_scalar(meta, "llama.rope.freq_base")),
        "max_position_embeddings": int(_scalar(meta, "llama.context_length")),
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "bos_token_id": int(_scalar(meta, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_scalar(meta, "tokenizer.ggml.eos_token_id")),
        "torch_dtype": dtype,
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "tokenizer.json").write_text(_tokenizer_json(meta))
    tokens = meta["tokenizer.ggml.tokens"]

    def tok(key: str) -> str | None:
        return tokens[int(_scalar(meta, key))] if key in meta else None

    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok("tokenizer.ggml.bos_token_id"),
        "eos_token": tok("tokenizer.ggml.eos_token_id"),
        "unk_token": tok("tokenizer.ggml.unknown_token_id"),
        "pad_token": tok("tokenizer.ggml.padding_token_id"),
        "add_bos_token": bool(_scalar(meta, "tokenizer.ggml.add_bos_token"))
        if "tokenizer.ggml.add_bos_token" in meta
        else False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "chat_template": meta.get("tokenizer.chat_template"),
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
