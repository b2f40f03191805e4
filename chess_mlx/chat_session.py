"""A multi-turn chat over one model: history, KV-cache reuse, method switching, stop.

The UI (``app/``) and ``chess-mlx chat --prompt`` both drive this class; neither computes
anything itself. The KV cache is kept between turns: before each reply the chat template is
applied to the whole history, and only the tokens after the longest common prefix with what the
cache already holds are fed (the cache is trimmed back to that prefix first).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterator, Optional

import mlx.nn as nn

from . import methods as M
from .device_limits import context_length
from .errors import ChessError
from .generate import Step, stream
from .sparse_layers import ensure_method, set_method, sparsify
from .stats import CallStats, TokenStats, merge, summarize


@dataclass
class Reply:
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    last: Optional[Step] = None
    stopped: bool = False
    notice: Optional[str] = None  # e.g. the prompt had to be truncated
    context_tokens: int = 0  # prompt tokens of this turn (whole history), before the reply
    label: str = ""  # method @ level that produced it
    mean: Optional[TokenStats] = None  # token-weighted over the whole reply, set when it ends


@dataclass
class Turn:
    """One user message and the answer(s) it got (two in compare mode), kept for saving."""

    user: str
    answers: list[Reply] = field(default_factory=list)
    note: str = ""  # e.g. compare mode's speed ratio and divergence


class ChatSession:
    def __init__(self, model: nn.Module, tokenizer, thresholds=None, method: str = M.DENSE,
                 sparsity: Optional[float] = None, system_prompt: str = "", context_limit: Optional[int] = None):
        self.model, self.tokenizer, self.thresholds = model, tokenizer, thresholds
        self.system_prompt = system_prompt
        self.messages: list[dict] = []
        self.context_limit = context_limit or context_length(model) or 4096
        self.stop_event = threading.Event()
        self.last_fed = 0  # tokens fed to the model for the last reply (after cache reuse)
        self.turns: list[Turn] = []
        self._cache = None
        self._cached: list[int] = []
        sparsify(model)
        self.method, self.sparsity = M.DENSE, None
        self.set_method(method, sparsity)

    # -- methods ------------------------------------------------------------------------------
    def methods(self) -> list[str]:
        return list(M.METHODS) if self.thresholds is not None else [M.DENSE]

    def levels(self) -> list[float]:
        return self.thresholds.sparsities if self.thresholds is not None else []

    def set_method(self, method: str, sparsity: Optional[float] = None) -> None:
        """Switch method/level (no weight reload). The KV cache was computed under the old
        method, so it is dropped."""
        M.check_method(method)
        if method != M.DENSE and self.thresholds is None:
            raise ChessError(f"method {method!r} needs calibrated thresholds; this model folder has none")
        if method != M.DENSE and sparsity is None:
            levels = self.levels()
            sparsity = self.sparsity if self.sparsity in levels else (0.5 if 0.5 in levels else levels[0])
        state = set_method(self.model, method, self.thresholds, sparsity)
        self.method, self.sparsity = method, state.sparsity
        self.reset_cache()

    # -- history ------------------------------------------------------------------------------
    def reset_cache(self) -> None:
        self._cache, self._cached = None, []

    def clear(self) -> None:
        self.messages, self.turns = [], []
        self.reset_cache()

    @property
    def label(self) -> str:
        return M.label(self.method, self.sparsity)

    def _template(self, messages: list[dict]) -> list[int]:
        msgs = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + messages
        if getattr(self.tokenizer, "chat_template", None):
            return list(self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True))
        text = "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:"
        return list(self.tokenizer.encode(text))

    def _fit(self, max_tokens: int) -> tuple[list[int], Optional[str]]:
        """Prompt tokens for the current history, dropping old turns (and finally the head of the
        last user message) so that prompt + reply fit the context. The reply's room is at most
        half the context: a max-tokens setting near or past the context length used to leave the
        prompt 16 tokens, dropping the whole conversation at every message; the reply is cut at
        the context's end instead (``reply``)."""
        budget = max(16, self.context_limit - min(max_tokens, self.context_limit // 2))
        notice = None
        while True:
            ids = self._template(self.messages)
            if len(ids) <= budget:
                return ids, notice
            if len(self.messages) > 1:
                self.messages = self.messages[2:] if len(self.messages) > 2 else self.messages[1:]
                notice = "older turns were dropped to fit the context"
                continue
            content = self.messages[-1]["content"]
            ids_c = list(self.tokenizer.encode(content))
            keep = max(1, len(ids_c) - (len(ids) - budget))
            self.messages[-1] = dict(self.messages[-1], content=self.tokenizer.decode(ids_c[-keep:]))
            notice = f"the prompt was truncated to its last {keep} tokens to fit the context"
            if keep == 1:
                return self._template(self.messages)[-budget:], notice

    # -- replies ------------------------------------------------------------------------------
    def reply(self, user_text: Optional[str], max_tokens: int = 256, sampler=None) -> Iterator[tuple[Step, Reply]]:
        """Stream the reply to ``user_text`` (None: regenerate the last reply). Yields (step, reply so far)."""
        from mlx_lm.models.cache import trim_prompt_cache

        from .kv_cache import make_cache

        if user_text is None:
            if not self.messages or self.messages[-1]["role"] != "assistant":
                raise ChessError("there is no reply to regenerate")
            self.messages.pop()
            turn = self.turns[-1] if self.turns else Turn(self.messages[-1]["content"])
        else:
            if not user_text.strip():
                raise ChessError("the prompt is empty")
            self.messages.append({"role": "user", "content": user_text})
            turn = Turn(user_text)
        # Several sessions may share one model (compare mode): put this session's method in place.
        state = ensure_method(self.model, self.method, self.thresholds, self.sparsity)
        full, notice = self._fit(max_tokens)
        room = max(1, self.context_limit - len(full))
        if room < max_tokens:  # the setting passes the context: the reply ends where the context does
            max_tokens = room
            cut = f"the reply can use {room} tokens before the model's context of {self.context_limit} ends"
            notice = f"{notice}; {cut}" if notice else cut
        if self._cache is None:
            self._cache, self._cached = make_cache(self.model), []
        common = 0
        for a, b in zip(self._cached, full[:-1]):  # always feed at least the last prompt token
            if a != b:
                break
            common += 1
        if common < len(self._cached):
            trim_prompt_cache(self._cache, len(self._cached) - common)
        fed = full[common:]
        self.last_fed = len(fed)
        self.stop_event.clear()
        out = Reply(notice=notice, context_tokens=len(full), label=self.label)
        turn.answers = [out]
        if not self.turns or self.turns[-1] is not turn:
            self.turns.append(turn)
        calls: list[CallStats] = []
        steps = stream(self.model, self.tokenizer, fed, max_tokens=max_tokens, sampler=sampler,
                       prompt_cache=self._cache)
        try:
            for step in steps:
                if step.finish_reason != "stop":
                    out.tokens.append(step.token)
                out.text += step.text
                out.last = step
                calls.append(CallStats(step.stats.density, 1))
                yield step, out
                if self.stop_event.is_set():
                    out.stopped = True
                    break
        except Exception:
            # A failed evaluation (the device out of memory) leaves the cache holding lazy arrays
            # and an offset past what was computed: the next reply starts from an empty cache
            # (the finally below then records nothing as cached) and re-reads the whole history.
            self._cache = None
            raise
        finally:
            steps.close()
            if calls:
                out.mean = summarize(merge(calls), state.weight_bytes)
            self.messages.append({"role": "assistant", "content": out.text})
            known = full + out.tokens
            offset = self._cache[0].offset if self._cache else 0
            if offset > len(known):  # a token computed ahead that nobody saw
                trim_prompt_cache(self._cache, offset - len(known))
                offset = len(known)
            self._cached = known[:offset]

    def stop(self) -> None:
        self.stop_event.set()
