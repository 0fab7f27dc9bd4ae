"""rank/alpha_pattern keys matched as PEFT does (`re.match(rf"(.*\\.)?({key})$", name)`), slow keys in bounded time
in a child interpreter, started once per key for a whole batch of names."""

from __future__ import annotations

import re
import subprocess

import pytest

from streammerge import patterns
from streammerge.patterns import PatternMatcher, PatternTimeout, may_backtrack

NAMES = [f"model.layers.{i}.self_attn.{p}" for i in range(3) for p in ("q_proj", "k_proj", "v_proj")]


@pytest.mark.parametrize("key", [r"(\w+\.)+q_proj", r"(q|k)+_proj", r"layers\.(\d+\.)+self_attn\.v_proj", "q_proj"])
def test_same_modules_as_pefts_own_rule(key):
    m = PatternMatcher()
    m.prime([key], NAMES)
    assert [m.matches(key, n) for n in NAMES] == [re.match(rf"(.*\.)?({key})$", n) is not None for n in NAMES]


def test_one_child_per_slow_key_for_a_batch(monkeypatch):
    runs = []
    real = subprocess.run
    monkeypatch.setattr(patterns.subprocess, "run", lambda *a, **k: runs.append(a) or real(*a, **k))
    m = PatternMatcher()
    m.prime([r"(\w+\.)+q_proj", "q_proj"], NAMES)
    assert len(runs) == 1 and may_backtrack(r"(\w+\.)+q_proj") and not may_backtrack("q_proj")
    assert m.first({"q_proj": 1, r"(\w+\.)+q_proj": 2}, NAMES[0]) == "q_proj"
    assert m.first({r"(\w+\.)+q_proj": 2}, NAMES[3]) == r"(\w+\.)+q_proj" and len(runs) == 1


def test_catastrophic_key_times_out_and_stays_out():
    m = PatternMatcher(seconds=0.5)
    key = "(.|..|...|....)+[^j]"
    with pytest.raises(PatternTimeout):
        m.prime([key], ["a" * 40 + "j"])
    with pytest.raises(PatternTimeout):  # its time is used up: no second wait
        m.matches(key, "x")
