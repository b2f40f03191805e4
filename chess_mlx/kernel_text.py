"""The kernel text handed to MLX: comments out, and only the shared helpers a kernel uses.

Why: MLX's CUDA backend keys a custom kernel's compiled module by a hash of its whole source,
computed again at every launch while it encodes the graph (``CustomKernel::eval_gpu``), and the
Metal backend compares the whole source with the cached one at every launch. With the commented
shared header (~24 KB) every sparse launch hashed ~27 KB: py-spy put ``std::_Hash_bytes`` under
``CustomKernel::eval_gpu`` at 8-13% of the encoder thread's samples in a 4-bit decode
(benchmarks/RESULTS.md, session 18). Decode is bound by that host work, so the text is cut here.
The sources on disk stay as written (commented, one shared header per backend).

Shared helpers follow a naming rule that makes their uses visible to a plain scan: every
top-level item of ``common.cuh`` / ``common.metal`` defines a ``chess_*`` function or a ``Chess*``
struct. Items that define no such name are always kept.
"""

from __future__ import annotations

import re

_HELPER = re.compile(r"\b(?:chess_\w+|Chess\w+)\b")


def strip_comments(src: str) -> str:
    """``src`` without // and /* */ comments (the kernel sources hold no string literals)."""
    src = re.sub(r"/\*.*?\*/", "", src, flags=re.S)
    return re.sub(r"//[^\n]*", "", src)


def compact(src: str) -> str:
    """Comments, indentation and blank lines removed; one statement layout per line kept, so
    preprocessor lines stay lines of their own."""
    lines = (re.sub(r"[ \t]+", " ", line).strip() for line in strip_comments(src).splitlines())
    return "\n".join(line for line in lines if line) + "\n"


def header_items(header: str) -> list[str]:
    """The top-level items of a (comment-free) header, in order: declarations, definitions,
    preprocessor lines. An item ends at a ``;`` or a closing ``}`` (with its ``;``) at brace
    depth 0."""
    items: list[str] = []
    cur: list[str] = []
    depth = 0
    for line in strip_comments(header).splitlines(keepends=True):
        if depth == 0 and not "".join(cur).strip() and line.lstrip().startswith("#"):
            items.append(line)
            cur = []
            continue
        for i, ch in enumerate(line):
            cur.append(ch)
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth < 0:
                    raise ValueError("unbalanced braces in a kernel header")
                if depth == 0 and not line[i + 1:].strip().startswith(";"):
                    items.append("".join(cur))
                    cur = []
            elif ch == ";" and depth == 0:
                items.append("".join(cur))
                cur = []
    rest = "".join(cur)
    if depth != 0:
        raise ValueError("unbalanced braces in a kernel header")
    if rest.strip():
        items.append(rest)
    return [it for it in items if it.strip()]


def defined_name(item: str) -> str | None:
    """The helper an item defines: the first ``chess_*`` / ``Chess*`` name in it."""
    m = _HELPER.search(item)
    return m.group(0) if m else None


def used_helpers(text: str) -> set[str]:
    return set(_HELPER.findall(text))


def helpers_for(header: str, body: str) -> str:
    """The items of ``header`` that ``body`` needs, directly or through other helpers, in their
    header order (every specialisation and declaration of a needed name comes along)."""
    items = header_items(header)
    names = [defined_name(it) for it in items]
    need = used_helpers(body)
    while True:
        more = set().union(*(used_helpers(it) for it, n in zip(items, names) if n in need)) - need
        if not more:
            break
        need |= more
    return "".join(it for it, n in zip(items, names) if n is None or n in need)


def launch_text(header: str, body: str) -> tuple[str, str]:
    """(header, body) as handed to MLX: the helpers ``body`` uses, both compacted."""
    return compact(helpers_for(header, body)), compact(body)
