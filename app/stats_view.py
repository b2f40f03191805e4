"""Text of the stats panels. It formats what the library reports (``Step``/``Reply``); it never
computes a statistic itself."""

from __future__ import annotations

from typing import Optional

from chess_mlx.chat_session import Reply
from chess_mlx.generate import Step


def stats_text(label: str, step: Optional[Step], reply: Optional[Reply], context_limit: int,
               compact: bool = False) -> str:
    lines = [f"[b]{label}[/b]"]
    if step is None:
        return "\n".join(lines + ["", "(no reply yet)"])
    # While a reply streams, the sparsity shown is the latest token's; once it ends, the reply's mean.
    live = reply is None or reply.mean is None
    s = step.stats if live else reply.mean
    which = "(token)" if live else "(reply)"
    context = (reply.context_tokens if reply else 0) + step.generation_tokens
    lines += [
        "",
        f"tokens/s        {step.generation_tps:8.1f}",
        f"TTFT            {step.ttft:8.2f} s",
        *([f"setup (once)    {step.setup_s:8.2f} s"] if step.setup_s > 0 else []),
        f"prompt tok/s    {step.prompt_tps:8.1f}",
        f"generated       {step.generation_tokens:8d}",
        f"context         {context:8d} / {context_limit}",
        "",
        f"FFN sparsity    {s.ffn_sparsity:8.1%} {which}",
        f"attn sparsity   {s.attn_sparsity:8.1%} {which}",
        f"weights/token   {s.bytes_fraction:8.1%} of dense",
    ]
    if compact:
        return "\n".join(lines)
    lines += [
        f"  ({s.bytes_read / 1e6:.1f} / {s.bytes_dense / 1e6:.1f} MB)",
        "",
        f"MLX active mem  {step.active_memory_gb:8.2f} GB",
        f"MLX peak mem    {step.peak_memory_gb:8.2f} GB",
    ]
    if reply is not None and reply.notice:
        lines += ["", f"[yellow]{reply.notice}[/yellow]"]
    return "\n".join(lines)
