"""Files around the weights: copied verbatim, tokenizer override from the adapter, config dtype fields,
quantization_config, safetensors metadata."""

from __future__ import annotations

import json

import oracle
import pytest
import torch
from conftest import copy_dir, run_merge
from oracle import INDEX, config_dtype_fields, read_checkpoint, read_output, tree_snapshot
from safetensors import safe_open

WEIGHT_FILES = {"model.safetensors", INDEX}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}\n"
CUSTOM_PY = "# custom modeling code shipped with the checkpoint\nX = 1\n"
DTYPE_FIELDS = {"torch_dtype", "dtype"}


def _is_weight(name: str) -> bool:
    return name in WEIGHT_FILES or name.endswith(".safetensors")


@pytest.fixture(scope="module")
def fmt_base(cases, tmp_path_factory):
    """The llama base plus chat_template.jinja, a custom *.py, a README, both dtype spellings and a
    quantization_config added by hand to config.json."""
    case = cases.get("llama")
    d = copy_dir(case.base, tmp_path_factory.mktemp("fmt") / "base")
    (d / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (d / "modeling_custom.py").write_text(CUSTOM_PY)
    (d / "README.md").write_text("base model card\n")
    cfg = json.loads((d / "config.json").read_text())
    cfg["torch_dtype"] = "bfloat16"
    cfg["dtype"] = "bfloat16"
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": False, "load_in_8bit": False}
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in ("config.json", "generation_config.json", *TOKENIZER_FILES):
        assert (d / f).exists(), f
    return d


@pytest.fixture(scope="module")
def fmt_out(cases, fmt_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("fmt-out") / "out"
    run_merge(fmt_base, cases.get("llama").adapter, out, dtype="f16", max_shard_size="20KB")
    return out


def test_non_weight_files_copied(cases, fmt_base, fmt_out):
    base_files = {p.name for p in fmt_base.iterdir() if p.is_file() and not _is_weight(p.name)}
    out_files = {p.name for p in fmt_out.iterdir() if p.is_file() and not _is_weight(p.name)}
    assert out_files == base_files, (sorted(out_files - base_files), sorted(base_files - out_files))
    for name in base_files - {"config.json"}:
        assert (fmt_out / name).read_bytes() == (fmt_base / name).read_bytes(), name
    # nothing from the adapter folder (adapter_config.json, adapter_model.*, PEFT's README.md)
    assert not any(p.name.startswith("adapter_") for p in fmt_out.iterdir())
    assert (fmt_out / "README.md").read_text() == "base model card\n"


def test_config_dtype_and_quantization(fmt_base, fmt_out):
    base_cfg = json.loads((fmt_base / "config.json").read_text())
    cfg = json.loads((fmt_out / "config.json").read_text())
    assert "quantization_config" not in cfg
    fields = config_dtype_fields(cfg)
    assert set(fields) >= {"torch_dtype", "dtype"}, fields
    assert set(fields.values()) == {"float16"}, fields
    # everything else unchanged
    strip = DTYPE_FIELDS | {"quantization_config", "transformers_version"}
    assert {k: v for k, v in cfg.items() if k not in strip} == {k: v for k, v in base_cfg.items() if k not in strip}


def test_shard_metadata_is_pt(fmt_out):
    files = sorted(fmt_out.glob("*.safetensors"))
    assert len(files) >= 2  # max_shard_size="20KB" → sharded
    for f in files:
        with safe_open(str(f), "pt") as h:
            assert h.metadata() == {"format": "pt"}, f.name
    wm = json.loads((fmt_out / INDEX).read_text())["weight_map"]
    assert set(wm.values()) == {f.name for f in files}
    assert all(t.dtype == torch.float16 for t in read_output(fmt_out).values())


def test_adapter_tokenizer_replaces_base(cases, fmt_base, tmp_path):
    case = cases.get("llama")
    ad = copy_dir(case.adapter, tmp_path / "adapter-tok")
    oracle.save_tokenizer(ad, extra="x")  # different vocab → different bytes
    for name in TOKENIZER_FILES:
        assert (ad / name).read_bytes() != (fmt_base / name).read_bytes()
    ad_before = tree_snapshot(ad)
    out = tmp_path / "out"
    run_merge(fmt_base, ad, out, dtype="bf16")
    for name in TOKENIZER_FILES:
        assert (out / name).read_bytes() == (ad / name).read_bytes(), name
    for name in ("generation_config.json", "chat_template.jinja", "modeling_custom.py", "README.md"):
        assert (out / name).read_bytes() == (fmt_base / name).read_bytes(), name
    assert not any(p.name.startswith("adapter_") for p in out.iterdir())
    assert tree_snapshot(ad) == ad_before  # inputs never modified
    cfg = json.loads((out / "config.json").read_text())
    assert set(config_dtype_fields(cfg).values()) == {"bfloat16"}


def test_inputs_untouched(cases, fmt_base, tmp_path):
    case = cases.get("llama")
    before_b, before_a = tree_snapshot(fmt_base), tree_snapshot(case.adapter)
    run_merge(fmt_base, case.adapter, tmp_path / "out", dtype="f32")
    assert tree_snapshot(fmt_base) == before_b
    assert tree_snapshot(case.adapter) == before_a


def test_qwen35_nested_dtype_fields(qwen35, tmp_path):
    """Nested sub-configs carry their own dtype (as Hub Qwen3.5 checkpoints do): all must name the output dtype."""
    base = copy_dir(qwen35.base, tmp_path / "base")
    cfg = json.loads((base / "config.json").read_text())
    for sub in ("text_config", "vision_config"):
        cfg[sub]["dtype"] = "bfloat16"
        cfg[sub]["torch_dtype"] = "bfloat16"
    cfg["torch_dtype"] = "bfloat16"
    (base / "config.json").write_text(json.dumps(cfg, indent=2))
    out = tmp_path / "out"
    run_merge(base, qwen35.adapter, out, dtype="f16")
    out_cfg = json.loads((out / "config.json").read_text())
    fields = config_dtype_fields(out_cfg)
    assert {"dtype", "torch_dtype", "text_config.dtype", "text_config.torch_dtype"} <= set(fields), fields
    assert set(fields.values()) == {"float16"}, fields
    out_t = read_output(out)
    assert set(out_t) == set(read_checkpoint(base))
    assert all(t.dtype == torch.float16 for t in out_t.values())
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
