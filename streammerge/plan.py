"""Planning: match every adapter tensor to the checkpoint and check every shape before any byte is written.

The plan is a list of output tensors in checkpoint order, each with its source (a base tensor, or an adapter
tensor that replaces it) and the operations that turn the source into the merged tensor. Every adapter key is
consumed exactly once; anything left over, ambiguous or mis-shaped is reported in a single PlanError.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import permutations
from pathlib import Path
from typing import Any

import torch

from .adapter import Adapter
from .checkpoint import ITEMSIZE, TORCH_TO_ST, Checkpoint, TensorInfo
from .consistency import check_dora
from .errors import AdapterError, PlanError, UnsupportedError
from .fused import FusedPart
from .layouts import (
    candidates, choose_layout, derived_layout, token_adapter_owner, transformers_available, wrapper_copy,
)
from .quantized import detect as detect_quantization
from .quantized import refusal as quantized_refusal

PREFIX = "base_model.model."

# exact key suffixes of PEFT's LoRA format (spec §1.2), longest first so no suffix shadows another
ROLE_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".token_adapter.trainable_tokens_delta", "tokens"),
    (".lora_magnitude_vector.weight", "magnitude"),
    (".lora_magnitude_vector", "magnitude"),
    (".lora_embedding_A", "emb_A"),
    (".lora_embedding_B", "emb_B"),
    (".base_layer.weight", "base_weight"),
    (".base_layer.bias", "base_bias"),
    (".lora_A.weight", "A"),
    (".lora_B.weight", "B"),
    (".lora_B.bias", "lora_bias"),
    # LoHa, LoKr, IA3, VeRA (spec §13)
    (".hada_w1_a", "hada_w1_a"), (".hada_w1_b", "hada_w1_b"), (".hada_w2_a", "hada_w2_a"),
    (".hada_w2_b", "hada_w2_b"), (".hada_t1", "hada_t1"), (".hada_t2", "hada_t2"),
    (".lokr_w1_a", "lokr_w1_a"), (".lokr_w1_b", "lokr_w1_b"), (".lokr_w2_a", "lokr_w2_a"),
    (".lokr_w2_b", "lokr_w2_b"), (".lokr_w1", "lokr_w1"), (".lokr_w2", "lokr_w2"), (".lokr_t2", "lokr_t2"),
    (".ia3_l", "ia3_l"),
    (".vera_lambda_b", "vera_lambda_b"), (".vera_lambda_d", "vera_lambda_d"),
)
OTHER_TYPE_ROLES = {r for _, r in ROLE_SUFFIXES[10:]}
# VeRA's shared random projections, saved once for the whole model (save_projection=True)
VERA_SHARED = ("base_model.vera_A", "base_model.vera_B")

FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
OUT_DTYPES = {"bf16": "BF16", "f16": "F16", "f32": "F32", "auto": None}
ST_TO_TORCH_NAME = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}

# model types whose linear layers are transformers' Conv1D ([in, out] weights, spec §5)
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp", "convbert"}
# disk names of input embeddings, for tied checkpoints
INPUT_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "shared.weight")


# ---------------------------------------------------------------------------------------------------------
# operations: data only; the engine applies them with kernels.py


@dataclass(frozen=True)
class LoraRows:
    """`W[r0:r1] += B[r0:r1] @ A * s` on the weight viewed as `[out, in]` (Linear, ConvNd).

    For one expert of fused MoE factors (target_parameters, spec §12) the factors are slices:
    `A_e = A[e*r:(e+1)*r]`, `B_e = B[:, e::E]`, and `b_rows` picks the rows of `B_e @ A_e` this tensor holds
    (w1 = gate rows, w3 = up rows of a fused gate_up_proj).
    """

    a: str
    b: str
    scale: float
    module: str
    expert: int | None = None
    experts: int = 1
    b_rows: tuple[int, int] | None = None
    out_rows: tuple[int, int] | None = None  # the delta covers only these rows of W (a module cut out of a fused W)

    def describe(self) -> str:
        where = f"[expert {self.expert}]" if self.expert is not None else ""
        if self.out_rows is not None:
            where += f"[rows {self.out_rows[0]}:{self.out_rows[1]}]"
        return f"lora({self.module}{where}, s={self.scale:g})"


@dataclass(frozen=True)
class LoraExperts:
    """Fused expert parameter stored fused on disk, `[E, d1, d2]`: `W[e] += s * B_e @ A_e` (or its transpose
    when the disk layout is `[E, in, out]`), one expert per row of the `[E, d1*d2]` view."""

    a: str
    b: str
    scale: float
    module: str
    experts: int
    transpose: bool

    def describe(self) -> str:
        return f"lora-experts({self.module}, E={self.experts}{', T' if self.transpose else ''}, s={self.scale:g})"


@dataclass(frozen=True)
class LoraCols:
    """`W[r0:r1] += (A[:, r0:r1].T @ B.T) * s`: Conv1D `[in, out]` and embedding `[vocab, dim]` weights."""

    a: str
    b: str
    scale: float
    module: str

    def describe(self) -> str:
        return f"lora-T({self.module}, s={self.scale:g})"


@dataclass(frozen=True)
class BiasAdd:
    key: str
    scale: float

    def describe(self) -> str:
        return f"lora_bias(s={self.scale:g})"


@dataclass(frozen=True)
class TokenRows:
    """Trainable-token rows: new values for the listed rows (rounded to the base dtype first, as PEFT does)."""

    key: str
    indices: tuple[int, ...]
    base_dtype: str

    def describe(self) -> str:
        return f"tokens({len(self.indices)} rows)"


@dataclass(frozen=True)
class DoraRows:
    """DoRA magnitude, norm per row of `W + dW` (Linear, ConvNd)."""

    key: str

    def describe(self) -> str:
        return "dora(rows)"


@dataclass(frozen=True)
class DoraCols:
    """DoRA magnitude, norm per column over all rows: needs a first pass over the whole tensor."""

    key: str

    def describe(self) -> str:
        return "dora(cols, 2 passes)"


@dataclass(frozen=True)
class LohaRows:
    """LoHa: `W += ((w1a @ w1b) * (w2a @ w2b)) * s`, row block by row block."""

    w1a: str
    w1b: str
    w2a: str
    w2b: str
    scale: float
    module: str

    def describe(self) -> str:
        return f"loha({self.module}, s={self.scale:g})"


@dataclass(frozen=True)
class LokrRows:
    """LoKr: `W += kron(w1, w2) * s`; w1/w2 are saved whole or as two factors each."""

    w1: tuple[str, ...]
    w2: tuple[str, ...]
    scale: float
    module: str

    def describe(self) -> str:
        return f"lokr({self.module}, s={self.scale:g})"


@dataclass(frozen=True)
class Ia3Scale:
    """IA3: `W *= l` per row (`axis="rows"`, and the bias too) or per column (feed-forward layers)."""

    key: str
    axis: str

    def describe(self) -> str:
        return f"ia3({self.axis})"


@dataclass(frozen=True)
class VeraRows:
    """VeRA: `W += (lambda_b * B[:out]) @ (lambda_d * A[:, :in])` (transposed for Conv1D)."""

    lambda_b: str
    lambda_d: str
    transpose: bool
    module: str

    def describe(self) -> str:
        return f"vera({self.module}{', T' if self.transpose else ''})"


Op = LoraRows | LoraExperts | LoraCols | BiasAdd | TokenRows | DoraRows | DoraCols | LohaRows | LokrRows | \
    Ia3Scale | VeraRows


@dataclass
class OutTensor:
    """One tensor of the output: where its rows come from and what is done to them."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    base: TensorInfo | None                  # base tensor the rows come from (None: from the adapter)
    replacement: str | None = None           # adapter key whose values replace the base tensor
    ops: list[Op] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]

    @property
    def raw_copy(self) -> bool:
        return self.replacement is None and not self.ops and self.base is not None and self.base.dtype == self.dtype

    @property
    def merged(self) -> bool:
        return bool(self.ops) or self.replacement is not None

    def describe(self) -> str:
        parts = [f"replace({self.replacement})"] if self.replacement else []
        parts += [op.describe() for op in self.ops]
        if not parts:
            parts = ["copy" if self.raw_copy else f"cast {self.base.dtype if self.base else '?'}->{self.dtype}"]
        return " + ".join(parts)


