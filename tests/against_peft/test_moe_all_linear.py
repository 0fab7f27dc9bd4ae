"""MoE adapters as users make them with transformers 5 + PEFT 0.21 (spec §12).

`LoraConfig(target_modules="all-linear")` on an MoE model is rewritten by PEFT into the linear modules plus
`target_parameters` with *bare* names (`gate_up_proj`, `gate.weight`, `down_proj`) and a rank/alpha pattern for
`gate_up_proj`. A bare name selects only modules that own such a parameter (the fused experts, the router), never a
LoRA module like `self_attn.k_proj`; the 2-D router target is plain LoRA on that tensor. Parameters of one module
nest PEFT's ParamWrappers: `experts.base_layer.lora_A/B` for the first parameter in registration order,
`experts.lora_A/B` for the next.

Oracle: PEFT's merge on the base loaded in float32, rounded once to bf16 and saved by transformers (so per-expert
checkpoints compare per expert); for checkpoints fused on disk, the merged state dict itself (module names are the
disk names there).
"""

from __future__ import annotations

import json

import pytest
import torch
import variant_helpers as vh
from conftest import run_merge
from oracle import read_checkpoint, ulp_diff
from torch import nn

E = 3
COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, tie_word_embeddings=False)
# tiny configs: 2 layers, 3 experts, top-2 routing; dense first layer where the architecture has one
DEEPSEEK = dict(n_routed_experts=E, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
                first_k_dense_replace=1, n_group=1, topk_group=1)
ARCHS = {
    "qwen3_moe": dict(num_experts=E, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8,
                      decoder_sparse_step=1, mlp_only_layers=[]),
    "mixtral": dict(num_local_experts=E, num_experts_per_tok=2, head_dim=8),
    "olmoe": dict(num_experts=E, num_experts_per_tok=2, eos_token_id=1, pad_token_id=0),
    "deepseek_v2": dict(DEEPSEEK, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=8,
                        v_head_dim=8),
    "deepseek_v3": dict(DEEPSEEK, kv_lora_rank=16, q_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                        v_head_dim=8),
    "glm4_moe": dict(DEEPSEEK, head_dim=8),
    "dots1": dict(DEEPSEEK, head_dim=8),
    "minimax": dict(num_local_experts=E, num_experts_per_tok=2, head_dim=8,
                    layer_types=["linear_attention", "full_attention"]),
    "hunyuan_v1_moe": dict(num_experts=E, moe_topk=2, head_dim=8),
    "ernie4_5_moe": dict(moe_num_experts=E, moe_k=2, moe_intermediate_size=16, moe_layer_start_index=0,
                         moe_num_shared_experts=1),
    "qwen3_next": dict(num_experts=E, num_experts_per_tok=2, moe_intermediate_size=16,
                       shared_expert_intermediate_size=16, head_dim=8, decoder_sparse_step=1, mlp_only_layers=[],
                       layer_types=["linear_attention", "full_attention"], linear_num_value_heads=4,
                       linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8),
}


@pytest.fixture(scope="module")
def wd(tmp_path_factory):
    return tmp_path_factory.mktemp("moe-all-linear")


_bases: dict = {}


def _base(wd, mt, **save_kwargs):
    """The tiny bf16 base of `mt`, saved once per module (save_original_format=False keeps experts fused)."""
    key = (mt, tuple(sorted(save_kwargs.items())))
    if key not in _bases:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        cfg = vh.tiny_config(mt, **{**COMMON, **ARCHS[mt]})
        model = AutoModelForCausalLM.from_config(cfg)
        vh.oracle._perturb_small_params(model, 0)
        out = wd / f"base-{mt}{'-fused' if save_kwargs else ''}"
        model.to(torch.bfloat16).save_pretrained(str(out), **save_kwargs)
        _bases[key] = out
    return _bases[key]


def _assert_all_linear_config(adapter) -> dict:
    """What PEFT wrote for all-linear on an MoE model: bare target_parameters and a gate_up_proj pattern."""
    cfg = vh.adapter_config(adapter)
    bare = [t for t in cfg["target_parameters"] if "." not in t]
    assert "gate_up_proj" in bare and "down_proj" in bare, cfg["target_parameters"]
    assert any("gate_up_proj" in k for k in cfg["rank_pattern"]), cfg["rank_pattern"]
    return cfg


def _changed(ref: dict, base: dict) -> set[str]:
    return {k for k, v in ref.items() if k not in base or not torch.equal(v, base[k])}


