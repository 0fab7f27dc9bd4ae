"""io/quant: each format's rows are transformers' own dequantization bit for bit (any row range), verify's float64
reading of them agrees, the FP8 re-quantizers are transformers' / the fixtures' quantizers, and what cannot be read
exactly is refused with a message that names it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("bitsandbytes")
pytest.importorskip("compressed_tensors")

import quant_fixtures as qf

from streammerge.errors import CheckpointError, UnsupportedError
from streammerge.io.checkpoint import Checkpoint, open_checkpoint
from streammerge.io.quant import fp8, read_quantized
from streammerge.io.reader import TensorReader
from streammerge.io.safetensors import TensorInfo
from streammerge.io.sharding import PlannedTensor, plan_shards

BUILDERS = {k: qf.BUILDERS[k] for k in ("fp8-deepseek-8", "fp8-deepseek-16", "fp8-deepseek-128", "fp8-qwen3moe-bf16scale",
                                             "ct-channel-qwen3moe", "ct-tensor-llama", "mxfp4-gptoss", "bnb-nf4",
                                             "bnb-fp4-dq", "bnb-int8")}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("quant-formats")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32 if t.dtype == torch.float32 else torch.uint8)


def _spans(rows: int) -> list[tuple[int, int]]:
    """Whole, unaligned, single-row and empty row ranges."""
    return sorted({(0, rows), (1, rows), (0, max(1, rows // 3)), (rows // 3, rows // 3 + 1), (rows - 1, rows),
                   (rows // 2, rows // 2)})


@pytest.mark.parametrize("key", list(BUILDERS))
def test_rows_are_transformers_dequantization_bit_for_bit(root, key):
    """Every quantized tensor, any row range: the engine's float32 rows and verify's float64 reading of them are
    the fixture's reference (transformers' own dequantization, loaded in float32) bit for bit."""
    from streammerge.verify.quantized import dequantized_rows
    from streammerge.verify.reference import Sources

    ck = BUILDERS[key](root)
    config = json.loads((ck.path / "config.json").read_text())
    quant = read_quantized(open_checkpoint(ck.path), config)
    assert quant is not None and set(quant.tensors) == set(ck.quantized)
    ref = ck.reference(torch.float32)
    sources = Sources(adapter=None)  # type: ignore[arg-type]  # only base tensors are read
    with TensorReader() as reader:
        for name, qt in quant.tensors.items():
            want = ref[name].reshape(qt.shape[0], -1)
            assert qt.disk_names == list(ck.quantized[name]) or set(qt.disk_names) == set(ck.quantized[name])
            rows = qt.rows(reader)
            for r0, r1 in _spans(qt.shape[0]):
                got = rows.rows(r0, r1)
                assert got.dtype == torch.float32 and torch.equal(_bits(got), _bits(want[r0:r1])), (name, r0, r1)
                theirs = dequantized_rows(qt, sources, 1, want.shape[1], r0, r1)
                assert torch.equal(_bits(theirs.float()), _bits(want[r0:r1])), (name, r0, r1, "verify")
            sources.tensor_done()
    sources.close()


def test_mxfp4_rows_of_the_expert_row_view(root):
    """verify views a fused expert tensor as `[E * in, out]` when LoRA is merged into it: rows are then input
    features of one expert, taken from slices of the disk's groups."""
    from streammerge.verify.quantized import dequantized_rows
    from streammerge.verify.reference import Sources

    ck = BUILDERS["mxfp4-gptoss"](root)
    quant = read_quantized(open_checkpoint(ck.path), ck.config)
    sources = Sources(adapter=None)  # type: ignore[arg-type]
    for name, qt in quant.tensors.items():
        e, n_in, n_out = qt.shape
        want = ck.reference(torch.float32)[name].reshape(e * n_in, n_out)
        for r0, r1 in ((0, e * n_in), (5, 40), (n_in - 3, n_in + 7), (e * n_in - 1, e * n_in)):
            got = dequantized_rows(qt, sources, n_in, n_out, r0, r1)
            assert torch.equal(got.float(), want[r0:r1]), (name, r0, r1)
    sources.close()


