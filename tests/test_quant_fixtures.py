"""The quantized fixtures themselves: on-disk layout as each ecosystem writes it, and references that are what
transformers loads. Facts and sources: docs/quantized-formats.md."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")
pytest.importorskip("compressed_tensors")

import quant_fixtures as qf

TOKENS = torch.tensor([[1, 5, 9, 2, 7, 3]])


class Fixtures:
    """Each checkpoint built once per module, on first use."""

    def __init__(self, root: Path):
        self.root = root
        self._built: dict[str, qf.QuantCheckpoint] = {}

    def get(self, key: str) -> qf.QuantCheckpoint:
        if key not in self._built:
            self._built[key] = BUILDERS[key](self.root)
        return self._built[key]


BUILDERS = qf.BUILDERS
LOADABLE = [k for k in BUILDERS if k not in ("fp8-deepseek-16", "fp8-deepseek-128")]


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Fixtures:
    return Fixtures(tmp_path_factory.mktemp("quant"))


def headers(ck: qf.QuantCheckpoint) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(v.shape), v.dtype) for k, v in ck.tensors().items()}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point and a.element_size() == 1:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return torch.equal(a, b)


def assert_untouched_from_source(ck: qf.QuantCheckpoint, disk: dict[str, torch.Tensor]) -> None:
    src = qf.read_tensors(ck.source)
    parts = {p for ps in ck.quantized.values() for p in ps}
    for k, v in disk.items():
        if k not in parts:
            assert same_bits(v, src[k]), k


# ------------------------------------------------------------------------------------------------------
# On-disk layout


@pytest.mark.parametrize("key", ["fp8-deepseek-8", "fp8-deepseek-16", "fp8-deepseek-128", "fp8-qwen3moe-bf16scale"])
def test_fp8_block_layout(fx, key):
    ck = fx.get(key)
    qc = ck.config["quantization_config"]
    block = qc["weight_block_size"]
    assert qc == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": block}
    disk = ck.tensors()
    scale_dtype = torch.bfloat16 if "bf16scale" in key else torch.float32
    src = qf.read_tensors(ck.source)
    for name in qf.linear_weights(src):
        rows, cols = src[name].shape
        assert disk[name].dtype == torch.float8_e4m3fn and disk[name].shape == (rows, cols), name
        scale = disk[name.removesuffix("weight") + "weight_scale_inv"]
        assert scale.dtype == scale_dtype and scale.shape == (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    kinds = {n.split(".")[-2] for n in ck.quantized}
    if "deepseek" in key:
        assert {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"} <= kinds
        assert any(".mlp.experts.3." in n for n in ck.quantized) and any("shared_experts" in n for n in ck.quantized)
        assert "model.layers.1.mlp.gate.weight" in disk and "model.layers.1.mlp.gate.e_score_correction_bias" in disk
    assert_untouched_from_source(ck, disk)
    assert not any(n.startswith(("lm_head", "model.embed_tokens")) or "norm" in n or n.endswith("mlp.gate.weight")
                   for n in ck.quantized)


def test_fp8_block_matches_transformers_own_quantizer(fx, monkeypatch):
    """transformers quantizes on the fly only on a GPU; its quantizer and serializer themselves run on the CPU. They
    write the same bytes for every shared tensor; the one layout difference is that transformers 5.24 saves an MoE
    layer's expert scales fused (`experts.gate_up_proj_scale_inv` [E, ...]) while DeepSeek/Qwen ship them per
    expert, as the fixture does."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    ck = fx.get("fp8-deepseek-8")
    monkeypatch.setattr(FineGrainedFP8HfQuantizer, "validate_environment", lambda self, *a, **k: None)
    model = AutoModelForCausalLM.from_pretrained(str(ck.source), dtype=torch.bfloat16,
                                                 quantization_config=FineGrainedFP8Config(weight_block_size=[8, 8]))
    out = fx.root / "transformers-fp8"
    model.save_pretrained(str(out))
    theirs, ours = qf.read_tensors(out), ck.tensors()
    for k in set(theirs) & set(ours):
        assert same_bits(theirs[k], ours[k]), k
    only_ours = set(set(ours) - set(theirs))
    only_theirs = set(theirs) - set(ours)
    assert only_ours and all(".mlp.experts." in k and k.endswith("_proj.weight_scale_inv") for k in only_ours)
    assert only_theirs == {"model.layers.1.mlp.experts.gate_up_proj_scale_inv",
                           "model.layers.1.mlp.experts.down_proj_scale_inv"}
    p = "model.layers.1.mlp.experts"
    for e in range(4):
        fused = torch.cat([ours[f"{p}.{e}.gate_proj.weight_scale_inv"], ours[f"{p}.{e}.up_proj.weight_scale_inv"]])
        assert torch.equal(theirs[f"{p}.gate_up_proj_scale_inv"][e], fused)
        assert torch.equal(theirs[f"{p}.down_proj_scale_inv"][e], ours[f"{p}.{e}.down_proj.weight_scale_inv"])


