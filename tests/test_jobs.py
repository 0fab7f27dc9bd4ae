"""Batch job files: JSON, YAML and TOML read to the same jobs; every mistake is one clear InputError."""

from __future__ import annotations

import json

import pytest

from streammerge.errors import InputError
from streammerge.jobs import Job, load_jobs

SPEC = {"base": "org/base", "dtype": "f16", "jobs": [
    {"adapter": "a1", "output": "o1"},
    {"adapters": ["a1", "org/a2"], "weights": [0.7, 0.3], "output": "o2", "name": "mix"},
]}
YAML = """base: org/base
dtype: f16
jobs:
  - {adapter: a1, output: o1}
  - {adapters: [a1, org/a2], weights: [0.7, 0.3], output: o2, name: mix}
"""
TOML = """base = "org/base"
dtype = "f16"
[[jobs]]
adapter = "a1"
output = "o1"
[[jobs]]
adapters = ["a1", "org/a2"]
weights = [0.7, 0.3]
output = "o2"
name = "mix"
"""


@pytest.mark.parametrize("suffix, text", [(".json", json.dumps(SPEC)), (".yaml", YAML), (".toml", TOML)])
def test_three_formats_read_the_same(tmp_path, suffix, text):
    (tmp_path / "a1").mkdir()
    path = tmp_path / f"jobs{suffix}"
    path.write_text(text)
    spec = load_jobs(path)
    assert spec.base == "org/base" and spec.options == {"dtype": "f16"}
    a1 = str(tmp_path / "a1")  # exists beside the job file: made absolute; a repo id is kept
    assert spec.jobs == (Job((a1,), str(tmp_path / "o1")),
                         Job((a1, "org/a2"), str(tmp_path / "o2"), (0.7, 0.3), "mix"))
    assert spec.jobs[0].label == "o1" and spec.jobs[1].label == "mix"


@pytest.mark.parametrize("change, message", [
    ({"jobs": []}, "non-empty list"),
    ({"base": 3}, "'base' must be"),
    ({"speed": "max"}, "unknown field"),
    ({"jobs": [{"adapter": "a", "adapters": ["b"], "output": "o"}]}, "exactly one of"),
    ({"jobs": [{"adapters": ["a", "b"], "weights": [1], "output": "o"}]}, "one number per adapter"),
    ({"jobs": [{"adapter": "a"}]}, "'output' must be"),
    ({"jobs": [{"adapter": "a", "output": "o"}, {"adapter": "b", "output": "o"}]}, "same output"),
])
def test_mistakes_are_named(tmp_path, change, message):
    path = tmp_path / "jobs.json"
    path.write_text(json.dumps({**SPEC, **change}))
    with pytest.raises(InputError, match=message) as e:
        load_jobs(path)
    assert e.value.exit_code == 3 and str(path) in str(e.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_jobs(tmp_path / "none.json")
    bad = tmp_path / "jobs.toml"
    bad.write_text("base = ")
    with pytest.raises(InputError, match="not a valid toml job file"):
        load_jobs(bad)
