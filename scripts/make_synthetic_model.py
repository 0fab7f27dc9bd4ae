#!/usr/bin/env python
"""Write a synthetic Qwen3 base checkpoint and a PEFT LoRA adapter for it.

    python scripts/make_synthetic_model.py --preset {tiny,qwen3-1.7b,qwen3-8b} --out DIR
        [--seed N] [--rank 16] [--alpha 32] [--max-shard-size 2GB] [--quantize fp8-block]
        [--adapter-name adapter] [--adapter-only]

writes DIR/base/ (config.json, generation_config.json, a small real tokenizer and safetensors weights with the
real architecture's key layout and shapes, sharded like transformers) and DIR/adapter/ (adapter_config.json and
adapter_model.safetensors as PEFT saves them). With `--quantize fp8-block` the base is FP8 block-wise as
DeepSeek-V3 and Qwen3-*-FP8 ship it: every linear weight F8_E4M3 with a float32 `weight_scale_inv` per 128x128 block,
embeddings, norms and lm_head bf16, `quantization_config` `{"quant_method": "fp8", "weight_block_size": [128, 128]}`.
`--adapter-only --adapter-name NAME --seed N --rank R` adds another adapter DIR/NAME/ for the base already in
DIR/base (the base is a function of the seed, so it is not rewritten). No download, no model instantiation, and nothing beyond
streammerge's own runtime dependencies (torch): it runs in a bare `pip install streammerge`.

Memory stays bounded by the largest single tensor (the embedding: 1.2 GB for qwen3-8b): each shard is written
by a small streaming safetensors writer, one tensor at a time, instead of being collected in a dict first.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import re
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)  # numpy is optional
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from streammerge.io.sharding import PlannedTensor, plan_shards, shard_file_names, write_index  # noqa: E402
from streammerge.io.writer import ShardWriter  # noqa: E402
from streammerge.options import parse_size  # noqa: E402

PRESETS = {
    # Shapes of the real Qwen/Qwen3-1.7B and Qwen/Qwen3-8B configs; "tiny" is the same architecture shrunk.
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=512, tie_word_embeddings=True,
        max_position_embeddings=2048, rope_theta=1000000.0, name="synthetic/qwen3-tiny",
    ),
    "qwen3-1.7b": dict(
        hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
        max_position_embeddings=40960, rope_theta=1000000.0, name="synthetic/qwen3-1.7b",
    ),
    "qwen3-8b": dict(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False,
        max_position_embeddings=40960, rope_theta=1000000.0, name="synthetic/qwen3-8b",
    ),
}

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

@dataclass
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    kind: str  # "linear", "embed", "norm"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


# --------------------------------------------------------------------------------------------------------------
# layout


def base_tensor_specs(p: dict) -> list[TensorSpec]:
    """Qwen3ForCausalLM state-dict keys in module order, as transformers saves them."""
    h, i, hd = p["hidden_size"], p["intermediate_size"], p["head_dim"]
    q_out, kv_out = p["num_attention_heads"] * hd, p["num_key_value_heads"] * hd
    specs = [TensorSpec("model.embed_tokens.weight", (p["vocab_size"], h), "embed")]
    for layer in range(p["num_hidden_layers"]):
        pre = f"model.layers.{layer}."
        specs += [
            TensorSpec(pre + "self_attn.q_proj.weight", (q_out, h), "linear"),
            TensorSpec(pre + "self_attn.k_proj.weight", (kv_out, h), "linear"),
            TensorSpec(pre + "self_attn.v_proj.weight", (kv_out, h), "linear"),
            TensorSpec(pre + "self_attn.o_proj.weight", (h, q_out), "linear"),
            TensorSpec(pre + "self_attn.q_norm.weight", (hd,), "norm"),
            TensorSpec(pre + "self_attn.k_norm.weight", (hd,), "norm"),
            TensorSpec(pre + "mlp.gate_proj.weight", (i, h), "linear"),
            TensorSpec(pre + "mlp.up_proj.weight", (i, h), "linear"),
            TensorSpec(pre + "mlp.down_proj.weight", (h, i), "linear"),
            TensorSpec(pre + "input_layernorm.weight", (h,), "norm"),
            TensorSpec(pre + "post_attention_layernorm.weight", (h,), "norm"),
        ]
    specs.append(TensorSpec("model.norm.weight", (h,), "norm"))
    if not p["tie_word_embeddings"]:
        specs.append(TensorSpec("lm_head.weight", (p["vocab_size"], h), "embed"))
    return specs


def lora_module_shapes(p: dict) -> list[tuple[str, int, int]]:
    """(module path, in_features, out_features) of every LoRA target, PEFT key order."""
    h, i, hd = p["hidden_size"], p["intermediate_size"], p["head_dim"]
    q_out, kv_out = p["num_attention_heads"] * hd, p["num_key_value_heads"] * hd
    dims = {
        "self_attn.q_proj": (h, q_out), "self_attn.k_proj": (h, kv_out), "self_attn.v_proj": (h, kv_out),
        "self_attn.o_proj": (q_out, h), "mlp.gate_proj": (h, i), "mlp.up_proj": (h, i), "mlp.down_proj": (i, h),
    }
    return [
        (f"model.layers.{layer}.{mod}", fin, fout)
        for layer in range(p["num_hidden_layers"])
        for mod, (fin, fout) in dims.items()
    ]


# --------------------------------------------------------------------------------------------------------------
# writing

def f32_to_bf16_bits(x: torch.Tensor) -> torch.Tensor:
    """float32 -> bfloat16 bit patterns (int16), round to nearest even (x must be finite)."""
    return x.to(torch.float32).to(torch.bfloat16).view(torch.int16)


class WeightSource:
    """Fast random bf16 weights, as bit patterns (no float math per tensor).

    Drawing 8e9 normal samples and rounding them costs minutes on 2 cores, so a 16M-value block of
    N(0, 0.02) clamped to +-0.1 is drawn once; each tensor is a slice of it starting at a random offset (wrapping)
    with the 3 lowest mantissa bits XORed with fresh random bits (a relative perturbation below 6%, which never
    changes the exponent, so values stay finite and inside +-0.1). Norm weights are 1 +- 0.05."""

    BLOCK = 1 << 24

    def __init__(self, seed: int, max_numel: int):
        self.gen = torch.Generator().manual_seed(seed)
        n = min(self.BLOCK, max_numel)
        x = torch.randn(n, generator=self.gen)
        x *= 0.02
        x.clamp_(-0.1, 0.1)
        self.block = f32_to_bf16_bits(x)
        self.noise = torch.empty(min(self.BLOCK, max_numel), dtype=torch.int16)

    def tiled(self, src: torch.Tensor, n: int) -> torch.Tensor:
        """`n` values of `src` repeated from a random start (a copy of its own, for noise to be added)."""
        m = src.numel()
        start = int(torch.randint(0, m, (1,), generator=self.gen))
        out = torch.empty(n, dtype=src.dtype)
        pos = 0
        while pos < n:
            take = min(n - pos, m - start)
            out[pos : pos + take] = src[start : start + take]
            pos += take
            start = 0
        return out

    def linear(self, shape: tuple[int, ...]) -> torch.Tensor:
        """bf16 N(0, 0.02) weights clamped to +-0.1."""
        n = math.prod(shape)
        out = self.tiled(self.block, n)
        for i in range(0, n, self.BLOCK):  # in chunks: a full-size noise array would double the peak memory
            part = out[i : i + self.BLOCK]
            noise = self.noise[: part.numel()]
            noise.random_(0, 8, generator=self.gen)
            part ^= noise
        return out.view(torch.bfloat16).reshape(shape)

    def norm(self, shape: tuple[int, ...]) -> torch.Tensor:
        """bf16 norm weights 1 +- 0.055."""
        one = 0x3F80  # bf16 1.0; +-7 ulps = 1 +- 0.055
        return (one + torch.randint(-7, 8, shape, generator=self.gen)).to(torch.int16).view(torch.bfloat16)


class Fp8Source(WeightSource):
    """Random FP8 block-wise weights: e4m3 codes sliced from a random block like the bf16 ones (their low bit XORed
    with fresh noise, NaN codes moved to +-448's neighbour), and float32 block scales around 2e-4 (a block whose
    largest weight is ~0.09)."""

    BLOCK_SIZE = (128, 128)

    def __init__(self, seed: int, max_numel: int):
        super().__init__(seed, max_numel)
        n = min(self.BLOCK, max_numel)
        self.codes = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=self.gen)
        self.bits = torch.empty(n, dtype=torch.uint8)

    def fp8(self, shape: tuple[int, ...]) -> torch.Tensor:
        n = math.prod(shape)
        out = self.tiled(self.codes, n)
        for i in range(0, n, self.BLOCK):
            part = out[i : i + self.BLOCK]
            noise = self.bits[: part.numel()]
            noise.random_(0, 2, generator=self.gen)
            part ^= noise
            part[(part & 0x7F) == 0x7F] ^= 1  # S.1111.111 is NaN in e4m3fn
        return out.view(torch.float8_e4m3fn).reshape(shape)

    def scales(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.rand(shape, generator=self.gen) * 2e-4 + 1e-4

    @classmethod
    def scale_shape(cls, shape: tuple[int, ...]) -> tuple[int, int]:
        return -(-shape[0] // cls.BLOCK_SIZE[0]), -(-shape[1] // cls.BLOCK_SIZE[1])


def planned_tensors(specs: dict[str, TensorSpec], quantize: str | None) -> list[PlannedTensor]:
    """What the base holds, in module order: with FP8, each linear weight F8_E4M3 followed by its scale."""
    planned = []
    for s in specs.values():
        if quantize and s.kind == "linear":
            planned.append(PlannedTensor(s.name, "F8_E4M3", s.shape))
            planned.append(PlannedTensor(s.name + "_scale_inv", "F32", Fp8Source.scale_shape(s.shape)))
        else:
            planned.append(PlannedTensor(s.name, "BF16", s.shape))
    return planned


def write_base_weights(base: Path, p: dict, max_shard: int, seed: int, log,
                       quantize: str | None = None) -> tuple[int, int, int]:
    specs = {s.name: s for s in base_tensor_specs(p)}
    shards = plan_shards(planned_tensors(specs, quantize), max_shard)
    names = shard_file_names(len(shards))
    src = (Fp8Source if quantize else WeightSource)(seed, max(s.numel for s in specs.values()))
    for shard, fname in zip(shards, names):
        t0 = time.time()
        # streammerge's own streaming writer: one tensor in memory at a time, bytes as save_file lays them out
        with ShardWriter(base / fname, shard) as w:
            for t in w.order:
                if t.name.endswith("_scale_inv"):
                    assert isinstance(src, Fp8Source)
                    w.write(t.name, src.scales(t.shape))
                    continue
                s = specs[t.name]
                if t.dtype == "F8_E4M3":
                    assert isinstance(src, Fp8Source)
                    w.write(t.name, src.fp8(s.shape))
                else:
                    w.write(t.name, src.norm(s.shape) if s.kind == "norm" else src.linear(s.shape))
        log(f"  {fname}: {len(shard)} tensors, {human(sum(t.nbytes for t in shard))}, {time.time() - t0:.1f}s")
    numel = sum(s.numel for s in specs.values())
    if len(shards) > 1:
        # the same content as transformers 5 save_pretrained writes
        write_index(base / "model.safetensors.index.json", shards, names, {"total_parameters": numel})
    return sum(t.nbytes for shard in shards for t in shard), len(shards), numel


FP8_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


def human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1000
    return ""


def _version(dist: str, default: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return default


def build_config(p: dict, tok_ids: dict[str, int]) -> dict:
    """Qwen3 config.json with the fields transformers 5 writes for Qwen3Config (to_diff_dict), plus `torch_dtype`
    beside `dtype`: transformers 5 writes only `dtype`, the Qwen hub configs (transformers 4) only `torch_dtype`;
    both are written so readers of either generation find it. Hand-written (no transformers import, so the tiny
    preset stays fast); tests/test_scripts.py checks it against Qwen3Config."""
    n = p["num_hidden_layers"]
    d = {
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": tok_ids["<|endoftext|>"], "dtype": "bfloat16", "eos_token_id": tok_ids["<|endoftext|>"],
        "head_dim": p["head_dim"], "hidden_act": "silu", "hidden_size": p["hidden_size"], "initializer_range": 0.02,
        "intermediate_size": p["intermediate_size"], "layer_types": ["full_attention"] * n,
        "max_position_embeddings": p["max_position_embeddings"], "max_window_layers": n, "model_type": "qwen3",
        "num_attention_heads": p["num_attention_heads"], "num_hidden_layers": n,
        "num_key_value_heads": p["num_key_value_heads"], "pad_token_id": None, "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": p["rope_theta"], "rope_type": "default"}, "sliding_window": None,
        "tie_word_embeddings": p["tie_word_embeddings"], "torch_dtype": "bfloat16",
        "transformers_version": _version("transformers", "5.0.0"), "use_cache": True, "use_sliding_window": False,
        "vocab_size": p["vocab_size"],
    }
    return d


CORPUS = """\
The quick brown fox jumps over the lazy dog. A language model predicts the next token from the previous ones.
Low rank adaptation trains two small matrices per layer and keeps the base weights frozen.
Merging adds the scaled product of the two matrices to the original weight so inference needs no adapter.
Safetensors files start with a small JSON header followed by raw little endian tensor data.
Streaming the merge tensor by tensor keeps the peak memory close to the size of one tensor.
def merge(weight, lora_a, lora_b, scale): return weight + scale * lora_b @ lora_a
<|im_start|>user
Hello, how are you today?<|im_end|>
<|im_start|>assistant
I am fine, thank you. 0 1 2 3 4 5 6 7 8 9 10 100 1000
"""

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _byte_chars() -> list[str]:
    """GPT-2's byte-level alphabet: the printable character each byte value stands for."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