@dataclass
class Plan:
    tensors: list[OutTensor]
    layout: str
    config_updates: dict[str, Any]
    notes: list[str]
    adapter_keys: int

    @property
    def merged(self) -> list[OutTensor]:
        return [t for t in self.tensors if t.merged]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


# ---------------------------------------------------------------------------------------------------------


@dataclass
class _Module:
    name: str
    roles: dict[str, str] = field(default_factory=dict)  # role -> adapter key


def read_base_config(root: Path) -> dict[str, Any]:
    """config.json of the base, or {} when it has none."""
    path = root / "config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{path}: base config.json is not valid JSON ({e}); re-download the base") from e
    except RecursionError:
        raise AdapterError(f"{path}: base config.json is nested too deeply to be a model config; re-download the "
                           "base") from None
    return data if isinstance(data, dict) else {}


def _config_values(config: dict[str, Any], key: str) -> list[Any]:
    """`key` at the top level and in nested *_config dicts (text_config of vision-language models)."""
    found = [config[key]] if key in config else []
    for v in config.values():
        if isinstance(v, dict):
            found += _config_values(v, key)
    return found


def output_dtype(choice: str, base_dtype: str) -> str:
    """The safetensors dtype a tensor is written in for --dtype `choice` (non-float tensors keep theirs)."""
    if choice not in OUT_DTYPES:
        raise ValueError(f"unknown dtype {choice!r}; choose one of {', '.join(OUT_DTYPES)}")
    target = OUT_DTYPES[choice]
    if target is None or base_dtype not in FLOAT_DTYPES:
        return base_dtype
    return target


def split_key(key: str) -> tuple[str, str | None]:
    """(module name, role) for a LoRA key, or (key, None) for a full-replacement tensor."""
    for suffix, role in ROLE_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return key, None


def strip_prefix(keys: list[str], where: Path) -> dict[str, str]:
    """Adapter key -> key without PEFT's `base_model.model.` prefix (absent in save_peft_format=False files)."""
    with_prefix = [k for k in keys if k.startswith(PREFIX)]
    if with_prefix and len(with_prefix) != len(keys):
        odd = sorted(set(keys) - set(with_prefix))[:5]
        raise AdapterError(f"{where}: some keys lack the '{PREFIX}' prefix ({odd}); the adapter file is inconsistent")
    if with_prefix:
        return {k: k[len(PREFIX):] for k in keys}
    if any(k.startswith("base_model.") for k in keys):
        # adapters saved from a LoraModel directly: base_model.<module>
        return {k: k[len("base_model."):] if k.startswith("base_model.") else k for k in keys}
    return {k: k for k in keys}


class _Problems:
    def __init__(self) -> None:
        self.items: list[str] = []
        self.hint = "the adapter was trained on another model, or for another size of it"

    def add(self, text: str) -> None:
        self.items.append(text)

    def raise_if_any(self, adapter: Adapter, base_root: Path) -> None:
        if not self.items:
            return
        head = f"adapter {adapter.weights_path} does not fit base {base_root} ({len(self.items)} problem(s))"
        shown = self.items[:20]
        more = f"; ... and {len(self.items) - 20} more" if len(self.items) > 20 else ""
        raise PlanError(head + ": " + "; ".join(shown) + more + f". Likely cause: {self.hint}")


