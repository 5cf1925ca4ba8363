"""Errors a user can cause, and the one-sentence message they end in.

    raise UserError(f"unknown strategy {name!r}{did_you_mean(name, known)}")

The CLI catches `UserError` and prints its message on stderr with a non-zero exit; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A problem with the user's input, reported as one sentence without a traceback."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A ' (did you mean X?)' suffix for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def one_of(word: str, choices: Iterable[str]) -> str:
    """'; valid: a, b, c (did you mean b?)' for messages about an unknown name."""
    choices = list(choices)
    return f"; valid: {', '.join(choices)}{did_you_mean(word, choices)}"
