"""The tuners: one module per PEFT adapter type, and this registry, the only place a type is named.

A new adapter type is a module defining its operations, how it plans a module and a `TUNER` (see base.py and
docs/contributing.md), plus its name in `MODULES`.
"""

from __future__ import annotations

from importlib import import_module

from .base import Role, Tuner

# the registry: the modules of this package that define a TUNER
MODULES = ("lora", "loha", "lokr", "ia3", "vera")

TUNERS: dict[str, Tuner] = {t.peft_type: t for t in (import_module(f".{m}", __name__).TUNER for m in MODULES)}


def register(tuner: Tuner) -> None:
    """Add a tuner at run time (a plug-in outside this package)."""
    TUNERS[tuner.peft_type] = tuner


def all_roles() -> list[Role]:
    """Every key suffix any tuner knows, longest first: a key is read by the first suffix it ends with, so a
    suffix that ends another (`.lora_magnitude_vector.weight`) must come before it."""
    roles = {r.suffix: r for t in TUNERS.values() for r in t.roles}
    return sorted(roles.values(), key=lambda r: -len(r.suffix))
