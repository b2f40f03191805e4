"""Text files in, token sequences out, with the errors a user can act on."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from .errors import ChessError


def read_text(path: Path | str, what: str = "text") -> str:
    path = Path(path)
    if not path.exists():
        raise ChessError(f"{what} file {path} does not exist")
    if path.is_dir():
        raise ChessError(f"{what} file {path} is a folder")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ChessError(f"{what} file {path} is not UTF-8 text") from None
    if not text.strip():
        raise ChessError(f"{what} file {path} is empty")
    return text


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of a whole document (no length warning: we window it ourselves)."""
    from transformers.utils import logging

    previous = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return list(tokenizer.encode(text))
    finally:
        logging.set_verbosity(previous)


def token_sequences(tokenizer, text: str, n_tokens: int, seq_len: int, source: str = "text") -> mx.array:
    """The first ``n_tokens`` tokens of ``text`` as a (n_tokens // seq_len, seq_len) array."""
    if n_tokens <= 0:
        raise ChessError("the number of calibration tokens must be positive")
    seq_len = min(seq_len, n_tokens)
    ids = encode(tokenizer, text)
    if len(ids) < n_tokens:
        raise ChessError(f"{source} has only {len(ids)} tokens, fewer than the {n_tokens} needed")
    n_seq = n_tokens // seq_len
    return mx.array(ids[: n_seq * seq_len]).reshape(n_seq, seq_len)
