"""What the adapter says it was trained on (`base_model_name_or_path`) against the base it is merged into.

A one-line warning, only when the difference changes what the merge means:

* the adapter was trained on a quantized twin of the model (QLoRA: `*-bnb-4bit`, GPTQ, AWQ, FP8... in the name)
  and is merged into full-precision weights: the usual QLoRA merge, but not the weights it was trained against;
* both names are Hugging Face repo ids and they differ in the model's size or variant (`8b` vs `14b`, `base` vs
  `instruct`/`chat`/`it`...): the delta was learned for other weights.

Everything else is silent: a missing name, local paths (a training run records wherever its base happened to
live), and renames that keep size and variant (another organisation's re-upload, case, `-hf`).
"""

from __future__ import annotations

import re
from pathlib import Path

from .io.hub import looks_like_repo_id

# name tokens of quantized uploads -> what to call the scheme
_QUANT_TOKENS = {
    "bnb": "bitsandbytes", "4bit": "4-bit", "8bit": "8-bit", "nf4": "bitsandbytes NF4", "fp4": "4-bit",
    "gptq": "GPTQ", "awq": "AWQ", "int4": "INT4", "int8": "INT8", "w4a16": "INT4 (W4A16)", "w8a8": "INT8 (W8A8)",
    "fp8": "FP8", "mxfp4": "MXFP4", "hqq": "HQQ", "aqlm": "AQLM", "eetq": "EETQ", "exl2": "EXL2",
    "quantized": "quantized",
}
# tokens naming a different set of weights of the same architecture
_VARIANT_TOKENS = {
    "base", "instruct", "chat", "it", "sft", "dpo", "rlhf", "coder", "code", "math", "vl", "vision", "thinking",
    "reasoning", "guard",
}
_SIZE = re.compile(r"^(\d+x)?\d+(\.\d+)?[bm]$")  # 8b, 1.5b, 135m, 8x7b
_CACHE_DIR = re.compile(r"(?:^|/)models--([^/]+?)--([^/]+)(?:/|$)")


def repo_id_of(text: str) -> str | None:
    """The Hugging Face repo id `text` names: the id itself, or the repo of a hub cache snapshot path."""
    text = str(text).replace("\\", "/")
    m = _CACHE_DIR.search(text)
    if m:
        return f"{m.group(1)}/{m.group(2)}"
    if "/" in text and looks_like_repo_id(text) and not Path(text).exists():
        return text
    return None


def _tokens(name: str) -> list[str]:
    last = name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].lower()
    return [t for t in re.split(r"[-_\s]+", last) if t]


def _quantization(name: str) -> str | None:
    # "...-quantized.w4a16": dots separate scheme tokens too (but not versions and sizes: 3.1, 1.5b)
    found = [_QUANT_TOKENS[p] for t in _tokens(name) for p in t.split(".") if p in _QUANT_TOKENS]
    if not found:
        return None
    specific = [f for f in found if f not in ("quantized", "bitsandbytes")]
    if "bitsandbytes" in found:
        return f"bitsandbytes {specific[0]}" if specific else "bitsandbytes"
    return specific[0] if specific else "quantized"


def _identity(name: str) -> tuple[frozenset[str], frozenset[str]]:
    tokens = _tokens(name)
    return frozenset(t for t in tokens if _SIZE.match(t)), frozenset(t for t in tokens if t in _VARIANT_TOKENS)


def base_mismatch(recorded: object, base_arg: str | Path, base_dir: Path) -> str | None:
    """The warning to print when the adapter's recorded base differs from `--base` in a way that matters."""
    if not isinstance(recorded, str) or not recorded.strip():
        return None
    recorded = recorded.strip()
    base_name = repo_id_of(str(base_arg)) or repo_id_of(str(base_dir)) or str(base_arg)
    same = _tokens(recorded) == _tokens(base_name)
    scheme = _quantization(recorded)
    if scheme and not same and not _quantization(base_name):
        what = "a quantized model" if scheme == "quantized" else f"a quantized ({scheme}) model"
        return (f"the adapter was trained on {recorded}, {what} (QLoRA); it is merged into the "
                f"full-precision weights of --base {base_arg}: the usual way to merge such an adapter, but not the "
                "weights it was trained against, so the merged model's outputs differ slightly from the adapter's "
                "on the quantized model")
    recorded_id, base_id = repo_id_of(recorded), repo_id_of(base_name)
    if scheme or same or recorded_id is None or base_id is None:
        return None
    (r_size, r_variant), (b_size, b_variant) = _identity(recorded_id), _identity(base_id)
    if r_size != b_size or r_variant != b_variant:
        return (f"the adapter was trained on {recorded_id}, but --base is {base_id} (another size or variant); its "
                "shapes fit, so it is merged, but the delta was learned for other weights: check --base")
    return None
