"""Qwen3.5 (vision-language checkpoint, text-only adapter).

What transformers 5.24 does (checked by test_on_disk_and_module_names):
* `Qwen3_5ForConditionalGeneration.save_pretrained` writes `model.language_model.layers.N…`,
  `model.language_model.embed_tokens/norm`, `model.visual.…` and `lm_head.weight`.
* `AutoModelForCausalLM.from_pretrained` on that folder builds the text-only `Qwen3_5ForCausalLM`, whose
  module names are `model.layers.N…` (the `qwen3_5_text` conversion renames `model.language_model.X → model.X`
  on load and silently drops the vision tower).
* A LoRA made on that model is saved as `base_model.model.model.layers.N….lora_A.weight`, i.e. with names that
  do not exist on disk: the merger must map `model.layers.N` → `model.language_model.layers.N`.
* The rank/alpha patterns of the adapter are matched against *module* names (`model.layers.1.self_attn.q_proj`
  is used as a full-name alpha key here); matched against the disk name it would not fire.
"""

from __future__ import annotations

import oracle
import pytest
import torch
from conftest import run_merge
from oracle import adapter_modules, bit_equal, checkpoint_keys, read_checkpoint, read_output, ulp_diff

TEXT_DISK = "model.language_model."
INPUT_IDS = torch.randint(3, 240, (2, 12), generator=torch.Generator().manual_seed(7))


def module_to_disk(name: str) -> str:
    """Text-only class state-dict/module name → on-disk name of the VLM checkpoint (explicit, for the test)."""
    if name.startswith("model."):
        return TEXT_DISK + name[len("model."):]
    assert name.startswith("lm_head"), name
    return name


def test_on_disk_and_module_names(qwen35):
    keys = checkpoint_keys(qwen35.base)
    assert "lm_head.weight" in keys
    assert any(k.startswith("model.visual.") for k in keys)
    assert not any(k.startswith("model.layers.") for k in keys)
    text = [k for k in keys if k.startswith(TEXT_DISK)]
    assert "model.language_model.layers.0.linear_attn.in_proj_qkv.weight" in text
    assert "model.language_model.layers.1.self_attn.q_proj.weight" in text
    assert set(keys) == set(text) | {k for k in keys if k.startswith("model.visual.")} | {"lm_head.weight"}
    ad = oracle.read_adapter_tensors(qwen35.adapter)
    assert all(k.startswith("base_model.model.model.layers.") for k in ad), sorted(ad)[:3]
    # the reference model's names are module names and map 1:1 onto the text part of the checkpoint
    ref = qwen35.reference()
    assert {module_to_disk(k) for k in ref} == set(text) | {"lm_head.weight"}


@pytest.fixture(scope="module")
def q35_outputs(qwen35, tmp_path_factory):
    root = tmp_path_factory.mktemp("q35out")
    outs = {}
    for loader in ("auto", "qwen3.5"):
        outs[loader] = root / loader
        run_merge(qwen35.base, qwen35.adapter, outs[loader], dtype="bf16", loader=loader)
    return outs


@pytest.mark.parametrize("loader", ["auto", "qwen3.5"])
def test_merge_matches_peft_text_model(qwen35, q35_outputs, loader):
    out = q35_outputs[loader]
    base_t = read_checkpoint(qwen35.base)
    out_t = read_output(out)
    assert set(checkpoint_keys(out)) == set(checkpoint_keys(qwen35.base))
    ref = {module_to_disk(k): v for k, v in qwen35.reference().items()}
    merged_keys = {module_to_disk(m) + ".weight" for m in adapter_modules(qwen35.adapter)}
    assert len(merged_keys) == 15  # 8 linear in the linear-attention layer, 7 in the full-attention layer
    bad = {}
    for k, b in base_t.items():
        o = out_t[k]
        assert o.shape == b.shape and o.dtype == torch.bfloat16, k
        if k.startswith("model.visual."):
            assert bit_equal(o, b), f"vision tensor {k} changed"
            continue
        # 1 ulp: fp32 summation order in B@A only (see test_oracle_core)
        d = ulp_diff(o, ref[k])
        if d > 1:
            bad[k] = d
        if k in merged_keys:
            assert not torch.equal(o, b), f"{k} targeted but unchanged"
        else:
            assert bit_equal(o, b), f"{k} not targeted but changed"
    assert not bad, f"text tensors further than 1 ulp from PEFT's merge: {bad}"
    # the full-name alpha key (module name) must have been used for this module
    f = oracle.formula_merge(base_t, qwen35.adapter, torch.bfloat16,
                             module_to_key=lambda m: module_to_disk(m) + ".weight")
    k = "model.language_model.layers.1.self_attn.q_proj.weight"
    assert ulp_diff(out_t[k], f[k]) <= 1


