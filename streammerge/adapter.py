"""Reading PEFT LoRA adapters: adapter_config.json and the weights, lazily.

Weights are never loaded as a whole: safetensors adapters are memory-mapped through the same strict header
reader as the base, `.bin` adapters go through `torch.load(weights_only=True, mmap=True)` so a pickle can never
execute code.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import AdapterError, MissingFileError, NumericError, UnsupportedError
from .io.reader import TensorReader
from .io.safetensors import TensorInfo, read_header
from .kernels import nonfinite_count
from .patterns import PATTERN_SECONDS, PatternMatcher, PatternTimeout
from .tuners import TUNERS

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")

# Fields of every PEFT config (up to 0.21) that are metadata or only matter at injection/training time; each tuner
# adds the fields of its own type (streammerge.tuners).
_COMMON_FIELDS = {
    "auto_mapping", "base_model_name_or_path", "revision", "task_type", "inference_mode", "peft_version",
    "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "runtime_config", "peft_type",
    "modules_to_save", "ensure_weight_tying", "save_embedding_layers", "tied_target_modules", "modules_to_tie",
}


def _known_fields() -> set[str]:
    return _COMMON_FIELDS.union(*(t.config_fields for t in TUNERS.values()))


# float32 factors kept by Adapter.factor: enough for the A and B of two fused expert parameters at once
FACTOR_CACHE = 8

# init_lora_weights values that rewrite the base weight when PEFT loads the adapter (spec §2.3): merging them
# into the original base gives different numbers from what was trained.
_BASE_MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@dataclass(frozen=True)
class AdapterConfig:
    """The merge-relevant fields of adapter_config.json, with PEFT's defaults for missing ones."""

    path: Path
    raw: dict[str, Any]
    peft_type: str
    r: int
    lora_alpha: float
    use_rslora: bool
    use_dora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    fan_in_fan_out: bool
    modules_to_save: tuple[str, ...]
    ensure_weight_tying: bool
    trainable_token_indices: Any
    target_parameters: tuple[str, ...]
    feedforward_modules: Any = None
    # PEFT's pattern rule, with slow keys matched in bounded time (patterns.py)
    _matcher: PatternMatcher = field(default_factory=PatternMatcher, repr=False, compare=False)

    def resolve_r(self, name: str) -> int:
        """r for a module name with PEFT >= 0.15's pattern rule (first key in file order wins)."""
        key = self._pattern_key("rank_pattern", self.rank_pattern, name)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def resolve_alpha(self, name: str) -> float:
        key = self._pattern_key("alpha_pattern", self.alpha_pattern, name)
        return float(self.alpha_pattern[key]) if key is not None else self.lora_alpha

    def prime(self, names: list[str]) -> None:
        """Match the slow pattern keys against these module names at once (one child process per key)."""
        try:
            self._matcher.prime([*self.rank_pattern, *self.alpha_pattern], names)
        except PatternTimeout as e:
            raise self._slow(e.key, f"the {len(names)} module names") from None

    def _pattern_key(self, field_name: str, patterns: dict[str, Any], name: str) -> str | None:
        try:
            return self._matcher.first(patterns, name)
        except PatternTimeout as e:
            raise self._slow(e.key, f"module {name}", field_name) from None

    def _slow(self, key: str, against: str, field_name: str | None = None) -> AdapterError:
        field_name = field_name or ("rank_pattern" if key in self.rank_pattern else "alpha_pattern")
        return AdapterError(
            f"{self.path}: {field_name} key {key!r} cannot be matched against {against} in "
            f"{PATTERN_SECONDS:g} s: the regex backtracks catastrophically (PEFT would hang on it too); "
            "rewrite it without nested or repeated alternatives, e.g. list the module names"
        )

    def scaling(self, name: str, r: int) -> float:
        """PEFT's `s`: alpha/r, or alpha/sqrt(r) with rsLoRA, alpha resolved per module."""
        alpha = self.resolve_alpha(name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


@dataclass
class Adapter:
    """A PEFT adapter: its config and lazily readable tensors (name -> shape/dtype known up front)."""

    root: Path
    config: AdapterConfig
    weights_path: Path
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    _infos: dict[str, TensorInfo] = field(default_factory=dict, repr=False)
    _loaded: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _reader: TensorReader | None = field(default=None, repr=False)
    _factors: OrderedDict[str, torch.Tensor] = field(default_factory=OrderedDict, repr=False)
    _asked: set[str] = field(default_factory=set, repr=False)

    def get(self, key: str) -> torch.Tensor:
        """The tensor stored under `key` (a zero-copy view where possible)."""
        if key in self._loaded:
            return self._loaded[key]
        if self._reader is None:
            self._reader = TensorReader()
        return self._reader.tensor(self._infos[key])

    def get_f32(self, key: str) -> torch.Tensor:
        if key in self._loaded:
            return self._loaded[key].to(torch.float32)
        # read, not mapped: a file changed during the merge is then an error, not a SIGBUS
        return self.read_rows(key, 0, self._infos[key].rows).to(torch.float32)

    def read_rows(self, key: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [start, stop) of tensor `key`, read into `out` when given (see TensorReader.read_rows)."""
        if key in self._loaded:
            t = self._loaded[key]
            return t[start:stop] if t.dim() else t
        if self._reader is None:
            self._reader = TensorReader()
        return self._reader.read_rows(self._infos[key], start, stop, out)

    def factor(self, key: str) -> torch.Tensor:
        """`key` as float32, checked once for NaN/Inf.

        The last few are kept: fused MoE factors serve every expert's tensor in turn (E x 3 output tensors per
        layer), and converting and scanning them again for each would be wasted passes over the whole tensor.
        """
        t = self._factors.pop(key, None)
        if t is None:
            t = self.get_f32(key)
            bad = nonfinite_count(t)
            if bad:
                raise NumericError(f"{self.weights_path}: adapter tensor {key} has {bad} NaN/Inf values (training "
                                   "diverged?); use an earlier checkpoint of the adapter")
        self._factors[key] = t
        self._asked.add(key)
        while len(self._factors) > FACTOR_CACHE:
            self._factors.popitem(last=False)
        return t

    def trim_factors(self) -> None:
        """Forget the kept factors not asked for since the last trim. A batch merging many adapters at once trims
        each after every tensor, so it keeps only what the current tensor uses (consecutive expert tensors that
        share fused factors still find them)."""
        for key in [k for k in self._factors if k not in self._asked]:
            del self._factors[key]
        self._asked.clear()

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


def load_adapter_config(root: Path) -> AdapterConfig:
    """Read and validate adapter_config.json; refuse what cannot be merged into a checkpoint."""
    path = root / CONFIG_NAME
    raw = _read_json(path)
    peft_type = str(raw.get("peft_type", "LORA")).upper()
    tuner = TUNERS.get(peft_type)
    if tuner is None:
        raise UnsupportedError(
            f"{path}: peft_type {peft_type!r} is not supported (streammerge merges {', '.join(TUNERS)} "
            "adapters); merge it with PEFT's merge_and_unload instead"
        )
    if tuner.check_config is not None:
        tuner.check_config(path, raw)
    _refuse_unmergeable(path, raw)
    unknown = sorted(set(raw) - _known_fields())
    if unknown:
        warnings.warn(
            f"{path}: unknown adapter_config fields {unknown} (from another PEFT version?) were ignored",
            stacklevel=2,
        )

    def typed(name: str, kind: type | tuple[type, ...], default: Any) -> Any:
        return _typed(path, raw, name, kind, default)

    rank_pattern, alpha_pattern = typed("rank_pattern", dict, {}), typed("alpha_pattern", dict, {})
    _check_patterns(path, rank_pattern, alpha_pattern)
    modules_to_save = raw.get("modules_to_save") or ()
    target_parameters = raw.get("target_parameters") or ()
    if not isinstance(target_parameters, (list, tuple)) or not all(isinstance(t, str) for t in target_parameters):
        raise AdapterError(f"{path}: field 'target_parameters' has value {target_parameters!r}; expected a list of "
                           "parameter names; fix adapter_config.json")
    return AdapterConfig(
        path=path,
        raw=raw,
        peft_type=peft_type,
        r=typed("r", int, 8),
        lora_alpha=float(typed(tuner.alpha_field, (int, float), 8)),
        use_rslora=bool(raw.get("use_rslora", False)),
        use_dora=bool(raw.get("use_dora", False)),
        rank_pattern=rank_pattern,
        alpha_pattern={k: float(v) for k, v in alpha_pattern.items()},
        fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
        modules_to_save=(tuple(modules_to_save) if isinstance(modules_to_save, (list, tuple))
                         else (str(modules_to_save),)),
        ensure_weight_tying=bool(raw.get("ensure_weight_tying", False)),
        trainable_token_indices=raw.get("trainable_token_indices"),
        target_parameters=tuple(target_parameters),
        feedforward_modules=raw.get("feedforward_modules"),
    )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise MissingFileError(
            f"{path}: no adapter_config.json in the adapter folder; point --adapter at the folder PEFT's "
            "save_pretrained wrote (adapters saved under a name live in a sub-folder of that name)"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e}); re-save or re-download the adapter") from e
    except RecursionError:
        raise AdapterError(f"{path}: JSON nested too deeply to be an adapter config; re-save or re-download the "
                           "adapter") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{path}: expected a JSON object; re-save or re-download the adapter")
    return raw


def _typed(path: Path, raw: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any) -> Any:
    """A number or object field: PEFT's default when missing; an explicit null fails in PEFT too."""
    value = raw.get(name, default)
    if value is None and name in raw:
        need = "an object ({} for none)" if kind is dict else "a number"
        raise AdapterError(f"{path}: field {name!r} is null, where PEFT needs {need} and cannot load the adapter "
                           "either; set it to the value the adapter was trained with")
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, (int, float))):
        raise AdapterError(f"{path}: field {name!r} has value {value!r}; expected {kind}; fix adapter_config.json")
    return value


