"""Adapters as LLaMA-Factory, Unsloth and Axolotl save them when the vocabulary grows (spec §10.3, §10.4, §11).

Each builds a PEFT LoraConfig and saves through PEFT's save_pretrained (LLaMA-Factory through the HF Trainer, which
passes the model's state_dict). With a resized vocabulary `save_embedding_layers="auto"` saves the embedding layers
too, which puts PEFT's wrapper copies beside the trained tensor:

* embeddings in `modules_to_save` (LLaMA-Factory `resize_vocab` / `additional_target`, Unsloth new tokens, Axolotl
  `lora_modules_to_save`): `X.weight` (the trained copy PEFT loads), `X.modules_to_save.weight` (the same again),
  `X.original_module.weight` (the untrained, resized module);
* trainable tokens (Axolotl `peft_trainable_token_indices`): `X.token_adapter.base_layer.weight` + the rows;
* LoRA on the embeddings of a tied model: both `base_layer.weight`s, resized.

Oracle: PEFT's merge (float32 base, resized as the user must before loading the adapter) rounded once, where it is
right (untied); on tied models the unmerged PeftModel's logits.
"""

from __future__ import annotations

import json

import pytest
import torch
import variant_helpers as vh
from conftest import run_merge
from helpers_tiny import run_cli, tree_digest
from oracle import read_checkpoint, ulp_diff
from safetensors.torch import load_file, save_file

VOCAB = 96
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.tensor([[1, 5, 95, 96, 97, 100, 3, 2], [7, 99, 101, 4, 96, 8, 9, 10]])  # new token ids included


@pytest.fixture(scope="module")
def wd(tmp_path_factory):
    return tmp_path_factory.mktemp("trainers")


_bases: dict = {}


def _base(wd, tied: bool):
    """A tiny bf16 llama (untied) or qwen2 (tied) base, built once per module."""
    if tied not in _bases:
        mt = "qwen2" if tied else "llama"
        _bases[tied] = vh.build_base(mt, wd / f"base-{mt}", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return _bases[tied]


def _resize(rows: int):
    return lambda model: model.resize_token_embeddings(rows, mean_resizing=False)


def _adapter(base, out, rows, *, trainer_save=False, perturb="modules_to_save", **lora):
    """get_peft_model on the resized base as the trainers configure it, train (perturb) the full copies, save."""
    from peft import LoraConfig, TaskType, get_peft_model

    model = vh.load_causal(base)
    _resize(rows)(model)
    torch.manual_seed(1)
    pm = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, lora_dropout=0.0,
                                          init_lora_weights=False, **lora))
    if perturb:
        vh.perturb(pm, lambda n: perturb in n, scale=2.0)
    if trainer_save:  # transformers' Trainer._save: save_pretrained(output_dir, state_dict=model.state_dict())
        pm.save_pretrained(str(out), state_dict=pm.state_dict())
    else:
        pm.save_pretrained(str(out))
    return out


def _keys(adapter) -> set[str]:
    return {k.removeprefix("base_model.model.") for k in vh.oracle.read_adapter_tensors(adapter)}


def _check_logits(base, adapter, out, rows, *, tied_after: bool) -> None:
    """The merged output, loaded by transformers, computes what the unmerged PEFT model computes."""
    from transformers import AutoModelForCausalLM

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == rows and bool(cfg.get("tie_word_embeddings")) == tied_after, cfg
    ours = vh.logits(AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32), IDS)
    ref = vh.logits(vh.peft_unmerged(base, adapter, prepare=_resize(rows)), IDS)
    assert ours.shape[-1] == rows
    vh.assert_logits_close(ours, ref, what=str(adapter.name))


def test_llamafactory_resize_vocab_additional_target(wd):
    """LLaMA-Factory: lora_target all (its find_all_linear_modules: every Linear but lm_head), resize_vocab (pad to
    a multiple of 64) and additional_target embed_tokens,lm_head, saved by the HF Trainer."""
    base = _base(wd, tied=False)
    ad = _adapter(base, wd / "ad-lf", 128, trainer_save=True, target_modules=LINEAR,
                  modules_to_save={"embed_tokens", "lm_head"})
    assert {"lm_head.modules_to_save.weight", "lm_head.original_module.weight", "lm_head.weight",
            "model.embed_tokens.modules_to_save.weight", "model.embed_tokens.original_module.weight",
            "model.embed_tokens.weight"} <= _keys(ad), "setup: the layout LLaMA-Factory saves"
    out = wd / "out-lf"
    run_merge(base, ad, out)
    ref = vh.reference_on_disk(base, ad, wd / "ref-lf", prepare=_resize(128))
    base_t = read_checkpoint(base)
    vh.compare_to_reference(read_checkpoint(out), base_t, ref,
                            {"model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.down_proj.weight"})
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 128


