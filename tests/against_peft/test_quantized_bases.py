"""Merging into quantized bases, against PEFT on the base as transformers dequantizes it.

Each base is a tiny checkpoint of one format, written the way its ecosystem writes it (tests/quant_fixtures.py):
FP8 block-wise (DeepSeek-V3 MLA with routed + shared experts, whole and partial edge blocks, the real 128 block;
Qwen3-MoE with BF16 scales, sharded), compressed-tensors FP8 (per channel with an MoE ignore list, per tensor with
a static input scale and an ignored Linear), MXFP4 (GPT-OSS fused experts with biases) and bitsandbytes (nf4/fp4
with and without double quantization, LLM.int8). The adapter is a PEFT LoRA made on the full-precision model.

Oracle for `--dtype bf16`: the base dequantized in float32 as transformers does it (`QuantCheckpoint.reference`,
checked against transformers' own loader wherever that loader is right), PEFT's float32 merge on it, rounded once
(≤ 1 ulp, as every oracle test). For `--dtype keep`: the output loads in transformers' FP8 path and its logits
stay as close to the unmerged PEFT model as quantizing the base alone moved the base's logits; each re-quantized
value is within half an e4m3 step of PEFT's float32 merge.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import helpers_tiny as ht
import pytest
import torch
import variant_helpers as vh
from oracle import read_checkpoint

pytest.importorskip("bitsandbytes")
pytest.importorskip("compressed_tensors")

import quant_fixtures as qf

from streammerge.verify import verify

BUILDERS = qf.BUILDERS
KEEP = ["fp8-deepseek-8", "fp8-deepseek-16", "fp8-qwen3moe-bf16scale", "ct-channel-qwen3moe", "ct-tensor-llama"]
LOADABLE_KEEP = [k for k in KEEP if k != "fp8-deepseek-16"]  # transformers 5.24 cannot load partial FP8 blocks
REFUSED_KEEP = ["mxfp4-gptoss", "bnb-nf4", "bnb-nf4-dq", "bnb-fp4-dq", "bnb-int8"]

# what each adapter targets: every quantized kind of Linear of the architecture, the routed experts through
# target_parameters (fused on load by transformers 5), and an unquantized tensor where the format leaves one
TARGETS = {
    "deepseek_v3": dict(
        target_modules=["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                        "shared_experts.gate_proj", "shared_experts.up_proj", "shared_experts.down_proj",
                        "layers.0.mlp.gate_proj", "layers.0.mlp.up_proj", "layers.0.mlp.down_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        modules_to_save=["kv_a_layernorm"]),
    "qwen3_moe": dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
    "llama": dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                  "lm_head"]),
    "gpt_oss": dict(target_modules=["q_proj", "v_proj"],
                    target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
}
TOKENS = torch.tensor([[1, 5, 9, 2, 7, 3, 11, 4]])
BATCH = torch.randint(0, qf.VOCAB, (8, 16), generator=torch.Generator().manual_seed(3))


@pytest.fixture(autouse=True, scope="module")
def _no_v4_target_rewrite():
    """PEFT 0.21 rewrites `gate_proj`/`up_proj`/`down_proj` targets of a DeepSeek-V3 model into the routed experts'
    fused parameters (its transformers-4 compatibility), dropping the shared experts and the dense MLP, which are
    real Linear modules on transformers 5. The rewrite is switched off while adapters are made and loaded, so those
    modules get their LoRA as the config asks; the merge maths PEFT then does is its own."""
    import peft.utils.transformers_weight_conversion as twc

    saved = twc._convert_peft_config_moe
    twc._convert_peft_config_moe = lambda config, model: None
    yield
    twc._convert_peft_config_moe = saved


class Case:
    """One quantized base, its adapter, the float32 dequantized base, PEFT's reference and streammerge's outputs,
    each made once, on first use."""

    def __init__(self, root: Path, key: str):
        self.root, self.key = root, key
        self.ck: qf.QuantCheckpoint = BUILDERS[key](root)
        self.arch = self.ck.source.name.removeprefix("src-")
        self._outs: dict[str, tuple[Path, object]] = {}
        self._ref = None

    @property
    def adapter(self) -> Path:
        ad = self.root / f"adapter-{self.arch}"
        if not ad.exists():
            vh.save_adapter(vh.load_causal(self.ck.source), ad, mutate=_perturb_saved, **TARGETS[self.arch])
        return ad

    @property
    def dequantized(self) -> Path:
        """The base as transformers dequantizes it, in float32, as a plain checkpoint (no quantization_config)."""
        out = self.root / f"deq-{self.ck.name}"
        if not out.exists():
            cfg = self.ck.config
            del cfg["quantization_config"]
            qf.write_checkpoint(out, self.ck.reference(torch.float32), cfg, self.ck.source)
        return out

    def reference(self) -> dict[str, torch.Tensor]:
        """PEFT's float32 merge on the dequantized base, rounded once to bf16, under on-disk names."""
        if self._ref is None:
            self._ref = vh.reference_on_disk(self.dequantized, self.adapter, self.root / f"ref-{self.ck.name}")
        return self._ref

    def reference32(self) -> dict[str, torch.Tensor]:
        """PEFT's float32 merge on the dequantized base, in float32, under on-disk names."""
        out = self.root / f"ref32-{self.ck.name}"
        if not out.exists():
            vh.peft_merged(self.dequantized, self.adapter).save_pretrained(str(out))
        return read_checkpoint(out)

    def merged(self, dtype: str = "bf16") -> tuple[Path, object]:
        if dtype not in self._outs:
            out = self.root / f"out-{self.ck.name}-{dtype}"
            summary = vh_merge(self.ck.path, self.adapter, out, dtype)
            self._outs[dtype] = (out, summary)
        return self._outs[dtype]


