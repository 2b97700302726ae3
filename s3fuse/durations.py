"""Durations as the command line and the configuration file take them: a number of seconds
(30, 2.5), or a number with a unit: "45s", "30m", "12h", "90d", "2w".

One parser for both, so that an option means the same wherever it is given.
"""

from __future__ import annotations

import math
import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)?\s*$")
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
EXAMPLES = '"90d", "12h", "30m", "45s" or seconds'


class DurationError(ValueError):
    """Not a duration; the message says what was expected."""


def parse(value: str | int | float) -> float:
    """Seconds, 0 or more: from a number, or a string of digits with an optional unit."""
    if isinstance(value, bool):
        raise DurationError(f"must be a duration such as {EXAMPLES} (got {value!r})")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION.match(value)
        if not m:
            raise DurationError(f"must be a duration such as {EXAMPLES} (got {value!r})")
        seconds = float(m.group(1)) * UNIT_SECONDS[m.group(2) or "s"]
    else:
        raise DurationError(f"must be a duration such as {EXAMPLES} (got {type(value).__name__})")
    if not math.isfinite(seconds) or seconds < 0:
        raise DurationError(f"must be a duration such as {EXAMPLES} (got {value!r})")
    return seconds


def parse_positive(value: str | int | float) -> float:
    """As `parse`, but longer than zero."""
    seconds = parse(value)
    if seconds <= 0:
        raise DurationError(f"must be longer than zero (got {value!r})")
    return seconds


def parse_interval(value: str | int | float) -> float:
    """A schedule's interval: a duration longer than zero, or 0 / "never" for no schedule."""
    if value == "never":
        return 0.0
    try:
        return parse(value)
    except DurationError:
        raise DurationError(f'must be a duration such as {EXAMPLES}, or "never" (got {value!r})') from None