@pytest.mark.parametrize("key", ["ct-channel-qwen3moe", "ct-tensor-llama"])
def test_compressed_tensors_layout(fx, key):
    ck = fx.get(key)
    qc = ck.config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "float-quantized"
    assert qc["quantization_status"] == "compressed"
    weights = qc["config_groups"]["group_0"]["weights"]
    assert (weights["type"], weights["num_bits"], weights["symmetric"]) == ("float", 8, True)
    channel = key.startswith("ct-channel")
    assert weights["strategy"] == ("channel" if channel else "tensor")
    acts = qc["config_groups"]["group_0"]["input_activations"]
    assert acts["dynamic"] is channel
    disk, src = ck.tensors(), qf.read_tensors(ck.source)
    for name in qf.linear_weights(src):
        module = name.removesuffix(".weight")
        if name not in ck.quantized:
            assert module in qc["ignore"] and disk[name].dtype == torch.bfloat16
            continue
        assert disk[name].dtype == torch.float8_e4m3fn and disk[name].shape == src[name].shape
        scale = disk[module + ".weight_scale"]
        assert scale.dtype == torch.bfloat16
        assert scale.shape == ((src[name].shape[0], 1) if channel else (1,))
        assert (module + ".input_scale" in disk) is (not channel)
        if not channel:
            assert disk[module + ".input_scale"].shape == (1,)
    if channel:  # the MoE router is not a Linear and is never quantized
        assert disk["model.layers.0.mlp.gate.weight"].dtype == torch.bfloat16
    else:
        assert "model.layers.0.mlp.down_proj.weight" not in ck.quantized
    assert not any(k.endswith("zero_point") for k in disk)
    assert_untouched_from_source(ck, disk)


