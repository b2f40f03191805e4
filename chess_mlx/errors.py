"""One exception type for every problem the user can fix.

The CLI turns a ``ChessError`` into a single line on stderr and exit code 2, and the device
running out of memory (``out_of_memory``) into one line and exit code 3; anything else is a bug
and keeps its traceback.
"""


class ChessError(Exception):
    """A user-facing error: bad input, missing files, mismatched thresholds."""


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is the device running out of memory: not a bug, but nothing the input can fix
    either. MLX raises a RuntimeError from its allocator (``cudaMallocAsync ... out of memory`` on
    CUDA, ``[metal::malloc] ...`` on Metal)."""
    if isinstance(e, MemoryError):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "[metal::malloc]" in text
                                            or "insufficient memory" in text)