def _check_patterns(path: Path, rank_pattern: dict[str, Any], alpha_pattern: dict[str, Any]) -> None:
    for pname, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        for key, value in pattern.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise AdapterError(f"{path}: {pname}[{key!r}] = {value!r} is not a number; fix adapter_config.json")
            try:
                re.compile(key)
            except re.error as e:
                raise AdapterError(f"{path}: {pname} key {key!r} is not a valid regex ({e})") from e


def _refuse_unmergeable(path: Path, raw: dict[str, Any]) -> None:
    def refuse(what: str, fix: str) -> None:
        raise UnsupportedError(f"{path}: {what}; {fix}")

    if raw.get("enable_lora") is not None:
        refuse("PEFT < 0.3 MergedLinear adapter (enable_lora)", "re-save it with a current PEFT version")
    if raw.get("layer_replication"):
        refuse(
            "layer_replication duplicates layers that share one base weight, so the adapter cannot be merged "
            "into the original checkpoint",
            "merge with PEFT and save the expanded model instead",
        )
    if raw.get("alora_invocation_tokens"):
        refuse("aLoRA adapters (alora_invocation_tokens) activate per token and cannot be merged", "serve it unmerged")
    for name in ("arrow_config", "kasa_config", "use_bdlora"):
        if raw.get(name):
            refuse(f"{name} is set; this LoRA variant is not supported", "merge it with PEFT")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_MUTATING_INITS):
        refuse(
            f"init_lora_weights={init!r} rewrites the base weights when the adapter is loaded, so merging it "
            "into the original base gives other numbers than were trained",
            "convert it first with PEFT's save_pretrained(..., path_initial_model_for_weight_conversion=...)",
        )