def build_plan(ckpt: Checkpoint, adapter: Adapter, *, dtype: str = "bf16", loader: str = "auto") -> Plan:
    """Match, check and plan the whole merge from headers and configs only."""
    cfg = adapter.config
    base_config = read_base_config(ckpt.root)
    model_type = str(base_config.get("model_type", ""))
    problems = _Problems()
    notes: list[str] = []

    quant = detect_quantization(ckpt.tensors, base_config)
    if quant is not None:
        raise UnsupportedError(quantized_refusal(quant, ckpt.root, ckpt.tensors))

    keys = list(adapter.shapes)
    if cfg.peft_type == "VERA":
        missing = [k for k in VERA_SHARED if k not in adapter.shapes]
        if missing:
            raise AdapterError(f"{adapter.weights_path}: VeRA adapter without {missing}; re-save it with "
                               "save_projection=True")
        keys = [k for k in keys if k not in VERA_SHARED]
    stripped = strip_prefix(keys, adapter.weights_path)
    modules: dict[str, _Module] = {}
    replacements: dict[str, str] = {}  # module-side tensor name -> adapter key
    for key, short in stripped.items():
        mod, role = split_key(short)
        if role is None:
            replacements[short] = key
            continue
        m = modules.setdefault(mod, _Module(mod))
        if role in m.roles:
            problems.add(f"{mod}: two tensors for {role} ({m.roles[role]}, {key})")
        m.roles[role] = key

    # base_layer.* are the wrapped module's own tensors saved with the adapter: they replace the checkpoint's
    # (`X.token_adapter.base_layer.weight` is embedding X, saved beside its trainable tokens)
    for m in modules.values():
        for role, param in (("base_weight", "weight"), ("base_bias", "bias")):
            if role in m.roles:
                target = f"{token_adapter_owner(m.name)}.{param}"
                if target in replacements:
                    problems.add(f"{target}: saved twice ({replacements[target]}, {m.roles[role]})")
                replacements[target] = m.roles.pop(role)
    modules = {n: m for n, m in modules.items() if m.roles}
    notes += _fold_wrapper_copies(replacements, adapter)
    fused = (_split_param_modules(modules, cfg, adapter, _param_finder(ckpt.tensors, loader), problems)
             if cfg.target_parameters else [])
    if cfg.peft_type == "LORA":
        check_dora({n: m.roles.keys() for n, m in modules.items()}, cfg.use_dora, adapter.weights_path)

    for m in modules.values():
        if m.roles.keys() & {"A", "B"} and m.roles.keys() & {"emb_A", "emb_B"}:
            problems.add(f"{m.name}: both lora_A/B and lora_embedding_A/B are saved; the adapter file is corrupt")

    # every module-side tensor name the adapter touches
    wanted: list[str] = []
    for m in modules.values():
        if m.roles.keys() & ({"A", "B", "emb_A", "emb_B", "magnitude", "tokens"} | OTHER_TYPE_ROLES):
            wanted.append(f"{m.name}.weight")
        if "lora_bias" in m.roles:
            wanted.append(f"{m.name}.bias")
    wanted += list(replacements)
    for f in fused:
        wanted += f.names

    tie_flags = _config_values(base_config, "tie_word_embeddings")
    tied_config = bool(tie_flags[0]) if tie_flags else False
    optional = {n for n in wanted if n.split(".")[-2:-1] == ["lm_head"]} if tied_config else set()

    choice, rivals = choose_layout(wanted, ckpt.tensors, loader, optional=optional,
                                   derive=lambda: derived_layout(ckpt.root, ckpt.tensors))
    if rivals:
        alts = ", ".join(sorted({c.layout.name for c in rivals}))
        raise PlanError(
            f"adapter {adapter.weights_path}: its module names fit base {ckpt.root} in more than one way "
            f"(layouts {choice.layout.name}, {alts}); pass --loader to say which"
        )
    to_disk = choice.layout.to_disk
    if choice.missing:
        tried = f"--loader {loader}" if loader != "auto" else "every known --loader layout"
        for n in choice.missing:
            problems.add(f"{n}: no tensor {to_disk(n)} in the base")
        problems.hint = (f"the adapter is for another model (tried {tried}); check --base, or pass the --loader "
                         "that matches the checkpoint's naming")
        if loader == "auto" and not transformers_available():
            problems.hint += (". transformers is not installed: with it (pip install 'streammerge[transformers]') "
                              "streammerge also tries the base's own renamings, which place checkpoints saved under "
                              "legacy names (e.g. transformer.h.N..., backbone.*) and fused tensors")
        problems.raise_if_any(adapter, ckpt.root)

    input_embedding = _find_input_embedding(ckpt, to_disk)
    # tied on disk: the config says so and the checkpoint stores no output embedding of its own
    tied = tied_config and input_embedding is not None and to_disk("lm_head.weight") not in ckpt.tensors

    out: dict[str, OutTensor] = {}
    for name, info in ckpt.tensors.items():
        out[name] = OutTensor(name, output_dtype(dtype, info.dtype), info.shape, info)
    new_tensors: list[str] = []
    config_updates: dict[str, Any] = {}

    def target(module_tensor: str) -> OutTensor | None:
        disk = to_disk(module_tensor)
        if disk in out:
            return out[disk]
        if tied and module_tensor in optional:
            # a tied checkpoint stores no output embedding: it starts as a copy of the input embedding, as the
            # adapter saved it (a resized vocabulary) when it saved one
            emb = out[input_embedding]
            out[disk] = OutTensor(disk, emb.dtype, emb.shape, emb.base, replacement=emb.replacement)
            new_tensors.append(disk)
            return out[disk]
        problems.add(f"{module_tensor}: no tensor {disk} in the base")
        return None

    # 1. full replacements (modules_to_save, base_layer.*, bias="all")
    ensure_tying = cfg.ensure_weight_tying
    parts = choice.layout.parts or {}
    for module_tensor, key in replacements.items():
        if module_tensor in parts:
            raise UnsupportedError(f"{adapter.weights_path}: {key} replaces {module_tensor}, which is cut out of the "
                                   f"fused checkpoint tensor {parts[module_tensor].disk} on load; replacing part of a "
                                   "tensor is not supported: merge it with PEFT instead")
        shape = adapter.shapes[key]
        if tied and module_tensor in optional:
            emb_module = _module_tensor_of(input_embedding, replacements, to_disk)
            if emb_module is not None and _same_values(adapter, key, replacements[emb_module]):
                # the head is saved as a copy of the (replaced) tied embedding: one tensor, still tied
                notes.append(f"{key} equals the tied input embedding; kept tied")
                continue
        t = target(module_tensor)
        if t is None:
            continue
        vocab_like = t.name == input_embedding or module_tensor.split(".")[-2:-1] == ["lm_head"]
        if shape != t.shape and not (vocab_like and len(shape) == 2 and shape[1:] == t.shape[1:]):
            problems.add(f"{module_tensor}: adapter tensor {key} has shape {list(shape)} but base {t.name} is "
                         f"{list(t.shape)}")
            continue
        t.replacement = key
        t.shape = shape
        src = TORCH_TO_ST.get(adapter.dtypes[key])
        if src is None:
            problems.add(f"{key}: dtype {adapter.dtypes[key]} cannot be written")
            continue
        t.dtype = output_dtype(dtype, t.base.dtype if t.base is not None else src)

    # 2. trainable tokens, 3. LoRA deltas, DoRA, lora_bias
    used_head_clones: set[str] = set()
    if ensure_tying and tied:
        used_head_clones = _ensure_tying_clones(modules, adapter, to_disk, input_embedding, optional, problems)
    if tied:
        used_head_clones |= _tied_token_clones(modules, adapter, to_disk, input_embedding, optional, problems)
    for m in modules.values():
        if m.name in used_head_clones:
            continue
        part = parts.get(f"{m.name}.weight") or parts.get(f"{m.name}.bias")
        if part is not None:
            _plan_fused_part(m, part, adapter, cfg, target, problems)
        elif cfg.peft_type != "LORA" or m.roles.keys() & OTHER_TYPE_ROLES:
            # checks that every tensor of the module belongs to the adapter's type
            _plan_other_type(m, adapter, cfg, model_type, target, to_disk, ckpt, problems)
        else:
            _plan_module(m, adapter, cfg, model_type, target, problems)
    for f in fused:
        f.plan(adapter, target, model_type, problems)

    problems.raise_if_any(adapter, ckpt.root)

    # tied embeddings: say what the adapter model computes (spec §11). Replacements and trainable-token rows
    # land in the one shared tensor, so they keep the tie; a LoRA delta on only one side breaks it.
    if tied:
        heads = [out[n] for n in new_tensors]
        emb = out[input_embedding]
        emb_delta = any(isinstance(op, (LoraCols, DoraCols)) for op in emb.ops)
        if heads:
            config_updates["tie_word_embeddings"] = False
            notes.append("the adapter gives the output embedding values of its own: wrote lm_head and set "
                         "tie_word_embeddings=false")
        elif emb_delta and ensure_tying:
            notes.append("ensure_weight_tying: the embedding LoRA is merged once and the weights stay tied")
        elif emb_delta:
            head = to_disk("lm_head.weight")
            einfo = ckpt.tensors[input_embedding]
            # the head keeps the embedding as it was before the LoRA (incl. a saved, resized base_layer)
            out[head] = OutTensor(head, emb.dtype, emb.shape, einfo, replacement=emb.replacement,
                                  ops=[op for op in emb.ops if isinstance(op, TokenRows)])
            new_tensors.append(head)
            config_updates["tie_word_embeddings"] = False
            notes.append(f"LoRA changed the tied input embedding only: wrote {head} = the embedding without the "
                         "delta and set tie_word_embeddings=false")
    if input_embedding is not None and out[input_embedding].replacement is not None:
        vocab = out[input_embedding].shape[0]
        if vocab not in _config_values(base_config, "vocab_size"):
            config_updates["vocab_size"] = vocab
            notes.append(f"vocabulary resized to {vocab} rows by the adapter")

    tensors = [out[n] for n in ckpt.tensors] + [out[n] for n in new_tensors]
    return Plan(tensors, choice.layout.name, config_updates, notes, len(adapter.shapes))


