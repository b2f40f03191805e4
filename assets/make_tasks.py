"""Build assets/tasks/devils_definitions.jsonl from the held-out text (deterministic, seed 0).

A zero-shot multiple-choice task made by the project from public-domain text: for an entry of
The Devil's Dictionary (held-out half, M-Z), pick its first definition sentence among four, the
other three being first sentences of other entries. It is *not* one of the paper's eight tasks;
it exists so that accuracy can be measured offline on the shipped model.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

HERE = Path(__file__).parent
N_ITEMS = 120


def entries(text: str) -> list[tuple[str, str]]:
    out = []
    for block in re.split(r"\n\s*\n", text):
        m = re.match(r"([A-Z][A-Z' -]+), ([a-z.]+)\s+(.*)", block.strip().replace("\n", " "), re.S)
        if not m:
            continue
        first = re.split(r"(?<=[.!?])\s", m.group(3).strip())[0].strip()
        if 20 <= len(first) <= 140 and "_" not in first and "{" not in first:
            out.append((m.group(1).strip().capitalize(), first))
    return out


def main() -> None:
    rng = random.Random(0)
    pool = entries((HERE / "text" / "heldout.txt").read_text())
    chosen = rng.sample(pool, N_ITEMS)
    lines = []
    for word, definition in chosen:
        others = rng.sample([d for w, d in pool if w != word], 3)
        choices = others + [definition]
        rng.shuffle(choices)
        lines.append(json.dumps({"context": f"In The Devil's Dictionary, the entry \"{word}\" reads:",
                                 "choices": [" " + c for c in choices], "gold": choices.index(definition)}))
    (HERE / "tasks" / "devils_definitions.jsonl").write_text("\n".join(lines) + "\n")
    print(f"{len(lines)} items from {len(pool)} usable entries")


if __name__ == "__main__":
    main()
