"""build_plan: match every adapter tensor to the checkpoint and check every shape before any byte is written.

Group the adapter's keys into modules, let the adapter type's tuner take what it plans apart, choose the one
layout that places every touched tensor, then plan replacements, each module (through its tuner) and the tie
decisions. Every adapter key is consumed exactly once; anything left over, ambiguous or mis-shaped is reported in a
single PlanError.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import AdapterError, PlanError, UnsupportedError
from ..io.sidefiles import config_values, read_base_config
from ..layouts import (
    LayoutChoice,
    choose_layout,
    derived_layout,
    transformers_available,
)
from ..options import output_dtype
from ..tuners import TUNERS
from ..tuners.base import Claim, ModuleKeys, PlanContext, Tuner
from .keys import fold_wrapper_copies, group_keys
from .model import OutTensor, Plan, Problems
from .quantized import view as quantized_view
from .replacements import plan_replacements
from .tied import Tie, find_input_embedding, head_clones, settle

if TYPE_CHECKING:
    from ..adapter import Adapter
    from ..io.checkpoint import Checkpoint


def build_plan(ckpt: Checkpoint, adapter: Adapter, *, dtype: str = "bf16", loader: str = "auto") -> Plan:
    """Match, check and plan the whole merge from headers and configs only."""
    # a quantized base is planned through its logical (dequantized) tensors
    base_config = read_base_config(ckpt.root)
    quant = quantized_view(ckpt, base_config)
    plan = plan_logical(ckpt if quant is None else quant.checkpoint, adapter, dtype=dtype, loader=loader,
                        base_config=base_config)
    if quant is not None:
        quant.finish(plan, dtype)
    return plan


def plan_logical(ckpt: Checkpoint, adapter: Adapter, *, dtype: str = "bf16", loader: str = "auto",
                 base_config: dict[str, Any] | None = None) -> Plan:
    """`build_plan` on a full-precision checkpoint, or on a quantized one's logical view (`quantized.view`) before
    its `finish` says where each tensor's rows come from. `base_config`: config.json, when already read."""
    cfg = adapter.config
    tuner = TUNERS[cfg.peft_type]
    if base_config is None:
        base_config = read_base_config(ckpt.root)
    problems = Problems()
    modules, replacements = group_keys(_module_keys(adapter, tuner), adapter.weights_path, problems)
    cfg.prime(list(modules))
    notes = fold_wrapper_copies(replacements, adapter)
    claims: list[Claim] = list(tuner.claim(modules, adapter, ckpt.tensors, loader, problems)) if tuner.claim else []
    if tuner.check_keys is not None:
        tuner.check_keys(modules, adapter, problems)

    wanted = _wanted(modules, replacements, claims)
    tie_flags = config_values(base_config, "tie_word_embeddings")
    tied_config = bool(tie_flags[0]) if tie_flags else False
    optional = {n for n in wanted if n.split(".")[-2:-1] == ["lm_head"]} if tied_config else set()
    layout = _choose(ckpt, adapter, loader, wanted, optional, problems).layout
    to_disk = layout.to_disk

    input_embedding = find_input_embedding(ckpt.tensors, to_disk)
    # tied on disk: the config says so and the checkpoint stores no output embedding of its own
    tie = (Tie(input_embedding, optional, to_disk) if tied_config and input_embedding is not None
           and to_disk("lm_head.weight") not in ckpt.tensors else None)
    out = {name: OutTensor(name, output_dtype(dtype, info.dtype), info.shape, info)
           for name, info in ckpt.tensors.items()}
    ctx = PlanContext(adapter, cfg, str(base_config.get("model_type", "")), ckpt.tensors, to_disk,
                      _targets(out, tie, to_disk, problems), problems, loader, layout.parts or {})

    plan_replacements(replacements, ctx, tie, input_embedding, dtype, notes)
    skip = head_clones(tie, modules, adapter, problems) if tie is not None else set()
    _plan_modules(tuner, modules, skip, ctx)
    for claim in claims:
        claim.plan(ctx)
    problems.raise_if_any(adapter.weights_path, ckpt.root)

    config_updates: dict[str, object] = {}
    new_tensors: list[str] = []
    if tie is not None:
        settle(tie, out, ckpt.tensors[tie.input_embedding], cfg.ensure_weight_tying, notes, config_updates)
        new_tensors = tie.new_tensors
    if input_embedding is not None and out[input_embedding].replacement is not None:
        vocab = out[input_embedding].shape[0]
        if vocab not in config_values(base_config, "vocab_size"):
            config_updates["vocab_size"] = vocab
            notes.append(f"vocabulary resized to {vocab} rows by the adapter")
    tensors = [out[n] for n in ckpt.tensors] + [out[n] for n in new_tensors]
    return Plan(tensors, layout.name, config_updates, notes, len(adapter.shapes))


