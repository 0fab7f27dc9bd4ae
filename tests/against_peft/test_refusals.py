"""What cannot be merged correctly is refused (spec §2.3, §13, §15).

Each refusal: UnsupportedError (exit code 5), a message naming the feature, and nothing written — not the
output folder, not a staging folder next to it. Unknown config keys only warn.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
import torch
import variant_helpers as vh
from conftest import REPO, run_merge
from oracle import read_checkpoint


@pytest.fixture(scope="module")
def wd(tmp_path_factory):
    return tmp_path_factory.mktemp("refusals")


@pytest.fixture(scope="module")
def base(wd):
    return vh.build_base("llama", wd / "llama")


@pytest.fixture(scope="module")
def lora(wd, base):
    return vh.save_adapter(vh.load_causal(base), wd / "lora", target_modules=["q_proj", "v_proj"])


def _errors():
    from streammerge import errors

    return errors


def _variant(wd, lora, name, **changes):
    d = wd / f"ad-{name}"
    if not d.exists():
        shutil.copytree(lora, d)
        vh.edit_adapter_config(d, **changes)
    return d


def _expect_refusal(base, adapter, out, *words):
    errors = _errors()
    with pytest.raises(errors.UnsupportedError) as ei:
        run_merge(base, adapter, out)
    assert ei.value.exit_code == 5
    msg = str(ei.value)
    for w in words:
        assert re.search(w, msg, re.IGNORECASE), f"message does not name {w!r}: {msg}"
    vh.expect_nothing_written(out)
    return msg


# peft types that are not LoRA (real adapters saved by PEFT where that is quick) -------------------------

def _real_adapter(wd, base, kind):
    d = wd / f"ad-real-{kind}"
    return d if d.exists() else vh.other_peft_adapter(base, d, kind)


@pytest.mark.parametrize("kind", ["OFT"])  # LoHa, LoKr, IA3 and VeRA merge: against_peft/test_variants.py item 10
def test_refuses_other_peft_types(wd, base, kind, tmp_path):
    _expect_refusal(base, _real_adapter(wd, base, kind), tmp_path / "out", kind)


@pytest.mark.parametrize("kind", ["ADALORA", "BOFT", "PROMPT_TUNING"])
def test_refuses_other_peft_types_by_config(wd, base, lora, kind, tmp_path):
    _expect_refusal(base, _variant(wd, lora, kind.lower(), peft_type=kind), tmp_path / "out", kind)


# LoRA configs that cannot be merged into the original checkpoint ----------------------------------------

CASES = {
    "layer_replication": (dict(layer_replication=[[0, 2], [1, 2]]), ["layer_replication"]),
    "pissa": (dict(init_lora_weights="pissa"), ["pissa"]),
    "pissa_niter": (dict(init_lora_weights="pissa_niter_4"), ["pissa"]),
    "olora": (dict(init_lora_weights="olora"), ["olora"]),
    "loftq": (dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 1}), ["loftq"]),
    "corda": (dict(init_lora_weights="corda"), ["corda"]),
    "alora": (dict(alora_invocation_tokens=[5, 6]), ["alora"]),
    "enable_lora": (dict(enable_lora=[True, False, True]), ["enable_lora"]),
    "arrow": (dict(arrow_config={"top_k": 2}), ["arrow"]),
    "kasa": (dict(kasa_config={"a": 1}), ["kasa"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_refuses_unmergeable_lora(wd, base, lora, case, tmp_path):
    changes, words = CASES[case]
    _expect_refusal(base, _variant(wd, lora, case, **changes), tmp_path / "out", *words)


def test_refuses_grouped_conv(wd, tmp_path):
    base = vh.save_convnet(wd / "convnet")
    ad = vh.save_adapter(vh.load_convnet(base, torch.bfloat16), wd / "ad-grouped", target_modules=["grouped"])
    _expect_refusal(base, ad, tmp_path / "out", "group")


def test_cli_exit_code_and_message(wd, base, lora, tmp_path):
    ad = _variant(wd, lora, "layer_replication", **CASES["layer_replication"][0])
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "streammerge", "--base", str(base), "--adapter", str(ad), "--output",
                        str(out), "--no-progress"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 5, (p.returncode, p.stderr[-2000:])
    assert "layer_replication" in p.stderr
    assert "Traceback" not in p.stderr
    vh.expect_nothing_written(out)


def test_unknown_config_key_warns_and_merges(wd, base, lora, tmp_path):
    ad = _variant(wd, lora, "unknown", some_future_field={"x": 1})
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="some_future_field"):
        run_merge(base, ad, out)
    out_t, base_t = read_checkpoint(out), read_checkpoint(base)
    assert set(out_t) == set(base_t)
    assert not torch.equal(out_t["model.layers.0.self_attn.q_proj.weight"], base_t["model.layers.0.self_attn.q_proj.weight"])


def test_converted_pissa_is_accepted(wd, base, tmp_path):
    """A PiSSA adapter converted with path_initial_model_for_weight_conversion is plain LoRA against the
    original base (spec §2.3): not refused, and equal to PEFT's merge of the converted adapter."""
    from peft import LoraConfig, get_peft_model

    init_dir = wd / "pissa-init"
    conv_dir = wd / "pissa-converted"
    if not conv_dir.exists():
        model = vh.load_causal(base, dtype=torch.float32)
        pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="pissa"))
        pm.peft_config["default"].init_lora_weights = True
        pm.save_pretrained(str(init_dir))
        pm.peft_config["default"].init_lora_weights = "pissa"
        vh.perturb(pm, lambda n: "lora_" in n, scale=0.3)
        pm.save_pretrained(str(conv_dir), path_initial_model_for_weight_conversion=str(init_dir))
    cfg = vh.adapter_config(conv_dir)
    assert cfg["init_lora_weights"] is True and cfg["r"] == 8
    out = tmp_path / "out"
    run_merge(base, conv_dir, out)
    ref = vh.reference_on_disk(base, conv_dir, tmp_path / "ref")
    vh.compare_to_reference(read_checkpoint(out), read_checkpoint(base), ref,
                            {"model.layers.0.self_attn.q_proj.weight"})


def test_multihead_attention_adapter_is_not_merged(tmp_path):
    """PEFT wraps nn.MultiheadAttention with LoRA on `in_proj_weight` (and applies the out_proj delta twice,
    spec §15.2). streammerge does not implement that wrapper: planning fails, naming the module, and nothing is
    written (rather than a merge onto the wrong tensor)."""
    import torch.nn as nn
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    errors = _errors()

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
            self.fc = nn.Linear(16, 16)

    torch.manual_seed(0)
    net = Net()
    (tmp_path / "base").mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "base" / "model.safetensors"),
              metadata={"format": "pt"})
    pm = get_peft_model(net, LoraConfig(r=2, target_modules=["mha"], init_lora_weights=False))
    pm.save_pretrained(str(tmp_path / "adapter"))
    with pytest.raises(errors.PlanError, match=r"mha\.weight"):
        run_merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    vh.expect_nothing_written(tmp_path / "out")
