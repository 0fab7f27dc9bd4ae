"""PEFT-side oracle helpers for the streammerge tests.

Everything here is built at run time from transformers configs (no downloads, no committed weights):

* ``make_base`` / ``make_qwen35_base``: tiny random checkpoints saved with ``save_pretrained``.
* ``make_adapter``: a PEFT LoRA adapter with non-zero B (``init_lora_weights=False``), rsLoRA and
  rank/alpha patterns (incl. a full module name key, which only matches with PEFT >= 0.15 rules).
* ``peft_reference``: PEFT's own ``merge_and_unload`` state dict (the oracle).
* ``formula_merge``: an independent re-computation of the merge from the adapter file (spec §2.2-§5), used to
  cross-check PEFT and for output dtypes PEFT cannot produce directly (f16 from a bf16 base).
* ``ulp_diff``, ``read_checkpoint``, ``checkpoint_keys``: comparison and reading utilities.

None of these import streammerge, so they can be checked on their own.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

HIDDEN = 64
VOCAB = 256

# Linear LoRA targets per model family (all linear layers of a decoder block).
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]  # transformers Conv1D: W stored [in, out]
QWEN35_TARGETS = LLAMA_TARGETS + ["in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj"]

# Patterns exercised in every adapter. Keys are chosen so that they match a *subset* of the modules, one
# of them is a full module name (matches only with the PEFT >= 0.15 rule `(.*\.)?(p)$`), and a rank key
# and an alpha key hit different modules (r and alpha are resolved independently).
PATTERNS = {
    "decoder": dict(
        rank_pattern={"model.layers.0.self_attn.q_proj": 8, "down_proj": 2},
        alpha_pattern={"model.layers.1.self_attn.k_proj": 24, "v_proj": 16, "layers.1.mlp.up_proj": 3},
    ),
    "gpt2": dict(
        rank_pattern={"transformer.h.0.attn.c_attn": 8, "c_fc": 2},
        alpha_pattern={"transformer.h.1.attn.c_proj": 24, "mlp.c_proj": 3},
    ),
    "qwen3_5": dict(
        rank_pattern={"model.layers.1.self_attn.q_proj": 8, "down_proj": 2},
        alpha_pattern={"model.layers.1.self_attn.q_proj": 24, "in_proj_qkv": 16, "layers.0.mlp.up_proj": 3},
    ),
}


def _tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig

    if model_type == "gpt2":
        kw = dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=128, n_inner=4 * HIDDEN)
    else:
        kw = dict(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=2 * HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=False,
        )
        if model_type == "qwen2":
            kw["tie_word_embeddings"] = True
        if model_type == "qwen3":
            kw["head_dim"] = 16
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def _perturb_small_params(model, seed: int) -> None:
    """Norm weights are initialised to exactly 1 and biases to 0; give them random values so that a test
    checking "untouched tensors are bit-identical" cannot pass by accident (e.g. a writer emitting ones)."""
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * 0.1)


def save_tokenizer(dirpath: Path, vocab_size: int = VOCAB, extra: str = "") -> None:
    """A tiny word-level fast tokenizer (tokenizer.json + tokenizer_config.json ...). `extra` is appended
    to one token name so two tokenizers with different bytes can be made."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for i in range(len(specials), vocab_size):
        vocab[f"w{i}{extra}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   model_max_length=128 if not extra else 64)
    fast.save_pretrained(str(dirpath))


def make_base(
    model_type: str,
    tmp: Path,
    dtype: torch.dtype = torch.bfloat16,
    *,
    name: str | None = None,
    seed: int = 0,
    max_shard_size: str | None = None,
    tokenizer: bool = False,
    **overrides,
) -> Path:
    """Build and save a tiny random `model_type` causal LM (safetensors) under tmp/name; returns the dir."""
    from transformers import AutoModelForCausalLM

    out = Path(tmp) / (name or f"base-{model_type}")
    torch.manual_seed(seed)
    cfg = _tiny_config(model_type, **overrides)
    model = AutoModelForCausalLM.from_config(cfg)
    _perturb_small_params(model, seed)
    model = model.to(dtype).eval()
    kw = {}
    if max_shard_size is not None:
        kw["max_shard_size"] = max_shard_size
    model.save_pretrained(str(out), **kw)
    if tokenizer:
        save_tokenizer(out)
    return out


def make_qwen35_base(tmp: Path, dtype: torch.dtype = torch.bfloat16, *, name: str = "base-qwen3_5",
                     seed: int = 0, tokenizer: bool = False) -> Path:
    """A tiny Qwen3_5ForConditionalGeneration (one linear-attention + one full-attention text layer and a
    one-block vision tower). On disk (transformers 5.24) the names are `model.language_model.layers.N...`,
    `model.visual...`, `lm_head.weight` (untied)."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    out = Path(tmp) / name
    torch.manual_seed(seed)
    cfg = Qwen3_5Config(
        text_config=dict(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
            layer_types=["linear_attention", "full_attention"], max_position_embeddings=128,
        ),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=HIDDEN,
                           patch_size=4, num_position_embeddings=64),
        image_token_id=250, video_token_id=251, vision_start_token_id=252, vision_end_token_id=253,
    )
    model = Qwen3_5ForConditionalGeneration(cfg)
    _perturb_small_params(model, seed)
    model = model.to(dtype).eval()
    model.save_pretrained(str(out))
    if tokenizer:
        save_tokenizer(out)
    return out


def default_lora_kwargs(model_type: str) -> dict:
    if model_type == "gpt2":
        return dict(target_modules=list(GPT2_TARGETS), **PATTERNS["gpt2"])
    if model_type in ("qwen3_5", "qwen3_5_text"):
        return dict(target_modules=list(QWEN35_TARGETS), **PATTERNS["qwen3_5"])
    return dict(target_modules=list(LLAMA_TARGETS), **PATTERNS["decoder"])


def make_adapter(
    base_dir: Path,
    tmp: Path,
    *,
    name: str = "adapter",
    seed: int = 1,
    safe_serialization: bool = True,
    model_class=None,
    **lora_kwargs,
) -> Path:
    """Train-side: load the base with `model_class` (default AutoModelForCausalLM), wrap it with a random
    LoRA, save it.

    Defaults: r=4, lora_alpha=8, use_rslora=True, the family's linear targets and rank/alpha patterns."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir = Path(base_dir)
    out = Path(tmp) / name
    model = (model_class or AutoModelForCausalLM).from_pretrained(str(base_dir), dtype=torch.bfloat16)
    mt = model.config.model_type
    kw = dict(r=4, lora_alpha=8, use_rslora=True, lora_dropout=0.0, init_lora_weights=False)
    kw.update(default_lora_kwargs(mt))
    kw.update(lora_kwargs)
    if mt == "gpt2":
        kw.setdefault("fan_in_fan_out", True)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(**kw))
    peft_model.save_pretrained(str(out), safe_serialization=safe_serialization)
    # A zero B would make every merge test vacuous: check the file really holds non-zero deltas.
    sd = read_adapter_tensors(out)
    b_keys = [k for k in sd if k.endswith("lora_B.weight")]
    assert b_keys, f"no lora_B in {out}"
    for k in b_keys:
        assert sd[k].abs().max() > 0, f"{k} is all zeros: the adapter would not change anything"
    return out


