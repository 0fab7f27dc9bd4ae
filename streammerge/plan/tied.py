"""Tied input/output embeddings (spec §11): what the unmerged adapter model computes decides what is written.

On disk a tied checkpoint stores no output embedding; in memory `lm_head.weight` is the input embedding.
Replacements and trainable-token rows land in the one shared tensor, so they keep the tie; a LoRA delta on only
one side breaks it (PEFT's own merge is wrong there: it adds the delta to both).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..layouts import INPUT_EMBEDDING_SUFFIXES
from ..tuners.base import ModuleKeys, ProblemSink
from .keys import same_values
from .model import OutTensor

if TYPE_CHECKING:
    from ..adapter import Adapter


def find_input_embedding(disk: Mapping[str, Any], to_disk: Callable[[str], str]) -> str | None:
    """The disk name of the input embedding (the language model's, in a checkpoint with several towers)."""
    for suffix in INPUT_EMBEDDING_SUFFIXES:
        hits = [n for n in disk if n == suffix or n.endswith("." + suffix)]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            # a VLM with several towers: the language model's embedding is the one the layout maps model.* to
            preferred = to_disk("model." + suffix)
            if preferred in hits:
                return preferred
    return None


@dataclass
class Tie:
    """A tied checkpoint's output embedding: absent on disk, created from the input embedding when needed."""

    input_embedding: str
    optional: set[str]                      # module-side output-embedding names (lm_head.*)
    to_disk: Callable[[str], str]
    new_tensors: list[str] = field(default_factory=list)

    def head_for(self, module_tensor: str, out: dict[str, OutTensor]) -> OutTensor | None:
        """The output embedding as a new tensor starting from the input embedding, as the adapter saved it (a
        resized vocabulary) when it saved one; None for other names."""
        if module_tensor not in self.optional:
            return None
        disk = self.to_disk(module_tensor)
        emb = out[self.input_embedding]
        out[disk] = OutTensor(disk, emb.dtype, emb.shape, emb.base, replacement=emb.replacement)
        self.new_tensors.append(disk)
        return out[disk]


def head_clones(tie: Tie, modules: dict[str, ModuleKeys], adapter: Adapter, problems: ProblemSink) -> set[str]:
    """Output-embedding modules whose tensors are a second copy of the tied embedding's, used once."""
    used = _ensure_tying_clones(tie, modules, adapter, problems) if adapter.config.ensure_weight_tying else set()
    return used | _token_clones(tie, modules, adapter, problems)


def _ensure_tying_clones(tie: Tie, modules: dict[str, ModuleKeys], adapter: Adapter,
                         problems: ProblemSink) -> set[str]:
    """With ensure_weight_tying PEFT saves the embedding LoRA twice (as lm_head factors too); use it once."""
    heads = [m for m in modules.values() if f"{m.name}.weight" in tie.optional]
    embs = [m for m in modules.values() if tie.to_disk(f"{m.name}.weight") == tie.input_embedding]
    if not heads or not embs:
        return set()
    head, emb = heads[0], embs[0]
    if not ({"A", "B"} <= head.roles.keys() and {"emb_A", "emb_B"} <= emb.roles.keys()):
        return set()
    import torch

    same = torch.equal(adapter.get(head.roles["A"]), adapter.get(emb.roles["emb_B"]).T) and torch.equal(
        adapter.get(head.roles["B"]), adapter.get(emb.roles["emb_A"]).T
    )
    if not same:
        problems.add(f"{head.name}: ensure_weight_tying is set but its LoRA factors are not the tied embedding's; "
                     "the adapter is inconsistent")
        return set()
    return {head.name}


def _token_clones(tie: Tie, modules: dict[str, ModuleKeys], adapter: Adapter, problems: ProblemSink) -> set[str]:
    """Trainable tokens on a tied embedding saved with the embedding layers: the output embedding's tied wrapper is
    saved too (`lm_head.token_adapter.trainable_tokens_delta`, the same rows). The rows go once into the shared
    tensor, which stays tied, as in the unmerged model."""
    heads = [m for m in modules.values() if f"{m.name}.weight" in tie.optional and set(m.roles) == {"tokens"}]
    embs = [m for m in modules.values() if tie.to_disk(f"{m.name}.weight") == tie.input_embedding
            and "tokens" in m.roles]
    if not heads or not embs:
        return set()
    head, emb = heads[0], embs[0]
    if not same_values(adapter, head.roles["tokens"], emb.roles["tokens"]):
        problems.add(f"{head.name}: {head.roles['tokens']} of the tied output embedding differs from "
                     f"{emb.roles['tokens']}; the adapter is inconsistent")
        return set()
    return {head.name}


def settle(tie: Tie, out: dict[str, OutTensor], base_info: Any, ensure_tying: bool, notes: list[str],
           config_updates: dict[str, Any]) -> None:
    """After planning: untie (writing the output embedding) wherever the adapter model computes two tensors."""
    heads = [out[n] for n in tie.new_tensors]
    emb = out[tie.input_embedding]
    emb_delta = any(op.arithmetic for op in emb.ops)
    if heads:
        config_updates["tie_word_embeddings"] = False
        notes.append("the adapter gives the output embedding values of its own: wrote lm_head and set "
                     "tie_word_embeddings=false")
    elif emb_delta and ensure_tying:
        notes.append("ensure_weight_tying: the embedding LoRA is merged once and the weights stay tied")
    elif emb_delta:
        head = tie.to_disk("lm_head.weight")
        # the head keeps the embedding as it was before the LoRA (incl. a saved, resized base_layer)
        out[head] = OutTensor(head, emb.dtype, emb.shape, base_info, replacement=emb.replacement,
                              ops=[op for op in emb.ops if not op.arithmetic])
        tie.new_tensors.append(head)
        config_updates["tie_word_embeddings"] = False
        notes.append(f"LoRA changed the tied input embedding only: wrote {head} = the embedding without the "
                     "delta and set tie_word_embeddings=false")
