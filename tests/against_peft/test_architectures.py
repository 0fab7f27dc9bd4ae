"""Checkpoint layouts (spec §14) and other architectures, each against PEFT.

Layouts: adapters carry *module* names of the class they were trained on; transformers 5 writes the legacy
on-disk names (LLaVA `language_model.model.*`, Qwen2-VL `model.*` + `visual.*`, Mixtral `block_sparse_moe`).
The oracle is PEFT's float32 merge saved by transformers (=> disk names), rounded once to bf16.
"""

from __future__ import annotations

import pytest
import torch
import variant_helpers as vh
from conftest import run_merge
from oracle import checkpoint_keys, read_adapter_tensors, read_checkpoint
from transformers import AutoModel, AutoModelForSeq2SeqLM


@pytest.fixture(scope="module")
def wd(tmp_path_factory):
    return tmp_path_factory.mktemp("arch")


def _check(wd, name, base, ad, must, *, cls=None, ref_kwargs=None, merge_kwargs=None):
    out = wd / f"out-{name}"
    run_merge(base, ad, out, **(merge_kwargs or {}))
    ref = vh.reference_on_disk(base, ad, wd / f"ref-{name}", cls=cls, **(ref_kwargs or {}))
    out_t = read_checkpoint(out)
    vh.compare_to_reference(out_t, read_checkpoint(base), ref, must)
    return out, out_t


# 7. layouts ---------------------------------------------------------------------------------------------

def _llava_cls():
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration


@pytest.fixture(scope="module")
def llava(wd):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    torch.manual_seed(0)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          image_size=16, patch_size=8, projection_dim=32)
    tc = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = _llava_cls()(LlavaConfig(vision_config=vc, text_config=tc, image_token_id=120))
    base = vh.save_base(model, wd / "llava")
    keys = checkpoint_keys(base)
    # what transformers 5.24 writes (verified here so a change of layout shows up as a setup failure)
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in keys
    assert "language_model.lm_head.weight" in keys
    return base, tc


def test_llava_adapter_trained_on_llava_class(wd, llava):
    base, _ = llava
    model = vh.load_causal(base, cls=_llava_cls())
    ad = vh.save_adapter(model, wd / "ad-llava", target_modules=r".*(language_model|vision_tower).*\.(q_proj|v_proj)")
    sd = read_adapter_tensors(ad)
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in sd
    must = {"language_model.model.layers.1.self_attn.v_proj.weight"}
    must |= {k for k in checkpoint_keys(base) if k.startswith("vision_tower.") and k.endswith("q_proj.weight")}
    _check(wd, "llava", base, ad, must, cls=_llava_cls())


def test_text_only_adapter_on_llava_checkpoint(wd, llava):
    from transformers import LlamaForCausalLM

    base, text_cfg = llava
    torch.manual_seed(4)
    ad = vh.save_adapter(LlamaForCausalLM(text_cfg).to(torch.bfloat16), wd / "ad-llava-text",
                         target_modules=["q_proj", "v_proj", "down_proj"])
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in read_adapter_tensors(ad)
    # On the LLaVA class PEFT also injects LoRA into the vision tower's q_proj/v_proj (same suffixes), which
    # have no saved keys and would keep random init_lora_weights=False factors (spec §2.3). With the default
    # init (B = 0, what a trained adapter's config says) they stay zero, so the reference is the text delta only.
    vh.edit_adapter_config(ad, init_lora_weights=True)
    must = {f"language_model.model.layers.{i}.{m}.weight" for i in range(2)
            for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    # PEFT needs an explicit key_mapping for this (spec §14.1); streammerge must find the layout itself
    _check(wd, "llava-text", base, ad, must, cls=_llava_cls(),
           ref_kwargs=dict(key_mapping={r"^model\.layers": "model.language_model.layers"}))


def test_qwen2_vl(wd):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}, eos_token_id=2, bos_token_id=1),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=120, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123)
    base = vh.save_base(Qwen2VLForConditionalGeneration(cfg), wd / "qwen2vl")
    keys = checkpoint_keys(base)
    assert "model.layers.0.self_attn.q_proj.weight" in keys and "visual.blocks.0.attn.qkv.weight" in keys
    model = vh.load_causal(base, cls=Qwen2VLForConditionalGeneration)
    ad = vh.save_adapter(model, wd / "ad-qwen2vl", target_modules=r".*(language_model.*\.(q_proj|v_proj)|visual.*\.qkv)")
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in read_adapter_tensors(ad)
    must = {"model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight",
            "visual.blocks.0.attn.qkv.weight"}
    _check(wd, "qwen2vl", base, ad, must, cls=Qwen2VLForConditionalGeneration)