def load_adapter(root: Path | str) -> Adapter:
    """Open a PEFT adapter folder: config plus lazily readable weights."""
    root = Path(root)
    if not root.is_dir():
        raise MissingFileError(f"{root}: adapter folder not found; pass a local folder or a Hugging Face repo id")
    config = load_adapter_config(root)
    st_path, bin_path = (root / n for n in WEIGHT_NAMES)
    if st_path.is_file():
        infos, _ = read_header(st_path)
        return Adapter(
            root=root,
            config=config,
            weights_path=st_path,
            shapes={k: i.shape for k, i in infos.items()},
            dtypes={k: i.torch_dtype for k, i in infos.items()},
            _infos=dict(infos),
        )
    if bin_path.is_file():
        tensors = _load_bin(bin_path)
        return Adapter(
            root=root,
            config=config,
            weights_path=bin_path,
            shapes={k: tuple(t.shape) for k, t in tensors.items()},
            dtypes={k: t.dtype for k, t in tensors.items()},
            _loaded=tensors,
        )
    raise MissingFileError(
        f"{root}: no adapter_model.safetensors or adapter_model.bin; the adapter folder is incomplete, re-download it"
    )


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        # weights_only refuses any pickle that would import or call code; mmap keeps big adapters off the heap.
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise _bin_error(path, e) from e
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e2:
            raise _bin_error(path, e2) from e2
    except Exception as e:
        raise _bin_error(path, e) from e
    tensors_only = isinstance(data, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in data.items())
    if not tensors_only:
        raise AdapterError(f"{path}: expected a dict of tensors; re-save the adapter with PEFT (safetensors preferred)")
    return data


def _bin_error(path: Path, e: BaseException) -> AdapterError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return AdapterError(
        f"{path}: cannot be loaded safely ({first[:200]}); only plain tensor pickles are read "
        "(torch.load weights_only=True); re-save the adapter as adapter_model.safetensors"
    )
