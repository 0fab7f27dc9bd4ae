"""DoRA, embedding LoRA, full replacements, lora_bias — each against PEFT.

Oracle: PEFT's merge_and_unload on the base loaded in float32, rounded once to bf16 (see variant_helpers).
PEFT on a bf16 base rounds embeddings twice (spec §4); where that matters it is pointed out and also bounded.
"""

from __future__ import annotations

import json

import pytest
import torch
import variant_helpers as vh
from conftest import run_merge
from oracle import read_adapter_tensors, read_checkpoint, ulp_diff


@pytest.fixture(scope="module")
def wd(tmp_path_factory):
    return tmp_path_factory.mktemp("variants")


@pytest.fixture(scope="module")
def llama(wd):
    return vh.build_base("llama", wd / "llama")


@pytest.fixture(scope="module")
def gpt2(wd):
    v = 256
    return vh.build_base("gpt2", wd / "gpt2", bos_token_id=v - 1, eos_token_id=v - 1)


@pytest.fixture(scope="module")
def qwen2(wd):
    # untied qwen2: q/k/v have biases
    return vh.build_base("qwen2", wd / "qwen2", tie_word_embeddings=False)


def _merge_and_compare(wd, name, base, adapter, must_change, *, cls=None, prepare=None, max_ulp=1, **merge_kw):
    out = wd / f"out-{name}"
    run_merge(base, adapter, out, **merge_kw)
    ref = vh.reference_on_disk(base, adapter, wd / f"ref-{name}", cls=cls, prepare=prepare)
    out_t, base_t = read_checkpoint(out), read_checkpoint(base)
    vh.compare_to_reference(out_t, base_t, ref, must_change, max_ulp=max_ulp)
    return out, out_t, base_t, ref


def _is_mag(n):
    return "lora_magnitude_vector" in n


# 1. DoRA ------------------------------------------------------------------------------------------------

def test_dora_linear_rows(wd, llama):
    ad = vh.save_adapter(vh.load_causal(llama), wd / "ad-dora-lin", use_dora=True,
                         target_modules=["q_proj", "v_proj", "down_proj"],
                         mutate=lambda pm: vh.perturb(pm, _is_mag, multiplicative=True))
    assert any(k.endswith("lora_magnitude_vector") for k in read_adapter_tensors(ad))
    must = {f"model.layers.{i}.{m}.weight" for i in range(2)
            for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    _merge_and_compare(wd, "dora-lin", llama, ad, must)


def test_dora_magnitude_matters(wd, llama):
    """Same A/B, magnitude scaled x2 for one module: the merged rows must scale x2 (norm per row)."""
    ad = vh.save_adapter(vh.load_causal(llama), wd / "ad-dora-m", use_dora=True, target_modules=["q_proj"],
                         mutate=lambda pm: vh.perturb(pm, _is_mag, multiplicative=True))
    _out, out_t, base_t, _ref = _merge_and_compare(wd, "dora-m", llama, ad,
                                                 {"model.layers.0.self_attn.q_proj.weight"})
    # independent formula of spec §8: m / ||W + dW||_row * (W + dW)
    sd = read_adapter_tensors(ad)
    cfg = vh.adapter_config(ad)
    p = "base_model.model.model.layers.0.self_attn.q_proj."
    w = base_t["model.layers.0.self_attn.q_proj.weight"].float()
    v = w + sd[p + "lora_B.weight"].float() @ sd[p + "lora_A.weight"].float() * vh.scale_of(cfg)
    m = sd[p + "lora_magnitude_vector"].float()
    want = (m / v.norm(dim=1)).unsqueeze(1) * v
    assert ulp_diff(out_t["model.layers.0.self_attn.q_proj.weight"], want.to(torch.bfloat16)) <= 1


def test_dora_gpt2_conv1d_column_norms(wd, gpt2):
    ad = vh.save_adapter(vh.load_causal(gpt2), wd / "ad-dora-gpt2", use_dora=True, fan_in_fan_out=True,
                         target_modules=["c_attn", "c_fc"],
                         mutate=lambda pm: vh.perturb(pm, _is_mag, multiplicative=True))
    must = {f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "mlp.c_fc")}
    _merge_and_compare(wd, "dora-gpt2", gpt2, ad, must)