def test_mixtral_mlp_to_block_sparse_moe(wd):
    """Module `model.layers.N.mlp.gate` (router, saved via modules_to_save) is `block_sparse_moe.gate` on disk."""
    base = vh.build_base("mixtral", wd / "mixtral", num_local_experts=3, num_experts_per_tok=2)
    assert "model.layers.0.block_sparse_moe.gate.weight" in checkpoint_keys(base)
    ad = vh.save_adapter(vh.load_causal(base), wd / "ad-mixtral-gate", target_modules=["q_proj"],
                         modules_to_save=["mlp.gate"],
                         mutate=lambda pm: vh.perturb(pm, lambda n: "gate.modules_to_save" in n))
    assert "base_model.model.model.layers.0.mlp.gate.weight" in read_adapter_tensors(ad)
    must = {"model.layers.0.block_sparse_moe.gate.weight", "model.layers.1.block_sparse_moe.gate.weight",
            "model.layers.0.self_attn.q_proj.weight"}
    _check(wd, "mixtral-gate", base, ad, must)


# 8. other architectures ---------------------------------------------------------------------------------

def test_t5_encoder_decoder(wd):
    base = vh.build_base("t5", wd / "t5", cls=AutoModelForSeq2SeqLM, vocab_size=128, d_model=32, d_ff=64,
                         num_layers=1, num_decoder_layers=1, num_heads=2, d_kv=16, decoder_start_token_id=0)
    assert {k for k in checkpoint_keys(base) if "embed" in k or k in ("shared.weight", "lm_head.weight")} == \
        {"shared.weight"}, "setup: tied T5 stores only shared.weight"
    model = vh.load_causal(base, cls=AutoModelForSeq2SeqLM)
    ad = vh.save_adapter(model, wd / "ad-t5", task_type="SEQ_2_SEQ_LM", target_modules=["q", "v"])
    must = {"encoder.block.0.layer.0.SelfAttention.q.weight", "encoder.block.0.layer.0.SelfAttention.v.weight",
            "decoder.block.0.layer.0.SelfAttention.q.weight", "decoder.block.0.layer.1.EncDecAttention.v.weight"}
    out, _ = _check(wd, "t5", base, ad, must, cls=AutoModelForSeq2SeqLM)
    dec = torch.zeros(2, 3, dtype=torch.long)
    ours = vh.logits(AutoModelForSeq2SeqLM.from_pretrained(str(out), dtype=torch.float32).eval(), decoder_input_ids=dec)
    unmerged = vh.logits(vh.peft_unmerged(base, ad, cls=AutoModelForSeq2SeqLM), decoder_input_ids=dec)
    vh.assert_logits_close(ours, unmerged, what="t5")


def test_bert_feature_extraction_no_model_prefix(wd):
    base = vh.build_base("bert", wd / "bert", cls=AutoModel, vocab_size=128, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64)
    assert "encoder.layer.0.attention.self.query.weight" in checkpoint_keys(base)
    ad = vh.save_adapter(vh.load_causal(base, cls=AutoModel), wd / "ad-bert", task_type="FEATURE_EXTRACTION",
                         target_modules=["query", "value", "dense"])
    assert "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight" in read_adapter_tensors(ad)
    must = {"encoder.layer.0.attention.self.query.weight", "encoder.layer.0.attention.self.value.weight",
            "encoder.layer.0.output.dense.weight", "pooler.dense.weight"}
    _check(wd, "bert", base, ad, must, cls=AutoModel)


def test_phi3_fused_qkv_gate_up(wd):
    base = vh.build_base("phi3", wd / "phi3", pad_token_id=0, bos_token_id=1, eos_token_id=2)
    keys = checkpoint_keys(base)
    assert "model.layers.0.self_attn.qkv_proj.weight" in keys and "model.layers.0.mlp.gate_up_proj.weight" in keys
    ad = vh.save_adapter(vh.load_causal(base), wd / "ad-phi3",
                         target_modules=["qkv_proj", "gate_up_proj", "o_proj", "down_proj"])
    must = {f"model.layers.{i}.{m}.weight" for i in range(2)
            for m in ("self_attn.qkv_proj", "mlp.gate_up_proj", "self_attn.o_proj", "mlp.down_proj")}
    _check(wd, "phi3", base, ad, must)


def test_conv1d_conv2d_conv3d_custom_module(wd):
    base = vh.save_convnet(wd / "convnet")
    ad = vh.save_adapter(vh.load_convnet(base, torch.bfloat16), wd / "ad-conv",
                         target_modules=["c1", "c2", "c3", "c4", "fc"])
    sd = read_adapter_tensors(ad)
    assert sd["base_model.model.c2.lora_A.weight"].shape == (4, 4, 3, 5)
    out = wd / "out-conv"
    run_merge(base, ad, out)
    ref = vh.convnet_reference(base, ad)
    vh.compare_to_reference(read_checkpoint(out), read_checkpoint(base), ref,
                            {"c1.weight", "c2.weight", "c3.weight", "c4.weight", "fc.weight"})