@pytest.mark.parametrize("ensure", [False, True], ids=["untie", "ensure_weight_tying"])
def test_unsloth_new_tokens_on_tied_model(wd, ensure):
    """Unsloth with new tokens: embed_tokens and lm_head go to modules_to_save; on a tied model the two trained
    copies differ (the output is untied) unless ensure_weight_tying ties them (one tensor, still tied)."""
    base = _base(wd, tied=True)
    name = f"unsloth-{'ensure' if ensure else 'untie'}"
    ad = _adapter(base, wd / f"ad-{name}", VOCAB + 8, target_modules=LINEAR,
                  modules_to_save=["embed_tokens", "lm_head"], ensure_weight_tying=ensure)
    assert {"lm_head.modules_to_save.weight", "model.embed_tokens.original_module.weight"} <= _keys(ad)
    out = wd / f"out-{name}"
    run_merge(base, ad, out)
    out_t = read_checkpoint(out)
    saved = vh.oracle.read_adapter_tensors(ad)
    assert torch.equal(out_t["model.embed_tokens.weight"], saved["base_model.model.model.embed_tokens.weight"])
    if ensure:
        assert "lm_head.weight" not in out_t
    else:
        assert torch.equal(out_t["lm_head.weight"], saved["base_model.model.lm_head.weight"])
    _check_logits(base, ad, out, VOCAB + 8, tied_after=ensure)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_axolotl_trainable_tokens_with_new_tokens(wd, tied):
    """Axolotl peft_trainable_token_indices on new tokens: the resized embedding is saved as
    `embed_tokens.token_adapter.base_layer.weight` (and, tied, the output embedding's tied wrapper as well)."""
    base = _base(wd, tied=tied)
    rows = VOCAB + 8
    ad = _adapter(base, wd / f"ad-tt-{tied}", rows, perturb="trainable_tokens", target_modules=["q_proj", "v_proj"],
                  trainable_token_indices=[VOCAB + 1, VOCAB + 4, 5])
    assert "model.embed_tokens.token_adapter.base_layer.weight" in _keys(ad)
    out = wd / f"out-tt-{tied}"
    run_merge(base, ad, out)
    if tied:
        assert "lm_head.token_adapter.trainable_tokens_delta" in _keys(ad)
        assert "lm_head.weight" not in read_checkpoint(out)
        _check_logits(base, ad, out, rows, tied_after=True)
    else:
        ref = vh.reference_on_disk(base, ad, wd / f"ref-tt-{tied}", prepare=_resize(rows))
        must = {"model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.weight"}
        vh.compare_to_reference(read_checkpoint(out), read_checkpoint(base), ref, must)


def test_embedding_lora_with_new_tokens_on_tied_model(wd):
    """LoRA on embed_tokens and lm_head of a tied model with a resized vocabulary: both resized base_layer weights
    are saved (equal, tied); the output embedding is the resized embedding plus its own delta (untied)."""
    base = _base(wd, tied=True)
    rows = VOCAB + 8
    ad = _adapter(base, wd / "ad-emb-lora", rows, perturb=None, target_modules=["q_proj", "embed_tokens", "lm_head"])
    assert {"lm_head.base_layer.weight", "model.embed_tokens.base_layer.weight"} <= _keys(ad)
    out = wd / "out-emb-lora"
    run_merge(base, ad, out)
    out_t = read_checkpoint(out)
    assert out_t["lm_head.weight"].shape == out_t["model.embed_tokens.weight"].shape == (rows, 32)
    _check_logits(base, ad, out, rows, tied_after=False)


def test_unsloth_continued_pretraining_on_tied_model(wd):
    """Unsloth's continued-pretraining recipe lists embed_tokens and lm_head in target_modules: embed_tokens goes to
    modules_to_save, lm_head stays a LoRA target (its resized base_layer saved). Tied base: the input embedding is
    the trained copy, the output the resized untrained embedding plus the head's delta (untied)."""
    base = _base(wd, tied=True)
    rows = VOCAB + 8
    ad = _adapter(base, wd / "ad-unsloth-cpt", rows, target_modules=LINEAR + ["lm_head"],
                  modules_to_save=["embed_tokens"])
    assert {"lm_head.base_layer.weight", "lm_head.lora_B.weight", "model.embed_tokens.weight"} <= _keys(ad)
    out = wd / "out-unsloth-cpt"
    run_merge(base, ad, out)
    _check_logits(base, ad, out, rows, tied_after=False)


# refusals: wrapper copies PEFT would not load, or that contradict each other --------------------------------------

@pytest.fixture(scope="module")
def lf_adapter(wd):
    base = _base(wd, tied=False)
    return base, _adapter(base, wd / "ad-lf-small", VOCAB + 8, target_modules=["q_proj"],
                          modules_to_save=["embed_tokens", "lm_head"])


def _edited(src, dst, edit):
    tensors = load_file(str(src / "adapter_model.safetensors"))
    edit(tensors)
    dst.mkdir()
    save_file(tensors, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    return dst


P = "base_model.model.model.embed_tokens."


@pytest.mark.parametrize("case", ["copies-differ", "copy-without-trained", "original-shape"])
def test_inconsistent_wrapper_copies_are_refused(lf_adapter, tmp_path, capsys, case):
    base, src = lf_adapter
    edits = {
        "copies-differ": lambda t: t.__setitem__(P + "modules_to_save.weight", t[P + "modules_to_save.weight"] + 1),
        "copy-without-trained": lambda t: t.pop(P + "weight"),
        "original-shape": lambda t: t.__setitem__(P + "original_module.weight",
                                                  t[P + "original_module.weight"][:VOCAB]),
    }
    ad = _edited(src, tmp_path / "ad", edits[case])
    before = tree_digest(ad)
    code, _, err = run_cli(["--base", base, "--adapter", ad, "--output", tmp_path / "out", "--no-progress"], capsys)
    assert code == 3, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert "module model.embed_tokens" in err and "re-save" in err, err
    key = {"copies-differ": "modules_to_save.weight", "copy-without-trained": "modules_to_save.weight",
           "original-shape": "original_module.weight"}[case]
    assert P + key in err, err
    vh.expect_nothing_written(tmp_path / "out")
    assert tree_digest(ad) == before


def test_trained_copies_are_written_as_saved(lf_adapter, wd):
    """The trained copies (`X.weight`) are written bit for bit, new rows included."""
    base, ad = lf_adapter
    out = wd / "out-lf-small"
    run_merge(base, ad, out)
    saved = vh.oracle.read_adapter_tensors(ad)
    out_t = read_checkpoint(out)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        assert ulp_diff(out_t[k], saved["base_model.model." + k].to(torch.bfloat16)) == 0, k