def vh_merge(base: Path, adapter: Path, out: Path, dtype: str):
    import streammerge

    return streammerge.merge(str(base), str(adapter), str(out), dtype=dtype)


def _perturb_saved(pm) -> None:
    """modules_to_save copies start equal to the base: make them differ, so a merge that ignores them fails."""
    if any("modules_to_save" in n for n, _ in pm.named_parameters()):
        vh.perturb(pm, lambda n: "modules_to_save" in n)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized-bases")
    made: dict[str, Case] = {}

    def get(key: str) -> Case:
        if key not in made:
            made[key] = Case(root, key)
        return made[key]

    return get


def _changed(ref: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in ref if k in base and not torch.equal(ref[k], base[k].to(ref[k].dtype))}


# ------------------------------------------------------------------------------------------------------------
# --dtype bf16: the merged model in full precision


@pytest.mark.parametrize("key", list(BUILDERS))
def test_bf16_merge_equals_peft_on_the_dequantized_base(cases, key):
    case = cases(key)
    ck = case.ck
    if ck.loads_in_transformers:
        # the oracle's base is what transformers' own loader makes of the checkpoint in float32, bit for bit
        resaved = case.root / f"resaved-f32-{ck.name}"
        qf.load_dequantized(ck.path, torch.float32).save_pretrained(str(resaved))
        loaded, want = read_checkpoint(resaved), ck.reference(torch.float32)
        assert set(loaded) == set(want) and all(torch.equal(loaded[k], want[k]) for k in want)
    out, summary = case.merged("bf16")
    assert summary.tensors_merged > 0 and not summary.requantized
    ref, base = case.reference(), ck.reference(torch.bfloat16)
    changed = _changed(ref, base)
    # the adapter changes quantized tensors (so the comparison can fail): MoE experts, shared experts too
    assert set(ck.quantized) & changed
    if case.arch != "llama":
        assert any(".experts." in k for k in changed)
    if case.arch == "deepseek_v3":
        assert any("shared_experts" in k for k in changed) and "model.layers.0.mlp.down_proj.weight" in changed
    out_t = read_checkpoint(out)
    vh.compare_to_reference(out_t, base, ref, changed)
    # companions gone, every other tensor as transformers' dequantized save has it
    assert set(out_t) == set(base)
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "bfloat16"


@pytest.mark.parametrize("key", list(BUILDERS))
def test_bf16_merge_logits_match_the_unmerged_adapter(cases, key):
    case = cases(key)
    out, _ = case.merged("bf16")
    ours = vh.logits(vh.load_causal(out, torch.float32), TOKENS)
    unmerged = vh.logits(vh.peft_unmerged(case.dequantized, case.adapter), TOKENS)
    base = vh.logits(vh.load_causal(case.dequantized, torch.float32), TOKENS)
    assert (unmerged - base).abs().max() > 1e-3, "the adapter does not change the logits: the test cannot fail"
    vh.assert_logits_close(ours, unmerged, what=key)


