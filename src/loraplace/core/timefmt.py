"""Durations as the study's log lines print them.

duration(62.5)   # '1m02s'
"""

from __future__ import annotations


def duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"
