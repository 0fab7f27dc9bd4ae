"""A tuner added from outside the package (tests/tuners/toy_scale.py) merges, verifies and refuses like the
built-in ones: the registry is the only place that has to know it."""

from __future__ import annotations

import json

import helpers_tiny as ht
import pytest
import torch
import toy_scale
from oracle import read_checkpoint
from safetensors.torch import save_file

from streammerge import merge, tuners
from streammerge.errors import PlanError
from streammerge.verify import verify


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(tuners.TUNERS, toy_scale.TUNER.peft_type, toy_scale.TUNER)


def _adapter(path, targets: dict[str, float], alpha: float = 2.0, shape=(1,)):
    path.mkdir()
    tensors = {f"base_model.model.{m}.scale_c": torch.full(shape, c) for m, c in targets.items()}
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "SCALE_DIAGONAL", "alpha": alpha}))
    return path


def test_toy_tuner_merges_by_hand_formula_and_verifies(registered, tmp_path):
    base = ht.make_base(tmp_path / "base", hidden=64, inter=128, vocab=256)
    targets = {"model.layers.0.self_attn.q_proj": 0.5, "model.layers.1.mlp.down_proj": -0.25}
    adapter = _adapter(tmp_path / "ad", targets)
    merge(base, adapter, tmp_path / "out", dtype="f32")
    before, after = read_checkpoint(base), read_checkpoint(tmp_path / "out")
    for name, w in before.items():
        module = name.removesuffix(".weight")
        expected = w.float().clone()
        if module in targets:
            n = min(expected.shape)
            expected[range(n), range(n)] += 2.0 * targets[module]
        assert torch.equal(after[name], expected), name
    assert verify(base, adapter, tmp_path / "out", sample_blocks=None, dtype="f32").ok


def test_toy_tuner_problems_are_reported_like_any_other(registered, tmp_path):
    base = ht.make_base(tmp_path / "base", hidden=64, inter=128, vocab=256)
    adapter = _adapter(tmp_path / "ad", {"model.layers.0.self_attn.q_proj": 0.5}, shape=(2,))
    with pytest.raises(PlanError, match=r"q_proj: scale_c \[2\]"):
        merge(base, adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unregistered_type_is_refused(tmp_path):
    base = ht.make_base(tmp_path / "base", hidden=64, inter=128, vocab=256)
    adapter = _adapter(tmp_path / "ad", {"model.layers.0.self_attn.q_proj": 0.5})
    with pytest.raises(NotImplementedError, match="SCALE_DIAGONAL"):
        merge(base, adapter, tmp_path / "out")
