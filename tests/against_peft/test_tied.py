"""Tied input/output embeddings (spec §11) — correct where PEFT is not.

A tied checkpoint (tiny qwen2, tie_word_embeddings=True) stores only `model.embed_tokens.weight` (= E).
The *unmerged* PEFT model is what was trained, so it is the oracle; PEFT's own merge writes one shared tensor
and is wrong in cases (a)-(c) — each test checks that too, so the setup provably distinguishes the two.
Tensor checks use the formula from the adapter file, rounded once to bf16.
"""

from __future__ import annotations

import json

import pytest
import torch
import variant_helpers as vh
from conftest import run_merge
from oracle import checkpoint_keys, read_adapter_tensors, read_checkpoint, ulp_diff
from transformers import AutoModelForCausalLM

E_KEY = "model.embed_tokens.weight"
H_KEY = "lm_head.weight"


@pytest.fixture(scope="module")
def wd(tmp_path_factory):
    return tmp_path_factory.mktemp("tied")


@pytest.fixture(scope="module")
def base(wd):
    b = vh.build_base("qwen2", wd / "qwen2-tied", tie_word_embeddings=True)
    assert H_KEY not in checkpoint_keys(b), "setup: a tied checkpoint has no lm_head.weight"
    assert json.loads((b / "config.json").read_text())["tie_word_embeddings"] is True
    return b


def _run(wd, base, name, **lora):
    ad = vh.save_adapter(vh.load_causal(base), wd / f"ad-{name}", **lora)
    out = wd / f"out-{name}"
    run_merge(base, ad, out)
    return ad, out, read_checkpoint(out), read_checkpoint(base)[E_KEY]


def _tied_flag(out) -> bool:
    return json.loads((out / "config.json").read_text()).get("tie_word_embeddings", True)


def _logit_errors(base, ad, out):
    """(ours vs unmerged, PEFT merged vs unmerged, scale), all f32 forwards."""
    ours = vh.logits(AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval())
    unmerged = vh.logits(vh.peft_unmerged(base, ad))
    peft_merged = vh.logits(vh.peft_merged(base, ad))
    scale = unmerged.abs().max().item()
    return (ours - unmerged).abs().max().item(), (peft_merged - unmerged).abs().max().item(), scale


def _assert_ours_right_peft_wrong(base, ad, out):
    err_ours, err_peft, scale = _logit_errors(base, ad, out)
    assert err_ours <= 2e-2 * scale, f"merged output != unmerged PEFT model: {err_ours:.4g} (scale {scale:.4g})"
    # sanity of the setup: PEFT's merge is far off here (spec §11), so this test can tell the two apart
    assert err_peft > max(10 * err_ours, 0.05 * scale), (err_peft, err_ours, scale)


def _lin_delta(ad, module):
    p = vh.lora_pairs(ad)[module]
    return p["B"] @ p["A"] * vh.scale_of(vh.adapter_config(ad))


def _emb_delta(ad, module):
    p = vh.lora_pairs(ad)[module]
    return (p["eB"] @ p["eA"]).T * vh.scale_of(vh.adapter_config(ad))


def test_a_lora_on_lm_head_only(wd, base):
    ad, out, out_t, E = _run(wd, base, "head", target_modules=["lm_head"])
    assert H_KEY in out_t, "the output must carry its own lm_head now"
    want = (E.float() + _lin_delta(ad, "lm_head")).to(torch.bfloat16)
    assert ulp_diff(out_t[H_KEY], want) <= 1
    assert not torch.equal(out_t[H_KEY], E)
    assert torch.equal(out_t[E_KEY], E), "the input embedding was not trained"
    assert _tied_flag(out) is False
    _assert_ours_right_peft_wrong(base, ad, out)


def test_b_lora_on_embed_tokens_only(wd, base):
    ad, out, out_t, E = _run(wd, base, "emb", target_modules=["embed_tokens"])
    want = (E.float() + _emb_delta(ad, "model.embed_tokens")).to(torch.bfloat16)
    assert ulp_diff(out_t[E_KEY], want) <= 1
    assert not torch.equal(out_t[E_KEY], E)
    assert H_KEY in out_t and torch.equal(out_t[H_KEY], E), "the output embedding stays E"
    assert _tied_flag(out) is False
    _assert_ours_right_peft_wrong(base, ad, out)


