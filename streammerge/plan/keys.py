"""Adapter keys -> modules: strip PEFT's prefix, split each key into module name and role by exact suffix (the
suffixes every tuner declares), and set aside full replacements (`modules_to_save`, `base_layer.*`, bias="all")."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import AdapterError
from ..layouts import token_adapter_owner, wrapper_copy
from ..tuners import all_roles
from ..tuners.base import ModuleKeys, ProblemSink, Role

if TYPE_CHECKING:
    from ..adapter import Adapter

PREFIX = "base_model.model."

# the wrapped module's own tensors, saved beside its adapter: they replace the checkpoint's (spec §10.3, §9)
_BASE_LAYER = (Role(".base_layer.weight", "base_weight"), Role(".base_layer.bias", "base_bias", "bias"))


def split_key(key: str, roles: list[Role]) -> tuple[str, str | None]:
    """(module name, role) for an adapter key, or (key, None) for a full-replacement tensor."""
    for r in roles:
        if key.endswith(r.suffix):
            return key[: -len(r.suffix)], r.role
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


def group_keys(keys: list[str], where: Path, problems: ProblemSink) -> tuple[dict[str, ModuleKeys], dict[str, str]]:
    """(module name -> its adapter tensors by role, module-side tensor name -> adapter key of a replacement)."""
    roles = sorted([*all_roles(), *_BASE_LAYER], key=lambda r: -len(r.suffix))
    modules: dict[str, ModuleKeys] = {}
    replacements: dict[str, str] = {}
    for key, short in strip_prefix(keys, where).items():
        mod, role = split_key(short, roles)
        if role is None:
            replacements[short] = key
            continue
        m = modules.setdefault(mod, ModuleKeys(mod))
        if role in m.roles:
            problems.add(f"{mod}: two tensors for {role} ({m.roles[role]}, {key})")
        m.roles[role] = key
    # (`X.token_adapter.base_layer.weight` is embedding X, saved beside its trainable tokens)
    for m in modules.values():
        for r in _BASE_LAYER:
            if r.role in m.roles:
                target = f"{token_adapter_owner(m.name)}.{r.param}"
                if target in replacements:
                    problems.add(f"{target}: saved twice ({replacements[target]}, {m.roles[r.role]})")
                replacements[target] = m.roles.pop(r.role)
    return {n: m for n, m in modules.items() if m.roles}, replacements


def same_values(adapter: Adapter, k1: str, k2: str) -> bool:
    """Whether two adapter tensors hold the same values (compared through their memory maps)."""
    return adapter.shapes[k1] == adapter.shapes[k2] and torch.equal(adapter.get(k1), adapter.get(k2))


def fold_wrapper_copies(replacements: dict[str, str], adapter: Adapter) -> list[str]:
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
        if kind == "trained" and not same_values(adapter, key, main):
            raise AdapterError(f"{where}: {key} and {main} should both hold the trained copy but differ (PEFT would "
                               f"load {main} and ignore {key}); the adapter file is inconsistent, re-save it with "
                               "PEFT's save_pretrained")
        if module not in checked:
            checked.append(module)
    return [f"{m}: the modules_to_save wrapper's copies saved with its embedding layer were checked; the trained "
            "copy is merged" for m in checked]
