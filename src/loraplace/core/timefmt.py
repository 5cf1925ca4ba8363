"""Durations as the study's lines and `loraplace status` print them.

duration(62.5)   # '1m02s'
duration(3725)   # '1h02m'
duration(None)   # '-'
"""

from __future__ import annotations


def duration(seconds: float | None) -> str:
    """42s, 3m05s, 1h02m; '-' where unknown."""
    if seconds is None:
        return "-"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"
