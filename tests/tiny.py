"""Tiny random Llama-family models that the tests build and save themselves."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

VOCAB = 260


def byte_tokenizer_files(folder: Path) -> None:
    """A byte-level BPE tokenizer with no merges: 256 byte tokens + <|endoftext|>."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    (folder / "tokenizer.json").write_text(tok.to_str())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
        "add_bos_token": False, "clean_up_tokenization_spaces": False}))


def tiny_config(model_type: str = "llama", **over) -> dict:
    cfg = dict(model_type=model_type, hidden_size=64, num_hidden_layers=2, intermediate_size=160,
               num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=VOCAB,
               rope_theta=10000.0, tie_word_embeddings=False, max_position_embeddings=512, head_dim=16)
    if model_type == "qwen3":
        cfg["tie_word_embeddings"] = True
    cfg.update(over)
    return cfg


def tiny_model(model_type: str = "llama", seed: int = 0, **over):
    """(model, config) with random weights; norms randomised too, so they matter."""
    from mlx_lm.utils import _get_classes

    cfg = tiny_config(model_type, **over)
    model_cls, args_cls = _get_classes(cfg)
    model = model_cls(args_cls.from_dict(cfg))
    mx.random.seed(seed)
    params = []
    for name, p in tree_flatten(model.parameters()):
        if "norm" in name:
            params.append((name, 1.0 + 0.1 * mx.random.normal(p.shape)))
        elif "embed" in name:
            params.append((name, mx.random.normal(p.shape)))
        else:
            params.append((name, mx.random.normal(p.shape) * (p.shape[-1] ** -0.5)))
    model.load_weights(params)
    mx.eval(model.parameters())
    return model, cfg


def save_tiny(folder: Path, model_type: str = "llama", seed: int = 0, **over) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model, cfg = tiny_model(model_type, seed, **over)
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(cfg))
    byte_tokenizer_files(folder)
    return folder


def memory_growth_of_first_step(model) -> int:
    """Bytes of MLX memory that a model's first one-token step (after a 3-token prompt) leaves
    allocated: what a one-token path stores for itself (stacked rows, transposed weights)."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([[1, 2, 3]]), cache=cache))
    mx.synchronize()
    mx.clear_cache()
    used = mx.get_active_memory()
    mx.eval(model(mx.array([[4]]), cache=cache))  # the first one-token step
    mx.synchronize()
    mx.clear_cache()
    return mx.get_active_memory() - used
