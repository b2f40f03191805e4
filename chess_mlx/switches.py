"""Process-wide on/off switches with an environment default, for paths that have a fallback.

Each optional decode path (compiled paths, two-thread decode, fused attention) can be switched off
from the environment for debugging, and on and off at run time by benchmarks and tests that
compare both in one process.
"""

from __future__ import annotations

import os
from typing import Callable


def env_switch(var: str, what: str) -> tuple[Callable[[], bool], Callable[[bool], None]]:
    """``(enabled, enable)`` for a switch that is on unless the environment sets ``var=0``."""
    state = [os.environ.get(var, "1") != "0"]

    def enabled() -> bool:
        return state[0]

    def enable(on: bool = True) -> None:
        state[0] = bool(on)

    enabled.__doc__ = f"Whether {what} is on ({var}=0 switches it off)."
    enable.__doc__ = f"Switch {what} on or off."
    return enabled, enable
