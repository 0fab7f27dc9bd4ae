"""A bare install (the declared runtime dependencies only: no numpy, transformers, tokenizers...) merges,
verifies and runs the built-in example. `.ci/run` also checks this on a real wheel in a fresh venv."""

from __future__ import annotations

import helpers_tiny as ht
import pytest
from blocked_imports import REPO, run_blocked


def test_the_blocker_works(tmp_path):
    r = run_blocked(["-c", "import numpy"], tmp_path)
    assert r.returncode != 0 and "No module named 'numpy'" in r.stderr


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    work = tmp_path_factory.mktemp("bare")
    r = run_blocked([REPO / "scripts" / "make_synthetic_model.py", "--preset", "tiny", "--out", work, "--quiet"], work)
    assert r.returncode == 0 and not r.stderr, r.stderr  # --quiet: not even torch's missing-numpy warning
    return work


def test_synthetic_model_needs_no_undeclared_package(synthetic):
    assert (synthetic / "base" / "model.safetensors").is_file()
    assert (synthetic / "base" / "tokenizer.json").is_file()
    assert (synthetic / "adapter" / "adapter_model.safetensors").is_file()


def test_merge_and_verify_without_numpy(tmp_path):
    base = ht.make_base(tmp_path / "base")
    adapter = ht.make_adapter(tmp_path / "adapter", base)
    out = tmp_path / "merged"
    r = run_blocked(["-m", "streammerge", "--base", base, "--adapter", adapter, "--output", out, "--no-progress"],
                    tmp_path)
    assert r.returncode == 0, r.stderr
    assert not r.stderr and (out / "model.safetensors").is_file()  # not even torch's "Failed to initialize NumPy"
    r = run_blocked(["-m", "streammerge", "verify", "--base", base, "--adapter", adapter, "--merged", out], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Verify: OK" in r.stdout


def test_example_runs_in_a_bare_install(tmp_path):
    r = run_blocked([REPO / "scripts" / "example.py", "--out", tmp_path / "example"], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Done. Merged model:" in r.stdout and "Verify: OK" in r.stdout

