"""Compare mode: one prompt answered by the dense model and by a sparse method, one after the other.

Both sides are ``ChatSession``s over the *same* weights (each puts its own method in place before
it generates) with their own history and KV cache. Decoding is greedy, so the first token where
the two replies differ says how soon sparsification changed the model's choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

from . import methods as M
from .chat_session import ChatSession, Reply, Turn
from .errors import ChessError
from .generate import Step

SIDES = ("dense", "sparse")


@dataclass
class Comparison:
    dense: Reply
    sparse: Reply

    @property
    def speed_ratio(self) -> Optional[float]:
        """Sparse tokens/s over dense tokens/s (decode only)."""
        d, s = self.dense.last, self.sparse.last
        if d is None or s is None or d.generation_tps <= 0:
            return None
        return s.generation_tps / d.generation_tps

    @property
    def divergence(self) -> Optional[int]:
        """0-based index of the first generated token that differs, None if the replies agree.
        A reply that is a strict prefix of the other diverges where it ends, unless it was stopped."""
        a, b = self.dense.tokens, self.sparse.tokens
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return i
        if len(a) != len(b) and not (self.dense.stopped or self.sparse.stopped):
            return min(len(a), len(b))
        return None

    def summary(self) -> str:
        """The final line compare mode shows (and saves)."""
        r = self.speed_ratio
        speed = "speed n/a" if r is None else (
            f"{self.sparse.label} runs at {r:.2f}x dense tokens/s "
            f"({self.sparse.last.generation_tps:.1f} vs {self.dense.last.generation_tps:.1f})")
        k = self.divergence
        n = min(len(self.dense.tokens), len(self.sparse.tokens))
        same = (f"greedy outputs identical over {n} tokens" if k is None
                else f"greedy outputs diverge at token {k + 1}")
        return f"{speed} · {same}"


class CompareSession:
    """Two sessions on one model: dense and ``method`` at ``sparsity``."""

    def __init__(self, base: ChatSession, method: Optional[str] = None, sparsity: Optional[float] = None):
        if base.thresholds is None:
            raise ChessError("compare mode needs calibrated thresholds; this model folder has none")
        method = method or (base.method if base.method != M.DENSE else M.CHESS)
        if method == M.DENSE:
            raise ChessError("compare mode compares dense with a sparse method; pick one of "
                             + ", ".join(M.SPARSE_METHODS))
        sparsity = sparsity if sparsity is not None else base.sparsity
        kw = dict(system_prompt=base.system_prompt, context_limit=base.context_limit)
        self.dense = ChatSession(base.model, base.tokenizer, base.thresholds, M.DENSE, **kw)
        self.sparse = ChatSession(base.model, base.tokenizer, base.thresholds, method, sparsity, **kw)
        self.turns: list[Turn] = []
        self.last: Optional[Comparison] = None
        self._stopped = False

    @property
    def sessions(self) -> dict[str, ChatSession]:
        return {"dense": self.dense, "sparse": self.sparse}

    @property
    def system_prompt(self) -> str:
        return self.dense.system_prompt

    @system_prompt.setter
    def system_prompt(self, text: str) -> None:
        self.dense.system_prompt = self.sparse.system_prompt = text

    def reply(self, text: str, max_tokens: int = 256) -> Iterator[tuple[str, Step, Reply]]:
        """Stream dense then sparse greedy replies: yields (side, step, reply so far)."""
        if not text.strip():
            raise ChessError("the prompt is empty")
        self._stopped = False
        replies: dict[str, Reply] = {}
        for side in SIDES:
            if self._stopped:
                break
            for step, reply in self.sessions[side].reply(text, max_tokens=max_tokens):
                replies[side] = reply
                yield side, step, reply
        if len(replies) == 2:
            self.last = Comparison(replies["dense"], replies["sparse"])
            self.turns.append(Turn(text, [replies["dense"], replies["sparse"]], self.last.summary()))
        else:
            self.last = None
            self.turns.append(Turn(text, list(replies.values()), "stopped before both sides answered"))

    def stop(self) -> None:
        self._stopped = True
        self.dense.stop()
        self.sparse.stop()

    def clear(self) -> None:
        self.dense.clear()
        self.sparse.clear()
        self.turns, self.last = [], None