@pytest.mark.parametrize("mt", list(ARCHS))
def test_all_linear_adapter_on_per_expert_checkpoint(wd, mt):
    base = _base(wd, mt)
    base_t = read_checkpoint(base)
    assert any(".experts.0." in k for k in base_t), "setup: transformers 5 writes the experts per expert"
    ad = vh.save_adapter(vh.load_causal(base), wd / f"ad-{mt}", target_modules="all-linear")
    cfg = _assert_all_linear_config(ad)
    assert "gate.weight" in cfg["target_parameters"]

    out = wd / f"out-{mt}"
    run_merge(base, ad, out)
    ref = vh.reference_on_disk(base, ad, wd / f"ref-{mt}")
    changed = _changed(ref, base_t)
    # the test can fail: experts of every MoE layer, the router and attention all change
    assert any(".experts.1." in k for k in changed) and any(k.endswith("o_proj.weight") for k in changed), changed
    assert any(k.endswith((".gate.weight", ".gate.wg.weight")) for k in changed), changed
    vh.compare_to_reference(read_checkpoint(out), base_t, ref, changed)


@pytest.mark.parametrize("mt", ["qwen3_moe", "mixtral"])
def test_all_linear_adapter_on_fused_checkpoint(wd, mt):
    """Experts fused on disk (`mlp.experts.gate_up_proj` [E, 2I, H]). qwen3_moe's tiny experts are square
    (2I == H): only the architecture tells the orientation, and transformers 5 writes [E, out, in]."""
    base = _base(wd, mt, save_original_format=False)
    base_t = read_checkpoint(base)
    fused = "model.layers.1.mlp.experts.gate_up_proj"
    assert base_t[fused].dim() == 3, "setup: the experts are fused on disk"
    ad = vh.save_adapter(vh.load_causal(base), wd / f"ad-fused-{mt}", target_modules="all-linear")
    _assert_all_linear_config(ad)

    out = wd / f"out-fused-{mt}"
    run_merge(base, ad, out)
    ref = {k: v.to(torch.bfloat16) for k, v in vh.peft_merged(base, ad).state_dict().items()}
    changed = _changed(ref, base_t)
    assert {fused, "model.layers.1.mlp.experts.down_proj", "model.layers.1.mlp.gate.weight"} <= changed
    vh.compare_to_reference(read_checkpoint(out), base_t, ref, changed)


@pytest.mark.parametrize("targets", [["experts.down_proj", "gate_up_proj"], ["gate_up_proj", "experts.down_proj"]],
                         ids=["down-first", "gate_up-first"])
def test_nested_target_parameters_with_target_modules(wd, targets):
    """target_modules + two nested target_parameters, listed in either order, each parameter with its own
    rank and alpha: PEFT nests by registration order (gate_up_proj inside), not by the order in the config."""
    base = _base(wd, "mixtral")
    name = "-".join(t.split(".")[-1] for t in targets)
    ad = vh.save_adapter(vh.load_causal(base), wd / f"ad-nested-{name}", target_modules=["q_proj", "k_proj"],
                         target_parameters=targets, rank_pattern={"gate_up_proj": 6}, alpha_pattern={"down_proj": 5})
    keys = vh.oracle.read_adapter_tensors(ad)
    inner = "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"
    assert keys[inner].shape[0] == 6 * E, "setup: gate_up_proj (rank 6) is the inner wrapper"

    out = wd / f"out-nested-{name}"
    run_merge(base, ad, out)
    ref = vh.reference_on_disk(base, ad, wd / f"ref-nested-{name}")
    base_t = read_checkpoint(base)
    changed = _changed(ref, base_t)
    moe = "block_sparse_moe.experts"
    assert {f"model.layers.0.{moe}.2.w1.weight", f"model.layers.0.{moe}.2.w3.weight",
            f"model.layers.1.{moe}.0.w2.weight", "model.layers.1.self_attn.k_proj.weight"} <= changed
    vh.compare_to_reference(read_checkpoint(out), base_t, ref, changed)


