"""Checkpoints only transformers' own conversion mapping can place, with and without transformers installed.

transformers 5 saves some models under their legacy names (exaone `transformer.h.N.attn.attention.*`, nemotron_h
`backbone.*`) and renames them on load, so PEFT adapters use the module names. lara_mini goes further: its
checkpoint fuses the gated-delta-net projections into one `linear_attn.in_proj` tensor that transformers splits
into `in_proj_qkv/z/b/a` on load; a LoRA on one of those modules updates a block of rows of the disk tensor.

transformers is an optional extra (`streammerge[transformers]`): without it such bases cannot be placed, and the
planning error (exit 4) says that installing it would. Its absence is simulated in a subprocess (blocked_imports).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import variant_helpers as vh
from blocked_imports import run_blocked
from oracle import read_checkpoint

import streammerge
from streammerge.errors import UnsupportedError

pytest.importorskip("transformers")
pytest.importorskip("peft")

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
MODELS = {
    "exaone": (dict(SMALL), ["q_proj", "v_proj", "out_proj", "gate_proj", "down_proj"]),
    # one Mamba2 layer, one attention layer; the Mamba in_proj is a plain Linear (PEFT refuses out_proj there)
    "nemotron_h": (dict(SMALL, hybrid_override_pattern="M*", mamba_num_heads=4, mamba_head_dim=8, n_groups=1,
                        ssm_state_size=8, head_dim=8), ["q_proj", "v_proj", "o_proj", "in_proj"]),
    # layer 0 is linear attention (fused in_proj on disk), layer 1 full attention
    "lara_mini": (dict(SMALL, head_dim=8, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                       linear_num_value_heads=4, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                       num_experts=4, num_experts_per_tok=2, layer_types=["linear_attention", "full_attention"]),
                  ["in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "q_proj", "out_proj"]),
    # fused `mlp.gate_up_proj` and `attn.gqkv_proj` on disk, chunked into equal parts on load
    "hrm_text": (dict(SMALL, head_dim=8, num_key_value_heads=4), ["gate_proj", "up_proj", "q_proj", "v_proj", "o_proj"]),
}
LEGACY_PREFIX = {"exaone": "transformer.h.0.", "nemotron_h": "backbone.layers.0.", "lara_mini": "model.layers.0.",
                 "hrm_text": "model."}


@pytest.fixture(scope="module")
def wd(tmp_path_factory):
    return tmp_path_factory.mktemp("tf-layouts")


def _build(wd, model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    kw, targets = MODELS[model_type]
    base = wd / model_type
    if not base.exists():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kw))
        vh.save_base(model, base)
        vh.save_adapter(vh.load_causal(base), wd / f"{model_type}-lora", target_modules=targets)
    return base, wd / f"{model_type}-lora"


@pytest.fixture(scope="module", params=sorted(MODELS))
def legacy(request, wd):
    return request.param, *_build(wd, request.param)


def test_checkpoints_keep_their_legacy_names(legacy):
    model_type, base, adapter = legacy
    disk = set(read_checkpoint(base))
    assert any(k.startswith(LEGACY_PREFIX[model_type]) for k in disk)
    if model_type == "lara_mini":
        assert "model.layers.0.linear_attn.in_proj.weight" in disk
        assert not any("in_proj_qkv" in k for k in disk)
    adapter_keys = json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
    assert adapter_keys


def test_merges_like_peft_with_transformers(legacy, wd):
    model_type, base, adapter = legacy
    out = wd / f"out-{model_type}"
    summary = streammerge.merge(base, adapter, out)
    assert summary.layout == "transformers"
    ref = vh.reference_on_disk(base, adapter, wd / f"ref-{model_type}")  # saved by transformers: disk names
    out_t, base_t = read_checkpoint(out), read_checkpoint(base)
    changed = {k for k in ref if k in base_t and not torch.equal(base_t[k], ref[k])}
    fused = {"lara_mini": ["model.layers.0.linear_attn.in_proj.weight"],
             "hrm_text": ["model.L_module.layers.0.attn.gqkv_proj.weight", "model.L_module.layers.0.mlp.gate_up_proj.weight"]}
    assert set(fused.get(model_type, [])) <= changed  # rows of the fused tensors
    assert len(changed) >= 3
    vh.compare_to_reference(out_t, base_t, ref, changed)
    # verify's float64 reference knows the row blocks a split module covers in the fused tensor
    from streammerge.verify import verify

    report = verify(base, adapter, out, sample_blocks=None)
    assert report.ok, report.problems()


def test_without_transformers_the_error_says_to_install_it(legacy, tmp_path):
    _model_type, base, adapter = legacy
    out = tmp_path / "out"
    r = run_blocked(["-m", "streammerge", "--base", base, "--adapter", adapter, "--output", out], tmp_path,
                    ("transformers",))
    assert r.returncode == 4, r.stderr
    assert "pip install 'streammerge[transformers]'" in r.stderr, r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert not out.exists()


def test_fused_rows_by_hand(wd):
    """The rows each split module takes: [q|k|v] + z + b + a, as transformers' Split sizes them."""
    base, _ = _build(wd, "lara_mini")
    from streammerge.io.checkpoint import open_checkpoint
    from streammerge.layouts import derived_layout

    layout = derived_layout(base, open_checkpoint(base).tensors)
    key_dim, value_dim, v_heads = 2 * 8, 4 * 8, 4
    pre = "model.layers.0.linear_attn."
    rows = {n[len(pre):]: p.rows for n, p in layout.parts.items() if n.startswith(pre)}
    qkv = 2 * key_dim + value_dim
    assert rows == {"in_proj_qkv.weight": (0, qkv), "in_proj_z.weight": (qkv, qkv + value_dim),
                    "in_proj_b.weight": (qkv + value_dim, qkv + value_dim + v_heads),
                    "in_proj_a.weight": (qkv + value_dim + v_heads, qkv + value_dim + 2 * v_heads)}


def test_dora_on_fused_rows_is_not_supported(wd, tmp_path):
    """What cannot be merged into a block of rows is refused as unsupported (exit 5) naming the module."""
    base, _ = _build(wd, "lara_mini")
    ad = vh.save_adapter(vh.load_causal(base), tmp_path / "dora", use_dora=True, target_modules=["in_proj_z"])
    with pytest.raises(UnsupportedError, match=r"model\.layers\.0\.linear_attn\.in_proj_z is cut out of the fused "
                                               r"checkpoint tensor model\.layers\.0\.linear_attn\.in_proj\.weight"):
        streammerge.merge(base, ad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_fused_rows_independent_of_block_size(wd, tmp_path):
    """The fused tensor's bytes do not depend on --max-memory (row blocks cut through the modules' rows)."""
    base, adapter = _build(wd, "lara_mini")
    outs = []
    for mem in (None, "1MB"):
        out = tmp_path / f"out-{mem}"
        streammerge.merge(base, adapter, out, max_memory=mem)
        outs.append((out / "model.safetensors").read_bytes())
    assert outs[0] == outs[1]
    shutil.rmtree(tmp_path)
