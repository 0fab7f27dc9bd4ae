"""Weighted combinations against PEFT's add_weighted_adapter(..., combination_type="cat") followed by a merge.

Three adapters of different ranks, targets, alphas (rank/alpha patterns, rsLoRA, an embedding LoRA) on one tiny
base; PEFT combines them into a new adapter and merges it on the base loaded in float32 (its merge rounded once to
bf16 is the oracle, ≤ 1 ulp for another float32 summation order). GPT-2 covers the transposed (Conv1D) deltas.
"""

from __future__ import annotations

import pytest
import torch
from conftest import gpt2_overrides
from oracle import read_checkpoint
from variant_helpers import F32, compare_to_reference, load_causal, save_adapter

WEIGHTS = [0.7, 0.3, -0.5]


def _adapters(base, root, specs):
    out = []
    for i, kw in enumerate(specs):
        out.append(save_adapter(load_causal(base, F32), root / f"adapter-{i}", seed=10 + i, **kw))
    return out


def peft_cat(base, adapters, weights, out, *, fix_scaling=False):
    """PEFT: load the adapters, add_weighted_adapter(cat), merge that adapter alone, round once to bf16."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = load_causal(base, F32)
    names = [f"a{i}" for i in range(len(adapters))]
    pm = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name=names[0])
    for name, path in zip(names[1:], adapters[1:]):
        pm.load_adapter(str(path), adapter_name=name)
    pm.add_weighted_adapter(names, weights, "combo", combination_type="cat")
    scalings = {m.scaling["combo"] for m in pm.modules() if isinstance(m, LoraLayer) and "combo" in m.scaling}
    if fix_scaling:
        for m in pm.modules():
            if isinstance(m, LoraLayer) and "combo" in m.scaling:
                m.scaling["combo"] = 1.0
    pm.set_adapter("combo")
    merged = pm.merge_and_unload(adapter_names=["combo"])
    merged.to(torch.bfloat16).save_pretrained(str(out))
    return read_checkpoint(out), scalings


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    import oracle

    root = tmp_path_factory.mktemp("combine-llama")
    base = oracle.make_base("llama", root, tokenizer=True)
    adapters = _adapters(base, root, [
        # (PEFT would also save the embedding's base layer, a full replacement a combination refuses)
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"],
             save_kwargs=dict(save_embedding_layers=False)),
        dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "o_proj", "down_proj"],
             rank_pattern={"o_proj": 2}, alpha_pattern={"down_proj": 3}),
        dict(r=2, lora_alpha=4, target_modules=["k_proj", "gate_proj", "v_proj"]),
    ])
    return root, base, adapters


def _targeted(base_t, modules):
    return {k for k in base_t if k.endswith(".weight") and any(f".{m}." in k for m in modules)}


def test_three_adapters_match_peft_cat(llama, tmp_path):
    import streammerge
    from streammerge.verify import verify

    _, base, adapters = llama
    ref, _ = peft_cat(base, adapters, WEIGHTS, tmp_path / "ref")
    out = tmp_path / "merged"
    summary = streammerge.merge(str(base), [str(a) for a in adapters], str(out), weights=WEIGHTS)
    assert summary.weights == WEIGHTS and len(summary.adapters) == 3
    base_t, out_t = read_checkpoint(base), read_checkpoint(out)
    must = _targeted(base_t, ["q_proj", "v_proj", "o_proj", "down_proj", "k_proj", "gate_proj", "embed_tokens"])
    ulps = compare_to_reference(out_t, base_t, ref, must)
    assert len(ulps) == len(must) == 13  # 2 layers x 6 projections + the embedding
    # the float64 reference of verify checks combinations too
    report = verify(str(base), [str(a) for a in adapters], str(out), weights=WEIGHTS, sample_blocks=None)
    assert report.ok, report.problems()
    assert (out / "tokenizer.json").exists()


def test_verify_reports_other_weights(llama, tmp_path):
    """verify recomputes the combination: the same output checked against other weights is reported."""
    import streammerge
    from streammerge.verify import verify

    _, base, adapters = llama
    out = tmp_path / "merged"
    streammerge.merge(str(base), [str(a) for a in adapters[:2]], str(out), weights=[0.7, 0.3])
    report = verify(str(base), [str(a) for a in adapters[:2]], str(out), weights=[0.7, 0.31], sample_blocks=None)
    assert not report.ok
    assert any("q_proj" in p for p in report.problems())


def test_rslora_first_is_the_weighted_sum(llama, tmp_path):
    """With an rsLoRA adapter first PEFT's combined adapter keeps use_rslora with alpha = r = R, so its merge
    scales the concatenation by √R; the combination streammerge writes is Σ w_i s_i B_i A_i whatever the order,
    which is PEFT's cat with the combined adapter's scale set to alpha/r = 1."""
    import streammerge

    _, base, adapters = llama
    order = [adapters[1], adapters[0]]
    ref, fixed_from = peft_cat(base, order, [0.3, 0.7], tmp_path / "ref", fix_scaling=True)
    assert sorted(fixed_from) == [pytest.approx(12 ** 0.5)]  # PEFT's own scale: √R with R = 8 + 4, not 1
    out = tmp_path / "merged"
    streammerge.merge(str(base), [str(a) for a in order], str(out), weights=[0.3, 0.7])
    base_t = read_checkpoint(base)
    compare_to_reference(read_checkpoint(out), base_t, ref,
                         _targeted(base_t, ["q_proj", "v_proj", "o_proj", "down_proj", "embed_tokens"]))


def test_one_adapter_with_a_weight(llama, tmp_path):
    """One adapter with a weight is a combination of one: W + w·s·B·A (PEFT's cat of one adapter: the same
    product of A with the weight and the scale)."""
    import streammerge

    _, base, adapters = llama
    ref, _ = peft_cat(base, [adapters[2], adapters[2]], [0.25, 0.25], tmp_path / "ref")
    out = tmp_path / "merged"
    streammerge.merge(str(base), str(adapters[2]), str(out), weights=[0.5])
    base_t = read_checkpoint(base)
    # 0.25 + 0.25 of the same adapter and 0.5 of it: the same values up to float32 rounding
    compare_to_reference(read_checkpoint(out), base_t, ref, _targeted(base_t, ["k_proj", "gate_proj", "v_proj"]))


def test_gpt2_conv1d_combination(tmp_path_factory):
    import oracle

    import streammerge

    root = tmp_path_factory.mktemp("combine-gpt2")
    base = oracle.make_base("gpt2", root, **gpt2_overrides("gpt2"))
    adapters = _adapters(base, root, [
        dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
        dict(r=6, lora_alpha=3, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
    ])
    ref, _ = peft_cat(base, adapters, [1.5, -0.25], root / "ref")
    out = root / "merged"
    streammerge.merge(str(base), [str(a) for a in adapters], str(out), weights=[1.5, -0.25])
    base_t = read_checkpoint(base)
    must = _targeted(base_t, ["c_attn", "c_proj", "c_fc"])
    assert compare_to_reference(read_checkpoint(out), base_t, ref, must)