def _find_input_embedding(ckpt: Checkpoint, to_disk) -> str | None:
    for suffix in INPUT_EMBEDDING_SUFFIXES:
        hits = [n for n in ckpt.tensors if n == suffix or n.endswith("." + suffix)]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            # a VLM with several towers: the language model's embedding is the one the layout maps model.* to
            preferred = to_disk("model." + suffix)
            if preferred in hits:
                return preferred
    return None


def _module_tensor_of(disk_name: str | None, replacements: dict[str, str], to_disk) -> str | None:
    for module_tensor in replacements:
        if to_disk(module_tensor) == disk_name:
            return module_tensor
    return None


def _same_values(adapter: Adapter, k1: str, k2: str) -> bool:
    return adapter.shapes[k1] == adapter.shapes[k2] and torch.equal(adapter.get(k1), adapter.get(k2))


def _fold_wrapper_copies(replacements: dict[str, str], adapter: Adapter) -> list[str]:
    """Check and drop the wrapper copies saved beside a modules_to_save module's own tensor (spec §10.4).

    PEFT loads the trained copy from `X.P` and merges that; `X.modules_to_save.P` (the same trained copy) is never
    loaded and `X.original_module.P` (the untrained, possibly resized module) never reaches the merged model. Both
    must be consistent with `X.P`, or which tensor was trained is not clear.
    """
    checked: list[str] = []
    for name in list(replacements):
        split = wrapper_copy(name)
        if split is None:
            continue
        own, kind = split
        key = replacements.pop(name)
        module = own.rsplit(".", 1)[0]
        main = replacements.get(own)
        where = f"{adapter.weights_path}: module {module}"
        if main is None:
            raise AdapterError(f"{where}: {key} is saved without the module's own tensor {own} (the trained copy "
                               "PEFT loads), so PEFT would not load this layout; re-save the adapter with PEFT's "
                               "save_pretrained")
        if adapter.shapes[key] != adapter.shapes[main]:
            raise AdapterError(f"{where}: {key} {list(adapter.shapes[key])} and {main} {list(adapter.shapes[main])} "
                               "are copies of one module with different shapes; the adapter file is inconsistent, "
                               "re-save it with PEFT's save_pretrained")
        if kind == "trained" and not _same_values(adapter, key, main):
            raise AdapterError(f"{where}: {key} and {main} should both hold the trained copy but differ (PEFT would "
                               f"load {main} and ignore {key}); the adapter file is inconsistent, re-save it with "
                               "PEFT's save_pretrained")
        if module not in checked:
            checked.append(module)
    return [f"{m}: the modules_to_save wrapper's copies saved with its embedding layer were checked; the trained "
            "copy is merged" for m in checked]


def _ensure_tying_clones(modules, adapter, to_disk, input_embedding, optional, problems) -> set[str]:
    """With ensure_weight_tying PEFT saves the embedding LoRA twice (as lm_head factors too); use it once."""
    heads = [m for m in modules.values() if f"{m.name}.weight" in optional]
    embs = [m for m in modules.values() if to_disk(f"{m.name}.weight") == input_embedding]
    if not heads or not embs:
        return set()
    head, emb = heads[0], embs[0]
    if not ({"A", "B"} <= head.roles.keys() and {"emb_A", "emb_B"} <= emb.roles.keys()):
        return set()
    same = torch.equal(adapter.get(head.roles["A"]), adapter.get(emb.roles["emb_B"]).T) and torch.equal(
        adapter.get(head.roles["B"]), adapter.get(emb.roles["emb_A"]).T
    )
    if not same:
        problems.add(f"{head.name}: ensure_weight_tying is set but its LoRA factors are not the tied embedding's; "
                     "the adapter is inconsistent")
        return set()
    return {head.name}


def _tied_token_clones(modules, adapter, to_disk, input_embedding, optional, problems) -> set[str]:
    """Trainable tokens on a tied embedding saved with the embedding layers: the output embedding's tied wrapper is
    saved too (`lm_head.token_adapter.trainable_tokens_delta`, the same rows). The rows go once into the shared
    tensor, which stays tied, as in the unmerged model."""
    heads = [m for m in modules.values() if f"{m.name}.weight" in optional and set(m.roles) == {"tokens"}]
    embs = [m for m in modules.values() if to_disk(f"{m.name}.weight") == input_embedding and "tokens" in m.roles]
    if not heads or not embs:
        return set()
    head, emb = heads[0], embs[0]
    if not _same_values(adapter, head.roles["tokens"], emb.roles["tokens"]):
        problems.add(f"{head.name}: {head.roles['tokens']} of the tied output embedding differs from "
                     f"{emb.roles['tokens']}; the adapter is inconsistent")
        return set()
    return {head.name}


