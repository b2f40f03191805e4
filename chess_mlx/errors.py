"""One exception type for every problem the user can fix.

The CLI turns a ``ChessError`` into a single line on stderr and exit code 2; anything else is a bug
and keeps its traceback.
"""


class ChessError(Exception):
    """A user-facing error: bad input, missing files, mismatched thresholds."""
