"""How module names in an adapter map onto tensor names in a checkpoint on disk.

PEFT saves adapter keys under *module* names of the class it was trained with; checkpoints on disk keep the
names of the class that wrote them, and transformers renames between the two on load (spec §14). A layout is an
ordered list of regex rewrites from module names to disk names, applied in turn (like transformers'
`WeightRenaming`s). `auto` tries every layout and keeps the one that places every adapter tensor; two layouts
that both fit but disagree are an error, never a guess.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from .derived import FusedPart, derived_layout, transformers_available

__all__ = [
    "CONV1D_MODEL_TYPES", "INPUT_EMBEDDING_SUFFIXES", "LAYOUTS", "LOADER_CHOICES", "MOE_RULES", "PER_EXPERT",
    "REGISTRATION_ORDER", "TRANSPOSED_EXPERTS", "FusedPart", "Layout", "LayoutChoice", "candidates", "choose_layout",
    "conv1d_layer", "derived_layout", "token_adapter_owner", "transformers_available", "wrapper_copy",
]

Rule = tuple[str, str]

_VLM_TOP = r"(?!language_model\.|visual\.|vision_tower\.|multi_modal_projector\.|vision_model\.)"

# name -> rewrite rules (module name -> disk name). The plain layout has none.
LAYOUTS: dict[str, tuple[Rule, ...]] = {
    "causal-lm": (),
    # Qwen3.5 / Qwen3_5ForConditionalGeneration (and Qwen3-VL, Gemma3n on disk): the text model lives under
    # model.language_model, so an adapter trained through AutoModelForCausalLM (model.layers.N...) needs the prefix.
    "qwen3.5": ((rf"^model\.{_VLM_TOP}", "model.language_model."),),
    # LLaVA family, Gemma3, Mistral3, ... as written on disk (transformers reverses its renames on save):
    # language_model.model.*, language_model.lm_head, vision_tower.*, multi_modal_projector.*
    "llava": (
        (r"^model\.language_model\.", "language_model.model."),
        (r"^model\.vision_tower\.", "vision_tower."),
        (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
        (r"^lm_head\.", "language_model.lm_head."),
        (rf"^model\.{_VLM_TOP}", "language_model.model."),
    ),
    # Qwen2-VL / Qwen2.5-VL on disk: model.* is the text model, visual.* the vision tower.
    "qwen2-vl": (
        (r"^model\.language_model\.", "model."),
        (r"^model\.visual\.", "visual."),
    ),
    # an adapter trained on a vision-language class, merged into a text-only checkpoint.
    "vlm-to-text": ((r"^model\.language_model\.", "model."),),
    # an adapter created on the inner model (get_peft_model(model.model, ...)): layers.N... -> model.layers.N...
    "inner-model": ((r"^(?!model\.|lm_head\.)", "model."),),
}

# Mixtral-family checkpoints keep `block_sparse_moe` on disk; transformers 5 modules say `mlp` (spec §14.3).
MOE_RULES: tuple[Rule, ...] = ((r"\.mlp\.(experts|gate)\.", r".block_sparse_moe.\1."),)

LOADER_CHOICES = ("auto", *LAYOUTS)

# model types whose linear layers are transformers' Conv1D ([in, out] weights, spec §5)
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp", "convbert"})
# disk names of input embeddings, for tied checkpoints
INPUT_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "shared.weight")

# MoE experts (spec §12). How a fused expert parameter is stored on disk when the checkpoint keeps experts apart:
# [(per-expert tensor names, in the order their rows make up the fused parameter)]
PER_EXPERT = {
    "gate_up_proj": (("w1", "w3"), ("gate_proj", "up_proj")),
    "down_proj": (("w2",), ("down_proj",)),
}
# The order transformers 5 registers expert parameters in (every experts class it ships follows it). Where PEFT
# nests several wrappers on one module the first parameter in registration order is innermost; checkpoints do not
# record that order (safetensors stores names sorted), so it only breaks ties the LoRA shapes leave open.
REGISTRATION_ORDER = ("gate_up_proj", "gate_up_proj_bias", "gate_proj", "up_proj", "down_proj", "down_proj_bias")
# model types whose fused expert tensors on disk are [E, in, out]: experts built with `is_transposed` (GPT-OSS,
# Aria) or transposed by transformers on load (qwen3_vl_moe). Shapes tell the orientation unless the experts are
# square; then these are transposed and every other model has transformers 5's own [E, out, in] layout.
TRANSPOSED_EXPERTS = frozenset({"gpt_oss", "aria", "aria_text", "openai_privacy_filter", "qwen3_vl_moe",
                                "qwen3_vl_moe_text"})


def conv1d_layer(model_type: str, module: str) -> bool:
    """Whether `module`'s weight is a transformers Conv1D ([in, out]) in a model of `model_type`."""
    return model_type in CONV1D_MODEL_TYPES and not module.endswith("lm_head")