@pytest.mark.parametrize("double_quant", [False, True])
def test_bnb4_rows_that_straddle_blocks(tmp_path, double_quant):
    """96-wide rows in blocks of 64: blocks run over the flattened tensor (what quantize_4bit did), so rows
    start mid-block and mid-byte; the rows are the flat-block dequantization, not bitsandbytes 0.50's CPU kernel."""
    import bitsandbytes.functional as bnbf

    w = (torch.randn(10, 96, generator=torch.Generator().manual_seed(5)) * 0.05).to(torch.bfloat16)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    parts = {f"m.weight.{k}": v for k, v in state.as_dict(packed=True).items()}
    save_file({"m.weight": packed, **parts, "n.weight": torch.ones(4, dtype=torch.bfloat16)},
              str(tmp_path / "model.safetensors"))
    config = {"model_type": "llama", "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                                             "bnb_4bit_quant_type": "nf4"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    quant = read_quantized(open_checkpoint(tmp_path), config)
    qt = quant.tensors["m.weight"]
    assert qt.shape == (10, 96) and qt.dtype == "BF16"
    want = qf.dequantize_bnb4(packed, {k.removeprefix("weight."): v for k, v in state.as_dict(packed=True).items()},
                              torch.float32)
    with TensorReader() as reader:
        rows = qt.rows(reader)
        for r0, r1 in ((0, 10), (1, 2), (3, 7), (9, 10)):
            assert torch.equal(rows.rows(r0, r1), want[r0:r1]), (r0, r1)


# ------------------------------------------------------------------------------------------------------------
# re-quantization


def test_fp8_block_quantizer_is_transformers_fp8quantize(root):
    """On whole blocks, codes and scales are transformers' Fp8Quantize._quantize_one bit for bit (the op its
    loader inverts); the dequantized rows returned for the report are q * scale."""
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 48, generator=g) * torch.rand(64, 1, generator=g)
    w[16:32, 16:32] = 0  # an all-zero block keeps scale 1
    op = Fp8Quantize(FineGrainedFP8HfQuantizer(FineGrainedFP8Config(weight_block_size=[16, 16])))
    theirs = op._quantize_one("x.weight", w)
    q = torch.empty(64, 48, dtype=torch.float8_e4m3fn)
    inv, dq = fp8.quantize_blocks(w, 16, 16, torch.float32, q, torch.empty(64 * 48), None,
                                  torch.empty(64 * 48 // 2, dtype=torch.int32), "x")
    assert torch.equal(q.view(torch.uint8), theirs["x.weight"].view(torch.uint8))
    assert torch.equal(inv, theirs["x.weight_scale_inv"]) and inv[1, 1] == 1.0
    assert torch.equal(dq, q.float() * inv.repeat_interleave(16, 0).repeat_interleave(16, 1))


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_fp8_block_requantizer_on_partial_blocks_in_row_blocks(scale_dtype):
    """Partial edge blocks, 16-bit scales, and the engine's row blocks (aligned to the block rows): the same codes
    and scales as the fixtures' quantizer on the whole tensor (zero-padded, as transformers would)."""
    from streammerge.io.quant.base import QuantTensor
    from streammerge.io.quant.fp8_block import FORMAT

    w = torch.randn(40, 36, generator=torch.Generator().manual_seed(1)) * 0.1
    q_want, s_want = qf.quantize_fp8_block(w, (16, 16), scale_dtype)
    st = {torch.float32: "F32", torch.bfloat16: "BF16"}[scale_dtype]
    scale = TensorInfo("x.weight_scale_inv", st, (3, 3), Path("x"), 0, 9 * 4)
    qt = QuantTensor("x.weight", (40, 36), "BF16", FORMAT, {"weight": TensorInfo("x.weight", "F8_E4M3", (40, 36),
                     Path("x"), 0, 40 * 36), "weight_scale_inv": scale}, {"block": (16, 16), "grid": (3, 3)})
    rq = FORMAT.requantizer(qt)
    assert rq.row_align == 16
    session = rq.session()
    q = torch.empty(40, 36, dtype=torch.float8_e4m3fn)
    scales = []
    for r0, r1 in ((0, 32), (32, 40)):
        s, _ = session.quantize(w[r0:r1], r0, r1, q[r0:r1])
        assert rq.scale_rows(r0, r1) == (r0 // 16, -(-r1 // 16))
        scales.append(s.clone())
    assert torch.equal(q.view(torch.uint8), q_want.view(torch.uint8))
    assert torch.equal(torch.cat(scales), s_want)


def test_compressed_requantizer_per_channel_and_per_tensor():
    """A fresh scale per row (or one for all, after seeing every row): amax / 448 in the scale's dtype; every
    code within half an e4m3 step of its value."""
    from streammerge.io.quant.base import QuantTensor
    from streammerge.io.quant.ct_fp8 import FORMAT

    w = torch.randn(12, 32, generator=torch.Generator().manual_seed(2)) * 0.2
    w[3] = 0
    for strategy, shape in (("channel", (12, 1)), ("tensor", (1,))):
        scale = TensorInfo("x.weight_scale", "BF16", shape, Path("x"), 0, 2 * math.prod(shape))
        qt = QuantTensor("x.weight", (12, 32), "BF16", FORMAT, {
            "weight": TensorInfo("x.weight", "F8_E4M3", (12, 32), Path("x"), 0, 12 * 32), "weight_scale": scale},
            {"strategy": strategy, "dense": True})
        rq = FORMAT.requantizer(qt)
        assert rq.whole_tensor is (strategy == "tensor")
        session = rq.session()
        if rq.whole_tensor:
            session.observe(w[:5], 0, 5)
            session.observe(w[5:], 5, 12)
        q = torch.empty(12, 32, dtype=torch.float8_e4m3fn)
        s, dq = session.quantize(w, 0, 12, q)
        amax = w.abs().amax(dim=1, keepdim=True) if strategy == "channel" else w.abs().max().reshape(1)
        want = torch.where(amax == 0, torch.finfo(torch.bfloat16).eps, (amax / 448).to(torch.bfloat16).float())
        assert s.dtype == torch.bfloat16 and torch.equal(s.float(), want.to(torch.bfloat16).float())
        v = w / s.float().reshape(-1, 1)
        assert ((q.float() - v).abs() <= torch.exp2(torch.floor(torch.log2(v.abs().clamp_min(1e-30))).clamp_min(-6)
                                                    - 4)).all()
        assert torch.equal(dq, q.float() * s.float().reshape(-1, 1))


def test_decode_is_torchs_e4m3_cast():
    """Every code (NaN included), odd counts and unaligned starts: the pair table gives the cast's float32 bits."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    q = torch.cat([codes, codes.flip(0), codes[:7]]).view(torch.float8_e4m3fn)
    for part in (q, q[1:], q[:-1], q[3:4]):
        out = torch.empty(part.numel())
        fp8.decode(part, out, torch.empty(part.numel() // 2 + 1, dtype=torch.int32))
        assert torch.equal(out.view(torch.int32), part.float().view(torch.int32))


def test_scale_blocks_matches_the_block_aware_dequantization():
    """Rows from any start: `q * s[row // bm, col // bn]`, one float32 product each (transformers'
    `_dequantize_fp8_weight` in float32)."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    g = torch.Generator().manual_seed(4)
    q = (torch.randn(40, 36, generator=g) * 50).to(torch.float8_e4m3fn)
    s = torch.rand(3, 3, generator=g) + 0.01
    want = _dequantize_fp8_weight(q, s, [16, 16], torch.float32)
    for r0, r1 in ((0, 40), (5, 37), (16, 32), (39, 40)):
        got = fp8.scale_blocks(q[r0:r1].float(), s[r0 // 16:-(-r1 // 16)], r0, 16, 16)
        assert torch.equal(got, want[r0:r1]), (r0, r1)


# ------------------------------------------------------------------------------------------------------------
# refusals


def _fake(tensors: dict[str, tuple[str, tuple[int, ...]]]) -> Checkpoint:
    infos = {n: TensorInfo(n, d, s, Path("/nowhere/model.safetensors"), 0, 0) for n, (d, s) in tensors.items()}
    return Checkpoint(Path("/nowhere"), infos, (), None)


FP8 = {"l.weight": ("F8_E4M3", (256, 128)), "l.weight_scale_inv": ("F32", (2, 1)), "n.weight": ("BF16", (4,))}
FP8_CONFIG = {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
CT = {"l.weight": ("F8_E4M3", (8, 16)), "l.weight_scale": ("BF16", (8, 1))}
CT_CONFIG = {"quantization_config": {
    "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
    "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"type": "float", "num_bits": 8,
                                                                     "strategy": "channel", "symmetric": True}}},
    "ignore": ["lm_head"]}}


@pytest.mark.parametrize("tensors, config, error, words", [
    ({"l.qweight": ("I32", (2, 16)), "l.qzeros": ("I32", (1, 2)), "l.scales": ("F16", (1, 16))},
     {"quantization_config": {"quant_method": "gptq", "bits": 4}}, UnsupportedError, ["GPTQ", "streammerge reads"]),
    (FP8, {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 64]}}, CheckpointError,
     ["l.weight_scale_inv is [2, 1]", "needs [2, 2]"]),
    (FP8, {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128], "expert_dtype": "fp4"}},
     UnsupportedError, ["expert_dtype 'fp4'"]),
    ({**FP8, "k.weight": ("F8_E4M3", (4, 4))}, FP8_CONFIG, UnsupportedError, ["k.weight", "without a weight_scale_inv"]),
    (CT, {"compression_config": CT_CONFIG["quantization_config"]}, UnsupportedError, ["compression_config"]),
    (CT, {"quantization_config": {**CT_CONFIG["quantization_config"], "ignore": ["re:^l$"]}}, CheckpointError,
     ["l.weight is quantized but quantization_config.ignore lists it ('re:^l$')"]),
    (CT, {"quantization_config": {**CT_CONFIG["quantization_config"], "format": "pack-quantized"}},
     UnsupportedError, ["format 'pack-quantized'"]),
    ({"l.weight": ("F8_E4M3", (8, 16)), "l.weight_scale": ("BF16", (2, 1))}, CT_CONFIG, UnsupportedError,
     ["is [2, 1]", "per output channel"]),
    (FP8, {}, UnsupportedError, ["quantized (FP8 block-wise", "no quantization_config"]),
])
def test_what_cannot_be_read_exactly_is_refused(tensors, config, error, words):
    with pytest.raises(error) as exc:
        read_quantized(_fake(tensors), config)
    for w in words:
        assert w in str(exc.value), (w, str(exc.value))