def test_dora_embedding_norm_over_vocab(wd, llama):
    ad = vh.save_adapter(vh.load_causal(llama), wd / "ad-dora-emb", use_dora=True,
                         target_modules=["embed_tokens", "q_proj"],
                         mutate=lambda pm: vh.perturb(pm, _is_mag, multiplicative=True))
    keys = read_adapter_tensors(ad)
    assert keys["base_model.model.model.embed_tokens.lora_magnitude_vector"].shape == (64,)
    _merge_and_compare(wd, "dora-emb", llama, ad,
                       {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"})


# 2. Embedding LoRA --------------------------------------------------------------------------------------

def test_embedding_lora_untied_llama(wd, llama):
    ad = vh.save_adapter(vh.load_causal(llama), wd / "ad-emb", target_modules=["embed_tokens"])
    sd = read_adapter_tensors(ad)
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in sd
    _out, out_t, base_t, _ref = _merge_and_compare(wd, "emb", llama, ad, {"model.embed_tokens.weight"})
    # PEFT on a bf16 base rounds the embedding delta to bf16 first (double rounding, spec §4/§6), so it is
    # not the oracle; it may differ by one rounding of the delta plus one of the sum -- never more.
    peft_bf16 = vh.peft_merged(llama, ad, dtype=torch.bfloat16).state_dict()["model.embed_tokens.weight"].float()
    w = base_t["model.embed_tokens.weight"].float()
    bound = 2.0 ** -7 * ((peft_bf16 - w).abs() + peft_bf16.abs()) * 1.01  # 1 ulp of the sum + 1 of the delta
    assert bool(((out_t["model.embed_tokens.weight"].float() - peft_bf16).abs() <= bound).all())


# 3. Full replacements -----------------------------------------------------------------------------------

def test_modules_to_save_lm_head(wd, llama):
    def mutate(pm):
        vh.perturb(pm, lambda n: "lm_head.modules_to_save" in n)

    ad = vh.save_adapter(vh.load_causal(llama), wd / "ad-mts", target_modules=["q_proj"],
                         modules_to_save=["lm_head"], mutate=mutate)
    assert "base_model.model.lm_head.weight" in read_adapter_tensors(ad)
    _, out_t, _, _ = _merge_and_compare(wd, "mts", llama, ad,
                                        {"lm_head.weight", "model.layers.1.self_attn.q_proj.weight"}, max_ulp=1)
    saved = read_adapter_tensors(ad)["base_model.model.lm_head.weight"]
    assert torch.equal(out_t["lm_head.weight"], saved.to(torch.bfloat16)), "modules_to_save must be verbatim"


def test_modules_to_save_score_seq_cls(wd):
    from transformers import AutoModelForSequenceClassification, LlamaForSequenceClassification

    base = vh.build_base("llama", wd / "llama-cls", cls=LlamaForSequenceClassification, num_labels=3,
                         pad_token_id=0)
    model = vh.load_causal(base, cls=AutoModelForSequenceClassification)
    ad = vh.save_adapter(model, wd / "ad-cls", task_type="SEQ_CLS", target_modules=["q_proj", "v_proj"],
                         mutate=lambda pm: vh.perturb(pm, lambda n: "score.modules_to_save" in n))
    assert "base_model.model.score.weight" in read_adapter_tensors(ad)
    _merge_and_compare(wd, "cls", base, ad, {"score.weight", "model.layers.0.self_attn.v_proj.weight"},
                       cls=AutoModelForSequenceClassification)


def test_saved_base_layer_overrides_checkpoint(wd, llama):
    """embed_tokens targeted -> the file holds embed_tokens.base_layer.weight, which PEFT loads over the
    checkpoint value before merging. The model was perturbed before training, so it differs from disk."""
    model = vh.load_causal(llama)
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(0.25)
    ad = vh.save_adapter(model, wd / "ad-baselayer", target_modules=["embed_tokens", "q_proj"])
    sd = read_adapter_tensors(ad)
    bl = sd["base_model.model.model.embed_tokens.base_layer.weight"]
    assert not torch.equal(bl.to(torch.bfloat16), read_checkpoint(llama)["model.embed_tokens.weight"])
    _, out_t, base_t, _ = _merge_and_compare(wd, "baselayer", llama, ad, {"model.embed_tokens.weight"})
    # the shift of 0.25 survives (a merge onto the disk value would be ~0.25 lower everywhere)
    shift = (out_t["model.embed_tokens.weight"].float() - base_t["model.embed_tokens.weight"].float()).mean()
    assert abs(shift.item() - 0.25) < 0.05, shift


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_full_replacement(wd, qwen2, bias):
    def mutate(pm):
        vh.perturb(pm, lambda n: n.endswith("bias") and "lora_" not in n)

    ad = vh.save_adapter(vh.load_causal(qwen2), wd / f"ad-bias-{bias}", target_modules=["q_proj", "o_proj"],
                         bias=bias, mutate=mutate)
    sd = read_adapter_tensors(ad)
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias" in sd
    must = {"model.layers.0.self_attn.q_proj.bias", "model.layers.1.self_attn.q_proj.weight"}
    if bias == "all":
        assert "base_model.model.model.layers.0.self_attn.k_proj.bias" in sd
        must |= {"model.layers.0.self_attn.k_proj.bias", "model.layers.1.self_attn.v_proj.bias"}
    else:
        assert "base_model.model.model.layers.0.self_attn.k_proj.bias" not in sd
    _, out_t, base_t, _ = _merge_and_compare(wd, f"bias-{bias}", qwen2, ad, must)
    if bias == "lora_only":
        # not saved -> the checkpoint value, even though the trained model had another one
        assert torch.equal(out_t["model.layers.0.self_attn.k_proj.bias"], base_t["model.layers.0.self_attn.k_proj.bias"])


def test_bias_all_on_gpt2(wd, gpt2):
    ad = vh.save_adapter(vh.load_causal(gpt2), wd / "ad-bias-gpt2", target_modules=["c_attn"], bias="all",
                         fan_in_fan_out=True,
                         mutate=lambda pm: vh.perturb(pm, lambda n: n.endswith("bias") and "lora_" not in n))
    must = {"transformer.h.0.attn.c_attn.bias", "transformer.h.0.mlp.c_fc.bias", "transformer.h.0.ln_1.bias",
            "transformer.h.1.attn.c_attn.weight"}
    _merge_and_compare(wd, "bias-gpt2", gpt2, ad, must)


def test_trainable_tokens(wd, llama):
    idx = [3, 5, 7, 200]
    ad = vh.save_adapter(vh.load_causal(llama), wd / "ad-tok", target_modules=["q_proj"],
                         trainable_token_indices=idx,
                         mutate=lambda pm: vh.perturb(pm, lambda n: "trainable_tokens_delta" in n))
    sd = read_adapter_tensors(ad)
    assert sd["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"].shape == (4, 64)
    _, out_t, base_t, _ = _merge_and_compare(wd, "tok", llama, ad,
                                             {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"})
    e_out, e_base = out_t["model.embed_tokens.weight"], base_t["model.embed_tokens.weight"]
    others = [i for i in range(e_out.shape[0]) if i not in idx]
    assert torch.equal(e_out[others], e_base[others]), "only the listed rows may change"


def test_resized_vocab_save_embedding_layers(wd):
    from transformers import AutoModelForCausalLM

    base = vh.build_base("llama", wd / "llama-v128", vocab_size=128)
    model = vh.load_causal(base)
    model.resize_token_embeddings(136)
    ad = vh.save_adapter(model, wd / "ad-resize", target_modules=["q_proj", "v_proj"],
                         save_kwargs=dict(save_embedding_layers=True))
    sd = read_adapter_tensors(ad)
    assert sd["base_model.model.model.embed_tokens.weight"].shape == (136, 64)
    assert sd["base_model.model.lm_head.weight"].shape == (136, 64)

    def prepare(m):
        m.resize_token_embeddings(136)

    out, out_t, _, _ = _merge_and_compare(
        wd, "resize", base, ad,
        {"model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.weight"}, prepare=prepare)
    assert out_t["model.embed_tokens.weight"].shape == (136, 64)
    assert out_t["lm_head.weight"].shape == (136, 64)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 136
    ids = torch.tensor([[3, 130, 135, 17, 9]])
    ours = vh.logits(AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval(), ids)
    assert ours.shape[-1] == 136
    peft_ref = vh.logits(vh.peft_merged(base, ad, prepare=prepare), ids)
    vh.assert_logits_close(ours, peft_ref, what="resized vocab")


# 5. lora_bias -------------------------------------------------------------------------------------------

def test_lora_bias(wd, qwen2):
    ad = vh.save_adapter(vh.load_causal(qwen2), wd / "ad-lbias", target_modules=["q_proj", "k_proj", "v_proj"],
                         lora_bias=True, mutate=lambda pm: vh.perturb(pm, lambda n: "lora_B" in n and n.endswith("bias")))
    sd = read_adapter_tensors(ad)
    bkey = "base_model.model.model.layers.0.self_attn.k_proj.lora_B.bias"
    assert bkey in sd and sd[bkey].abs().max() > 0
    must = {f"model.layers.{i}.self_attn.{p}.{w}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj")
            for w in ("weight", "bias")}
    _, out_t, base_t, _ = _merge_and_compare(wd, "lbias", qwen2, ad, must)
    # formula: b + s * lora_B.bias
    s = vh.scale_of(vh.adapter_config(ad))
    want = base_t["model.layers.0.self_attn.k_proj.bias"].float() + s * sd[bkey].float()
    assert ulp_diff(out_t["model.layers.0.self_attn.k_proj.bias"], want.to(torch.bfloat16)) <= 1


# 10. other PEFT types (spec §13), same streaming engine ----------------------------------------------

@pytest.mark.parametrize("kind", ["LOHA", "LOKR", "IA3", "VERA"])
def test_other_peft_types_match_peft(wd, llama, kind):
    ad = vh.other_peft_adapter(llama, wd / f"ad-{kind}", kind)
    must = {"model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"}
    if kind == "IA3":
        must |= {"model.layers.0.mlp.down_proj.weight"}
    _merge_and_compare(wd, kind, llama, ad, must)


@pytest.mark.parametrize("kind", ["IA3", "VERA"])
def test_other_peft_types_on_conv1d(wd, gpt2, kind):
    """GPT-2 Conv1D ([in, out] weights): PEFT transposes the IA3 vector and the VeRA delta, and IA3 on a
    non-feed-forward layer scales its bias too."""
    import peft

    cfg = {
        "IA3": peft.IA3Config(target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"],
                              init_ia3_weights=False),
        "VERA": peft.VeraConfig(r=4, target_modules=["c_attn", "c_fc"], save_projection=True),
    }[kind]
    torch.manual_seed(3)
    pm = peft.get_peft_model(vh.load_causal(gpt2), cfg)
    vh.perturb(pm, lambda n: "vera_lambda" in n or "ia3_l" in n, multiplicative=kind == "IA3")
    ad = wd / f"ad-{kind}-conv1d"
    pm.save_pretrained(str(ad))
    must = {f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "mlp.c_fc")}
    if kind == "IA3":
        must |= {"transformer.h.0.attn.c_attn.bias"}  # scaled with the outputs; c_fc (feed-forward) keeps its own
    _merge_and_compare(wd, f"{kind}-conv1d", gpt2, ad, must)


def test_dora_conv2d_custom_module(wd):
    """DoRA on ConvNd: magnitude [1, out, 1, 1], norm over all dims but the output channel (spec §8)."""
    base = vh.save_convnet(wd / "convnet")
    ad = vh.save_adapter(vh.load_convnet(base, torch.bfloat16), wd / "ad-dora-conv", use_dora=True,
                         target_modules=["c2", "c3", "fc"],
                         mutate=lambda pm: vh.perturb(pm, _is_mag, multiplicative=True))
    assert read_adapter_tensors(ad)["base_model.model.c2.lora_magnitude_vector"].shape == (1, 6, 1, 1)
    out = wd / "out-dora-conv"
    run_merge(base, ad, out)
    vh.compare_to_reference(read_checkpoint(out), read_checkpoint(base), vh.convnet_reference(base, ad),
                            {"c2.weight", "c3.weight", "fc.weight"})


def test_modules_to_save_norm_suffix_quirk(wd, llama):
    """modules_to_save=["norm"] matches by endswith without a dot boundary (spec §10.1): PEFT also saves every
    input_layernorm / post_attention_layernorm, and all of them replace the checkpoint's."""
    ad = vh.save_adapter(vh.load_causal(llama), wd / "ad-mts-norm", target_modules=["q_proj"],
                         modules_to_save=["norm"],
                         mutate=lambda pm: vh.perturb(pm, lambda n: "modules_to_save" in n))
    sd = read_adapter_tensors(ad)
    assert "base_model.model.model.layers.0.input_layernorm.weight" in sd
    must = {"model.norm.weight", "model.layers.0.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight"}
    _merge_and_compare(wd, "mts-norm", llama, ad, must)


def test_resized_vocab_with_embedding_lora(wd):
    """Embedding LoRA on a resized vocabulary: base_layer.weight [136, H] replaces the 128-row checkpoint
    tensor, and the LoRA delta (A is [r, 136]) is added on top."""
    base = vh.build_base("llama", wd / "llama-v128b", vocab_size=128)
    model = vh.load_causal(base)
    model.resize_token_embeddings(136)
    ad = vh.save_adapter(model, wd / "ad-resize-emb", target_modules=["embed_tokens", "lm_head", "q_proj"])
    sd = read_adapter_tensors(ad)
    assert sd["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (4, 136)

    def prepare(m):
        m.resize_token_embeddings(136)

    out, _out_t, _, _ = _merge_and_compare(wd, "resize-emb", base, ad,
                                          {"model.embed_tokens.weight", "lm_head.weight"}, prepare=prepare)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 136


def test_dora_adapter_bin_format(wd, llama):
    """The same DoRA merge from adapter_model.bin (torch.save, keys identical to the safetensors file)."""
    ad = vh.save_adapter(vh.load_causal(llama), wd / "ad-dora-bin", use_dora=True, target_modules=["k_proj"],
                         save_kwargs=dict(safe_serialization=False),
                         mutate=lambda pm: vh.perturb(pm, _is_mag, multiplicative=True))
    assert (ad / "adapter_model.bin").exists() and not (ad / "adapter_model.safetensors").exists()
    _merge_and_compare(wd, "dora-bin", llama, ad, {"model.layers.1.self_attn.k_proj.weight"})
