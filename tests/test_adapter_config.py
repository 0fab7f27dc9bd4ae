"""adapter_config.json is read as strictly as PEFT reads it: an explicit null where PEFT needs a value, and a
use_dora flag the saved tensors contradict, are refused before anything is written; a base that differs from the
one the adapter records in a way that changes the merge gets one warning line."""

from __future__ import annotations

import json
import shutil

import helpers_tiny as ht
import pytest
import torch
import variant_helpers as vh
from oracle import read_adapter_tensors

from streammerge.lineage import base_mismatch


@pytest.fixture(scope="module")
def wd(tmp_path_factory):
    return tmp_path_factory.mktemp("strict")


@pytest.fixture(scope="module")
def llama(wd):
    return vh.build_base("llama", wd / "llama")


@pytest.fixture(scope="module")
def lora(wd, llama):
    return vh.save_adapter(vh.load_causal(llama), wd / "lora", target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def dora(wd, llama):
    return vh.save_adapter(vh.load_causal(llama), wd / "dora", use_dora=True, target_modules=["q_proj", "v_proj"])


def _copy(src, dst, **changes):
    shutil.copytree(src, dst)
    vh.edit_adapter_config(dst, **changes)
    return dst


def _peft_load(base, adapter):
    from peft import PeftModel

    return PeftModel.from_pretrained(vh.load_causal(base, torch.float32), str(adapter))


@pytest.mark.parametrize("field", ["lora_alpha", "r", "rank_pattern", "alpha_pattern"])
def test_null_field_is_refused_as_peft_refuses_it(wd, llama, lora, tmp_path, capsys, field):
    ad = _copy(lora, tmp_path / "ad", **{field: None})
    with pytest.raises(Exception):
        _peft_load(llama, ad)
    code, _, err = ht.run_cli(["--base", llama, "--adapter", ad, "--output", tmp_path / "out"], capsys)
    assert code == 3, err
    assert f"field '{field}' is null" in err and "adapter_config.json" in err
    assert not (tmp_path / "out").exists()


def test_missing_alpha_still_takes_peft_default(wd, llama, lora, tmp_path, capsys):
    ad = tmp_path / "ad"
    shutil.copytree(lora, ad)
    cfg = vh.adapter_config(ad)
    del cfg["lora_alpha"]
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    assert _peft_load(llama, ad).base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == 8 / 4
    code, _, err = ht.run_cli(["--base", llama, "--adapter", ad, "--output", tmp_path / "out"], capsys)
    assert code == 0, err


def test_use_dora_without_magnitude_is_refused(wd, llama, lora, tmp_path, capsys):
    ad = _copy(lora, tmp_path / "ad", use_dora=True)
    assert not any("magnitude" in k for k in read_adapter_tensors(ad))
    # PEFT loads it with freshly initialised magnitudes (a "missing keys" warning): its merge is neither the
    # plain LoRA merge nor anything that was trained
    as_dora = _peft_load(llama, ad).merge_and_unload().state_dict()
    as_lora = _peft_load(llama, lora).merge_and_unload().state_dict()
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(as_dora[key], as_lora[key])
    code, _, err = ht.run_cli(["--base", llama, "--adapter", ad, "--output", tmp_path / "out"], capsys)
    assert code == 3, err
    assert "use_dora=true" in err and "lora_magnitude_vector" in err and "q_proj" in err
    assert not (tmp_path / "out").exists()


def test_magnitude_without_use_dora_is_refused(wd, llama, dora, tmp_path, capsys):
    ad = _copy(dora, tmp_path / "ad", use_dora=False)
    code, _, err = ht.run_cli(["--base", llama, "--adapter", ad, "--output", tmp_path / "out"], capsys)
    assert code == 3, err
    assert "use_dora=false" in err and "lora_magnitude_vector" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------
# the recorded base

@pytest.mark.parametrize("recorded, base, expect", [
    # trained on a quantized twin: matters (QLoRA merge into full precision)
    ("unsloth/llama-3-8b-Instruct-bnb-4bit", "meta-llama/Meta-Llama-3-8B-Instruct", "bitsandbytes 4-bit"),
    ("unsloth/Qwen3-8B-unsloth-bnb-4bit", "/models/qwen3-8b", "bitsandbytes 4-bit"),
    ("RedHatAI/Llama-3.1-8B-Instruct-quantized.w4a16", "meta-llama/Llama-3.1-8B-Instruct", "W4A16"),
    ("Qwen/Qwen3-8B-AWQ", "Qwen/Qwen3-8B", "AWQ"),
    ("Qwen/Qwen3-8B-FP8", "Qwen/Qwen3-8B", "FP8"),
    # another size or variant, both repo ids: matters
    ("Qwen/Qwen3-8B-Base", "Qwen/Qwen3-8B", "another size or variant"),
    ("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-chat-hf", "another size or variant"),
    ("google/gemma-2-9b-it", "google/gemma-2-9b", "another size or variant"),
    ("Qwen/Qwen3-8B", "/cache/hub/models--Qwen--Qwen3-14B/snapshots/0123abcd", "another size or variant"),
    # harmless: same model, re-uploads, case, local paths, nothing recorded
    ("Qwen/Qwen3-8B", "Qwen/Qwen3-8B", None),
    ("Qwen/Qwen3-8B", "qwen/qwen3-8b", None),
    ("unsloth/Qwen3-8B", "Qwen/Qwen3-8B", None),
    ("unsloth/llama-3-8b-Instruct", "meta-llama/Meta-Llama-3-8B-Instruct", None),
    ("Qwen/Qwen3-8B", "/cache/hub/models--Qwen--Qwen3-8B/snapshots/0123abcd", None),
    ("/home/me/models/llama-7b", "meta-llama/Llama-2-13b-hf", None),
    ("Qwen/Qwen3-8B", "/data/some-other-folder", None),
    ("tiny", "/tmp/base", None),
    ("", "Qwen/Qwen3-8B", None),
    (None, "Qwen/Qwen3-8B", None),
    ("Qwen/Qwen3-8B-FP8", "Qwen/Qwen3-8B-FP8", None),
])
def test_what_counts_as_another_base(recorded, base, expect, tmp_path):
    got = base_mismatch(recorded, base, tmp_path / "not-there")
    if expect is None:
        assert got is None
    else:
        assert got is not None and expect in got and str(recorded) in got


def test_qlora_twin_warns_once_and_merges(tmp_path, capsys):
    base = ht.make_base(tmp_path / "base")
    ad = ht.make_adapter(tmp_path / "ad", base, base_model_name_or_path="unsloth/llama-3-8b-Instruct-bnb-4bit")
    code, _out, err = ht.run_cli(["--base", base, "--adapter", ad, "--output", tmp_path / "out"], capsys)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, err
    assert "quantized (bitsandbytes 4-bit)" in warnings[0] and "full-precision" in warnings[0]


def test_hub_cache_base_of_another_variant_warns(tmp_path, capsys):
    base = ht.make_base(tmp_path / "hub" / "models--Qwen--Qwen3-8B-Base" / "snapshots" / "0123abcd")
    ad = ht.make_adapter(tmp_path / "ad", base, base_model_name_or_path="Qwen/Qwen3-8B")
    code, _, err = ht.run_cli(["--base", base, "--adapter", ad, "--output", tmp_path / "out"], capsys)
    assert code == 0, err
    assert err.count("warning:") == 1 and "Qwen/Qwen3-8B-Base" in err

    same = ht.make_adapter(tmp_path / "ad2", base, base_model_name_or_path="unsloth/Qwen3-8B-Base")
    code, _, err = ht.run_cli(["--base", base, "--adapter", same, "--output", tmp_path / "out2"], capsys)
    assert code == 0 and "warning:" not in err, err