def _plan_module(m: _Module, adapter: Adapter, cfg, model_type: str, target, problems: _Problems) -> None:
    roles = m.roles
    shapes = adapter.shapes
    if "tokens" in roles:
        t = target(f"{m.name}.weight")
        if t is not None:
            indices = _token_indices(cfg.trainable_token_indices, m.name)
            shape = shapes[roles["tokens"]]
            if indices is None:
                problems.add(f"{m.name}: trainable_tokens_delta saved but trainable_token_indices in "
                             "adapter_config.json does not name this module")
            elif len(shape) != 2 or shape[0] != len(indices) or shape[1] != t.shape[1]:
                problems.add(f"{m.name}: trainable_tokens_delta has shape {list(shape)}, expected "
                             f"[{len(indices)}, {t.shape[1]}]")
            elif max(indices) >= t.shape[0] or min(indices) < 0:
                problems.add(f"{m.name}: a trainable token index is outside the {t.shape[0]}-row embedding")
            else:
                base_dtype = t.base.dtype if t.base is not None else t.dtype
                t.ops.append(TokenRows(roles["tokens"], tuple(indices), base_dtype))

    pair = ("A", "B") if {"A", "B"} & roles.keys() else ("emb_A", "emb_B") if {"emb_A", "emb_B"} & roles.keys() else None
    if pair is None:
        for role in ("magnitude", "lora_bias"):
            if role in roles:
                problems.add(f"{m.name}: {roles[role]} has no lora_A/lora_B pair; the adapter file is incomplete")
        return
    a_role, b_role = pair
    if a_role not in roles or b_role not in roles:
        have, lack = (a_role, b_role) if a_role in roles else (b_role, a_role)
        missing = {"A": "lora_A", "B": "lora_B", "emb_A": "lora_embedding_A", "emb_B": "lora_embedding_B"}[lack]
        problems.add(f"{m.name}: {roles[have]} is saved without its {missing}; "
                     "the adapter file is incomplete")
        return
    a_key, b_key = roles[a_role], roles[b_role]
    a_shape, b_shape = shapes[a_key], shapes[b_key]
    t = target(f"{m.name}.weight")
    if t is None:
        return
    if t.base is not None and t.base.dtype not in FLOAT_DTYPES and t.replacement is None:
        problems.add(f"{m.name}: base tensor {t.name} is {t.base.dtype}, not a float weight; is the base quantized?")
        return
    r = a_shape[0] if a_shape else 0
    rank_key = m.name
    expected_r = cfg.resolve_r(rank_key)
    if a_role == "emb_A":
        ok = len(a_shape) == 2 and len(b_shape) == 2 and b_shape[1] == r and t.shape == (a_shape[1], b_shape[0])
        if not ok:
            problems.add(f"{m.name}: lora_embedding_A {list(a_shape)} / lora_embedding_B {list(b_shape)} do not fit "
                         f"embedding {t.name} {list(t.shape)}")
            return
        kind = "cols"
    else:
        kind = _linear_kind(m.name, a_shape, b_shape, t.shape, model_type, cfg.fan_in_fan_out)
        if kind is None:
            problems.add(f"{m.name}: lora_A {list(a_shape)} / lora_B {list(b_shape)} do not fit base {t.name} "
                         f"{list(t.shape)}")
            return
        if kind == "grouped":
            raise UnsupportedError(f"{adapter.weights_path}: {m.name} is a grouped convolution (groups > 1); PEFT "
                                   "cannot merge LoRA into it either")
    if r != expected_r:
        problems.add(f"{m.name}: lora_A has rank {r} but adapter_config.json says r={expected_r} for it "
                     "(r / rank_pattern); the config and weights disagree")
        return
    scale = cfg.scaling(rank_key, r)
    t.ops.append((LoraCols if kind == "cols" else LoraRows)(a_key, b_key, scale, m.name))

    if "magnitude" in roles:
        mkey = roles["magnitude"]
        n = math.prod(shapes[mkey])
        if kind == "cols":
            expected = t.shape[1]
            op: Op = DoraCols(mkey)
        else:
            expected = t.shape[0]
            op = DoraRows(mkey)
        if n != expected:
            problems.add(f"{m.name}: lora_magnitude_vector has {n} values, expected {expected} for {t.name} "
                         f"{list(t.shape)}")
        else:
            t.ops.append(op)
    if "lora_bias" in roles:
        bkey = roles["lora_bias"]
        bt = target(f"{m.name}.bias")
        if bt is not None:
            if shapes[bkey] != bt.shape:
                problems.add(f"{m.name}: lora_B.bias {list(shapes[bkey])} does not fit {bt.name} {list(bt.shape)}")
            else:
                bt.ops.append(BiasAdd(bkey, scale))


def _plan_fused_part(m: _Module, part: FusedPart, adapter: Adapter, cfg, target, problems: _Problems) -> None:
    """LoRA on a module transformers cuts out of a fused disk tensor: its delta lands on the module's rows."""
    roles = m.roles
    extra = sorted(set(roles) - {"A", "B"})
    if part.rows is None or extra or cfg.peft_type != "LORA":
        why = ("its rows of the fused tensor cannot be told" if part.rows is None else
               f"only a plain lora_A/lora_B pair can be merged into its rows, this adapter also has {extra}"
               if extra else f"only LoRA can be merged into its rows, this is a {cfg.peft_type} adapter")
        raise UnsupportedError(f"{adapter.weights_path}: {m.name} is cut out of the fused checkpoint tensor "
                               f"{part.disk} on load ({part.how}); {why}: not supported, merge it with PEFT instead")
    if set(roles) != {"A", "B"}:
        have = next(iter(roles.values()))
        problems.add(f"{m.name}: {have} is saved without the other half of its LoRA pair; the adapter file is "
                     "incomplete")
        return
    t = target(f"{m.name}.weight")
    if t is None:
        return
    r0, r1 = part.rows
    a_shape, b_shape = adapter.shapes[roles["A"]], adapter.shapes[roles["B"]]
    rows = (r1 - r0, *t.shape[1:])
    if len(t.shape) != 2 or _linear_kind(m.name, a_shape, b_shape, rows, "", False) != "rows":
        problems.add(f"{m.name}: lora_A {list(a_shape)} / lora_B {list(b_shape)} do not fit rows {r0}..{r1 - 1} of "
                     f"{t.name} {list(t.shape)}")
        return
    r, expected_r = a_shape[0], cfg.resolve_r(m.name)
    if r != expected_r:
        problems.add(f"{m.name}: lora_A has rank {r} but adapter_config.json says r={expected_r} for it "
                     "(r / rank_pattern); the config and weights disagree")
        return
    t.ops.append(LoraRows(roles["A"], roles["B"], cfg.scaling(m.name, r), m.name, out_rows=(r0, r1)))