# GPT-2's pre-tokenizer split, for the ASCII corpus below (\p{L} / \p{N} narrowed to ASCII letters / digits)
_SPLIT = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")


def train_bpe(lines: list[str], vocab_size: int, specials: list[str]) -> tuple[dict[str, int], list[list[str]]]:
    """A byte-level BPE vocabulary and merges (special tokens, then the 256 byte characters, then merges in the
    order learned), deterministic: the most frequent pair wins, ties go to the smallest pair."""
    alphabet = _byte_chars()
    words = Counter(
        tuple(alphabet[b] for b in piece.encode("utf-8")) for line in lines for piece in _SPLIT.findall(line)
    )
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    merges: list[list[str]] = []
    while len(vocab) < vocab_size:
        pairs: Counter = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < 2:
            break
        joined = best[0] + best[1]
        merges.append(list(best))
        vocab.setdefault(joined, len(vocab))
        merged: Counter = Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return vocab, merges


def write_tokenizer(base: Path, vocab_size: int) -> dict[str, int]:
    """A small byte-level BPE (a few hundred tokens) with Qwen's special tokens, loadable by AutoTokenizer.

    tokenizer.json is written as the `tokenizers` library saves it, trained here in plain Python so that the
    script needs nothing but torch."""
    vocab, merges = train_bpe(CORPUS.splitlines(), min(vocab_size, 400), SPECIAL_TOKENS)
    ids = {t: vocab[t] for t in SPECIAL_TOKENS}
    if max(vocab.values()) >= vocab_size:
        raise SystemExit(f"tokenizer vocab {len(vocab)} does not fit model vocab {vocab_size}")
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [
            {"id": ids[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
             "special": True}
            for t in SPECIAL_TOKENS
        ],
        "normalizer": None, "pre_tokenizer": byte_level, "post_processor": None,
        "decoder": {**byte_level, "add_prefix_space": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": vocab, "merges": merges,
        },
    }
    (base / "tokenizer.json").write_text(json.dumps(tokenizer, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    added = {
        str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True}
        for t in SPECIAL_TOKENS
    }
    tok_cfg = {
        "add_prefix_space": False, "added_tokens_decoder": added, "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None, "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>", "model_max_length": 40960, "pad_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (base / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    special = {"additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "eos_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    (base / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return ids


def adapter_config(p: dict, rank: int, alpha: int, base_path: str) -> dict:
    """adapter_config.json as PEFT (0.18 to 0.21) save_pretrained writes it for a LoraConfig with these arguments:
    every LoraConfig field with its default, sets as lists, inference_mode true. Hand-written so that peft need
    not be imported; tests/test_scripts.py checks it against peft.LoraConfig."""
    return {
        "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
        "base_model_name_or_path": base_path, "bias": "none", "corda_config": None, "ensure_weight_tying": False,
        "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "kasa_config": None, "layer_replication": None, "layers_pattern": None,
        "layers_to_transform": None, "loftq_config": {}, "lora_alpha": alpha, "lora_bias": False,
        "lora_dropout": 0.0, "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core",
        "modules_to_save": None, "monteclora_config": None, "peft_type": "LORA",
        "peft_version": _version("peft", "0.18.0"), "qalora_group_size": 16, "r": rank, "rank_pattern": {},
        "revision": None, "target_modules": sorted(LORA_TARGETS), "target_parameters": None,
        "task_type": "CAUSAL_LM", "trainable_token_indices": None, "use_bdlora": None, "use_dora": False,
        "use_qalora": False, "use_rslora": False, "velora_config": None,
    }


def write_adapter(adapter: Path, p: dict, rank: int, alpha: int, seed: int, base_path: str) -> int:
    """adapter_model.safetensors: lora_A [r, in] and lora_B [out, r] in float32, PEFT key names, {"format": "pt"}."""
    gen = torch.Generator().manual_seed(seed + 1)
    arrays = {}
    for mod, fin, fout in lora_module_shapes(p):
        pre = f"base_model.model.{mod}"
        bound = 1.0 / math.sqrt(fin)  # A as PEFT's kaiming-uniform init; B small but non-zero (a trained adapter)
        arrays[pre + ".lora_A.weight"] = ((rank, fin), lambda fin=fin, b=bound: torch.rand(rank, fin, generator=gen) * (2 * b) - b)
        arrays[pre + ".lora_B.weight"] = ((fout, rank), lambda fout=fout: torch.randn(fout, rank, generator=gen) * 0.01)
    names = sorted(arrays)  # draw in name order so the file is a function of the seed only
    planned = [PlannedTensor(k, "F32", arrays[k][0]) for k in names]
    with ShardWriter(adapter / "adapter_model.safetensors", planned) as w:
        for k in names:
            w.write(k, arrays[k][1]())
    cfg = adapter_config(p, rank, alpha, base_path)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return sum(t.nbytes for t in planned)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), required=True)
    ap.add_argument("--out", required=True, type=Path, help="writes OUT/base and OUT/adapter")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--max-shard-size", default="2GB", help="like transformers: 2GB = 2e9 bytes, 2GiB = 2^31")
    ap.add_argument("--quantize", choices=["fp8-block"], default=None,
                    help="write the base FP8 block-wise (F8_E4M3 linear weights, float32 128x128 block scales)")
    ap.add_argument("--adapter-name", default="adapter", help="write the adapter to OUT/NAME (default: adapter)")
    ap.add_argument("--adapter-only", action="store_true",
                    help="write only the adapter, for the base already in OUT/base (other ranks or seeds)")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    log = (lambda *x: None) if a.quiet else (lambda *x: print(*x, flush=True))

    p = PRESETS[a.preset]
    base, adapter = a.out / "base", a.out / a.adapter_name
    if a.adapter_only:
        t0 = time.time()
        adapter.mkdir(parents=True, exist_ok=True)
        ab = write_adapter(adapter, p, a.rank, a.alpha, a.seed, str(base.resolve()))
        log(f"adapter: {adapter}  r={a.rank} alpha={a.alpha}, {len(lora_module_shapes(p))} modules, {human(ab)} float32")
        log(f"done in {time.time() - t0:.1f}s")
        return 0
    for d in (base, adapter):
        d.mkdir(parents=True, exist_ok=True)
        for f in d.iterdir():  # stale shards of an earlier run with another shard size would confuse readers
            if f.is_file() and (f.suffix == ".safetensors" or f.name.endswith(".index.json")):
                f.unlink()
    t0 = time.time()
    log(f"Writing synthetic {a.preset} (Qwen3ForCausalLM) to {a.out}")
    ids = write_tokenizer(base, p["vocab_size"])
    cfg = build_config(p, ids)
    if a.quantize:
        cfg["quantization_config"] = dict(FP8_CONFIG)
    (base / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    gen_cfg = {"bos_token_id": ids["<|endoftext|>"], "do_sample": False, "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
               "pad_token_id": ids["<|endoftext|>"], "transformers_version": cfg.get("transformers_version", "5.0.0")}
    (base / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2, sort_keys=True) + "\n")
    total, nshards, nparams = write_base_weights(base, p, parse_size(a.max_shard_size), a.seed, log, a.quantize)
    kind = "FP8 block-wise (linear weights) + bf16" if a.quantize else "bf16"
    log(f"base:    {base}  {nparams:,} params, {human(total)} {kind} in {nshards} file(s)")
    # PEFT records model.name_or_path: the local folder the base was loaded from.
    ab = write_adapter(adapter, p, a.rank, a.alpha, a.seed, str(base.resolve()))
    log(f"adapter: {adapter}  r={a.rank} alpha={a.alpha}, {len(lora_module_shapes(p))} modules, {human(ab)} float32")
    log(f"done in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
