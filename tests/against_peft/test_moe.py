"""MoE experts (spec §12).

(i) transformers 5 loads Mixtral / Qwen-MoE experts as fused 3-D parameters (`mlp.experts.gate_up_proj`
[E, 2I, H], `down_proj` [E, H, I]) but the checkpoints on disk — and what transformers 5 writes — are per expert
(`block_sparse_moe.experts.e.w1/w3/w2` resp. `mlp.experts.e.gate_proj/up_proj/down_proj`). An adapter with
`target_parameters` must be split onto the per-expert disk tensors. Oracle: PEFT's float32 merge saved by
transformers (per expert again), rounded once to bf16.

(ii) transformers-4-style per-expert adapters (`…block_sparse_moe.experts.1.w1.lora_A.weight`) map 1:1 onto
the disk tensors. PEFT 0.21 converts them to target_parameters on load and gets the scale wrong with rsLoRA
(2α/√(2r) instead of α/√r); the oracle there is the per-expert formula computed from the files.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import variant_helpers as vh
from conftest import run_merge
from oracle import checkpoint_keys, read_checkpoint, ulp_diff
from safetensors.torch import save_file

E = 3
MOE = {
    "mixtral": dict(num_local_experts=E, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=E, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16,
                      decoder_sparse_step=1, mlp_only_layers=[]),
    "qwen2_moe": dict(num_experts=E, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[]),
}
EXPERT_NAMES = {"mixtral": ("block_sparse_moe", ("w1", "w2", "w3")),
                "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
                "qwen2_moe": ("mlp", ("gate_proj", "up_proj", "down_proj"))}


@pytest.fixture(scope="module")
def wd(tmp_path_factory):
    return tmp_path_factory.mktemp("moe")


_bases: dict = {}


def _base(wd, mt):
    if mt not in _bases:
        _bases[mt] = vh.build_base(mt, wd / f"base-{mt}", **MOE[mt])
    return _bases[mt]


def _expert_keys(mt):
    block, names = EXPERT_NAMES[mt]
    return {f"model.layers.{i}.{block}.experts.{e}.{n}.weight" for i in range(2) for e in range(E) for n in names}


@pytest.mark.parametrize("mt", ["mixtral", "qwen3_moe", "qwen2_moe"])
def test_target_parameters_fused_experts_split_per_expert(wd, mt):
    base = _base(wd, mt)
    keys = checkpoint_keys(base)
    assert _expert_keys(mt) <= set(keys), "setup: transformers 5 writes MoE experts per expert on disk"
    ad = vh.save_adapter(vh.load_causal(base), wd / f"ad-tp-{mt}", target_modules=["q_proj"],
                         target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    out = wd / f"out-tp-{mt}"
    run_merge(base, ad, out)
    ref = vh.reference_on_disk(base, ad, wd / f"ref-tp-{mt}")
    must = _expert_keys(mt) | {"model.layers.0.self_attn.q_proj.weight"}
    vh.compare_to_reference(read_checkpoint(out), read_checkpoint(base), ref, must)


def test_fused_factors_are_read_once_per_merge(wd, tmp_path, monkeypatch):
    """Every expert's w1/w3/w2 uses a slice of the same fused factors: they are converted and scanned for
    NaN/Inf once per merge, not once per expert tensor (E x 3 per layer)."""
    from collections import Counter

    from streammerge.adapter import Adapter

    base = _base(wd, "mixtral")
    ad = vh.save_adapter(vh.load_causal(base), tmp_path / "ad", target_modules=["q_proj"],
                         target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    loads: Counter = Counter()
    real = Adapter.get_f32

    def counting(self, key):
        loads[key] += 1
        return real(self, key)

    monkeypatch.setattr(Adapter, "get_f32", counting)
    run_merge(base, ad, tmp_path / "out")
    fused = {k: n for k, n in loads.items() if ".experts." in k}
    assert len(fused) == 2 * 2 * 2  # 2 layers x (gate_up, down) x (A, B)
    assert set(fused.values()) == {1}, fused


# (ii) transformers-4 per-expert adapter, built by hand ---------------------------------------------------

def _v4_adapter(wd, base, name, *, use_rslora, r=4, alpha=8, seed=3):
    """Keys base_model.model.model.layers.L.block_sparse_moe.experts.e.w{1,2,3}.lora_{A,B}.weight (the module
    names of transformers 4 Mixtral = the disk names)."""
    shapes = {k: v[0] for k, v in checkpoint_keys(base).items()}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(2):
        for e in range(E):
            for w in ("w1", "w2", "w3"):
                mod = f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}"
                out_f, in_f = shapes[mod + ".weight"]
                tensors[f"base_model.model.{mod}.lora_A.weight"] = torch.randn(r, in_f, generator=g) * 0.1
                tensors[f"base_model.model.{mod}.lora_B.weight"] = torch.randn(out_f, r, generator=g) * 0.1
    d = wd / name
    d.mkdir()
    save_file(tensors, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "use_rslora": use_rslora,
           "target_modules": ["w1", "w2", "w3"], "bias": "none", "lora_dropout": 0.0, "fan_in_fan_out": False,
           "base_model_name_or_path": str(base), "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {}}
    (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return d, tensors


def _v4_expected(base_t, tensors, scale):
    out = {}
    for k, a in tensors.items():
        if k.endswith(".lora_A.weight"):
            mod = k[len("base_model.model."): -len(".lora_A.weight")]
            b = tensors[f"base_model.model.{mod}.lora_B.weight"]
            out[mod + ".weight"] = base_t[mod + ".weight"].float() + (b @ a) * scale
    return out


@pytest.mark.parametrize("use_rslora", [False, True], ids=["plain", "rslora"])
def test_v4_per_expert_adapter(wd, use_rslora):
    base = _base(wd, "mixtral")
    name = f"ad-v4-{'rs' if use_rslora else 'plain'}"
    ad, tensors = _v4_adapter(wd, base, name, use_rslora=use_rslora)
    scale = 8 / math.sqrt(4) if use_rslora else 8 / 4
    base_t = read_checkpoint(base)
    want = _v4_expected(base_t, tensors, scale)
    out = wd / f"out-{name}"
    run_merge(base, ad, out)
    out_t = read_checkpoint(out)
    assert set(out_t) == set(base_t)
    for k, w in want.items():
        assert ulp_diff(out_t[k], w.to(torch.bfloat16)) <= 1, k
        assert not torch.equal(out_t[k], base_t[k]), k
    for k in set(base_t) - set(want):
        assert torch.equal(out_t[k], base_t[k]), k

    # PEFT 0.21 (converting the v4 adapter to fused target_parameters on load): right without rsLoRA,
    # wrong with it (spec §12) -- shows the formula above is PEFT's semantics and where PEFT deviates.
    peft_ref = vh.reference_on_disk(base, ad, wd / f"ref-{name}", out_dtype=torch.float32)
    worst = max((peft_ref[k] - w).abs().max().item() for k, w in want.items())
    if use_rslora:
        assert worst > 0.05, f"PEFT was expected to mis-scale rsLoRA v4 MoE adapters (diff {worst})"
    else:
        assert worst < 1e-4, f"PEFT's conversion of a plain v4 MoE adapter should match the formula ({worst})"


def test_target_parameters_on_experts_fused_on_disk_gpt_oss(tmp_path):
    """GPT-OSS keeps its experts fused on disk, `[E, in, out]` (`is_transposed`): the per-expert delta
    `(B_e @ A_e)^T * s` is added to each expert's slice of the fused tensor (spec §12). Oracle: PEFT's merge on
    the float32-loaded base, rounded once to bf16."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("gpt_oss", vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=E,
                               num_experts_per_tok=2, max_position_embeddings=64, layer_types=["full_attention"])
    AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    base_t = read_checkpoint(tmp_path / "base")
    fused = "model.layers.0.mlp.experts.gate_up_proj"
    assert base_t[fused].shape == (E, 32, 48)  # fused on disk, [E, in, out]

    lc = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False,
                    target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16), lc)
    pm.save_pretrained(tmp_path / "adapter")
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32),
                                    tmp_path / "adapter").merge_and_unload().state_dict()

    run_merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    out_t = read_checkpoint(tmp_path / "out")
    assert set(out_t) == set(base_t)
    for name in (fused, "model.layers.0.mlp.experts.down_proj", "model.layers.0.self_attn.q_proj.weight"):
        assert not torch.equal(out_t[name], base_t[name]), name
        assert ulp_diff(out_t[name], ref[name].to(torch.bfloat16)) <= 1, name
    assert torch.equal(out_t["model.layers.0.mlp.experts.gate_up_proj_bias"],
                       base_t["model.layers.0.mlp.experts.gate_up_proj_bias"])