def _linear_kind(name: str, a: tuple, b: tuple, w: tuple, model_type: str, fan_in_fan_out: bool) -> str | None:
    """'rows' for [out, in] weights, 'cols' for Conv1D [in, out], 'grouped' for grouped convs, None if no fit."""
    if len(a) < 2 or len(b) < 2 or b[1] != a[0] and len(w) <= 2:
        return None
    r = a[0]
    if len(w) > 2:  # ConvNd: A [r, in, *k], B [out, r/groups, 1...]
        if b[0] != w[0] or len(b) != len(w) or any(d != 1 for d in b[2:]) or a[2:] != w[2:]:
            return None
        if b[1] != r:  # lora_B carries the base's groups: r/groups input channels
            return "grouped"
        return "rows" if a[1:] == w[1:] else None
    if b[1] != r or len(w) != 2:
        return None
    out_dim, in_dim = b[0], a[1]
    linear = w == (out_dim, in_dim)
    conv1d = w == (in_dim, out_dim)
    if linear and conv1d:  # square: only the architecture can tell
        is_conv1d = model_type in CONV1D_MODEL_TYPES and not name.endswith("lm_head")
        if not model_type:
            is_conv1d = fan_in_fan_out
        return "cols" if is_conv1d else "rows"
    if linear:
        return "rows"
    if conv1d:
        return "cols"
    return None


def _token_indices(spec: Any, module: str) -> list[int] | None:
    if isinstance(spec, list):
        return [int(i) for i in spec]
    if isinstance(spec, dict):
        for key, value in spec.items():
            if module == key or module.endswith("." + key):
                return [int(i) for i in value]
    return None


# ---------------------------------------------------------------------------------------------------------
# target_parameters: LoRA on nn.Parameters, fused MoE experts and 2-D parameters such as a router (spec §12)

# Where PEFT nests several wrappers on one module, the first parameter in *registration* order is innermost
# (`<module>.base_layer...lora_A`), the last outermost (`<module>.lora_A`). Checkpoints do not record that order
# (safetensors stores names sorted, so `down_proj` comes before `gate_up_proj`). The LoRA shapes decide which pair
# belongs to which parameter; only when several assignments fit do we fall back on the order transformers 5
# registers its expert parameters in (every experts class it ships follows this order).
REGISTRATION_ORDER = ("gate_up_proj", "gate_up_proj_bias", "gate_proj", "up_proj", "down_proj", "down_proj_bias")
# how a fused parameter is stored on disk when the checkpoint keeps experts apart: [(names, rows of dW)]
PER_EXPERT = {
    "gate_up_proj": (("w1", "w3"), ("gate_proj", "up_proj")),
    "down_proj": (("w2",), ("down_proj",)),
}
# more nested wrappers than this on one module is not a real adapter; it bounds the search over assignments
MAX_NESTED = 6
# model types whose fused expert tensors on disk are [E, in, out]: experts built with `is_transposed` (GPT-OSS,
# Aria) or transposed by transformers on load (qwen3_vl_moe). Shapes tell the orientation unless the experts are
# square; then these are transposed and every other model has transformers 5's own [E, out, in] layout.
TRANSPOSED_EXPERTS = frozenset({"gpt_oss", "aria", "aria_text", "openai_privacy_filter", "qwen3_vl_moe",
                                "qwen3_vl_moe_text"})


@dataclass(frozen=True)
class _ParamOnDisk:
    """A module parameter as PEFT sees it (`shape`), and the module-side tensor names that hold it on disk."""

    family: str                     # "fused" (one tensor) | "per-expert" (one 2-D tensor per expert and part)
    shape: tuple[int, ...]          # [E, d1, d2] or [d1, d2]
    names: tuple[str, ...]
    parts: tuple[str, ...] = ()     # per-expert tensor names inside each expert (w1, w3 / gate_proj, up_proj)


def _param_finder(disk: Mapping[str, TensorInfo], loader: str):
    """`find(module, param)`: where the parameter `<module>.<param>` lives on disk, or None if the base has none."""
    layouts = candidates(loader)
    cache: dict[tuple[str, str], _ParamOnDisk | None] = {}

    def locate(name: str):
        for lay in layouts:
            if lay.to_disk(name) in disk:
                return lay
        return None

    def find(module: str, param: str) -> _ParamOnDisk | None:
        if (module, param) in cache:
            return cache[(module, param)]
        found = None
        fused = f"{module}.{param}"
        lay = locate(fused)
        if lay is not None:
            found = _ParamOnDisk("fused", disk[lay.to_disk(fused)].shape, (fused,))
        for parts in () if found else PER_EXPERT.get(param, ()):
            lay = locate(f"{module}.0.{parts[0]}.weight")
            if lay is None:
                continue
            experts = 0
            while lay.to_disk(f"{module}.{experts}.{parts[0]}.weight") in disk:
                experts += 1
            names = tuple(f"{module}.{e}.{p}.weight" for e in range(experts) for p in parts)
            first = [disk.get(lay.to_disk(f"{module}.0.{p}.weight")) for p in parts]
            if all(i is not None and len(i.shape) == 2 for i in first):
                rows = sum(i.shape[0] for i in first)
                found = _ParamOnDisk("per-expert", (experts, rows, first[0].shape[1]), names, parts)
            else:  # a broken checkpoint: its tensors are reported missing or mis-shaped per expert
                found = _ParamOnDisk("per-expert", (experts, -1, -1), names, parts)
            break
        cache[(module, param)] = found
        return found

    return find


@dataclass
class _FusedParam:
    module: str                      # e.g. model.layers.0.mlp.experts
    param: str                       # gate_up_proj / down_proj / weight / any other parameter name
    a: str
    b: str
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    r: int
    scale: float
    experts: int
    disk: _ParamOnDisk

    @property
    def names(self) -> list[str]:
        return list(self.disk.names)

    def plan(self, adapter: Adapter, target, model_type: str, problems: _Problems) -> None:
        E = self.experts
        in_dim, out_dim = self.a_shape[1], self.b_shape[0]
        where = f"{self.module}.{self.param}"
        if self.disk.family == "fused":
            t = target(self.names[0])
            if t is None:
                return
            if len(t.shape) == 2 and E == 1:
                # a 2-D parameter (e.g. a router's gate.weight): PEFT's ParamWrapper is plain Linear LoRA on it
                if t.shape != (out_dim, in_dim):
                    problems.add(f"{where}: lora_A {list(self.a_shape)} / lora_B {list(self.b_shape)} do not fit "
                                 f"{t.name} {list(t.shape)}")
                    return
                t.ops.append(LoraRows(self.a, self.b, self.scale, where))
                return
            if len(t.shape) != 3 or t.shape[0] != E:
                problems.add(f"{where}: LoRA factors for {E} experts do not fit {t.name} {list(t.shape)}")
                return
            d1, d2 = t.shape[1:]
            if (out_dim, in_dim) == (d1, d2) and (in_dim, out_dim) == (d1, d2):
                transpose = model_type in TRANSPOSED_EXPERTS  # square: only the architecture can tell
            elif (out_dim, in_dim) == (d1, d2):
                transpose = False
            elif (in_dim, out_dim) == (d1, d2):
                transpose = True
            else:
                problems.add(f"{where}: lora_A {list(self.a_shape)} / lora_B {list(self.b_shape)} do not fit "
                             f"{t.name} {list(t.shape)}")
                return
            t.ops.append(LoraExperts(self.a, self.b, self.scale, where, E, transpose))
            return
        parts = self.disk.parts
        rows = out_dim // len(parts)
        if rows * len(parts) != out_dim:
            problems.add(f"{where}: lora_B has {out_dim} rows, not divisible into {', '.join(parts)}")
            return
        if E != self.disk.shape[0]:
            problems.add(f"{where}: LoRA factors for {E} experts, the base has {self.disk.shape[0]} "
                         f"({self.module}.N.{parts[0]}.weight)")
            return
        for e in range(E):
            for i, part in enumerate(parts):
                t = target(f"{self.module}.{e}.{part}.weight")
                if t is None:
                    continue
                if t.shape != (rows, in_dim):
                    problems.add(f"{where}: expert {e} {part} is {list(t.shape)} on disk, the LoRA delta gives "
                                 f"{[rows, in_dim]}")
                    continue
                t.ops.append(LoraRows(self.a, self.b, self.scale, where, expert=e, experts=E,
                                      b_rows=(i * rows, (i + 1) * rows)))