def _module_keys(adapter: Adapter, tuner: Tuner) -> list[str]:
    """The adapter's keys without the model-level ones its type saves once (VeRA's projections)."""
    keys = list(adapter.shapes)
    if tuner.shared_keys:
        missing = [k for k in tuner.shared_keys if k not in adapter.shapes]
        if missing:
            raise AdapterError(f"{adapter.weights_path}: {tuner.peft_type} adapter without {missing}; "
                               f"{tuner.missing_shared_hint}")
        keys = [k for k in keys if k not in tuner.shared_keys]
    return keys


def _wanted(modules: dict[str, ModuleKeys], replacements: dict[str, str], claims: list[Claim]) -> list[str]:
    """Every module-side tensor name the adapter touches."""
    from ..tuners import all_roles

    param = {r.role: r.param for r in all_roles()}
    wanted: list[str] = []
    for m in modules.values():
        params = {param.get(role) for role in m.roles}
        wanted += [f"{m.name}.{p}" for p in ("weight", "bias") if p in params]
    wanted += list(replacements)
    for claim in claims:
        wanted += claim.names
    return wanted


def _choose(ckpt: Checkpoint, adapter: Adapter, loader: str, wanted: list[str], optional: set[str],
            problems: Problems) -> LayoutChoice:
    """The one layout that places every wanted tensor, or a PlanError saying what could not be placed."""
    choice, rivals = choose_layout(wanted, ckpt.tensors, loader, optional=optional,
                                   derive=lambda: derived_layout(ckpt.root, ckpt.tensors))
    if rivals:
        alts = ", ".join(sorted({c.layout.name for c in rivals}))
        raise PlanError(
            f"adapter {adapter.weights_path}: its module names fit base {ckpt.root} in more than one way "
            f"(layouts {choice.layout.name}, {alts}); pass --loader to say which"
        )
    if choice.missing:
        tried = f"--loader {loader}" if loader != "auto" else "every known --loader layout"
        for n in choice.missing:
            problems.add(f"{n}: no tensor {choice.layout.to_disk(n)} in the base")
        problems.hint = (f"the adapter is for another model (tried {tried}); check --base, or pass the --loader "
                         "that matches the checkpoint's naming")
        if loader == "auto" and not transformers_available():
            problems.hint += (". transformers is not installed: with it (pip install 'streammerge[transformers]') "
                              "streammerge also tries the base's own renamings, which place checkpoints saved under "
                              "legacy names (e.g. transformer.h.N..., backbone.*) and fused tensors")
        problems.raise_if_any(adapter.weights_path, ckpt.root)
    return choice


def _targets(out: dict[str, OutTensor], tie: Tie | None, to_disk: Callable[[str], str],
             problems: Problems) -> Callable[[str], OutTensor | None]:
    def target(module_tensor: str) -> OutTensor | None:
        disk = to_disk(module_tensor)
        if disk in out:
            return out[disk]
        head = tie.head_for(module_tensor, out) if tie is not None else None
        if head is None:
            problems.add(f"{module_tensor}: no tensor {disk} in the base")
        return head

    return target


def _plan_modules(tuner: Tuner, modules: dict[str, ModuleKeys], skip: set[str], ctx: PlanContext) -> None:
    """Each module through the adapter type's tuner, after checking every tensor belongs to that type."""
    refused = {role: why for t in TUNERS.values() for role, why in t.refused_roles.items()}
    where = ctx.adapter.weights_path
    for m in modules.values():
        if m.name in skip:
            continue
        part = ctx.parts.get(f"{m.name}.weight") or ctx.parts.get(f"{m.name}.bias")
        if part is not None:
            if tuner.plan_part is None:
                raise UnsupportedError(f"{where}: {m.name} is cut out of the fused checkpoint tensor {part.disk} on "
                                       f"load ({part.how}); a {tuner.peft_type} adapter cannot be merged into its "
                                       "rows: not supported, merge it with PEFT instead")
            tuner.plan_part(m, part, ctx)
            continue
        stray = set(m.roles) - tuner.role_names
        if stray & refused.keys():
            why = refused[sorted(stray & refused.keys())[0]]
            raise UnsupportedError(f"{where}: {m.name} uses {why}; merge it with PEFT")
        if stray:
            ctx.problems.add(f"{m.name}: {sorted(m.roles[r] for r in stray)} do not belong to a {tuner.peft_type} "
                             "adapter")
            continue
        tuner.plan_module(m, ctx)