def test_loaders_agree(q35_outputs):
    a, b = read_output(q35_outputs["auto"]), read_output(q35_outputs["qwen3.5"])
    assert a.keys() == b.keys() and all(bit_equal(a[k], b[k]) for k in a)


def test_merged_text_logits(qwen35, q35_outputs):
    """The merged VLM checkpoint, loaded as the text-only class, computes what PEFT's merged model does."""
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(str(q35_outputs["auto"]), dtype=torch.float32).eval()
        peft = oracle.peft_merged_model(qwen35.base, qwen35.adapter, torch.bfloat16).float()
        a, b = ours(INPUT_IDS).logits, peft(INPUT_IDS).logits
    # same bf16 weights up to isolated 1-ulp differences: 2e-3 of the logit scale (see test_oracle_core)
    assert (a - b).abs().max().item() <= 2e-3 * b.abs().max().item()


def test_causal_lm_loader_rejects_vlm_layout(qwen35, tmp_path):
    """loader="causal-lm" means module name == disk name; `model.layers.N…` does not exist in this checkpoint."""
    from streammerge.errors import PlanError

    out = tmp_path / "out"
    with pytest.raises(PlanError) as ei:
        run_merge(qwen35.base, qwen35.adapter, out, dtype="bf16", loader="causal-lm")
    assert "model.layers." in str(ei.value)
    assert not out.exists()


@pytest.fixture(scope="module")
def vlm_adapter(qwen35, tmp_path_factory):
    """An adapter trained on the VLM class itself: module names == disk names (`model.language_model.…`),
    with LoRA on vision linears too (qkv has a bias; linear_fc1 exists in the blocks and in the merger)."""
    from transformers import Qwen3_5ForConditionalGeneration

    targets = oracle.QWEN35_TARGETS + ["qkv", "linear_fc1"]
    return oracle.make_adapter(
        qwen35.base, tmp_path_factory.mktemp("vlm-ad"), name="adapter-vlm", model_class=Qwen3_5ForConditionalGeneration,
        target_modules=targets, rank_pattern={"model.visual.blocks.0.attn.qkv": 8},
        alpha_pattern={"model.language_model.layers.1.self_attn.q_proj": 24, "linear_fc1": 3},
    )


@pytest.mark.parametrize("loader", ["auto", "qwen3.5"])
def test_vlm_class_adapter(qwen35, vlm_adapter, tmp_path, loader):
    from transformers import Qwen3_5ForConditionalGeneration

    ad = oracle.read_adapter_tensors(vlm_adapter)
    assert any(k.startswith("base_model.model.model.visual.") for k in ad)
    assert any(k.startswith("base_model.model.model.language_model.layers.") for k in ad)
    out = tmp_path / "out"
    run_merge(qwen35.base, vlm_adapter, out, dtype="bf16", loader=loader)
    base_t, out_t = read_checkpoint(qwen35.base), read_output(out)
    assert set(out_t) == set(base_t)
    ref = oracle.peft_reference(qwen35.base, vlm_adapter, torch.bfloat16, model_class=Qwen3_5ForConditionalGeneration)
    merged_keys = {m + ".weight" for m in adapter_modules(vlm_adapter)}
    assert merged_keys <= set(base_t)  # VLM module names are the disk names
    assert any(k.startswith("model.visual.") for k in merged_keys)
    bad = {k: ulp_diff(out_t[k], ref[k]) for k in base_t if ulp_diff(out_t[k], ref[k]) > 1}
    assert not bad, bad  # 1 ulp: fp32 summation order only
    for k, b in base_t.items():
        if k in merged_keys:
            assert not torch.equal(out_t[k], b), k
        else:
            assert bit_equal(out_t[k], b), k