def test_mxfp4_layout(fx):
    ck = fx.get("mxfp4-gptoss")
    assert ck.config["quantization_config"]["quant_method"] == "mxfp4"
    disk = ck.tensors()
    hidden, inter, experts = qf.GPT_OSS["hidden_size"], qf.GPT_OSS["intermediate_size"], qf.GPT_OSS["num_local_experts"]
    for layer in range(2):
        p = f"model.layers.{layer}.mlp.experts."
        assert p + "gate_up_proj" not in disk and p + "down_proj" not in disk
        assert (disk[p + "gate_up_proj_blocks"].shape, disk[p + "gate_up_proj_blocks"].dtype) == (
            (experts, 2 * inter, hidden // 32, 16), torch.uint8)
        assert disk[p + "gate_up_proj_scales"].shape == (experts, 2 * inter, hidden // 32)
        assert disk[p + "down_proj_blocks"].shape == (experts, hidden, inter // 32, 16)
        assert disk[p + "down_proj_scales"].dtype == torch.uint8
        assert disk[p + "gate_up_proj_bias"].shape == (experts, 2 * inter)
        assert disk[p + "down_proj_bias"].dtype == torch.bfloat16
    assert_untouched_from_source(ck, disk)


@pytest.mark.parametrize("key", ["bnb-nf4", "bnb-nf4-dq", "bnb-fp4", "bnb-fp4-dq", "bnb-int8"])
def test_bitsandbytes_layout(fx, key):
    """The fixture is transformers' own output (quantized on the CPU, save_pretrained); pin the layout."""
    ck = fx.get(key)
    qc = ck.config["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes"
    disk, src = ck.tensors(), qf.read_tensors(ck.source)
    assert set(ck.quantized) == set(qf.linear_weights(src))
    for name in ck.quantized:
        rows, cols = src[name].shape
        if key == "bnb-int8":
            assert qc["load_in_8bit"] and disk[name].dtype == torch.int8 and disk[name].shape == (rows, cols)
            scb = disk[name.removesuffix("weight") + "SCB"]
            assert scb.dtype == torch.float32 and scb.shape == (rows,)
            assert disk[name + "_format"].dtype == torch.uint8 and disk[name + "_format"].shape == ()
            continue
        kind, dq = key.split("-")[1], key.endswith("-dq")
        assert qc["bnb_4bit_quant_type"] == kind and qc["bnb_4bit_use_double_quant"] is dq
        n = rows * cols
        assert disk[name].dtype == torch.uint8 and disk[name].shape == ((n + 1) // 2, 1)
        state = json.loads(bytes(disk[f"{name}.quant_state.bitsandbytes__{kind}"].tolist()))
        assert state["quant_type"] == kind and state["shape"] == [rows, cols] and state["dtype"] == "bfloat16"
        blocks = math.ceil(n / state["blocksize"])
        assert disk[f"{name}.quant_map"].shape == (16,)
        if dq:
            assert disk[f"{name}.absmax"].dtype == torch.uint8 and disk[f"{name}.absmax"].shape == (blocks,)
            assert disk[f"{name}.nested_absmax"].shape == (math.ceil(blocks / state["nested_blocksize"]),)
            assert disk[f"{name}.nested_quant_map"].shape == (256,)
            assert {"nested_blocksize", "nested_dtype", "nested_offset"} <= set(state)
        else:
            assert disk[f"{name}.absmax"].dtype == torch.float32 and disk[f"{name}.absmax"].shape == (blocks,)
            assert f"{name}.nested_absmax" not in disk and "nested_offset" not in state
    assert_untouched_from_source(ck, disk)


# ------------------------------------------------------------------------------------------------------
# References


@pytest.mark.parametrize("key", LOADABLE)
def test_transformers_loads_the_reference(fx, key):
    """Loaded by transformers on the CPU (dequantized) and saved again, the checkpoint is reference() exactly:
    same names, dtypes and bits, and no quantization_config left. The model runs."""
    ck = fx.get(key)
    assert ck.loads_in_transformers
    model = qf.load_dequantized(ck.path)
    out = fx.root / f"resaved-{ck.name}"
    model.save_pretrained(str(out))
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    saved, ref = qf.read_tensors(out), ck.reference(torch.bfloat16)
    assert set(saved) == set(ref)
    assert [k for k in ref if not same_bits(saved[k], ref[k])] == []
    assert all(ref[k].dtype == torch.bfloat16 for k in ck.quantized)
    with torch.no_grad():
        assert torch.isfinite(model(TOKENS).logits).all()


def test_fp8_partial_block_reference_agrees_with_compressed_tensors(fx):
    """The partial-block reference (transformers' block-aware `_dequantize_fp8_weight`, float32, one rounding) is
    bit-identical to compressed-tensors' independent FP8BlockDequantizer, which pads to whole blocks."""
    from compressed_tensors.entrypoints.convert.converters.fp8block_dequantizer import FP8BlockDequantizer

    for key, block in (("fp8-deepseek-16", (16, 16)), ("fp8-deepseek-128", (128, 128))):
        ck = fx.get(key)
        disk, ref = ck.tensors(), ck.reference(torch.bfloat16)
        other = FP8BlockDequantizer(weight_block_size=block, dtype=torch.bfloat16)
        partial = [k for k in ck.quantized if not qf.fp8_block_tiles(disk[k].shape, block)]
        assert partial
        for k in ck.quantized:
            theirs = other._create_dequantized_weight(disk[k], disk[k.removesuffix("weight") + "weight_scale_inv"])
            assert same_bits(theirs, ref[k]), k


def test_fp8_tiled_reference_is_the_loader_op(fx):
    """On whole blocks both transformers routes give the same bits: the loader's op and the block-aware one."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, _dequantize_fp8_weight

    ck = fx.get("fp8-deepseek-8")
    disk = ck.tensors()
    for k in ck.quantized:
        w, s = disk[k], disk[k.removesuffix("weight") + "weight_scale_inv"]
        a = Fp8Dequantize(None)._dequantize_one(w, s, output_dtype=torch.bfloat16)
        assert same_bits(a, _dequantize_fp8_weight(w, s, [8, 8], torch.float32).to(torch.bfloat16)), k


def test_transformers_cpu_fp8_loader_mishandles_partial_blocks(fx):
    """transformers 5.24's CPU dequantization derives the block size from the scale grid (rows // scale_rows): it
    refuses a grid that does not divide the shape (DeepSeek-V3's kv_a_proj_with_mqa: 576 rows, 5 scale rows) and
    silently uses the wrong block when it does (144 columns, 2 scale columns -> blocks of 72). This is why the
    partial-block fixtures are not loadable and their reference comes from the block-aware function."""
    ck16 = fx.get("fp8-deepseek-16")
    assert not ck16.loads_in_transformers and "raises" in ck16.note
    with pytest.raises(RuntimeError, match="conversion"):
        qf.load_dequantized(ck16.path)

    ck = fx.get("fp8-deepseek-128")
    assert not ck.loads_in_transformers and "silently" in ck.note
    model = qf.load_dequantized(ck.path)
    out = fx.root / "resaved-fp8-128"
    model.save_pretrained(str(out))
    saved, ref = qf.read_tensors(out), ck.reference(torch.bfloat16)
    wrong = {k for k in ref if not same_bits(saved[k], ref[k])}
    multi_block_partial = {k for k in ck.quantized
                           if not qf.fp8_block_tiles(ref[k].shape, (128, 128)) and max(ref[k].shape) > 128}
    assert multi_block_partial and wrong == multi_block_partial


def test_mxfp4_quantizer_inverts_transformers_dequantization():
    """Values already on the MX grid survive quantize -> transformers' dequantize exactly (nibble order, scale
    bias and sign included); random values land within half a grid step of the original."""
    g = torch.Generator().manual_seed(3)
    grid = torch.tensor(qf.E2M1 + tuple(-v for v in qf.E2M1[1:]))
    idx = torch.randint(0, len(grid), (2, 6, 64), generator=g)
    exps = torch.randint(-6, 4, (2, 6, 2, 1), generator=g).float()
    exact = (grid[idx].reshape(2, 6, 2, 32) * torch.exp2(exps)).reshape(2, 6, 64)
    exact[..., ::32] = 6.0 * torch.exp2(exps.reshape(2, 6, 2))  # each group's max sets its scale
    blocks, scales = qf.quantize_mxfp4(exact)
    back = qf.dequantize_mxfp4(blocks, scales, torch.float32).transpose(1, 2)
    assert torch.equal(back, exact)

    w = torch.randn(2, 6, 64, generator=g)
    blocks, scales = qf.quantize_mxfp4(w)
    back = qf.dequantize_mxfp4(blocks, scales, torch.float32).transpose(1, 2)
    step = torch.exp2(scales.float() - 127).repeat_interleave(32, -1)  # the grid's widest gap is 2 * scale
    assert ((back - w).abs() <= step + 1e-6).all()


def test_bnb4_rows_that_straddle_blocks():
    """quantize_4bit blocks the flattened tensor; the reference inverts exactly that (every value is code * absmax
    of its flat block). bitsandbytes 0.50's CPU `dequantize_4bit` blocks each row instead, so on a 96-wide row with
    64-value blocks it returns other numbers: pinned here, so that a fixed bitsandbytes shows up."""
    import bitsandbytes.functional as bnbf

    w = (torch.randn(8, 96, generator=torch.Generator().manual_seed(5)) * 0.05).to(torch.bfloat16)
    for kind in ("nf4", "fp4"):
        packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type=kind)
        parts = {k.removeprefix("weight."): v for k, v in state.as_dict(packed=True).items()}
        ref = qf.dequantize_bnb4(packed, parts, torch.float32)
        codes = packed.view(torch.uint8).reshape(-1)
        idx = torch.stack([codes >> 4, codes & 0xF], -1).reshape(-1).long()
        expected = (state.code[idx] * state.absmax.repeat_interleave(64)).reshape(8, 96).to(torch.bfloat16)
        assert torch.equal(ref, expected.float())
        assert (ref - w.float()).abs().max() <= state.absmax.max() * 0.5
        assert not torch.equal(bnbf.dequantize_4bit(packed, state).float(), ref)
        # whole blocks per row: both kernels agree
        packed, state = bnbf.quantize_4bit(w[:, :64], blocksize=64, quant_type=kind)
        flat_fn = bnbf_default_flat()
        flat = flat_fn(packed.reshape(-1), state.absmax, state.code, 64, state.shape, state.dtype)
        assert torch.equal(bnbf.dequantize_4bit(packed, state), flat)


def bnbf_default_flat():
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    return _dequantize_4bit_compute.__wrapped__
