"""Save a conversation, with the statistics of every reply, as Markdown."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable, Optional

from .chat_session import Reply, Turn
from .errors import ChessError


def reply_stats(r: Reply) -> str:
    """One line of what a reply cost: speed, sparsity over the whole reply, bytes per token."""
    if r.last is None:
        return "no tokens"
    s = r.mean if r.mean is not None else r.last.stats
    parts = [
        f"{r.last.generation_tokens} tokens",
        f"{r.last.generation_tps:.1f} tok/s",
        f"TTFT {r.last.ttft:.2f} s",
        *([f"setup {r.last.setup_s:.2f} s (once)"] if r.last.setup_s > 0 else []),
        f"prompt {r.last.prompt_tps:.1f} tok/s",
        f"FFN sparsity {s.ffn_sparsity:.1%}",
        f"attn sparsity {s.attn_sparsity:.1%}",
        f"weights/token {s.bytes_fraction:.1%} of dense",
        f"peak mem {r.last.peak_memory_gb:.2f} GB",
    ]
    if r.stopped:
        parts.append("stopped")
    return " · ".join(parts)


def to_markdown(turns: Iterable[Turn], system_prompt: str = "", model: str = "",
                sampling: str = "", when: Optional[float] = None) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when if when is not None else time.time()))
    out = ["# chess-mlx chat", ""]
    if model:
        out.append(f"- model: `{model}`")
    out.append(f"- saved: {stamp}")
    if sampling:
        out.append(f"- sampling: {sampling}")
    if system_prompt:
        out += ["", "## System prompt", "", system_prompt]
    for i, t in enumerate(turns, 1):
        out += ["", f"## Turn {i}", "", "### You", "", t.user]
        for r in t.answers:
            out += ["", f"### Assistant ({r.label or 'dense'})", "", r.text.strip() or "*(empty)*", "",
                    f"> {reply_stats(r)}"]
            if r.notice:
                out.append(f"> note: {r.notice}")
        if t.note:
            out += ["", f"**{t.note}**"]
    return "\n".join(out) + "\n"


def save(text: str, folder: Path, stem: str = "chess-mlx-chat") -> Path:
    """Write ``text`` to a new time-stamped file in ``folder``; never overwrites."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ChessError(f"cannot save: {folder} is not a folder")
    base = time.strftime(f"{stem}-%Y%m%d-%H%M%S")
    path, n = folder / f"{base}.md", 1
    while path.exists():
        n += 1
        path = folder / f"{base}-{n}.md"
    try:
        path.write_text(text)
    except OSError as e:
        raise ChessError(f"cannot save to {path}: {e.strerror}") from None
    return path
