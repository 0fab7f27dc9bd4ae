"""Quantized bases: recognised from headers and config, merged dequantized (or refused, before anything is
written, with a message that names the scheme and a tensor, when the scheme or the layout cannot be read exactly).

Merging into them once exited 0 with a broken model: an MXFP4 GPT-OSS base with an attention-only LoRA had its packed
experts copied and its quantization_config dropped (transformers then loads random experts), a bitsandbytes 4-bit
base with an lm_head LoRA had its F32 quantization state cast to bf16. They were then refused; now every tensor of
them is read as transformers dequantizes it (tests/against_peft/test_quantized_bases.py has the oracle tests), and
what is refused is what cannot be read or written back exactly. The checkpoints here are built as transformers saves
them: bitsandbytes quantizes on this CPU (when it is installed; otherwise the same names, dtypes and shapes are
written by hand, and `test_hand_written_bnb_layout_is_what_bitsandbytes_saves` pins them), the MXFP4 layout is
checked by loading it in transformers, the FP8 one follows transformers' fine-grained FP8 integration.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import helpers_tiny as ht
import pytest
import torch
import variant_helpers as vh
from safetensors.torch import load_file, save_file

from streammerge.io.checkpoint import open_checkpoint
from streammerge.io.quantized import detect

pytest.importorskip("transformers")
pytest.importorskip("peft")

E = 4


@pytest.fixture(scope="module")
def wd(tmp_path_factory):
    return tmp_path_factory.mktemp("quantized")


@pytest.fixture(scope="module")
def llama(wd):
    return vh.build_base("llama", wd / "llama")


@pytest.fixture(scope="module")
def head_lora(wd, llama):
    return vh.save_adapter(vh.load_causal(llama), wd / "head-lora", target_modules=["lm_head"])


@pytest.fixture(scope="module")
def attn_lora(wd, llama):
    return vh.save_adapter(vh.load_causal(llama), wd / "attn-lora", target_modules=["q_proj", "v_proj"])


def _refused(base: Path, adapter: Path, out: Path, capsys) -> str:
    code, _, err = ht.run_cli(["--base", base, "--adapter", adapter, "--output", out], capsys)
    assert code == 5, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "another model" not in err
    assert not out.exists()
    return err


# ---------------------------------------------------------------------------------------------------------
# bitsandbytes

_BNB = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "int8": dict(load_in_8bit=True),
}


def _bnb_by_hand(src: Path, dst: Path, kind: str) -> Path:
    """What transformers 5.24 + bitsandbytes 0.50 save for a quantized Linear (values are arbitrary)."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    out = {}
    for name, w in tensors.items():
        linear = name.endswith("_proj.weight")
        if not linear:
            out[name] = w
            continue
        n = w.numel()
        if kind == "int8":
            mod = name[: -len(".weight")]
            out[name] = torch.zeros(w.shape, dtype=torch.int8)
            out[f"{mod}.SCB"] = torch.ones(w.shape[0])
            out[f"{mod}.weight_format"] = torch.tensor(0, dtype=torch.uint8)
            continue
        blocks = n // 64
        out[name] = torch.zeros(n // 2, 1, dtype=torch.uint8)
        out[f"{name}.quant_map"] = torch.zeros(16)
        if kind == "nf4":  # double quantization: absmax itself quantized in blocks of 256
            out[f"{name}.absmax"] = torch.zeros(blocks, dtype=torch.uint8)
            out[f"{name}.nested_absmax"] = torch.ones(math.ceil(blocks / 256))
            out[f"{name}.nested_quant_map"] = torch.zeros(256)
        else:
            out[f"{name}.absmax"] = torch.ones(blocks)
        state = {"quant_type": kind, "blocksize": 64, "dtype": "bfloat16", "shape": list(w.shape)}
        if kind == "nf4":
            state.update(nested_blocksize=256, nested_dtype="float32", nested_offset=0.0)
        out[f"{name}.quant_state.bitsandbytes__{kind}"] = torch.tensor(list(json.dumps(state).encode()),
                                                                       dtype=torch.uint8)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    q = {"quant_method": "bitsandbytes", "load_in_4bit": kind != "int8", "load_in_8bit": kind == "int8",
         "bnb_4bit_quant_type": "fp4" if kind == "int8" else kind, "bnb_4bit_use_double_quant": kind == "nf4"}
    cfg["quantization_config"] = q
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def _bnb_real(src: Path, dst: Path, kind: str) -> Path:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(**_BNB[kind], bnb_4bit_compute_dtype=torch.bfloat16)
    AutoModelForCausalLM.from_pretrained(str(src), quantization_config=q, dtype=torch.bfloat16,
                                         device_map="cpu").save_pretrained(str(dst))
    return dst


def _has_bnb() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return True


@pytest.fixture(scope="module", params=sorted(_BNB))
def bnb_base(request, wd, llama):
    kind = request.param
    make = _bnb_real if _has_bnb() else _bnb_by_hand
    return kind, make(llama, wd / f"bnb-{kind}", kind)


def _header(path: Path) -> dict:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        h = json.loads(f.read(n))
    h.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"]) for k, v in h.items()}


def test_hand_written_bnb_layout_is_what_bitsandbytes_saves(wd, llama):
    if not _has_bnb():
        pytest.skip("bitsandbytes is not installed: only the hand-written layout can be used")
    for kind in _BNB:
        real = _header(_bnb_real(llama, wd / f"real-{kind}", kind) / "model.safetensors")
        hand = _header(_bnb_by_hand(llama, wd / f"hand-{kind}", kind) / "model.safetensors")
        # the packed quant_state's length depends on the JSON it holds; everything else must match exactly
        strip = {k: (d, s if "quant_state" not in k else None) for k, (d, s) in real.items()}
        assert strip == {k: (d, s if "quant_state" not in k else None) for k, (d, s) in hand.items()}, kind


def _merged_dequantized(base: Path, adapter: Path, out: Path, capsys) -> dict[str, torch.Tensor]:
    """The CLI merges into the base (exit 0), the output is a plain full-precision checkpoint with the logical names
    (no quantization state, no quantization_config), and verify passes on every row."""
    from streammerge.verify import verify

    code, _, err = ht.run_cli(["--base", base, "--adapter", adapter, "--output", out], capsys)
    assert code == 0, err
    out_t = load_file(out / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in out_t.values()), {k: t.dtype for k, t in out_t.items()}
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    report = verify(base, adapter, out, sample_blocks=None)
    assert report.ok, report.problems()
    return out_t


def test_bnb_base_with_lm_head_lora_merges_dequantized(bnb_base, head_lora, tmp_path, capsys):
    """Was refused (an lm_head LoRA once had the quantization state cast to bf16); now the 4-bit / 8-bit weights are
    read dequantized and written in bf16 under their own names, their state gone."""
    _kind, base = bnb_base
    out_t = _merged_dequantized(base, head_lora, tmp_path / "out", capsys)
    linears = {n for n in open_checkpoint(base).tensors if n.endswith("_proj.weight")}
    assert linears <= set(out_t) and not any(n.endswith(("absmax", "quant_map", "SCB", "weight_format"))
                                             or ".quant_state." in n for n in out_t)


def test_bnb_attention_lora_merges_but_is_refused_with_keep(bnb_base, attn_lora, tmp_path, capsys):
    """Merged dequantized by default; `--dtype keep` would have to re-quantize q_proj with bitsandbytes' quantizer,
    which is not reproduced exactly: refused, naming the tensor, nothing written."""
    _kind, base = bnb_base
    _merged_dequantized(base, attn_lora, tmp_path / "out", capsys)
    out = tmp_path / "kept"
    code, _, err = ht.run_cli(["--base", base, "--adapter", attn_lora, "--output", out, "--dtype", "keep"], capsys)
    assert code == 5 and err.startswith("error: --dtype keep: model.layers.0.self_attn.") and "bitsandbytes" in err
    assert not out.exists()


def test_detection_groups_every_quantized_tensor(bnb_base):
    """Each quantized Linear is one group holding all of its tensors; nothing else is claimed."""
    kind, base = bnb_base
    ckpt = open_checkpoint(base)
    quant = detect(ckpt.tensors, json.loads((base / "config.json").read_text()))
    assert quant is not None
    linears = {n for n in ckpt.tensors if n.endswith("_proj.weight")}
    assert {g.weight for g in quant.groups} == linears
    expected_roles = {"int8": {"weight", "SCB", "weight_format"},
                      "fp4": {"weight", "absmax", "quant_map", "quant_state"},
                      "nf4": {"weight", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state"}}
    assert all(set(g.parts) == expected_roles[kind] for g in quant.groups)
    rest = set(ckpt.tensors) - quant.tensors
    assert rest and all(ckpt.tensors[n].dtype == "BF16" for n in rest)
    # the tensors alone say so too (a config stripped of quantization_config)
    assert detect(ckpt.tensors, {}).tensors == quant.tensors


def test_quantization_config_alone_is_refused(wd, llama, head_lora, tmp_path, capsys):
    """Float tensors under an active quantization_config: copying them without it changes the model."""
    base = shutil.copytree(llama, tmp_path / "base")
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
                                  "bnb_4bit_quant_type": "nf4"}
    (base / "config.json").write_text(json.dumps(cfg))
    err = _refused(base, head_lora, tmp_path / "out", capsys)
    assert "quantized (bitsandbytes 4-bit nf4: config.json has quantization_config" in err


# ---------------------------------------------------------------------------------------------------------
# MXFP4 (GPT-OSS)

@pytest.fixture(scope="module")
def gpt_oss(wd):
    """A tiny GPT-OSS: bf16 base, an attention-only LoRA made on it, and the MXFP4 checkpoint of it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("gpt_oss", vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=E,
                               num_experts_per_tok=2, max_position_embeddings=64, layer_types=["full_attention"])
    bf16 = wd / "gpt-oss-bf16"
    AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(str(bf16))
    adapter = vh.save_adapter(vh.load_causal(bf16), wd / "gpt-oss-attn", target_modules=["q_proj", "v_proj"])

    # the layout of openai/gpt-oss-*: experts as *_blocks [E, out, in/32, 16] and *_scales [E, out, in/32], U8
    mx = wd / "gpt-oss-mxfp4"
    mx.mkdir()
    g = torch.Generator().manual_seed(1)
    out = {}
    for name, t in load_file(bf16 / "model.safetensors").items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            e, n_in, n_out = t.shape
            out[name + "_blocks"] = torch.randint(0, 256, (e, n_out, n_in // 32, 16), dtype=torch.uint8, generator=g)
            out[name + "_scales"] = torch.randint(124, 130, (e, n_out, n_in // 32), dtype=torch.uint8, generator=g)
        else:
            out[name] = t
    save_file(out, str(mx / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((bf16 / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                                   "lm_head"],
    }
    (mx / "config.json").write_text(json.dumps(config, indent=2))
    return bf16, mx, adapter


def test_mxfp4_layout_loads_in_transformers(gpt_oss):
    from transformers import AutoModelForCausalLM

    _, mx, _ = gpt_oss
    model, info = AutoModelForCausalLM.from_pretrained(str(mx), output_loading_info=True)  # dequantized on CPU
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape == (E, 64, 128)


def test_mxfp4_gpt_oss_with_attention_lora_merges_dequantized(gpt_oss, tmp_path, capsys):
    """Was refused (the packed experts were once copied without their config); now the experts are written as
    transformers' dequantized model has them: `mlp.experts.gate_up_proj` [E, in, out], bf16."""
    _, mx, adapter = gpt_oss
    out_t = _merged_dequantized(mx, adapter, tmp_path / "out", capsys)
    assert out_t["model.layers.0.mlp.experts.gate_up_proj"].shape == (E, 64, 128)
    assert not any(n.endswith(("_blocks", "_scales")) for n in out_t)


def test_mxfp4_tensors_are_refused_without_their_config(gpt_oss, tmp_path, capsys):
    _, mx, adapter = gpt_oss
    base = shutil.copytree(mx, tmp_path / "base")
    cfg = json.loads((base / "config.json").read_text())
    del cfg["quantization_config"]
    (base / "config.json").write_text(json.dumps(cfg))
    err = _refused(base, adapter, tmp_path / "out", capsys)
    assert "quantized (MXFP4: model.layers.0.mlp.experts." in err


# ---------------------------------------------------------------------------------------------------------
# FP8 block-wise (DeepSeek-V3 / Qwen3-FP8 layout)

@pytest.fixture(scope="module")
def fp8_base(wd, llama):
    base = shutil.copytree(llama, wd / "fp8")
    out = {}
    for name, w in load_file(base / "model.safetensors").items():
        if name.endswith("_proj.weight"):
            out[name] = w.float().to(torch.float8_e4m3fn)
            out[name + "_scale_inv"] = torch.ones(math.ceil(w.shape[0] / 128), math.ceil(w.shape[1] / 128))
        else:
            out[name] = w
    save_file(out, str(base / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128]}
    (base / "config.json").write_text(json.dumps(cfg, indent=2))
    return base


def test_fp8_block_wise_with_lm_head_lora_merges_dequantized(fp8_base, head_lora, tmp_path, capsys):
    """Was refused; with unit scales the dequantized weights are the F8_E4M3 values themselves."""
    out_t = _merged_dequantized(fp8_base, head_lora, tmp_path / "out", capsys)
    fp8 = load_file(fp8_base / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(out_t[name], fp8[name].float().to(torch.bfloat16))
    quant = detect(open_checkpoint(fp8_base).tensors, {})
    assert quant.scheme == "FP8 block-wise"
    assert all(set(g.parts) == {"weight", "weight_scale_inv"} for g in quant.groups)


# ---------------------------------------------------------------------------------------------------------
# other layouts, from headers alone

class _H:
    def __init__(self, dtype: str, shape: tuple[int, ...]):
        self.dtype, self.shape = dtype, shape


def test_other_layouts_are_recognised():
    ct_int4 = {"l.weight_packed": _H("I32", (8, 2)), "l.weight_scale": _H("BF16", (8, 1)),
               "l.weight_shape": _H("I64", (2,)), "n.weight": _H("BF16", (16,))}
    q = detect(ct_int4)
    assert q.scheme == "packed integer (compressed-tensors)" and q.tensors == {"l.weight_packed", "l.weight_scale",
                                                                               "l.weight_shape"}
    gptq = {"l.qweight": _H("I32", (2, 16)), "l.qzeros": _H("I32", (1, 2)), "l.scales": _H("F16", (1, 16)),
            "l.g_idx": _H("I32", (16,)), "l.bias": _H("F16", (16,))}
    q = detect(gptq, {"quantization_config": {"quant_method": "gptq", "bits": 4}})
    assert q.scheme == "GPTQ" and q.tensors == {"l.qweight", "l.qzeros", "l.scales", "l.g_idx"}
    plain = {"l.weight": _H("BF16", (4, 4)), "l.bias": _H("F32", (4,)), "pos": _H("I64", (1, 8))}
    assert detect(plain, {"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": False,
                                                  "load_in_8bit": False}}) is None
