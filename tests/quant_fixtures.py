"""Tiny quantized checkpoints, written the way their ecosystems write them, with their dequantized references.

Each builder saves a tiny random model with transformers (``save_pretrained``, bf16), quantizes it with the code
the format's ecosystem uses, and returns a :class:`QuantCheckpoint`. Facts, sources and the reasons behind each
choice are in docs/quantized-formats.md; in short:

* FP8 block-wise (``quant_method: "fp8"``): transformers' own ``Fp8Quantize`` (the inverse of the ``Fp8Dequantize``
  it loads with), applied to a zero-padded tensor where the shape is not a multiple of the block.
* compressed-tensors FP8: compressed-tensors' ``calculate_qparams`` + ``FloatQuantizationCompressor.compress``
  per tensor (what llm-compressor saves), config written by ``ModelCompressor.update_config``.
* MXFP4 (GPT-OSS): the MX scale/rounding rules of triton_kernels' ``downcast_to_mxfp_torch`` (what transformers'
  ``quantize_to_mxfp4`` calls), re-implemented here because that kernel comes from the Hub.
* bitsandbytes: transformers itself quantizes on the CPU and ``save_pretrained`` writes the checkpoint.

``QuantCheckpoint.reference(dtype)`` is the full-precision state dict under the checkpoint's own tensor names,
computed tensor by tensor with the exact function transformers dequantizes with on load (``dequantize_*`` below);
``load_dequantized`` loads the checkpoint with transformers itself (dequantized, on the CPU) where it can.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
VOCAB = 64

# ------------------------------------------------------------------------------------------------------
# Tiny full-precision sources

# DeepSeek-V3 / Kimi K2 layout (MLA + routed and shared experts). The dims are multiples of 8 but not all of 16
# (q_lora_rank, kv_lora_rank + qk_rope_head_dim and moe_intermediate_size are 40), and hidden_size is 144 = 128 + 16:
# block [8, 8] tiles every tensor exactly, [16, 16] leaves partial edge blocks, and the real [128, 128] leaves a
# partial 16-wide column block on every tensor that reads the hidden state.
DEEPSEEK_V3 = dict(
    vocab_size=VOCAB, hidden_size=144, intermediate_size=96, moe_intermediate_size=40, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=2, q_lora_rank=40, kv_lora_rank=32, qk_rope_head_dim=8,
    qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=1,
    topk_group=1, first_k_dense_replace=1, max_position_embeddings=64, tie_word_embeddings=False,
)
QWEN3_MOE = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
    decoder_sparse_step=1, max_position_embeddings=64, tie_word_embeddings=False,
)
# Rows are multiples of 64 (bitsandbytes' default block), as in real models: see dequantize_bnb4 for rows that
# are not.
LLAMA = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=64, tie_word_embeddings=False,
)
GPT_OSS = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
    sliding_window=16, tie_word_embeddings=False,
)
SOURCES = {"deepseek_v3": DEEPSEEK_V3, "qwen3_moe": QWEN3_MOE, "llama": LLAMA, "gpt_oss": GPT_OSS}


def make_source(model_type: str, root: Path, seed: int = 0) -> Path:
    """A tiny random bf16 `model_type` causal LM saved with save_pretrained under root/src-<model_type>."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(root) / f"src-{model_type}"
    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    # from_config in bf16 keeps the modules transformers pins to float32 (DeepSeek's router) in float32
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **SOURCES[model_type]),
                                             dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1:  # norms are ones and biases zeros at init: make every tensor distinguishable
                p.add_((torch.randn(p.shape, generator=g) * 0.1).to(p.dtype))
    model.save_pretrained(str(out))
    return out


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder (index or single file), in on-disk order."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(str(folder / name), "pt") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                out[k] = f.get_tensor(k)
    return out


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], config: dict, source: Path,
                     shards: int = 1) -> None:
    """Shards named and indexed like save_pretrained's; config.json plus the source's other small files."""
    folder.mkdir(parents=True, exist_ok=True)
    for extra in source.iterdir():
        if extra.suffix == ".json" and not extra.name.startswith("model") and extra.name != "config.json":
            shutil.copy(extra, folder / extra.name)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    names = sorted(tensors)
    if shards == 1:
        save_file({k: tensors[k].contiguous() for k in names}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
        return
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i * per:(i + 1) * per]
        save_file({k: tensors[k].contiguous() for k in part}, str(folder / fname), metadata={"format": "pt"})
        for k in part:
            weight_map[k] = fname
            total += tensors[k].numel() * tensors[k].element_size()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def source_config(source: Path) -> dict:
    return json.loads((source / "config.json").read_text())


