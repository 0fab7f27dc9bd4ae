"""rank_pattern / alpha_pattern keys matched against module names exactly as PEFT does, in bounded time.

PEFT (>= 0.15) selects a key with `re.match(rf"(.*\\.)?({key})$", name)`. A key that backtracks catastrophically
makes that take hours, and `re` cannot be interrupted, so keys that can (a repeat inside a repeat, alternatives
inside a repeat, back-references, several unbounded repeats) are matched by `re` in a child interpreter that is
killed when the key's time is up. Names are sent in batches (`PatternMatcher.prime`), so the child starts once
per such key, not once per module.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any

# matching time one rank/alpha_pattern key may use over a whole plan before the adapter is refused
PATTERN_SECONDS = 2.0

# the child: the same `re` as PEFT's, nothing else imported (-I -S: no site, no user paths)
_CHILD = (
    "import json, re, sys\n"
    "job = json.load(sys.stdin)\n"
    "rx = re.compile(job['pattern'])\n"
    "json.dump([rx.match(n) is not None for n in job['names']], sys.stdout)\n"
)


class PatternTimeout(Exception):
    """A pattern key could not be matched in the time allowed."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


class PatternMatcher:
    """PEFT's pattern rule with a time bound per slow key; results for slow keys are cached per name."""

    def __init__(self, seconds: float = PATTERN_SECONDS) -> None:
        self.seconds = seconds
        self._spent: dict[str, float] = {}
        self._known: dict[tuple[str, str], bool] = {}

    def first(self, patterns: Mapping[str, Any], name: str) -> str | None:
        """The first key of `patterns` (in file order) matching `name`, or None."""
        for key in patterns:
            if self.matches(key, name):
                return key
        return None

    def matches(self, key: str, name: str) -> bool:
        if not may_backtrack(key):
            return re.match(_full(key), name) is not None
        if (key, name) not in self._known:
            self.prime([key], [name])
        return self._known[(key, name)]

    def prime(self, keys: Iterable[str], names: Iterable[str]) -> None:
        """Match every slow key among `keys` against every name in one child run per key."""
        names = list(dict.fromkeys(names))
        for key in dict.fromkeys(keys):
            todo = [n for n in names if (key, n) not in self._known]
            if not todo or not may_backtrack(key):
                continue
            for name, hit in zip(todo, self._run(key, todo)):
                self._known[(key, name)] = hit

    def _run(self, key: str, names: list[str]) -> list[bool]:
        left = self.seconds - self._spent.get(key, 0.0)
        if left <= 0:
            raise PatternTimeout(key)
        started = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-I", "-S", "-c", _CHILD], capture_output=True, text=True,
                                  input=json.dumps({"pattern": _full(key), "names": names}), timeout=left,
                                  check=False)
        except subprocess.TimeoutExpired:
            raise PatternTimeout(key) from None
        finally:
            self._spent[key] = self._spent.get(key, 0.0) + time.perf_counter() - started
        try:
            hits = json.loads(proc.stdout)
        except ValueError:
            hits = None
        if proc.returncode != 0 or not isinstance(hits, list) or len(hits) != len(names):
            raise PatternTimeout(key)  # the child could not match it (out of memory, a recursion limit)
        return [bool(h) for h in hits]


def _full(key: str) -> str:
    return rf"(.*\.)?({key})$"


try:  # the parser of the re module (sre_parse before Python 3.11)
    from re import _parser as _sre_parse  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover
    import sre_parse as _sre_parse

_REPEATS = ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT")


@functools.lru_cache(maxsize=256)
def may_backtrack(key: str) -> bool:
    """True for regexes whose matching time can grow exponentially or as a high power of the name's length: a
    repeat inside a repeat, alternatives inside a repeat, back-references, or two unbounded repeats."""
    try:
        tree = _sre_parse.parse(key)
    except Exception:
        return True
    unbounded = 0

    def risky(items: Any, repeated: bool) -> bool:
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