def test_plain_checkpoints_are_not_quantized():
    assert read_quantized(_fake({"l.weight": ("BF16", (4, 4))}), {"model_type": "llama"}) is None


def test_a_new_scale_stays_in_its_weights_shard():
    """Greedy sharding never starts a shard with a glued tensor (a re-quantized weight's scale)."""
    ts = [PlannedTensor("a", "F8_E4M3", (100,)), PlannedTensor("a_s", "F32", (10,)), PlannedTensor("b", "BF16", (50,))]
    assert [[t.name for t in s] for s in plan_shards(ts, 100)] == [["a"], ["a_s"], ["b"]]
    assert [[t.name for t in s] for s in plan_shards(ts, 100, {"a_s"})] == [["a", "a_s"], ["b"]]


@pytest.mark.parametrize("scales", ["per-tensor", "e8m0"])
def test_fp8_per_tensor_and_power_of_two_scales_are_read_as_transformers_reads_them(tmp_path, scales):
    """`weight_block_size: null` (one scale for the tensor) and E8M0 byte scales (`2 ** (s - 127)`, DeepSeek-V4
    style) dequantize as transformers' Fp8Dequantize does; --dtype keep refuses to re-quantize into either."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    from streammerge.io.quant.fp8_block import FORMAT

    g = torch.Generator().manual_seed(6)
    q = (torch.randn(32, 48, generator=g) * 40).to(torch.float8_e4m3fn)
    if scales == "per-tensor":
        s, block = torch.tensor([0.0123]), None
    else:
        s, block = torch.randint(115, 125, (2, 3), dtype=torch.uint8, generator=g), [16, 16]
    save_file({"l.weight": q, "l.weight_scale_inv": s}, str(tmp_path / "model.safetensors"))
    config = {"quantization_config": {"quant_method": "fp8", "weight_block_size": block}}
    qt = read_quantized(open_checkpoint(tmp_path), config).tensors["l.weight"]
    want = Fp8Dequantize(None)._dequantize_one(q, s, output_dtype=torch.float32)
    with TensorReader() as reader:
        rows = qt.rows(reader)
        for r0, r1 in ((0, 32), (3, 20), (31, 32)):
            assert torch.equal(rows.rows(r0, r1), want[r0:r1]), (r0, r1)
    with pytest.raises(UnsupportedError, match="re-quantizing|re-quantiz"):
        FORMAT.requantizer(qt)
