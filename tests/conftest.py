"""Session fixtures for the oracle tests: tiny bases and adapters built once, PEFT references cached."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
# streammerge is installed editable in CI; locally `python -m pytest` from the repo root finds it via cwd.
# Appending (not prepending) keeps an explicitly chosen PYTHONPATH in charge.
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import oracle  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

CAUSAL_TYPES = ["llama", "qwen2", "qwen3", "mistral", "gpt2"]


def gpt2_overrides(model_type: str) -> dict:
    # GPT-2's default bos/eos (50256) lie outside the tiny vocab: transformers warns; keep them in range.
    return dict(bos_token_id=oracle.VOCAB - 1, eos_token_id=oracle.VOCAB - 1) if model_type == "gpt2" else {}


@dataclass
class Case:
    model_type: str
    base: Path
    adapter: Path
    conv1d: bool
    _ref: dict = field(default_factory=dict, repr=False)

    def reference(self, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
        """PEFT merge_and_unload state dict on the base loaded in `dtype` (cached)."""
        if dtype not in self._ref:
            self._ref[dtype] = oracle.peft_reference(self.base, self.adapter, dtype)
        return self._ref[dtype]

    def merged_keys(self) -> set[str]:
        """On-disk keys the adapter targets (plain causal LMs: module name == disk name)."""
        return {m + ".weight" for m in oracle.adapter_modules(self.adapter)}


class Cases:
    def __init__(self, root: Path):
        self.root = root
        self._cases: dict[str, Case] = {}

    def get(self, model_type: str) -> Case:
        if model_type not in self._cases:
            base = oracle.make_base(model_type, self.root, tokenizer=(model_type == "llama"),
                                    **gpt2_overrides(model_type))
            adapter = oracle.make_adapter(base, self.root, name=f"adapter-{model_type}")
            self._cases[model_type] = Case(model_type, base, adapter, conv1d=(model_type == "gpt2"))
        return self._cases[model_type]


@pytest.fixture(scope="session")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("oracle")


@pytest.fixture(scope="session")
def cases(work) -> Cases:
    return Cases(work / "cases")


def run_merge(base, adapter, output, **kw):
    """streammerge.merge, imported lazily so a missing/broken package fails only the tests that merge."""
    import streammerge

    return streammerge.merge(str(base), str(adapter), str(output), **kw)


class Merged:
    """Cache of streammerge outputs keyed by (case, options) so several tests can inspect one merge."""

    def __init__(self, root: Path):
        self.root = root
        self._out: dict[tuple, tuple[Path, object]] = {}

    def get(self, case: Case, **kw) -> tuple[Path, object]:
        key = (case.model_type, tuple(sorted(kw.items())))
        if key not in self._out:
            out = self.root / f"{case.model_type}-{len(self._out)}"
            summary = run_merge(case.base, case.adapter, out, **kw)
            self._out[key] = (out, summary)
        return self._out[key]


@pytest.fixture(scope="session")
def merged(work) -> Merged:
    return Merged(work / "merged")


@dataclass
class Qwen35Case:
    base: Path
    adapter: Path
    _ref: dict | None = None

    def reference(self) -> dict[str, torch.Tensor]:
        """PEFT merge on the text-only class (AutoModelForCausalLM → Qwen3_5ForCausalLM); module-name keys."""
        if self._ref is None:
            self._ref = oracle.peft_reference(self.base, self.adapter, torch.bfloat16)
        return self._ref


@pytest.fixture(scope="session")
def qwen35(work) -> Qwen35Case:
    base = oracle.make_qwen35_base(work, tokenizer=True)
    adapter = oracle.make_adapter(base, work, name="adapter-qwen3_5")
    return Qwen35Case(base, adapter)


@pytest.fixture
def fresh_dir(tmp_path) -> Path:
    d = tmp_path / "fresh"
    d.mkdir()
    return d


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def tmpfs(tmp_path):
    """Private tmpfs mounts (root only): a real small or full file system. Skips where mounting is not allowed.
    (test_bad_inputs.py has its own, for a read-only one.)"""
    import subprocess

    mounted = []

    def mount(where: Path, size: str = "1m") -> Path:
        where.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        mounted.append(where)
        return where

    yield mount
    for m in reversed(mounted):
        subprocess.run(["umount", "-l", str(m)], check=False)

