"""Zero-shot multiple-choice tasks, scored by log-likelihood as lm-evaluation-harness does.

Task file format (JSONL, one item per line; a folder of ``*.jsonl`` files is one task per file):

    {"context": "Question: ...\\nAnswer:", "choices": [" first", " second"], "gold": 0}

``choices`` are continuations of ``context`` (include the leading space, as lm-eval does).
For every item the scorer computes ``ll_i = log P(choice_i | context)`` (sum over the choice's
tokens) and reports

* ``acc``: the item counts when ``argmax ll_i`` is ``gold``;
* ``acc_norm``: the same with ``ll_i / len(choice_i in UTF-8 bytes)`` (lm-eval's byte-length
  normalisation).

Malformed lines are reported as ``file:line: reason`` and skipped (or refused with ``strict``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import ChessError


@dataclass
class Item:
    context: str
    choices: list[str]
    gold: int


@dataclass
class Task:
    name: str
    items: list[Item]
    skipped: list[str] = field(default_factory=list)  # "file:line: reason"


def _parse_line(line: str) -> Item:
    obj = json.loads(line)
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    ctx, choices, gold = obj.get("context"), obj.get("choices"), obj.get("gold")
    if not isinstance(ctx, str):
        raise ValueError("'context' must be a string")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise ValueError("'choices' must be a list of at least two non-empty strings")
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
        raise ValueError("'gold' must be an index into 'choices'")
    return Item(ctx, choices, gold)


def load_task(path: Path, strict: bool = False, limit: Optional[int] = None) -> Task:
    items, skipped = [], []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ChessError(f"task file {path} is not UTF-8 text") from None
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            items.append(_parse_line(line))
        except (ValueError, json.JSONDecodeError) as e:
            where = f"{path}:{no}: {str(e).splitlines()[0]}"
            if strict:
                raise ChessError(f"malformed task line {where}") from None
            skipped.append(where)
        if limit and len(items) >= limit:
            break
    if not items:
        raise ChessError(f"task file {path} holds no valid items")
    return Task(Path(path).stem, items, skipped)


def load_tasks(path: Path, strict: bool = False, limit: Optional[int] = None) -> list[Task]:
    path = Path(path)
    if not path.exists():
        raise ChessError(f"task path {path} does not exist")
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not files:
        raise ChessError(f"no *.jsonl task files in {path}")
    return [load_task(f, strict, limit) for f in files]


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def choice_loglikelihoods(model: nn.Module, tokenizer, item: Item) -> np.ndarray:
    """log P(choice | context) for every choice, in one padded batch."""
    ctx = _encode(tokenizer, item.context)
    bos = getattr(tokenizer, "bos_token_id", None)
    if not ctx:  # an empty context still needs one conditioning token
        ctx = [bos if bos is not None else tokenizer.eos_token_id]
    seqs, spans = [], []
    for ch in item.choices:
        whole = _encode(tokenizer, item.context + ch)
        # continuation = the tokens after the context's tokens (tokenizers may merge across the
        # boundary; then fall back to encoding the choice alone)
        cont = whole[len(ctx):] if whole[: len(ctx)] == ctx and len(whole) > len(ctx) else _encode(tokenizer, ch)
        seqs.append(ctx + cont)
        spans.append((len(ctx), len(ctx) + len(cont)))
    width = max(len(s) for s in seqs)
    batch = mx.array([s + [0] * (width - len(s)) for s in seqs])
    logits = model(batch[:, :-1]).astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    tgt = batch[:, 1:]
    picked = np.array(mx.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0])
    return np.array([picked[i, a - 1 : b - 1].sum() for i, (a, b) in enumerate(spans)], dtype=np.float64)


@dataclass
class TaskScore:
    task: str
    n: int
    acc: float
    acc_norm: float
    skipped: int


def score_task(model: nn.Module, tokenizer, task: Task,
               progress: Optional[Callable[[int, int], None]] = None) -> TaskScore:
    hits = hits_norm = 0
    for k, item in enumerate(task.items):
        ll = choice_loglikelihoods(model, tokenizer, item)
        lens = np.array([max(1, len(c.encode("utf-8"))) for c in item.choices], dtype=np.float64)
        hits += int(np.argmax(ll) == item.gold)
        hits_norm += int(np.argmax(ll / lens) == item.gold)
        if progress is not None:
            progress(k + 1, len(task.items))
    n = len(task.items)
    return TaskScore(task.name, n, hits / n, hits_norm / n, len(task.skipped))


# ------------------------------------------------------------------ lm-evaluation-harness data --
def _letter_gold(key: str, labels: list[str]) -> int:
    return labels.index(key) if key in labels else int(key) - 1


def _from_lmeval(kind: str, row: dict) -> Item:
    """One row of the public dataset (as the Hugging Face datasets store it) -> an Item, formatted
    the way lm-evaluation-harness formats that task."""
    if kind in ("arc_easy", "arc_challenge"):
        labels = row["choices"]["label"]
        return Item(f"Question: {row['question']}\nAnswer:", [" " + t for t in row["choices"]["text"]],
                    _letter_gold(row["answerKey"], labels))
    if kind == "hellaswag":
        ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
        return Item(f"{row['activity_label']}: {ctx}", [" " + e for e in row["endings"]], int(row["label"]))
    if kind == "piqa":
        return Item(f"Question: {row['goal']}\nAnswer:", [" " + row["sol1"], " " + row["sol2"]], int(row["label"]))
    if kind == "boolq":
        return Item(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", [" no", " yes"], int(bool(row["label"])))
    if kind == "openbookqa":
        labels = row["choices"]["label"]
        return Item(row["question_stem"], [" " + t for t in row["choices"]["text"]], _letter_gold(row["answerKey"], labels))
    if kind == "sciq":
        choices = [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]]
        return Item(f"{row['support'].strip()}\nQuestion: {row['question']}\nAnswer:", [" " + c for c in choices], 3)
    if kind == "winogrande":
        # lm-eval scores the sentence tail given each filled-in option; as a plain multiple choice
        # we keep the shared prefix as context and the option + tail as choices.
        pre, post = row["sentence"].split("_", 1)
        return Item(pre.rstrip(), [" " + row["option1"] + post, " " + row["option2"] + post], int(row["answer"]) - 1)
    raise ChessError(f"unknown task kind {kind!r}; known: {', '.join(LMEVAL_KINDS)}")


LMEVAL_KINDS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "boolq", "openbookqa", "sciq", "winogrande")


def convert_lmeval(kind: str, rows: Iterable[dict]) -> list[dict]:
    """Rows of a public task (JSON objects with the dataset's own fields) -> chess-mlx task lines."""
    if kind not in LMEVAL_KINDS:
        raise ChessError(f"unknown task kind {kind!r}; known: {', '.join(LMEVAL_KINDS)}")
    out = []
    for row in rows:
        it = _from_lmeval(kind, row)
        out.append({"context": it.context, "choices": it.choices, "gold": it.gold})
    return out