def test_kimi_k2_merges_like_deepseek_v3(cases, tmp_path):
    """Kimi K2 ships DeepSeek-V3's layout under its own model_type (with remote code): the same tensors, so the
    same merge, bit for bit, in both modes."""
    case = cases("fp8-deepseek-8")
    kimi = shutil.copytree(case.ck.path, tmp_path / "kimi-k2")
    cfg = json.loads((kimi / "config.json").read_text())
    cfg.update(model_type="kimi_k2", architectures=["DeepseekV3ForCausalLM"],
               auto_map={"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                         "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"})
    (kimi / "config.json").write_text(json.dumps(cfg))
    for dtype in ("bf16", "keep"):
        ours = read_checkpoint(vh_merge(kimi, case.adapter, tmp_path / f"out-{dtype}", dtype).output)
        theirs = read_checkpoint(case.merged(dtype)[0])
        assert set(ours) == set(theirs)
        assert all(torch.equal(ours[k].view(torch.uint8), theirs[k].view(torch.uint8)) for k in ours), dtype


# ------------------------------------------------------------------------------------------------------------
# --dtype keep: FP8 stays FP8


def _element_bound(ref: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Half an e4m3 step at each value (at its scale), plus float32 slack: how far re-quantization may move it
    (the binade taken a hair above the value: streammerge's own float32 merge may sit just across a power of 2)."""
    v = (ref.double().abs() * (1 + 2 ** -20) / scale).clamp_min(2.0 ** -30)
    return scale * torch.exp2(torch.floor(torch.log2(v)).clamp_min(-6) - 4) * (1 + 2 ** -12) + ref.abs() * 2 ** -18


def _expand_scale(ck: qf.QuantCheckpoint, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    rows, cols = weight.shape
    if ck.scheme == "fp8-block":
        bm, bn = ck.config["quantization_config"]["weight_block_size"]
        return scale.double().repeat_interleave(bm, 0)[:rows].repeat_interleave(bn, 1)[:, :cols]
    return scale.double().reshape(-1, 1).expand(rows, cols)


@pytest.mark.parametrize("key", KEEP)
def test_keep_requantizes_merged_tensors_and_copies_the_rest(cases, key):
    case = cases(key)
    ck = case.ck
    out, summary = case.merged("keep")
    disk, out_t = ck.tensors(), read_checkpoint(out)
    assert set(out_t) == set(disk), "the same tensors as the base: weights, scales (same names), input scales"
    assert json.loads((out / "config.json").read_text())["quantization_config"] == ck.config["quantization_config"]
    ref32 = case.reference32()
    reports = {r.name: r for r in summary.requantized}
    assert reports, "nothing was re-quantized: the test cannot fail"
    for name, parts in ck.quantized.items():
        weight, scale_name = parts[0], parts[1]
        if name not in reports:  # untouched: every part byte for byte
            assert all(torch.equal(out_t[p].view(torch.uint8), disk[p].view(torch.uint8)) for p in parts), name
            continue
        w, s = out_t[weight], out_t[scale_name]
        assert (w.dtype, s.dtype, s.shape) == (disk[weight].dtype, disk[scale_name].dtype, disk[scale_name].shape)
        assert not torch.equal(s, disk[scale_name]), f"{name}: the scale was not computed afresh"
        dq = w.double() * _expand_scale(ck, w, s)
        ref = ref32[name].double()
        err = (dq - ref).abs()
        assert (err <= _element_bound(ref, _expand_scale(ck, w, s))).all(), name
        # the summary's report is this error (against streammerge's own float32 merge, equal to PEFT's to a few
        # float32 roundings)
        r = reports[name]
        assert r.count == w.numel() and 0 < r.mean_abs <= r.max_abs
        assert abs(r.max_abs - float(err.max())) <= 1e-6 + 1e-4 * float(err.max()), name
        for p in parts[2:]:  # input_scale: an activation calibration, copied unchanged
            assert torch.equal(out_t[p], disk[p])
    # tensors that are not quantized keep their dtype (as --dtype auto): merged ones are PEFT's merge, others copied
    changed = _changed(case.reference(), ck.reference(torch.bfloat16))
    for k in set(disk) - {p for ps in ck.quantized.values() for p in ps}:
        assert out_t[k].dtype == disk[k].dtype, k
        if k in changed:
            vh.compare_to_reference({k: out_t[k]}, {k: disk[k]}, {k: case.reference()[k]}, {k})
        else:
            assert torch.equal(out_t[k], disk[k]), k


def _quantized_by_its_ecosystem(case: Case, out: Path) -> Path:
    """PEFT's float32 merge written back in the base's scheme by the format's own quantizer (transformers'
    Fp8Quantize; compressed-tensors' calculate_qparams + compressor on the bf16 merge, as llm-compressor would),
    each tensor the merge changed; the rest of the base as it is."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization.utils import calculate_qparams

    ck, ref32, disk = case.ck, case.reference32(), case.ck.tensors()
    tensors = dict(disk)
    changed = _changed(case.reference(), ck.reference(torch.bfloat16))
    for name in changed:
        if name not in ck.quantized:
            tensors[name] = case.reference()[name].to(disk[name].dtype)
            continue
        scale_name = ck.quantized[name][1]
        if ck.scheme == "fp8-block":
            block = ck.config["quantization_config"]["weight_block_size"]
            tensors[name], tensors[scale_name] = qf.quantize_fp8_block(ref32[name], block, disk[scale_name].dtype)
            continue
        scheme = qf._ct_scheme("channel" if disk[scale_name].numel() > 1 else "tensor")
        w = ref32[name].to(torch.bfloat16)
        lo, hi = (w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)) if disk[scale_name].numel() > 1 else (
            w.amin(), w.amax())
        scale, zp = calculate_qparams(lo, hi, scheme.weights)
        packed = BaseCompressor.get_value_from_registry("float-quantized").compress(
            {"weight": w, "weight_scale": scale, "weight_zero_point": zp}, scheme)
        tensors[name], tensors[scale_name] = packed["weight"], packed["weight_scale"]
    qf.write_checkpoint(out, tensors, ck.config, ck.source)
    return out


@pytest.mark.parametrize("key", LOADABLE_KEEP)
def test_kept_output_loads_in_transformers_and_its_logits_stay_within_the_quantization_error(cases, key):
    """The re-quantized model loads in transformers' FP8 path (dequantized on this CPU). Its logits (RMS over a
    batch) are as close to the unmerged adapter on the dequantized base as re-quantizing that same merge with the
    format's own quantizer puts them: the error FP8 itself costs. Two valid roundings of one merge land on either
    side of a value by chance, hence 25 % of slack (measured: 1.00 for FP8 block-wise, whose recipe is
    transformers' own, 0.96-0.99 for compressed-tensors). Quantizing the full-precision source into the base moved
    the base's logits less (`base_error`) only because the test adapters' deltas are 3-5 times the weights."""
    case = cases(key)
    out, _ = case.merged("keep")

    def rms(model) -> float:
        return float((vh.logits(model, BATCH) - unmerged).pow(2).mean().sqrt())

    unmerged = vh.logits(vh.peft_unmerged(case.dequantized, case.adapter), BATCH)
    keep_error = rms(qf.load_dequantized(out, torch.float32))
    theirs = _quantized_by_its_ecosystem(case, case.root / f"requantized-by-ecosystem-{case.ck.name}")
    requantization_error = rms(qf.load_dequantized(theirs, torch.float32))
    base_error = float((vh.logits(vh.load_causal(case.dequantized, torch.float32), BATCH)
                        - vh.logits(vh.load_causal(case.ck.source, torch.float32), BATCH)).pow(2).mean().sqrt())
    assert 0 < keep_error <= 1.25 * requantization_error, (keep_error, requantization_error, base_error)


@pytest.mark.parametrize("key", REFUSED_KEEP)
def test_keep_is_refused_where_a_merged_tensor_would_need_an_inexact_quantizer(cases, key, tmp_path, capsys):
    case = cases(key)
    adapter, out = case.adapter, tmp_path / "out"
    capsys.readouterr()  # what building the fixtures printed
    code, _, err = ht.run_cli(["--base", case.ck.path, "--adapter", adapter, "--output", out, "--dtype", "keep"],
                              capsys)
    assert code == 5, err
    assert err.startswith("error: --dtype keep: ") and err.count("\n") == 1, err
    fmt = "MXFP4" if key.startswith("mxfp4") else "bitsandbytes"
    assert f"is {fmt}" in err and "--dtype bf16" in err and "not reproduced here" in err, err
    vh.expect_nothing_written(out)


def test_keep_copies_mxfp4_experts_when_only_unquantized_tensors_merge(cases, tmp_path):
    """GPT-OSS with an attention-only LoRA: nothing quantized changes, so keep needs no quantizer: the MXFP4
    experts are copied byte for byte and the output loads and computes what the unmerged adapter does."""
    case = cases("mxfp4-gptoss")
    ad = tmp_path / "attention-only"
    vh.save_adapter(vh.load_causal(case.ck.source), ad, target_modules=["q_proj", "v_proj"])
    out = tmp_path / "out"
    summary = vh_merge(case.ck.path, ad, out, "keep")
    assert summary.tensors_merged and not summary.requantized
    disk, out_t = case.ck.tensors(), read_checkpoint(out)
    assert set(out_t) == set(disk)
    for parts in case.ck.quantized.values():
        assert all(torch.equal(out_t[p], disk[p]) for p in parts)
    ours = vh.logits(qf.load_dequantized(out, torch.float32), TOKENS)
    vh.assert_logits_close(ours, vh.logits(vh.peft_unmerged(case.dequantized, ad), TOKENS), what="mxfp4 keep")
    assert verify(case.ck.path, ad, out, sample_blocks=None).ok


# ------------------------------------------------------------------------------------------------------------
# verify


def _flip(out: Path, name: str, row: int = 0, mask: int = 0x40) -> None:
    """Flip bits of one byte of tensor `name` (its row `row`) in whichever shard holds it."""
    for shard in sorted(out.glob("*.safetensors")):
        header, n = ht.read_raw_header(shard)
        if name in header:
            b, e = header[name]["data_offsets"]
            row_bytes = (e - b) // max(1, header[name]["shape"][0])
            data = bytearray(shard.read_bytes())
            data[8 + n + b + row * row_bytes + 1] ^= mask
            shard.write_bytes(bytes(data))
            return
    raise AssertionError(name)


@pytest.mark.parametrize("key", list(BUILDERS))
def test_verify_passes_on_the_bf16_merge_and_catches_a_flipped_value(cases, key, tmp_path):
    case = cases(key)
    out, _ = case.merged("bf16")
    report = verify(case.ck.path, case.adapter, out, sample_blocks=None)
    assert report.ok, report.problems()
    changed = _changed(case.reference(), case.ck.reference(torch.bfloat16))
    merged = sorted(n for n in case.ck.quantized if n in changed)
    # and an untouched tensor: a dequantized one where the adapter leaves one, else a copied norm
    untouched = sorted(set(case.ck.quantized) - changed) or ["model.norm.weight"]
    for victim in (merged[0], untouched[0]):
        bad = shutil.copytree(out, tmp_path / f"bad-{len(list(tmp_path.iterdir()))}")
        _flip(bad, victim, row=1)
        report = verify(case.ck.path, case.adapter, bad, sample_blocks=None)
        assert not report.ok and any(victim in p for p in report.problems()), (victim, report.problems())


@pytest.mark.parametrize("key", KEEP)
def test_verify_passes_on_the_kept_merge_and_catches_a_flipped_code(cases, key, tmp_path):
    case = cases(key)
    out, summary = case.merged("keep")
    report = verify(case.ck.path, case.adapter, out, sample_blocks=None)
    assert report.ok, report.problems()
    assert report.dtype_choices == ["keep"]
    requantized = sorted(r.name for r in summary.requantized)
    untouched = sorted(set(case.ck.quantized) - set(requantized))
    for victim in [requantized[0]] + untouched[:1]:
        bad = shutil.copytree(out, tmp_path / f"bad-{victim}")
        _flip(bad, victim, row=1)
        report = verify(case.ck.path, case.adapter, bad, sample_blocks=None)
        assert not report.ok and any(victim in p for p in report.problems()), (victim, report.problems())
    # a scale that is not the fresh one (the base's, copied) is caught even where values would still fit
    bad = shutil.copytree(out, tmp_path / "stale-scale")
    scale = case.ck.quantized[requantized[0]][1]
    _flip(bad, scale, row=0, mask=0x01)
    report = verify(case.ck.path, case.adapter, bad, sample_blocks=None)
    assert not report.ok and any(requantized[0] in p for p in report.problems()), report.problems()


@pytest.mark.parametrize("dtype", ["bf16", "keep"])
def test_bytes_do_not_depend_on_the_block_size_and_scales_stay_with_their_weights(cases, dtype, tmp_path):
    """Partial edge blocks, two input shards: with 64 KiB row blocks and 20 KB output shards the output holds
    the same tensors, byte for byte, as with the defaults; each new scale is in its weight's shard."""
    import streammerge

    case = cases("fp8-deepseek-16")
    out, _ = case.merged(dtype)
    small = tmp_path / "small"
    streammerge.merge(str(case.ck.path), str(case.adapter), str(small), dtype=dtype, max_memory="1MB",
                      max_shard_size="20KB")
    index = json.loads((small / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 3
    a, b = read_checkpoint(out), read_checkpoint(small)
    assert set(a) == set(b) and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)
    if dtype == "keep":
        for parts in case.ck.quantized.values():
            assert index[parts[0]] == index[parts[1]], parts
        assert verify(case.ck.path, case.adapter, small, sample_blocks=None).ok


def test_cli_reports_the_requantization_error_and_the_dry_run_plan(cases, tmp_path, capsys):
    case = cases("fp8-qwen3moe-bf16scale")
    adapter = case.adapter
    capsys.readouterr()
    code, out, err = ht.run_cli(["--base", case.ck.path, "--adapter", adapter, "--output", tmp_path / "o",
                                 "--dtype", "keep", "--dry-run"], capsys)
    assert code == 0, err
    assert "q_proj.weight [64, 64] F8_E4M3: dequantize(FP8 block-wise) + lora(" in out
    assert "+ requantize(FP8 block-wise)" in out and "quantization_config kept" in out
    code, out, err = ht.run_cli(["--base", case.ck.path, "--adapter", adapter, "--output", tmp_path / "o",
                                 "--dtype", "keep", "--verify"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    head = next(ln for ln in lines if ln.startswith("Requant : "))
    assert "merged tensor(s) re-quantized; error against the float32 merge: max " in head
    assert sum(ln.startswith("          model.") for ln in lines) == 8 and "... and " in out
    assert "Verify: OK" in out and lines[-1].endswith(f"Done. Merged model: {tmp_path / 'o'}")


# ------------------------------------------------------------------------------------------------------------
# weighted combinations on a quantized base


COMBINED_TARGETS = {"qwen3_moe": (["q_proj", "v_proj"], ["k_proj", "o_proj", "v_proj"]),
                    "llama": (["q_proj", "gate_proj", "down_proj"], ["v_proj", "down_proj", "up_proj"])}


def _two_adapters(case: Case) -> list[Path]:
    paths = []
    for i, targets in enumerate(COMBINED_TARGETS[case.arch]):
        path = case.root / f"combo-{case.arch}-{i}"
        if not path.exists():
            vh.save_adapter(vh.load_causal(case.ck.source), path, seed=11 + i, r=4 * (i + 1), lora_alpha=8 + i,
                            target_modules=targets)
        paths.append(path)
    return paths


@pytest.mark.parametrize("key", ["fp8-qwen3moe-bf16scale", "ct-tensor-llama", "bnb-nf4-dq"])
def test_weighted_combination_on_a_quantized_base_equals_it_on_the_dequantized_base(cases, key, tmp_path):
    """A combination reads the quantized base exactly as a single merge does: its bf16 output is byte for byte the
    combination merged into the float32 dequantized base (where test_combinations checks it against PEFT)."""
    import streammerge

    case = cases(key)
    adapters = [str(a) for a in _two_adapters(case)]
    out, ref = tmp_path / "quantized", tmp_path / "dequantized"
    summary = streammerge.merge(str(case.ck.path), adapters, str(out), weights=[0.7, -0.4])
    streammerge.merge(str(case.dequantized), adapters, str(ref), weights=[0.7, -0.4])
    got, want = read_checkpoint(out), read_checkpoint(ref)
    assert summary.tensors_merged > 0 and set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert verify(case.ck.path, adapters, out, weights=[0.7, -0.4]).ok


@pytest.mark.parametrize("key", ["fp8-qwen3moe-bf16scale", "ct-tensor-llama"])
def test_weighted_combination_kept_as_fp8_passes_verify_and_copies_untouched_groups(cases, key, tmp_path):
    import streammerge

    case = cases(key)
    adapters = [str(a) for a in _two_adapters(case)]
    out = tmp_path / "kept"
    summary = streammerge.merge(str(case.ck.path), adapters, str(out), weights=[0.5, 0.5], dtype="keep")
    assert 0 < len(summary.requantized) <= summary.tensors_merged  # an ignored (unquantized) module is not
    got, base = read_checkpoint(out), case.ck.tensors()
    untouched = [t.name for t in summary.plan if not t.ops and t.quant is None and t.replacement is None]
    assert untouched and all(torch.equal(got[k], base[k]) for k in untouched)
    report = verify(case.ck.path, adapters, out, weights=[0.5, 0.5], dtype="keep", sample_blocks=None)
    assert report.ok, report.problems()