def read_adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    adapter_dir = Path(adapter_dir)
    st = adapter_dir / "adapter_model.safetensors"
    if st.exists():
        return load_file(str(st))
    return torch.load(str(adapter_dir / "adapter_model.bin"), map_location="cpu", weights_only=True)


def peft_reference(base_dir: Path, adapter_dir: Path, dtype: torch.dtype = torch.bfloat16,
                   model_class=None) -> dict[str, torch.Tensor]:
    """PEFT's merge: base loaded in `dtype`, adapter autocast to fp32 (PEFT default), merge_and_unload
    (safe_merge=False: W += fp32 delta, i.e. computed in fp32 and rounded once into `dtype`).
    Keys are *module* names of `model_class` (default AutoModelForCausalLM)."""
    model = peft_merged_model(base_dir, adapter_dir, dtype, model_class)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def peft_merged_model(base_dir: Path, adapter_dir: Path, dtype: torch.dtype = torch.bfloat16, model_class=None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = (model_class or AutoModelForCausalLM).from_pretrained(str(base_dir), dtype=dtype)
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    return model.merge_and_unload().eval()


def peft_unmerged_model(base_dir: Path, adapter_dir: Path, dtype: torch.dtype = torch.float32):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype)
    return PeftModel.from_pretrained(model, str(adapter_dir)).eval()


# ------------------------------------------------------------------------------------------------------
# Independent merge formula (spec §2.2 pattern rule, §3 scaling, §4 single rounding, §5 Conv1D transpose)