def _split_param_modules(modules: dict[str, _Module], cfg, adapter: Adapter, find,
                         problems: _Problems) -> list[_FusedParam]:
    """Take the LoRA pairs of PEFT's ParamWrappers (target_parameters) out of `modules`.

    A module is a ParamWrapper when target_parameters selects one of its parameters that exists in the base; its
    nested wrappers (`.base_layer` repeated) belong to its other selected parameters (spec §12).
    """
    roots: dict[str, list[tuple[int, _Module]]] = defaultdict(list)
    for name in list(modules):
        root, depth = name, 0
        while root.endswith(".base_layer"):
            root, depth = root[: -len(".base_layer")], depth + 1
        if _targeted_params(root, cfg.target_parameters, find):
            roots[root].append((depth, modules.pop(name)))
        elif depth:
            m = modules.pop(name)
            problems.add(f"{name}: nested LoRA pair ({', '.join(sorted(m.roles.values()))}) for target_parameters, "
                         f"but no parameter of {root} that target_parameters {list(cfg.target_parameters)} names "
                         "exists in the base")
    fused = []
    for root, wrapped in roots.items():
        params = _targeted_params(root, cfg.target_parameters, find)
        pairs: dict[int, _Module] = {}
        for depth, m in wrapped:
            if set(m.roles) != {"A", "B"}:
                extra = sorted(set(m.roles) - {"A", "B"})
                problems.add(f"{m.name}: target_parameters supports lora_A/lora_B only, found {extra or 'a half pair'}")
                continue
            pairs[depth] = m
        if len(pairs) != len(wrapped):
            continue
        if sorted(pairs) != list(range(len(params))):
            problems.add(f"{root}: LoRA pairs at nesting depth(s) {sorted(pairs)} but target_parameters selects "
                         f"{len(params)} parameter(s) of it ({', '.join(params)}); PEFT nests one wrapper per "
                         "parameter, so the adapter file is incomplete or for another model")
            continue
        order = _registration_order(root, pairs, params, cfg, adapter, problems)
        if order is None:
            continue
        n = len(order)
        for depth, m in sorted(pairs.items()):
            param = order[n - 1 - depth]
            name = f"{root}.{param}"
            a_shape, b_shape = adapter.shapes[m.roles["A"]], adapter.shapes[m.roles["B"]]
            r = cfg.resolve_r(name)
            fused.append(_FusedParam(root, param, m.roles["A"], m.roles["B"], a_shape, b_shape, r,
                                     cfg.scaling(name, r), a_shape[0] // r, params[param]))
    return fused


def _registration_order(root: str, pairs: dict[int, _Module], params: dict[str, _ParamOnDisk], cfg,
                        adapter: Adapter, problems: _Problems) -> tuple[str, ...] | None:
    """The order PEFT wrapped `params` in (innermost first), from the shapes of the nested LoRA pairs."""
    def shapes(depth: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        m = pairs[depth]
        return adapter.shapes[m.roles["A"]], adapter.shapes[m.roles["B"]]

    def fits(depth: int, param: str) -> bool:
        (a, b), on_disk = shapes(depth), params[param]
        r = cfg.resolve_r(f"{root}.{param}")
        if len(a) != 2 or len(b) != 2 or a[0] != b[1] or r <= 0 or a[0] % r:
            return False
        experts, io, w = a[0] // r, (b[0], a[1]), on_disk.shape
        if len(w) == 2:
            return experts == 1 and io == w
        transposed_ok = on_disk.family == "fused"  # [E, in, out] exists only fused on disk (GPT-OSS, qwen3_vl_moe)
        return len(w) == 3 and w[0] == experts and (io == w[1:] or transposed_ok and io[::-1] == w[1:])

    n = len(params)
    if n > MAX_NESTED:
        problems.add(f"{root}: target_parameters selects {n} parameters of one module; at most {MAX_NESTED} are "
                     "supported")
        return None
    fitting = [order for order in permutations(params) if all(fits(d, order[n - 1 - d]) for d in pairs)]
    if len(fitting) == 1:
        return fitting[0]
    described = "; ".join(f"{pairs[d].roles['A']} {list(shapes(d)[0])} / lora_B {list(shapes(d)[1])}"
                          for d in sorted(pairs))
    disk = ", ".join(f"{p} {list(params[p].shape)}" for p in params)
    if not fitting:
        problems.add(f"{root}: the LoRA pairs ({described}) do not fit its parameters ({disk}) with the ranks of "
                     "adapter_config.json (r / rank_pattern)")
        return None
    known = tuple(p for p in REGISTRATION_ORDER if p in params)
    if len(known) == n and known in fitting:
        return known
    raise UnsupportedError(
        f"{adapter.weights_path}: {root}: the nested LoRA pairs ({described}) fit its parameters ({disk}) in more "
        "than one order, and the order PEFT wrapped them in (the module's parameter registration order) is not "
        "known for these parameter names; merge this adapter with PEFT's merge_and_unload instead"
    )


def _targeted_params(module: str, targets: tuple[str, ...], find) -> dict[str, _ParamOnDisk]:
    """Parameters of `module` that target_parameters selects, as PEFT matches them: `<module>.<param>` equals a
    target or ends with `.<target>`, and the parameter exists. A bare name (`down_proj`) therefore selects only
    modules that own such a parameter, never a LoRA module whose name merely precedes it."""
    found: dict[str, _ParamOnDisk] = {}
    for t in targets:
        param = t.rsplit(".", 1)[-1]
        full = f"{module}.{param}"
        if param in found or not (full == t or full.endswith("." + t)):
            continue
        on_disk = find(module, param)
        if on_disk is not None:
            found[param] = on_disk
    return found


# ---------------------------------------------------------------------------------------------------------
# LoHa, LoKr, IA3, VeRA (spec §13): one formula per tensor, same streaming engine

_TYPE_ROLES = {
    "LOHA": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},
    "LOKR": {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"},
    "IA3": {"ia3_l"},
    "VERA": {"vera_lambda_b", "vera_lambda_d"},
}


def _plan_other_type(m: _Module, adapter: Adapter, cfg, model_type: str, target, to_disk, ckpt: Checkpoint,
                     problems: _Problems) -> None:
    roles, shapes = m.roles, adapter.shapes
    kind = cfg.peft_type
    allowed = _TYPE_ROLES.get(kind, set())
    stray = set(roles) - allowed
    if stray:
        if stray & {"hada_t1", "hada_t2", "lokr_t2"}:
            raise UnsupportedError(f"{adapter.weights_path}: {m.name} uses the CP-decomposed convolution form of "
                                   f"{kind} (use_effective_conv2d); merge it with PEFT")
        problems.add(f"{m.name}: {sorted(roles[r] for r in stray)} do not belong to a {kind} adapter")
        return
    t = target(f"{m.name}.weight")
    if t is None:
        return
    w = t.shape
    rows, cols = (w[0], math.prod(w[1:])) if w else (1, 1)
    conv1d = len(w) == 2 and model_type in CONV1D_MODEL_TYPES and not m.name.endswith("lm_head")
    name = m.name

    def need(*rs: str) -> bool:
        lack = [r for r in rs if r not in roles]
        if lack:
            problems.add(f"{name}: {kind} tensors {lack} are missing; the adapter file is incomplete")
        return not lack

    if kind == "LOHA":
        if not need("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
            return
        s1a, s1b, s2a, s2b = (shapes[roles[k]] for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        r = s1b[0] if len(s1b) == 2 else -1
        if not (len(s1a) == len(s2a) == 2 and s1a == s2a and s1b == s2b and s1a == (rows, r)
                and s1b[1] == cols) or conv1d:
            problems.add(f"{name}: hada_w1_a {list(s1a)} / hada_w1_b {list(s1b)} do not fit {t.name} {list(w)}")
            return
        if r != cfg.resolve_r(name):
            problems.add(f"{name}: LoHa rank {r} but adapter_config.json says r={cfg.resolve_r(name)}")
            return
        scale = cfg.resolve_alpha(name) / r
        t.ops.append(LohaRows(roles["hada_w1_a"], roles["hada_w1_b"], roles["hada_w2_a"], roles["hada_w2_b"],
                              scale, name))
    elif kind == "LOKR":
        w1 = ("lokr_w1",) if "lokr_w1" in roles else ("lokr_w1_a", "lokr_w1_b")
        w2 = ("lokr_w2",) if "lokr_w2" in roles else ("lokr_w2_a", "lokr_w2_b")
        if not need(*w1, *w2):
            return
        d1 = _factor_shape([shapes[roles[k]] for k in w1])
        d2 = _factor_shape([shapes[roles[k]] for k in w2])
        if d1 is None or d2 is None or conv1d or (d1[0] * d2[0], d1[1] * d2[1]) != (rows, cols):
            problems.add(f"{name}: LoKr factors {d1} x {d2} do not fit {t.name} {list(w)}")
            return
        # PEFT scales by alpha/r with the configured r even when w1/w2 are saved whole (spec §13)
        scale = cfg.resolve_alpha(name) / cfg.resolve_r(name)
        t.ops.append(LokrRows(tuple(roles[k] for k in w1), tuple(roles[k] for k in w2), scale, name))
    elif kind == "IA3":
        key = roles["ia3_l"]
        shape = shapes[key]
        if len(shape) != 2 or len(w) != 2:
            problems.add(f"{name}: ia3_l {list(shape)} on {t.name} {list(w)}: only Linear and Conv1D are supported")
            return
        eff = (shape[1], shape[0]) if conv1d else shape  # PEFT transposes l for fan_in_fan_out layers
        feedforward = shape[0] == 1 and shape[1] != 1  # [1, in] scales inputs; [out, 1] outputs (and the bias)
        axis = "rows" if eff[1] == 1 and eff[0] == rows else "cols" if eff[0] == 1 and eff[1] == cols else ""
        if not axis:
            problems.add(f"{name}: ia3_l {list(shape)} does not fit {t.name} {list(w)}")
            return
        t.ops.append(Ia3Scale(key, axis))
        bias = to_disk(f"{name}.bias")
        if not feedforward and bias in ckpt.tensors:
            bt = target(f"{name}.bias")
            if bt is not None and math.prod(bt.shape) == max(shape):
                bt.ops.append(Ia3Scale(key, "rows"))
    elif kind == "VERA":
        if not need("vera_lambda_b", "vera_lambda_d"):
            return
        a_shape, b_shape = adapter.shapes[VERA_SHARED[0]], adapter.shapes[VERA_SHARED[1]]
        out_dim, in_dim = (w[1], w[0]) if conv1d else (w[0], w[1]) if len(w) == 2 else (-1, -1)
        lb, ld = shapes[roles["vera_lambda_b"]], shapes[roles["vera_lambda_d"]]
        ok = (len(w) == 2 and len(a_shape) == 2 and len(b_shape) == 2 and a_shape[0] == b_shape[1] == ld[0]
              and lb == (out_dim,) and len(ld) == 1 and in_dim <= a_shape[1] and out_dim <= b_shape[0])
        if not ok:
            problems.add(f"{name}: vera_lambda_b {list(lb)} / vera_lambda_d {list(ld)} with vera_A {list(a_shape)} "
                         f"/ vera_B {list(b_shape)} do not fit {t.name} {list(w)}")
            return
        t.ops.append(VeraRows(roles["vera_lambda_b"], roles["vera_lambda_d"], conv1d, name))


def _factor_shape(shapes: list[tuple[int, ...]]) -> tuple[int, int] | None:
    """Shape of a LoKr factor saved whole ([m, n]) or as `a @ b` ([m, k] @ [k, n]); None for other forms."""
    if len(shapes) == 1 and len(shapes[0]) == 2:
        return shapes[0]
    if len(shapes) == 2 and all(len(x) == 2 for x in shapes) and shapes[0][1] == shapes[1][0]:
        return shapes[0][0], shapes[1][1]
    return None
