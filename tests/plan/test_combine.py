"""Weighted combinations: what cannot be a weighted sum of LoRA deltas is refused before anything is written, and
the plans of the adapters are combined tensor by tensor (tied embeddings included).

The arithmetic itself is checked against PEFT in tests/against_peft/test_combinations.py.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import variant_helpers as vh
from oracle import read_checkpoint


@pytest.fixture(scope="module")
def wd(tmp_path_factory):
    return tmp_path_factory.mktemp("combine")


@pytest.fixture(scope="module")
def base(wd):
    # qwen2: q/k/v biases (bias="all", lora_bias) and tied embeddings
    return vh.build_base("qwen2", wd / "qwen2")


@pytest.fixture(scope="module")
def plain(wd, base):
    return vh.save_adapter(vh.load_causal(base), wd / "plain", target_modules=["q_proj", "v_proj"])


def _adapter(wd, base, name, save_kwargs=None, **kw):
    path = wd / name
    if not path.exists():
        vh.save_adapter(vh.load_causal(base), path, save_kwargs=save_kwargs, **kw)
    return path


def _refused(base, adapters, out, *words, combination_words=("weighted combination",)):
    import streammerge
    from streammerge.errors import UnsupportedError

    with pytest.raises(UnsupportedError) as ei:
        streammerge.merge(str(base), [str(a) for a in adapters], str(out), weights=[0.5] * len(adapters))
    msg = str(ei.value)
    assert ei.value.exit_code == 5
    for w in (*combination_words, *words):
        assert re.search(w, msg, re.IGNORECASE), f"message does not name {w!r}: {msg}"
    vh.expect_nothing_written(out)
    return msg


REFUSED = {
    "dora": (dict(target_modules=["q_proj"], use_dora=True), None, ["DoRA", "magnitude"]),
    "modules_to_save": (dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), None,
                        ["modules_to_save", "replacement modules"]),
    "trainable_tokens": (dict(target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [3, 5]}), None,
                         ["trainable tokens"]),
    "lora_bias": (dict(target_modules=["q_proj"], lora_bias=True), None, ["lora_bias"]),
    "bias_all": (dict(target_modules=["q_proj"], bias="all"), None, ["full replacement", r"bias"]),
    "saved_embedding": (dict(target_modules=["q_proj", "embed_tokens"]), dict(save_embedding_layers=True),
                        ["embed_tokens", "full replacement"]),
}


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_refused_in_a_combination(wd, base, plain, kind):
    kw, save_kwargs, words = REFUSED[kind]
    other = _adapter(wd, base, f"ad-{kind}", save_kwargs, **kw)
    _refused(base, [plain, other], wd / f"out-{kind}", str(other), *words)
    # the same adapter alone still merges as before
    import streammerge

    streammerge.merge(str(base), str(other), str(wd / f"alone-{kind}"))


def test_non_lora_type_refused(wd, base, plain):
    loha = vh.other_peft_adapter(base, wd / "loha", "LOHA")
    _refused(base, [plain, loha], wd / "out-loha", "LOHA", "LoRA adapters only")


def test_target_parameters_refused(wd, base, plain):
    import shutil

    odd = wd / "ad-target-parameters"
    shutil.copytree(plain, odd)
    vh.edit_adapter_config(odd, target_parameters=["mlp.experts.gate_up_proj"])
    _refused(base, [odd, plain], wd / "out-tp", "target_parameters")


def test_different_tokenizers_refused(wd, base, plain):
    import shutil

    one, two = wd / "tok-1", wd / "tok-2"
    for d, text in ((one, "a"), (two, "b")):
        shutil.copytree(plain, d)
        (d / "tokenizer.json").write_text(json.dumps({"model": text}))
    _refused(base, [one, two], wd / "out-tok", "only one tokenizer", str(two), combination_words=())
    # an adapter without tokenizer files takes the other's
    import streammerge

    out = wd / "tok-ok"
    streammerge.merge(str(base), [str(plain), str(one)], str(out), weights=[1, 1])
    assert (out / "tokenizer.json").read_text() == (one / "tokenizer.json").read_text()


def test_weights_must_match_the_adapters(wd, base, plain):
    import streammerge

    with pytest.raises(ValueError, match="one weight per adapter"):
        streammerge.merge(str(base), [str(plain), str(plain)], str(wd / "w"), weights=[1.0])
    with pytest.raises(ValueError, match="finite"):
        streammerge.merge(str(base), [str(plain)], str(wd / "w"), weights=[float("nan")])


def test_weights_default_to_one_each(wd, base, plain):
    import streammerge

    a = wd / "sum-default"
    b = wd / "sum-ones"
    streammerge.merge(str(base), [str(plain), str(plain)], str(a))
    streammerge.merge(str(base), [str(plain), str(plain)], str(b), weights=[1, 1])
    ta, tb, t0 = read_checkpoint(a), read_checkpoint(b), read_checkpoint(base)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert q in ta
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not torch.equal(ta[q], t0[q])


def test_dry_run_describes_the_combination(wd, base, plain):
    import streammerge

    lines: list[str] = []
    streammerge.merge(str(base), [str(plain), str(plain)], str(wd / "dry"), weights=[0.7, 0.3], dry_run=True,
                      log=lines.append)
    text = "\n".join(lines)
    assert "weighted(0.7*lora(model.layers.0.self_attn.q_proj" in text and "0.3*lora(" in text
    assert not (wd / "dry").exists()


def test_tied_embedding_plans_are_united(tmp_path):
    """On a tied model one adapter's embedding LoRA unties the head (head = the embedding without the delta, as
    the unmerged model computes) while another adapter changes q_proj: the combination holds both, each tensor
    bit-identical to a one-adapter combination with the same weight."""
    import streammerge

    base = vh.build_base("qwen2", tmp_path / "qwen2")
    emb = vh.save_adapter(vh.load_causal(base), tmp_path / "emb", target_modules=["embed_tokens"],
                          save_kwargs=dict(save_embedding_layers=False))
    q = vh.save_adapter(vh.load_causal(base), tmp_path / "q", target_modules=["q_proj"], seed=3)
    both, only_emb, only_q = tmp_path / "both", tmp_path / "only-emb", tmp_path / "only-q"
    streammerge.merge(str(base), [str(emb), str(q)], str(both), weights=[0.7, 0.3])
    streammerge.merge(str(base), str(emb), str(only_emb), weights=[0.7])
    streammerge.merge(str(base), str(q), str(only_q), weights=[0.3])
    tb, te, tq, t0 = (read_checkpoint(p) for p in (both, only_emb, only_q, base))
    assert "lm_head.weight" in tb and "lm_head.weight" not in t0
    assert torch.equal(tb["lm_head.weight"], t0["model.embed_tokens.weight"])
    assert torch.equal(tb["model.embed_tokens.weight"], te["model.embed_tokens.weight"])
    assert not torch.equal(tb["model.embed_tokens.weight"], t0["model.embed_tokens.weight"])
    for k in tq:
        if k.endswith(".q_proj.weight"):
            assert torch.equal(tb[k], tq[k]) and not torch.equal(tb[k], t0[k]), k
    assert json.loads((both / "config.json").read_text())["tie_word_embeddings"] is False


def test_ensure_weight_tying_against_an_untying_adapter(wd, base, plain):
    """ensure_weight_tying keeps embedding and head one tensor; an adapter whose embedding delta unties them
    contradicts it: refused. With an adapter that leaves the embedding alone the combination stays tied."""
    import streammerge

    no_base_layer = dict(save_embedding_layers=False)
    ensure = _adapter(wd, base, "ensure", no_base_layer, target_modules=["embed_tokens"], ensure_weight_tying=True)
    untie = _adapter(wd, base, "untie", no_base_layer, target_modules=["embed_tokens"], seed=4)
    _refused(base, [ensure, untie], wd / "out-ensure", "ensure_weight_tying")
    out = wd / "ensure-plain"
    streammerge.merge(str(base), [str(ensure), str(plain)], str(out), weights=[0.5, 0.5])
    assert "lm_head.weight" not in read_checkpoint(out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
