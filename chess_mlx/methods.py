"""The sparsification methods and which calibrated thresholds each one uses.

One table, read by the sparse layers, the CLI and the UI, so a method means the same thing
everywhere.
"""

from __future__ import annotations

DENSE, CATS, CHESS, CHESS_ATTN, TEAL = "dense", "cats", "chess", "chess-attn", "teal"
METHODS = (DENSE, CATS, CHESS, CHESS_ATTN, TEAL)
SPARSE_METHODS = METHODS[1:]

# The seven linear projections of a Llama-style block, in the order statistics are reported.
PROJS = ("q", "k", "v", "o", "gate", "up", "down")
ATTN_PROJS = PROJS[:4]
MLP_PROJS = PROJS[4:]

DESCRIPTIONS = {
    DENSE: "unchanged model",
    CATS: "FFN: one threshold per layer on |SiLU(gate(x))|",
    CHESS: "FFN: one threshold per channel, t_i = tau / E|up_i|",
    CHESS_ATTN: "CHESS FFN + thresholded inputs of q_proj and o_proj",
    TEAL: "thresholded inputs of every projection (q,k,v,o,gate,up,down)",
}


def check_method(name: str) -> str:
    from .errors import ChessError

    if name not in METHODS:
        raise ChessError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return name


def parse_methods(text: str, extra: tuple[str, ...] = ()) -> list[str]:
    """'dense, chess' -> ['dense', 'chess'], each checked, each once; an empty list is refused (an
    eval of no method would print an empty table and succeed). ``extra``: names a caller accepts
    besides the methods (bench's 'mlx-lm')."""
    from .errors import ChessError

    parts = (m.strip() for m in text.split(","))
    names = list(dict.fromkeys(m if m in extra else check_method(m) for m in parts if m))
    if not names:
        raise ChessError(f"no method given in {text!r}; choose from: {', '.join((*extra, *METHODS))}")
    return names


def check_sparsity(value: float) -> float:
    from .errors import ChessError

    if not (0.0 <= value <= 0.99):
        raise ChessError(f"sparsity {value:g} is outside [0, 0.99]")
    return value


def parse_sparsity(text: str | float) -> float:
    """One sparsity level from the command line, checked against [0, 0.99]."""
    values = parse_sparsities(text)
    if len(values) != 1:
        from .errors import ChessError

        raise ChessError(f"give one sparsity level here, not {text!r}")
    return values[0]


def parse_sparsities(text: str) -> list[float]:
    """'0.3,0.5' -> [0.3, 0.5], each checked against [0, 0.99]."""
    from .errors import ChessError

    try:
        values = [float(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise ChessError(f"sparsity {text!r} is not a number or comma-separated list") from None
    if not values:
        raise ChessError("no sparsity given")
    return sorted({check_sparsity(v) for v in values})


def level_key(sparsity: float) -> str:
    """Canonical name of a sparsity level inside threshold files ('0.5' for 0.50)."""
    return f"{round(sparsity, 4):g}"


def label(method: str, sparsity: float | None) -> str:
    """How a method at a level is named to people: 'chess @ 0.5', 'dense'."""
    return method if method == DENSE or sparsity is None else f"{method} @ {sparsity:g}"