LINEAR = re.compile(r"_proj(_with_mqa)?\.weight$")


def linear_weights(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The nn.Linear weights of these families, experts included: `*_proj.weight` and DeepSeek's
    `kv_a_proj_with_mqa.weight` (routers are `mlp.gate` / `mlp.router`, never quantized)."""
    return [k for k in tensors if LINEAR.search(k) and tensors[k].dim() == 2]


# ------------------------------------------------------------------------------------------------------
# The dequantization oracles: the functions transformers loads each format with

def dequantize_fp8_block(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] | None,
                         dtype: torch.dtype) -> torch.Tensor:
    """FP8 block-wise: W = fp32(q) * fp32(scale_inv[i // bm, j // bn]), rounded once to `dtype`.

    Tiled tensors go through transformers' own loader op (`Fp8Dequantize._dequantize_one`). It derives the block
    from the scale grid, which is wrong for partial edge blocks, so those go through transformers'
    `_dequantize_fp8_weight` (which takes the configured block) in float32: the same products, the same rounding.
    """
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, _dequantize_fp8_weight

    rows, cols = weight.shape[-2:]
    if block is None or scale_inv.dim() == 0 or (rows % block[0] == 0 and cols % block[1] == 0):
        return Fp8Dequantize(None)._dequantize_one(weight, scale_inv, output_dtype=dtype)
    return _dequantize_fp8_weight(weight, scale_inv, list(block), torch.float32).to(dtype)


def dequantize_ct(weight: torch.Tensor, scale: torch.Tensor, scheme, fmt: str, dtype: torch.dtype,
                  expert: bool = False) -> torch.Tensor:
    """compressed-tensors FP8, as transformers' `CompressedTensorsDequantize` does it: dense modules through the
    format's compressor (`x_q.to(scale.dtype) * scale`, compressed_tensors' `_dequantize`), fused-expert weights
    through its own `(q.float() * scale.float()).to(dtype)`."""
    if expert:
        return (weight.to(torch.float32) * scale.to(torch.float32)).to(dtype)
    from compressed_tensors.compressors import BaseCompressor

    compressor = BaseCompressor.get_value_from_registry(scheme.format or fmt)
    return compressor.decompress({"weight": weight, "weight_scale": scale}, scheme)["weight"].to(dtype)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """MXFP4 `[E, R, G, 16]` blocks + `[E, R, G]` E8M0 scales -> `[E, G*32, R]` (transformers' parameter layout),
    by transformers' `convert_moe_packed_tensors` (what `Mxfp4Dequantize` calls)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    return convert_moe_packed_tensors(blocks, scales, dtype=dtype)


def bnb4_quant_state(parts: dict[str, torch.Tensor]):
    """bitsandbytes QuantState from the on-disk companions (suffixes after `weight.`), as Params4bit.from_prequantized
    reads them."""
    from bitsandbytes.functional import QuantState

    return QuantState.from_dict(dict(parts.items()), device=torch.device("cpu"))


def dequantize_bnb4(packed: torch.Tensor, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes nf4/fp4: W.flat[i] = fp32(code[nibble i]) * fp32(absmax[i // blocksize]), in the dtype the weight
    was quantized from, then cast to `dtype` as `model.dequantize(dtype)` does. Blocks run over the flattened
    tensor (high nibble first).

    This is `dequantize_4bit` (what transformers' `dequantize_bnb_weight` calls) wherever a row is a whole number
    of blocks. Where blocks straddle rows, bitsandbytes 0.50's CPU kernel blocks each row on its own, which does
    not invert `quantize_4bit`; there the flat-block function of its default backend (the CUDA semantics) is used.
    """
    import bitsandbytes.functional as bnbf
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    state = bnb4_quant_state(parts)
    if state.shape[-1] % state.blocksize == 0:
        return bnbf.dequantize_4bit(packed, state).to(dtype)
    absmax = state.absmax
    if state.nested:
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    flat = _dequantize_4bit_compute.__wrapped__  # the function itself, not its torch.compile wrapper
    out = flat(packed.view(torch.uint8).reshape(-1), absmax.float(), state.code, state.blocksize, state.shape,
               state.dtype)
    return out.to(dtype)


def dequantize_bnb8(weight: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """LLM.int8: `int8_vectorwise_dequant(W, SCB)` = W * SCB[:, None] * (1/127) in float32, then cast to `dtype`."""
    import bitsandbytes.functional as bnbf

    return bnbf.int8_vectorwise_dequant(weight, scb).to(dtype)


# ------------------------------------------------------------------------------------------------------
# The checkpoint handle

@dataclass
class QuantCheckpoint:
    """A quantized checkpoint folder and how to read it back.

    `quantized` maps each dequantized tensor name to the on-disk tensors it is made of (first the packed/FP8
    weight, then its companions); every other on-disk tensor is stored as is. `loads_in_transformers` is False
    where transformers 5.24 cannot load the folder on this CPU-only machine (the reason is in `note`)."""

    name: str
    path: Path
    scheme: str
    source: Path
    quantized: dict[str, tuple[str, ...]]
    dequantizer: Callable[[str, dict[str, torch.Tensor], torch.dtype], torch.Tensor] = field(repr=False)
    loads_in_transformers: bool = True
    note: str = ""
    _refs: dict = field(default_factory=dict, repr=False)

    @property
    def config(self) -> dict:
        return json.loads((self.path / "config.json").read_text())

    def tensors(self) -> dict[str, torch.Tensor]:
        return read_tensors(self.path)

    def reference(self, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
        """The dequantized state dict under the checkpoint's names (cached): quantized weights through the
        format's oracle in `dtype`, companions dropped, every other tensor as stored."""
        if dtype not in self._refs:
            disk = self.tensors()
            parts_of = {p for parts in self.quantized.values() for p in parts}
            out = {k: v for k, v in disk.items() if k not in parts_of}
            for name, parts in self.quantized.items():
                out[name] = self.dequantizer(name, {p: disk[p] for p in parts}, dtype)
            self._refs[dtype] = out
        return self._refs[dtype]


def load_dequantized(path: Path, dtype: torch.dtype = torch.bfloat16):
    """Load a quantized checkpoint with transformers on the CPU, dequantized, as a user would: FP8 and MXFP4
    fall back to dequantize=True by themselves, compressed-tensors is asked for it, bitsandbytes loads quantized
    and `model.dequantize(dtype)` expands it."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    qc = json.loads((Path(path) / "config.json").read_text())["quantization_config"]
    kw = {}
    if qc["quant_method"] == "compressed-tensors":
        kw["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    with warnings.catch_warnings():
        # "loading attributes (dequantize) will be overwritten with the one you passed": that is the point
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **kw)
    if qc["quant_method"] == "bitsandbytes":
        model.dequantize(dtype=dtype)
    return model.eval()


# ------------------------------------------------------------------------------------------------------
# FP8 block-wise (DeepSeek-V3 / Kimi K2 / Qwen3-FP8)

def quantize_fp8_block(w: torch.Tensor, block: tuple[int, int], scale_dtype: torch.dtype = torch.float32
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(F8_E4M3 weight, weight_scale_inv [ceil(R/bm), ceil(C/bn)]) by transformers' `Fp8Quantize` on the tensor
    zero-padded to whole blocks (padding cannot change a block's max), cropped back. With a 16-bit scale dtype
    the scale is rounded first and the weight divided by the rounded scale, so dequantization is consistent."""
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    rows, cols = w.shape
    pr, pc = -(-rows // block[0]) * block[0], -(-cols // block[1]) * block[1]
    padded = torch.nn.functional.pad(w.float(), (0, pc - cols, 0, pr - rows))
    op = Fp8Quantize(FineGrainedFP8HfQuantizer(FineGrainedFP8Config(weight_block_size=list(block))))
    out = op._quantize_one("x.weight", padded)
    q, inv = out["x.weight"][:rows, :cols].contiguous(), out["x.weight_scale_inv"]
    if scale_dtype != torch.float32:
        inv = inv.to(scale_dtype)
        s = inv.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
        q = (padded / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)[:rows, :cols].contiguous()
    return q, inv


def fp8_block_tiles(shape, block) -> bool:
    return shape[-2] % block[0] == 0 and shape[-1] % block[1] == 0


def make_fp8_block(root: Path, model_type: str = "deepseek_v3", block: tuple[int, int] = (128, 128),
                   scale_dtype: torch.dtype = torch.float32, shards: int = 1) -> QuantCheckpoint:
    """A `quant_method: "fp8"` checkpoint as DeepSeek-V3 / Qwen3-FP8 ship it: every linear weight F8_E4M3 with a
    `weight_scale_inv` beside it (experts per expert), everything else as in the bf16 source."""
    source = make_source(model_type, root)
    name = f"fp8-{model_type}-{block[0]}x{block[1]}-{str(scale_dtype).removeprefix('torch.')}"
    disk = read_tensors(source)
    out, quantized, partial = dict(disk), {}, []
    for k in linear_weights(disk):
        q, inv = quantize_fp8_block(disk[k], block, scale_dtype)
        scale_key = k.removesuffix("weight") + "weight_scale_inv"
        out[k], out[scale_key] = q, inv
        quantized[k] = (k, scale_key)
        if not fp8_block_tiles(q.shape, block):
            partial.append(k)
    cfg = source_config(source)
    cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "weight_block_size": list(block)}
    path = Path(root) / name
    write_checkpoint(path, out, cfg, source, shards)

    def dequantizer(_name, parts, dtype):
        weight, scale = parts.values()
        return dequantize_fp8_block(weight, scale, block, dtype)

    loads, note = True, ""
    if partial:
        # transformers' CPU loader derives the block from the scale grid: rows // ceil(rows / bm).
        bad = [k for k in partial if any(n % -(-n // b) for n, b in zip(out[k].shape, block))]
        loads = False
        note = (f"partial edge blocks ({len(partial)} tensors): transformers 5.24's Fp8Dequantize "
                + ("raises 'not divisible by scale grid'" if bad else "silently applies the wrong block size"))
    return QuantCheckpoint(name, path, "fp8-block", source, quantized, dequantizer, loads, note)


# ------------------------------------------------------------------------------------------------------
# compressed-tensors FP8 (RedHat / Neural Magic *-FP8-dynamic, llm-compressor output)

def _ct_scheme(strategy: str):
    from compressed_tensors.quantization import QuantizationScheme, preset_name_to_scheme

    scheme: QuantizationScheme = preset_name_to_scheme("FP8_DYNAMIC" if strategy == "channel" else "FP8",
                                                       ["Linear"])
    return scheme


def _ct_ignored(module: str, ignore: list[str]) -> bool:
    from compressed_tensors.utils.match import match_name

    return any(match_name(module, target) for target in ignore)


def make_ct_fp8(root: Path, model_type: str = "qwen3_moe", strategy: str = "channel",
                ignore: tuple[str, ...] = ("lm_head", "re:.*mlp.gate$")) -> QuantCheckpoint:
    """A compressed-tensors `float-quantized` checkpoint: per-channel weights with dynamic per-token activations
    (preset FP8_DYNAMIC, scale [out, 1]) or per-tensor weights with a static `input_scale` (preset FP8, scale
    [1]); scales in the weight's dtype (bf16) as llm-compressor's min-max observer computes them."""
    from compressed_tensors.compressors import BaseCompressor, ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.utils import calculate_qparams

    source = make_source(model_type, root)
    name = f"ct-fp8-{strategy}-{model_type}"
    scheme = _ct_scheme(strategy)
    qconfig = QuantizationConfig(config_groups={"group_0": scheme}, ignore=list(ignore),
                                 format="float-quantized", quantization_status="compressed")
    compressor = BaseCompressor.get_value_from_registry("float-quantized")
    disk = read_tensors(source)
    out, quantized = dict(disk), {}
    g = torch.Generator().manual_seed(7)
    for k in linear_weights(disk):
        module = k.removesuffix(".weight")
        if _ct_ignored(module, qconfig.ignore):
            continue
        w = disk[k]
        if strategy == "channel":
            lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
        else:
            lo, hi = w.amin(), w.amax()
        scale, zero_point = calculate_qparams(lo, hi, scheme.weights)
        packed = compressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zero_point},
                                     scheme)
        for suffix, t in packed.items():
            out[f"{module}.{suffix}"] = t
        quantized[k] = (k, f"{module}.weight_scale")
        if scheme.input_activations is not None and not scheme.input_activations.dynamic:
            # A calibrated activation range: what the static observer would have seen on some batch. Loading
            # dequantized drops it (an activation scale means nothing to a full-precision linear).
            amax = (w.abs().amax().float() * (1 + torch.rand((), generator=g))).to(w.dtype)
            act_scale, _ = calculate_qparams(-amax.reshape(1), amax.reshape(1), scheme.input_activations)
            out[f"{module}.input_scale"] = act_scale
            quantized[k] += (f"{module}.input_scale",)
    path = Path(root) / name
    write_checkpoint(path, out, source_config(source), source)
    ModelCompressor(quantization_config=qconfig).update_config(str(path))
    fused = model_type in ("qwen3_moe", "deepseek_v3")

    def dequantizer(name_, parts, dtype):
        weight, scale = list(parts.values())[:2]
        expert = fused and re.search(r"\.experts\.\d+\.", name_) is not None
        return dequantize_ct(weight, scale, scheme, "float-quantized", dtype, expert=expert)

    return QuantCheckpoint(name, path, "ct-fp8", source, quantized, dequantizer)


# ------------------------------------------------------------------------------------------------------
# MXFP4 (GPT-OSS)

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 along the last axis (groups of 32): E8M0 scale = max|x| / 6 rounded UP to a power of two (its
    exponent byte is stored), values x / scale rounded to the nearest E2M1 value with ties away from zero and
    saturated at 6, the sign kept even on zero; two codes per byte, the even element in the low nibble.
    Returns blocks `[..., G, 16]` U8 and scales `[..., G]` U8 (the rules of triton_kernels'
    `downcast_to_mxfp_torch`, which GPT-OSS and transformers' `quantize_to_mxfp4` use)."""
    x = w.float()
    *lead, n = x.shape
    assert n % 32 == 0, "MXFP4 groups of 32 along the input dimension"
    groups = x.reshape(*lead, n // 32, 32)
    amax = groups.abs().amax(dim=-1, keepdim=True)
    bits = (amax / 6.0).view(torch.int32)
    exp_bits = (bits + 0x007FFFFF) & 0x7F800000  # round the scale up to a power of two
    scale = exp_bits.view(torch.float32)
    scaled = torch.where(scale == 0, torch.zeros_like(groups), groups / torch.where(scale == 0, 1.0, scale))
    mag = scaled.abs()
    grid = torch.tensor(E2M1)
    # nearest grid value, ties to the larger magnitude: count the midpoints at or below |x|
    mids = (grid[1:] + grid[:-1]) / 2
    code = (mag.unsqueeze(-1) >= mids).sum(-1).to(torch.uint8)
    code = code | (torch.signbit(scaled).to(torch.uint8) << 3)
    code = code.reshape(*lead, n // 32, 16, 2)
    blocks = code[..., 0] | (code[..., 1] << 4)
    scales = (exp_bits.squeeze(-1) >> 23).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()


def make_mxfp4(root: Path) -> QuantCheckpoint:
    """A GPT-OSS MXFP4 checkpoint: each layer's fused experts as `gate_up_proj_blocks/_scales` and
    `down_proj_blocks/_scales` (U8, laid out [E, out, in/32, 16] and [E, out, in/32]), biases bf16, attention,
    router, embeddings, norms and lm_head bf16; config as openai/gpt-oss-* ship it."""
    source = make_source("gpt_oss", root)
    disk = read_tensors(source)
    out, quantized = dict(disk), {}
    for k in [k for k in disk if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        # transformers' parameter is [E, in, out]; the checkpoint quantizes rows of out along in.
        blocks, scales = quantize_mxfp4(disk[k].transpose(1, 2))
        del out[k]
        out[k + "_blocks"], out[k + "_scales"] = blocks, scales
        quantized[k] = (k + "_blocks", k + "_scales")
    cfg = source_config(source)
    cfg["quantization_config"] = {
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                                   "lm_head"],
        "quant_method": "mxfp4",
    }
    path = Path(root) / "mxfp4-gpt_oss"
    write_checkpoint(path, out, cfg, source)

    def dequantizer(_name, parts, dtype):
        blocks, scales = parts.values()
        return dequantize_mxfp4(blocks, scales, dtype)

    return QuantCheckpoint("mxfp4-gpt_oss", path, "mxfp4", source, quantized, dequantizer)


# ------------------------------------------------------------------------------------------------------
# bitsandbytes (QLoRA bases)

BNB_4BIT_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def make_bnb(root: Path, kind: str = "nf4", double_quant: bool = False, model_type: str = "llama"
             ) -> QuantCheckpoint:
    """transformers quantizes the bf16 source on the CPU (BitsAndBytesConfig) and save_pretrained writes it:
    kind "nf4"/"fp4" (optionally with double quantization of the absmax) or "int8" (LLM.int8)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    source = make_source(model_type, root)
    if kind == "int8":
        qc, name = BitsAndBytesConfig(load_in_8bit=True), f"bnb-int8-{model_type}"
    else:
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_use_double_quant=double_quant,
                                bnb_4bit_compute_dtype=torch.bfloat16)
        name = f"bnb-{kind}{'-dq' if double_quant else ''}-{model_type}"
    path = Path(root) / name
    model = AutoModelForCausalLM.from_pretrained(str(source), quantization_config=qc, dtype=torch.bfloat16)
    model.save_pretrained(str(path))
    del model
    disk = read_tensors(path)
    quantized = {}
    if kind == "int8":
        for k in disk:
            if k.endswith(".SCB"):
                module = k.removesuffix(".SCB")
                quantized[module + ".weight"] = (module + ".weight", k, module + ".weight_format")

        def dequantizer(_name, parts, dtype):
            weight, scb, _fmt = parts.values()
            return dequantize_bnb8(weight, scb, dtype)
    else:
        for k in disk:
            if ".weight.quant_state.bitsandbytes__" in k:
                w = k.split(".quant_state.")[0]
                companions = [f"{w}.{p}" for p in BNB_4BIT_PARTS if f"{w}.{p}" in disk]
                quantized[w] = (w, *companions, k)

        def dequantizer(name_, parts, dtype):
            packed = parts[name_]
            rest = {k.removeprefix(name_ + "."): v for k, v in parts.items() if k != name_}
            return dequantize_bnb4(packed, rest, dtype)

    return QuantCheckpoint(name, path, f"bnb-{kind}", source, quantized, dequantizer)


# every fixture, by the name the tests parametrize over
BUILDERS = {
    "fp8-deepseek-8": lambda r: make_fp8_block(r, "deepseek_v3", (8, 8)),
    "fp8-deepseek-16": lambda r: make_fp8_block(r, "deepseek_v3", (16, 16), shards=2),
    "fp8-deepseek-128": lambda r: make_fp8_block(r, "deepseek_v3", (128, 128)),
    "fp8-qwen3moe-bf16scale": lambda r: make_fp8_block(r, "qwen3_moe", (16, 16), torch.bfloat16, shards=2),
    "ct-channel-qwen3moe": lambda r: make_ct_fp8(r, "qwen3_moe", "channel", ("lm_head", "re:.*mlp.gate$")),
    "ct-tensor-llama": lambda r: make_ct_fp8(r, "llama", "tensor", ("lm_head", "model.layers.0.mlp.down_proj")),
    "mxfp4-gptoss": make_mxfp4,
    "bnb-nf4": lambda r: make_bnb(r, "nf4", False),
    "bnb-nf4-dq": lambda r: make_bnb(r, "nf4", True),
    "bnb-fp4": lambda r: make_bnb(r, "fp4", False),
    "bnb-fp4-dq": lambda r: make_bnb(r, "fp4", True),
    "bnb-int8": lambda r: make_bnb(r, "int8"),
}