def test_c_ensure_weight_tying(wd, base):
    ad, out, out_t, E = _run(wd, base, "ensure", target_modules=["embed_tokens"], ensure_weight_tying=True)
    sd = read_adapter_tensors(ad)
    assert "base_model.model.lm_head.lora_A.weight" in sd, "setup: PEFT saves the tied factors twice"
    want = (E.float() + _emb_delta(ad, "model.embed_tokens")).to(torch.bfloat16)
    assert ulp_diff(out_t[E_KEY], want) <= 1, "the delta must be applied once (PEFT applies it twice)"
    twice = (E.float() + 2 * _emb_delta(ad, "model.embed_tokens")).to(torch.bfloat16)
    assert ulp_diff(out_t[E_KEY], twice) > 8
    assert H_KEY not in out_t, "still tied: no lm_head.weight"
    assert _tied_flag(out) is True
    _assert_ours_right_peft_wrong(base, ad, out)


def test_d_modules_to_save_lm_head(wd, base):
    ad, out, out_t, E = _run(wd, base, "mts", target_modules=["q_proj"], modules_to_save=["lm_head"],
                             mutate=lambda pm: vh.perturb(pm, lambda n: "lm_head.modules_to_save" in n))
    saved = read_adapter_tensors(ad)["base_model.model.lm_head.weight"]
    assert H_KEY in out_t and torch.equal(out_t[H_KEY], saved.to(torch.bfloat16))
    assert not torch.equal(out_t[H_KEY], E)
    assert torch.equal(out_t[E_KEY], E)
    assert _tied_flag(out) is False
    err_ours, err_peft, scale = _logit_errors(base, ad, out)
    assert err_ours <= 2e-2 * scale, (err_ours, scale)
    assert err_peft <= 2e-2 * scale, "PEFT is right here; both must agree with the unmerged model"


def test_e_lora_on_both_embed_and_head(wd, base):
    """Both targeted, no ensure_weight_tying: the unmerged model used E+Δ_E in and E+Δ_lm out -> untie."""
    ad, out, out_t, E = _run(wd, base, "both", target_modules=["embed_tokens", "lm_head"])
    want_e = (E.float() + _emb_delta(ad, "model.embed_tokens")).to(torch.bfloat16)
    want_h = (E.float() + _lin_delta(ad, "lm_head")).to(torch.bfloat16)
    assert ulp_diff(out_t[E_KEY], want_e) <= 1
    assert H_KEY in out_t and ulp_diff(out_t[H_KEY], want_h) <= 1
    assert _tied_flag(out) is False
    _assert_ours_right_peft_wrong(base, ad, out)


def test_f_trainable_tokens_on_tied_embedding(wd, base):
    """Trainable tokens on a tied embedding: PEFT ties the lm_head wrapper to the same rows, so the new rows
    are used in and out; the output may stay tied (or untie with identical tensors) — logits decide."""
    idx = [3, 9, 100]
    ad, out, out_t, _E = _run(wd, base, "tok", target_modules=["q_proj"], trainable_token_indices=idx,
                             mutate=lambda pm: vh.perturb(pm, lambda n: "trainable_tokens_delta" in n))
    saved = read_adapter_tensors(ad)["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    assert torch.equal(out_t[E_KEY][idx], saved.to(torch.bfloat16))
    if H_KEY in out_t:
        assert torch.equal(out_t[H_KEY], out_t[E_KEY])
    err_ours, _err_peft, scale = _logit_errors(base, ad, out)
    assert err_ours <= 2e-2 * scale, (err_ours, scale)


def test_g_resized_vocab_tied(wd, base):
    """resize_token_embeddings(264) on a tied model + save_embedding_layers: both saved embeddings are the
    same tensor, so the output stays tied with 264 rows and vocab_size 264."""
    model = vh.load_causal(base)
    model.resize_token_embeddings(264)
    ad = vh.save_adapter(model, wd / "ad-resize-tied", target_modules=["q_proj"],
                         save_kwargs=dict(save_embedding_layers=True))
    out = wd / "out-resize-tied"
    run_merge(base, ad, out)
    out_t = read_checkpoint(out)
    assert out_t[E_KEY].shape == (264, 64)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == 264
    if H_KEY in out_t:
        assert out_t[H_KEY].shape == (264, 64) and cfg.get("tie_word_embeddings", True) is False
    ids = torch.tensor([[3, 260, 263, 17, 9]])
    ours = vh.logits(AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval(), ids)
    unmerged = vh.logits(vh.peft_unmerged(base, ad, prepare=lambda m: m.resize_token_embeddings(264)), ids)
    vh.assert_logits_close(ours, unmerged, what="resized tied vocab")