def test_three_and_four_nested_parameters_gpt_oss(tmp_path):
    """GPT-OSS experts own gate_up_proj, gate_up_proj_bias, down_proj, down_proj_bias ([E, in, out] fused on
    disk). With H == 2I the two bias parameters are both [E, 2I] and their LoRA pairs have equal shapes: the
    shapes place the others, transformers' registration order (gate_up_proj_bias first) places these two."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("gpt_oss", vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=E,
                               num_experts_per_tok=2, max_position_embeddings=64, layer_types=["full_attention"])
    AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    base_t = read_checkpoint(tmp_path / "base")
    prefix = "model.layers.0.mlp.experts."
    assert base_t[prefix + "gate_up_proj_bias"].shape == base_t[prefix + "down_proj_bias"].shape == (E, 32)

    for n, targets in ((3, ["gate_up_proj", "gate_up_proj_bias", "down_proj"]),
                       (4, ["down_proj_bias", "down_proj", "gate_up_proj_bias", "gate_up_proj"])):
        ad = vh.save_adapter(vh.load_causal(tmp_path / "base"), tmp_path / f"ad{n}", target_modules=["q_proj"],
                             target_parameters=targets, rank_pattern={"gate_up_proj$": 3})
        tensors = vh.oracle.read_adapter_tensors(ad)
        nested = [k for k in tensors if k.endswith("lora_A.weight") and ".experts." in k]
        innermost = max(nested, key=lambda k: k.count(".base_layer"))  # gate_up_proj, registered first
        assert len(nested) == n and tensors[innermost].shape[0] == 3 * E, nested
        run_merge(tmp_path / "base", ad, tmp_path / f"out{n}")
        ref = {k: v.to(torch.bfloat16) for k, v in vh.peft_merged(tmp_path / "base", ad).state_dict().items()}
        changed = _changed(ref, base_t)
        assert {prefix + t for t in targets} <= changed
        vh.compare_to_reference(read_checkpoint(tmp_path / f"out{n}"), base_t, ref, changed)


def test_unsloth_style_moe_targets(wd):
    """Unsloth's MoE recipe: target_modules names gate/up/down_proj and target_parameters the dotted
    `mlp.experts.*` paths; PEFT adds the bare names and the gate_up_proj patterns on top (deepseek_v2: the
    shared experts are plain LoRA modules called gate_proj/up_proj/down_proj too)."""
    base = _base(wd, "deepseek_v2")
    ad = vh.save_adapter(vh.load_causal(base), wd / "ad-unsloth-moe",
                         target_modules=["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                         target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    cfg = vh.adapter_config(ad)
    assert {"gate_up_proj", "mlp.experts.gate_up_proj"} <= set(cfg["target_parameters"]), cfg["target_parameters"]
    out = wd / "out-unsloth-moe"
    run_merge(base, ad, out)
    ref = vh.reference_on_disk(base, ad, wd / "ref-unsloth-moe")
    base_t = read_checkpoint(base)
    changed = _changed(ref, base_t)
    assert "model.layers.1.mlp.experts.2.up_proj.weight" in changed
    vh.compare_to_reference(read_checkpoint(out), base_t, ref, changed)


# a custom module: parameters PEFT nests that transformers does not define ------------------------------------

class _Experts(nn.Module):
    def __init__(self, names: tuple[str, ...], shapes: tuple[tuple[int, ...], ...]):
        super().__init__()
        for n, s in zip(names, shapes):
            self.register_parameter(n, nn.Parameter(torch.randn(*s) * 0.1))


class _Net(nn.Module):
    def __init__(self, names, shapes):
        super().__init__()
        self.experts = _Experts(names, shapes)
        self.head = nn.Linear(8, 4)


def _custom(tmp_path, names, shapes):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = _Net(names, shapes)
    base = tmp_path / "base"
    base.mkdir()
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in net.state_dict().items()},
              str(base / "model.safetensors"), metadata={"format": "pt"})
    (base / "config.json").write_text(json.dumps({"model_type": "custom-experts"}))
    pm = get_peft_model(net, LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=["head"],
                                        target_parameters=list(names)))
    pm.save_pretrained(str(tmp_path / "ad"))
    return base, tmp_path / "ad"


def test_equal_shapes_fall_back_on_registration_order(tmp_path):
    """gate_proj and up_proj [E, 6, 8] (as in inkling's shared experts): their LoRA pairs have one shape, so the
    known registration order (gate_proj, up_proj, down_proj) decides; PEFT's merge is the reference."""
    from peft import PeftModel
    from safetensors.torch import load_file

    names, shapes = ("gate_proj", "up_proj", "down_proj"), ((E, 6, 8), (E, 6, 8), (E, 8, 6))
    base, ad = _custom(tmp_path, names, shapes)
    run_merge(base, ad, tmp_path / "out")
    net = _Net(names, shapes)
    net.load_state_dict({k: v.float() for k, v in load_file(str(base / "model.safetensors")).items()})
    merged = PeftModel.from_pretrained(net, str(ad)).merge_and_unload()
    out_t = read_checkpoint(tmp_path / "out")
    for n in names:
        want = getattr(merged.experts, n).detach().to(torch.bfloat16)
        assert ulp_diff(out_t[f"experts.{n}"], want) <= 1, n
        assert not torch.equal(out_t[f"experts.{n}"], read_checkpoint(base)[f"experts.{n}"]), n


def test_equal_shapes_of_unknown_parameters_are_refused(tmp_path):
    from streammerge.errors import UnsupportedError

    base, ad = _custom(tmp_path, ("w_a", "w_b"), ((E, 6, 8), (E, 6, 8)))
    with pytest.raises(UnsupportedError, match=r"experts: the nested LoRA pairs .*lora_A.weight.* more than one "
                                               r"order.*merge_and_unload"):
        run_merge(base, ad, tmp_path / "out")
    vh.expect_nothing_written(tmp_path / "out")
