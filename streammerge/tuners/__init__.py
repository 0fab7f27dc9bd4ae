"""The tuners: one module per PEFT adapter type, and this registry, the only place a type is named.

A new adapter type is a module defining its operations, how it plans a module and a `Tuner` (see base.py and
docs/contributing.md), plus one line below.
"""

from __future__ import annotations

from . import ia3, loha, lokr, lora, vera
from .base import Role, Tuner

TUNERS: dict[str, Tuner] = {t.peft_type: t for t in (
    lora.TUNER,
    loha.TUNER,
    lokr.TUNER,
    ia3.TUNER,
    vera.TUNER,
)}


def register(tuner: Tuner) -> None:
    """Add a tuner at run time (a plug-in outside this package)."""
    TUNERS[tuner.peft_type] = tuner


def all_roles() -> list[Role]:
    """Every key suffix any tuner knows, longest first: a key is read by the first suffix it ends with, so a
    suffix that ends another (`.lora_magnitude_vector.weight`) must come before it."""
    roles = {r.suffix: r for t in TUNERS.values() for r in t.roles}
    return sorted(roles.values(), key=lambda r: -len(r.suffix))
