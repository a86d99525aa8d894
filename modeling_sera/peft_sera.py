"""SERA as a PEFT method: registers the "SERA" peft type when imported (the package `__init__` imports it).

`peft.register_peft_method` only accepts names of peft's closed `PeftType` enum, so SERA enters the registry the way
that function would have put it there: by adding itself to the mappings in `peft.mapping` that peft consults by peft
type. Those dicts are shared objects (peft_model, save_and_load, tuners_utils and mapping_func import them, never copy
them), so one entry each reaches every code path:

- `PEFT_TYPE_TO_CONFIG_MAPPING`: `PeftConfig.from_pretrained`, `PeftModel.from_pretrained` and `load_adapter` resolve
  "SERA" from adapter_config.json to `SeraTunerConfig`;
- `PEFT_TYPE_TO_TUNER_MAPPING`: `PeftModel` builds `SeraTunerModel`; `get_peft_model_state_dict` /
  `set_peft_model_state_dict` (save and load) dispatch to its state-dict hooks;
- `PEFT_TYPE_TO_PREFIX_MAPPING`: the "sera_" prefix peft uses to tell adapter keys apart when loading.

`PEFT_TYPE_TO_MIXED_MODEL_MAPPING` is left alone: SERA does not mix with other tuners.
"""

from __future__ import annotations

import warnings

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

from .peft_sera_config import SeraPeftType, SeraTunerConfig
from .peft_sera_layer import SeraAdapterLayer, SeraFusionLayer, SeraLayer
from .peft_sera_model import SeraTunerModel


def register_sera_with_peft() -> None:
    """Make "SERA" a peft type. Idempotent, so re-importing or reloading the package is harmless."""
    peft_type = SeraPeftType.SERA
    if peft_type.value in PeftType.__members__:
        warnings.warn(
            "peft ships its own SERA method; modeling_sera's SERA tuner replaces it in this process.", stacklevel=2
        )
    prefix = SeraTunerModel.prefix
    clashing = [
        str(other)
        for other, other_prefix in PEFT_TYPE_TO_PREFIX_MAPPING.items()
        if other_prefix == prefix and other != peft_type
    ]
    if clashing:
        raise RuntimeError(f"The peft prefix {prefix!r} of SERA is already used by {clashing}.")
    PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = SeraTunerConfig
    PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = SeraTunerModel
    PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = prefix


register_sera_with_peft()

__all__ = [
    "SeraAdapterLayer",
    "SeraFusionLayer",
    "SeraLayer",
    "SeraPeftType",
    "SeraTunerConfig",
    "SeraTunerModel",
    "register_sera_with_peft",
]
