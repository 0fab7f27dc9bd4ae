"""adapter_config.json against the adapter's own tensors: what the config promises must be what was saved."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path

from .errors import AdapterError

_PAIR_ROLES = {"A", "B", "emb_A", "emb_B"}


def check_dora(roles: Mapping[str, Collection[str]], use_dora: bool, where: Path) -> None:
    """`use_dora` and the saved `lora_magnitude_vector`s agree for every LoRA module (`roles`: module -> roles).

    PEFT loads a mismatch without an error but merges something else than was trained: with use_dora=true and no
    magnitude it starts the magnitude from the base weight's norms; with use_dora=false it ignores saved ones.
    """
    pairs = sorted(n for n, r in roles.items() if set(r) & _PAIR_ROLES)
    with_magnitude = {n for n, r in roles.items() if "magnitude" in r}
    if use_dora:
        lacking = [n for n in pairs if n not in with_magnitude]
        if lacking:
            shown = ", ".join(lacking[:3]) + (f" and {len(lacking) - 3} more" if len(lacking) > 3 else "")
            raise AdapterError(
                f"{where}: adapter_config.json sets use_dora=true but no lora_magnitude_vector is saved for "
                f"{len(lacking)} of {len(pairs)} LoRA module(s) ({shown}); without it the DoRA merge is undefined "
                "(PEFT would start the magnitude from the base weights, not the trained values): re-save the adapter "
                "with PEFT, or set use_dora=false if it was trained without DoRA"
            )
    elif with_magnitude:
        shown = ", ".join(sorted(with_magnitude)[:3])
        raise AdapterError(
            f"{where}: lora_magnitude_vector tensors are saved ({shown}...) but adapter_config.json says "
            "use_dora=false, so PEFT would ignore them; set use_dora=true if the adapter was trained with DoRA"
        )