# PEFT wrapper infixes that reach saved keys. A modules_to_save module whose embedding is also saved as an embedding
# layer (save_embedding_layers, spec §10.4) keeps its wrapper's submodules in the key: `X.modules_to_save.P` is the
# trained copy again, `X.original_module.P` the untrained module; `X.P` is the trained copy PEFT loads.
WRAPPER_COPIES = {"modules_to_save": "trained", "original_module": "original"}
# trainable tokens (TrainableTokensWrapper): the embedding saved as an embedding layer is `X.token_adapter.base_layer.P`
TOKEN_ADAPTER = "token_adapter"


def wrapper_copy(name: str) -> tuple[str, str] | None:
    """(`X.P`, "trained" | "original") for a saved `X.modules_to_save.P` / `X.original_module.P`; else None."""
    parts = name.split(".")
    hits = [i for i, p in enumerate(parts) if p in WRAPPER_COPIES]
    if len(hits) != 1 or hits[0] in (0, len(parts) - 1):
        return None
    i = hits[0]
    return ".".join(parts[:i] + parts[i + 1:]), WRAPPER_COPIES[parts[i]]


def token_adapter_owner(module: str) -> str:
    """The embedding a `X.token_adapter` module name belongs to (`X`), or `module` itself."""
    head, _, last = module.rpartition(".")
    return head if last == TOKEN_ADAPTER and head else module


@dataclass(frozen=True)
class Layout:
    """A named set of rewrites from module names to checkpoint names (or an explicit map of them)."""

    name: str
    rules: tuple[Rule, ...]
    names: Mapping[str, str] | None = None  # module name -> disk name, from transformers (derived_layout)
    parts: Mapping[str, FusedPart] | None = None  # module tensors that are rows of a fused disk tensor

    def to_disk(self, module_tensor: str) -> str:
        if self.names is not None:
            return self.names.get(module_tensor, module_tensor)
        for pattern, repl in self.rules:
            module_tensor = re.sub(pattern, repl, module_tensor, count=1)
        return module_tensor


def candidates(loader: str) -> list[Layout]:
    """The layouts `--loader` allows: one when forced, every known one (with and without MoE renames) for auto."""
    if loader != "auto":
        if loader not in LAYOUTS:
            raise ValueError(f"unknown loader {loader!r}; choose one of {', '.join(LOADER_CHOICES)}")
        return [Layout(loader, LAYOUTS[loader]), Layout(f"{loader}+moe", LAYOUTS[loader] + MOE_RULES)]
    out = []
    for name, rules in LAYOUTS.items():
        out.append(Layout(name, rules))
        out.append(Layout(f"{name}+moe", rules + MOE_RULES))
    return out


@dataclass(frozen=True)
class LayoutChoice:
    layout: Layout
    mapping: dict[str, str]          # module-side tensor name -> disk name, for every name that was placed
    missing: tuple[str, ...]         # module-side names the layout could not place


def choose_layout(
    names: Iterable[str], disk: Mapping[str, object], loader: str, optional: Iterable[str] = (),
    derive: Callable[[], Layout | None] | None = None,
) -> tuple[LayoutChoice, list[LayoutChoice]]:
    """Pick the layout that places the most names on existing disk tensors.

    Returns the choice and every other layout that placed as many names with a *different* mapping (ambiguity:
    the caller refuses). Names in `optional` may legitimately be absent (e.g. lm_head of a tied checkpoint) and
    are mapped by the chosen layout without counting against it.
    """
    names = list(dict.fromkeys(names))
    optional = set(optional)

    def place(layout: Layout) -> LayoutChoice:
        mapping, missing = {}, []
        for n in names:
            d = layout.to_disk(n)
            if d in disk or n in optional:
                mapping[n] = d
            else:
                missing.append(n)
        return LayoutChoice(layout, mapping, tuple(missing))

    results = [place(layout) for layout in candidates(loader)]
    if loader == "auto" and derive is not None and all(c.missing for c in results):
        derived = derive()
        if derived is not None:
            results.append(place(derived))
    # fewest missing first; among equals the earlier (simpler) layout, so plain names win ties of identical maps
    results.sort(key=lambda c: len(c.missing))
    best = results[0]

    def placed(c: LayoutChoice) -> dict[str, str]:
        return {n: d for n, d in c.mapping.items() if d in disk}

    rivals = [
        c for c in results[1:]
        if not best.missing and not c.missing and placed(c) != placed(best)
    ]
    return best, rivals

