"""rank_pattern / alpha_pattern keys matched against module names exactly as PEFT does, in bounded time.

PEFT (>= 0.15) selects a key with `re.match(rf"(.*\\.)?({key})$", name)`. A key that backtracks
catastrophically makes that take hours, so keys that can are matched with the `regex` module instead, which
reads them the same way but takes a timeout.
"""

from __future__ import annotations

import functools
import re
import time
from typing import Any

import regex

# matching time one rank/alpha_pattern key may use over a whole plan before the adapter is refused
PATTERN_SECONDS = 2.0


class PatternTimeout(Exception):
    """A pattern key could not be matched in the time allowed."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def pattern_key(patterns: dict[str, Any], name: str, spent: dict[str, float] | None = None) -> str | None:
    """The first pattern key matching `name` as PEFT >= 0.15 does (`(.*\\.)?(key)$`), or None.

    Keys whose matching time can explode (catastrophic backtracking) are matched with the `regex` module, which
    reads them the same way but can stop: each such key gets PATTERN_SECONDS in all (tracked in `spent`), after
    which PatternTimeout is raised instead of hanging.
    """
    for key in patterns:
        full = rf"(.*\.)?({key})$"
        if not _may_backtrack(key):
            if re.match(full, name):
                return key
            continue
        spent = {} if spent is None else spent
        started = time.perf_counter()
        try:
            if regex.match(full, name, timeout=max(PATTERN_SECONDS - spent.get(key, 0.0), 1e-3)):
                return key
        except TimeoutError:
            raise PatternTimeout(key) from None
        finally:
            spent[key] = spent.get(key, 0.0) + time.perf_counter() - started
    return None


try:  # the parser of the re module (sre_parse before Python 3.11)
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover
    import sre_parse as _sre_parse  # type: ignore[no-redef]

_REPEATS = ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT")


@functools.lru_cache(maxsize=256)
def _may_backtrack(key: str) -> bool:
    """True for regexes whose matching time can grow exponentially or as a high power of the name's length: a
    repeat inside a repeat, alternatives inside a repeat, back-references, or two unbounded repeats."""
    try:
        tree = _sre_parse.parse(key)
    except Exception:  # noqa: BLE001 - let the matcher report it
        return True
    unbounded = 0

    def risky(items, repeated: bool) -> bool:
        nonlocal unbounded
        for op, av in items:
            kind = str(op)
            if kind in _REPEATS:
                _lo, hi, sub = av
                many = hi > 1
                if many and repeated:
                    return True
                unbounded += hi == _sre_parse.MAXREPEAT
                if risky(sub, repeated or many):
                    return True
            elif kind == "BRANCH":
                if repeated or any(risky(alt, repeated) for alt in av[1]):
                    return True
            elif kind == "SUBPATTERN":
                if risky(av[-1], repeated):
                    return True
            elif kind in ("ASSERT", "ASSERT_NOT"):
                if risky(av[1], repeated):
                    return True
            elif kind == "ATOMIC_GROUP":
                if risky(av, repeated):
                    return True
            elif kind in ("GROUPREF", "GROUPREF_EXISTS"):
                return True
        return False

    return risky(tree, False) or unbounded >= 2