def resolve_pattern(patterns: dict, module_name: str, default):
    """PEFT >= 0.15 `get_pattern_key`: first key (file order) with re.match(r'(.*\\.)?(key)$', name)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def adapter_modules(adapter_dir: Path) -> dict[str, dict]:
    """module name -> {A, B (fp32), r, alpha, scale} from the saved adapter (keys `base_model.model.<m>.lora_X.weight`)."""
    adapter_dir = Path(adapter_dir)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    sd = read_adapter_tensors(adapter_dir)
    mods: dict[str, dict] = {}
    for k, v in sd.items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", k)
        assert m, f"unexpected adapter key {k}"
        mods.setdefault(m.group(1), {})[m.group(2)] = v.float()
    for name, d in mods.items():
        r = d["A"].shape[0]
        assert r == resolve_pattern(cfg.get("rank_pattern") or {}, name, cfg["r"]), name
        alpha = resolve_pattern(cfg.get("alpha_pattern") or {}, name, cfg["lora_alpha"])
        d["r"], d["alpha"] = r, alpha
        d["scale"] = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return mods


def formula_merge(
    base: dict[str, torch.Tensor],
    adapter_dir: Path,
    out_dtype: torch.dtype,
    *,
    conv1d: bool = False,
    module_to_key=lambda m: m + ".weight",
) -> dict[str, torch.Tensor]:
    """round_to(out_dtype)(fp32(W) + (fp32(B) @ fp32(A)) * s) for every adapter module (transposed for Conv1D);
    every other base tensor just converted to out_dtype. `module_to_key` maps an adapter module name to
    the on-disk base key."""
    out = {k: v.to(out_dtype) for k, v in base.items()}
    for mod, d in adapter_modules(adapter_dir).items():
        key = module_to_key(mod)
        w = base[key].float()
        delta = (d["B"] @ d["A"]) * d["scale"]
        if conv1d:
            delta = delta.T
        out[key] = (w + delta).to(out_dtype)
    return out


# ------------------------------------------------------------------------------------------------------
# Comparison

_INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def _ordered(t: torch.Tensor) -> torch.Tensor:
    """Map IEEE floats to int64 so that adjacent representable values differ by exactly 1 (sign-magnitude
    -> two's complement; +0 and -0 both map to 0)."""
    it = _INT_VIEW[t.dtype]
    bits = t.contiguous().view(it).to(torch.int64)
    nbits = 16 if it == torch.int16 else 32
    mag = bits & ((1 << (nbits - 1)) - 1)
    return torch.where(bits < 0, -mag, mag)


def ulp_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    """Max distance in units in the last place between two tensors of the same float dtype (bf16/f16/f32).
    Exact for bf16 (numpy has no bf16, so this works on the raw bits)."""
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert a.dtype in _INT_VIEW, a.dtype
    assert not torch.isnan(a).any() and not torch.isnan(b).any()
    if a.numel() == 0:
        return 0
    return int((_ordered(a) - _ordered(b)).abs().max())


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


# ------------------------------------------------------------------------------------------------------
# Reading checkpoints

INDEX = "model.safetensors.index.json"


def checkpoint_files(dirpath: Path) -> list[Path]:
    """The safetensors files of a checkpoint: those listed by the index, else model.safetensors."""
    dirpath = Path(dirpath)
    idx = dirpath / INDEX
    if idx.exists():
        wm = json.loads(idx.read_text())["weight_map"]
        return [dirpath / f for f in sorted(set(wm.values()))]
    return [dirpath / "model.safetensors"]


def checkpoint_keys(dirpath: Path) -> dict[str, tuple[list[int], str]]:
    """name -> (shape, safetensors dtype string), from the headers only."""
    out = {}
    for f in checkpoint_files(dirpath):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():  # noqa: SIM118 - safe_open handles are not iterable
                assert k not in out, f"{k} appears in two shards"
                sl = h.get_slice(k)
                out[k] = (list(sl.get_shape()), sl.get_dtype())
    return out


def read_checkpoint(dirpath: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (sharded via the index, or a single model.safetensors)."""
    out: dict[str, torch.Tensor] = {}
    for f in checkpoint_files(dirpath):
        part = load_file(str(f))
        dup = set(part) & set(out)
        assert not dup, f"tensors in two shards: {sorted(dup)[:5]}"
        out.update(part)
    return out


read_output = read_checkpoint


def rewrite_single_file(dirpath: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(dirpath) / "model.safetensors"),
              metadata={"format": "pt"})


def tree_snapshot(dirpath: Path) -> dict[str, bytes]:
    """relative path -> bytes of every file below dirpath (for "nothing changed" checks)."""
    dirpath = Path(dirpath)
    return {str(p.relative_to(dirpath)): p.read_bytes() for p in sorted(dirpath.rglob("*")) if p.is_file()}


def config_dtype_fields(cfg: dict) -> dict[str, str]:
    """Every dtype field of a config.json, incl. nested sub-configs: {'dtype': ..., 'text_config.torch_dtype': ...}."""
    found = {}
    for key in ("torch_dtype", "dtype"):
        if key in cfg:
            found[key] = cfg[key]
    for sub, val in cfg.items():
        if isinstance(val, dict) and sub.endswith("_config") and sub != "quantization_config":
            for k2, v2 in config_dtype_fields(val).items():
                found[f"{sub}.{k2}"] = v2
    return found
