"""When no built-in layout places the adapter, the base's own transformers renamings do.

A BERT checkpoint with legacy `LayerNorm.gamma` / `LayerNorm.beta` names (TF-ported checkpoints have them;
transformers renames them to weight/bias on load) and a PEFT adapter saved with bias="all": its keys use module
names (`...LayerNorm.bias`), which no built-in layout maps onto `...LayerNorm.beta`.
"""

from __future__ import annotations

import json

import pytest
import torch
from oracle import ulp_diff
from safetensors.torch import load_file, save_file

import streammerge
from streammerge.errors import PlanError

pytest.importorskip("transformers")
pytest.importorskip("peft")


def _legacy(name: str) -> str:
    return name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")


@pytest.fixture(scope="module")
def bert_legacy(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("bert-legacy")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=32)
    model = BertModel(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "LayerNorm" in n:
                p.add_(torch.randn_like(p) * 0.1)  # so a dropped or misplaced norm cannot pass
    model.save_pretrained(root / "base")
    st = load_file(root / "base" / "model.safetensors")
    save_file({_legacy(k): v for k, v in st.items()}, root / "base" / "model.safetensors", metadata={"format": "pt"})

    loaded = BertModel.from_pretrained(root / "base", dtype=torch.bfloat16)
    assert torch.equal(loaded.embeddings.LayerNorm.bias, st["embeddings.LayerNorm.bias"])  # transformers renames
    pm = get_peft_model(loaded, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], bias="all",
                                           init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if n.endswith("LayerNorm.bias"):
                p.add_(0.25)  # a trained bias differs from the checkpoint's
    pm.save_pretrained(root / "adapter")
    keys = load_file(root / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.embeddings.LayerNorm.bias" in keys
    return root


def test_legacy_names_merge_through_transformers_renamings(bert_legacy, tmp_path):
    from peft import PeftModel
    from transformers import BertModel

    out = tmp_path / "out"
    summary = streammerge.merge(bert_legacy / "base", bert_legacy / "adapter", out)
    assert summary.layout == "transformers"
    got = load_file(out / "model.safetensors")
    base = load_file(bert_legacy / "base" / "model.safetensors")
    assert set(got) == set(base)  # the checkpoint's own (legacy) names are kept

    ref = PeftModel.from_pretrained(BertModel.from_pretrained(bert_legacy / "base", dtype=torch.bfloat16),
                                    bert_legacy / "adapter").merge_and_unload().state_dict()
    changed = 0
    for module_name, tensor in ref.items():
        disk = _legacy(module_name)
        assert ulp_diff(got[disk], tensor) <= 1, disk
        changed += not torch.equal(got[disk], base[disk])
    # q and v weights of 2 layers, and the 5 LayerNorm biases the adapter replaced (embeddings + 2 per layer)
    assert changed == 4 + 5


def test_forced_loader_does_not_fall_back(bert_legacy, tmp_path):
    with pytest.raises(PlanError, match="LayerNorm.bias"):
        streammerge.merge(bert_legacy / "base", bert_legacy / "adapter", tmp_path / "out", loader="causal-lm")
    assert not (tmp_path / "out").exists()
    assert json.loads((bert_legacy / "adapter" / "adapter_config.json").read_text())["bias"] == "all"
