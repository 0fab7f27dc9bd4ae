"""Planning on header-only fakes: no weight file exists, so any read of tensor data would fail.

Each test states a checkpoint (names, dtypes, shapes) and an adapter (keys, shapes, config) and checks the plan
build_plan makes, or the problems it reports, from headers alone.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from streammerge.adapter import Adapter, load_adapter_config
from streammerge.errors import PlanError
from streammerge.io.checkpoint import Checkpoint
from streammerge.io.formats import ITEMSIZE
from streammerge.io.safetensors import TensorInfo
from streammerge.plan import build_plan
from streammerge.tuners.dora import DoraRows
from streammerge.tuners.experts import LoraExperts
from streammerge.tuners.lora import BiasAdd, LoraCols, LoraRows

NOWHERE = Path("/nonexistent/model.safetensors")


def checkpoint(root: Path, tensors: dict[str, tuple[int, ...]], config: dict | None = None,
               dtype: str = "BF16") -> Checkpoint:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config or {"model_type": "llama"}))
    infos = {n: TensorInfo(n, dtype, s, NOWHERE, 0, math.prod(s) * ITEMSIZE[dtype]) for n, s in tensors.items()}
    return Checkpoint(root, infos, (), None)


def adapter(root: Path, shapes: dict[str, tuple[int, ...]], **config) -> Adapter:
    root.mkdir(parents=True, exist_ok=True)
    (root / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, **config}))
    keys = {f"base_model.model.{k}": s for k, s in shapes.items()}
    return Adapter(root, load_adapter_config(root), root / "adapter_model.safetensors", keys,
                   dict.fromkeys(keys, torch.float32))


def lora(module: str, out: int, inp: int, r: int = 4) -> dict[str, tuple[int, ...]]:
    return {f"{module}.lora_A.weight": (r, inp), f"{module}.lora_B.weight": (out, r)}


def ops(plan, name):
    return next(t for t in plan.tensors if t.name == name).ops


def test_linear_lora_plans_rows_with_alpha_over_r(tmp_path):
    ck = checkpoint(tmp_path / "b", {"model.layers.0.self_attn.q_proj.weight": (32, 16), "model.norm.weight": (16,)})
    ad = adapter(tmp_path / "a", lora("model.layers.0.self_attn.q_proj", 32, 16))
    plan = build_plan(ck, ad)
    (op,) = ops(plan, "model.layers.0.self_attn.q_proj.weight")
    assert isinstance(op, LoraRows) and op.scale == 2.0
    assert ops(plan, "model.norm.weight") == [] and plan.layout == "causal-lm"


def test_gpt2_conv1d_square_weight_is_transposed_by_model_type(tmp_path):
    name = "transformer.h.0.attn.c_proj"
    for model_type, kind in (("gpt2", LoraCols), ("llama", LoraRows)):
        ck = checkpoint(tmp_path / model_type, {f"{name}.weight": (16, 16)}, {"model_type": model_type})
        ad = adapter(tmp_path / f"a-{model_type}", lora(name, 16, 16))
        assert isinstance(ops(build_plan(ck, ad), f"{name}.weight")[0], kind)


def test_an_unplaceable_module_stops_planning_before_shapes_are_checked(tmp_path):
    ck = checkpoint(tmp_path / "b", {"model.layers.0.self_attn.q_proj.weight": (32, 16)})
    shapes = {**lora("model.layers.0.self_attn.q_proj", 32, 8),                 # would be a shape problem
              **lora("model.layers.0.self_attn.k_proj", 32, 16)}                # no such tensor in the base
    with pytest.raises(PlanError, match=r"\(1 problem\(s\)\): model\.layers\.0\.self_attn\.k_proj\.weight: no tensor "
                                        r".*the adapter is for another model"):
        build_plan(ck, adapter(tmp_path / "a", shapes))


def test_rank_mismatch_and_bad_shape_together(tmp_path):
    ck = checkpoint(tmp_path / "b", {"model.layers.0.self_attn.q_proj.weight": (32, 16),
                                     "model.layers.0.self_attn.v_proj.weight": (32, 16)})
    shapes = {**lora("model.layers.0.self_attn.q_proj", 32, 8), **lora("model.layers.0.self_attn.v_proj", 32, 16, r=2)}
    with pytest.raises(PlanError, match=r"\(2 problem\(s\)\).*q_proj: lora_A \[4, 8\].*v_proj: lora_A has rank 2"):
        build_plan(ck, adapter(tmp_path / "a", shapes))


def test_dora_magnitude_and_lora_bias(tmp_path):
    m = "model.layers.0.mlp.down_proj"
    ck = checkpoint(tmp_path / "b", {f"{m}.weight": (16, 32), f"{m}.bias": (16,)})
    shapes = {**lora(m, 16, 32), f"{m}.lora_magnitude_vector": (16,), f"{m}.lora_B.bias": (16,)}
    plan = build_plan(ck, adapter(tmp_path / "a", shapes, use_dora=True, lora_bias=True))
    assert [type(o) for o in ops(plan, f"{m}.weight")] == [LoraRows, DoraRows]
    assert isinstance(ops(plan, f"{m}.bias")[0], BiasAdd)


def test_router_target_parameter_is_plain_lora_and_experts_are_fused(tmp_path):
    ck = checkpoint(tmp_path / "b", {"model.layers.0.mlp.gate.weight": (4, 16),
                                     "model.layers.0.mlp.experts.gate_up_proj": (4, 64, 16),
                                     "model.layers.0.mlp.experts.down_proj": (4, 16, 32)},
                    {"model_type": "qwen3_moe"})
    shapes = {"model.layers.0.mlp.gate.lora_A.weight": (2, 16), "model.layers.0.mlp.gate.lora_B.weight": (4, 2),
              "model.layers.0.mlp.experts.base_layer.lora_A.weight": (8, 16),
              "model.layers.0.mlp.experts.base_layer.lora_B.weight": (64, 8),
              "model.layers.0.mlp.experts.lora_A.weight": (8, 32),
              "model.layers.0.mlp.experts.lora_B.weight": (16, 8)}
    ad = adapter(tmp_path / "a", shapes, r=2, target_parameters=["gate_up_proj", "gate.weight", "down_proj"])
    plan = build_plan(ck, ad)
    (router,) = ops(plan, "model.layers.0.mlp.gate.weight")
    assert isinstance(router, LoraRows) and router.expert is None
    (gu,) = ops(plan, "model.layers.0.mlp.experts.gate_up_proj")
    (down,) = ops(plan, "model.layers.0.mlp.experts.down_proj")
    assert isinstance(gu, LoraExperts) and gu.experts == 4 and not gu.transpose
    assert down.a.endswith("experts.lora_A.weight") and gu.a.endswith("base_layer.lora_A.weight")


def test_lora_on_tied_lm_head_writes_a_head_and_unties(tmp_path):
    ck = checkpoint(tmp_path / "b", {"model.embed_tokens.weight": (100, 16), "model.norm.weight": (16,)},
                    {"model_type": "qwen2", "tie_word_embeddings": True})
    plan = build_plan(ck, adapter(tmp_path / "a", lora("lm_head", 100, 16)))
    head = plan.tensors[-1]
    assert head.name == "lm_head.weight" and head.base.name == "model.embed_tokens.weight"
    assert isinstance(head.ops[0], LoraRows) and ops(plan, "model.embed_tokens.weight") == []
    assert plan.config_updates == {"tie_word_embeddings": False}


def test_resized_vocabulary_replacement_updates_vocab_size(tmp_path):
    ck = checkpoint(tmp_path / "b", {"model.embed_tokens.weight": (100, 16), "lm_head.weight": (100, 16)},
                    {"model_type": "llama", "vocab_size": 100})
    shapes = {"model.embed_tokens.weight": (104, 16), "lm_head.weight": (104, 16)}
    plan = build_plan(ck, adapter(tmp_path / "a", shapes, modules_to_save=["embed_tokens", "lm_head"]))
    assert [t.shape for t in plan.tensors] == [(104, 16), (104, 16)]
    assert plan.config_updates == {"vocab_size": 104}


def test_tensors_of_another_type_do_not_belong(tmp_path):
    m = "model.layers.0.self_attn.q_proj"
    ck = checkpoint(tmp_path / "b", {f"{m}.weight": (32, 16)})
    shapes = {**lora(m, 32, 16), f"{m}.hada_w1_a": (32, 2)}
    with pytest.raises(PlanError, match=r"hada_w1_a'\] do not belong to a LORA adapter"):
        build_plan(ck, adapter(tmp_path / "a", shapes))


def test_vlm_layout_is_chosen_from_the_names_alone(tmp_path):
    ck = checkpoint(tmp_path / "b", {"model.language_model.layers.0.self_attn.q_proj.weight": (32, 16),
                                     "model.visual.blocks.0.attn.qkv.weight": (48, 16)})
    plan = build_plan(ck, adapter(tmp_path / "a", lora("model.layers.0.self_attn.q_proj", 32, 16)))
    assert plan.layout == "qwen3.5"
    assert isinstance(ops(plan, "model.language_model.layers.0.self_attn.q_proj.weight")[0], LoraRows)
