"""Sampling settings shared by ``chat`` (command line and UI): checked once, turned into a sampler.

Temperature 0 means greedy decoding, which is what compare mode uses so that dense and sparse
replies can be compared token by token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ChessError


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 512

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0.0):
            raise ChessError(f"temperature must be a finite number >= 0, not {self.temperature:g}")
        if not (0.0 < self.top_p <= 1.0):
            raise ChessError(f"top-p must be in (0, 1], not {self.top_p:g}")
        if self.max_tokens <= 0:
            raise ChessError(f"max tokens must be positive, not {self.max_tokens}")

    @classmethod
    def parse(cls, temperature: str, top_p: str, max_tokens: str) -> "Sampling":
        """From the text of three form fields; a clear ChessError names the bad field."""
        def num(kind, text, name):
            try:
                return kind(str(text).strip())
            except ValueError:
                raise ChessError(f"{name} {text!r} is not a{'n integer' if kind is int else ' number'}") from None

        return cls(num(float, temperature, "temperature"), num(float, top_p, "top-p"),
                   num(int, max_tokens, "max tokens"))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def sampler(self):
        """mlx-lm's sampler for these settings (None = its default argmax)."""
        if self.greedy:
            return None
        from mlx_lm.sample_utils import make_sampler

        return make_sampler(self.temperature, self.top_p)

    def describe(self) -> str:
        mode = "greedy" if self.greedy else f"temp {self.temperature:g}, top-p {self.top_p:g}"
        return f"{mode}, max {self.max_tokens} tokens"
