"""`SeraTunerConfig`: which SERA modules the PEFT tuner injects into a SERA model, and what else it trains.

The modules' settings are [`SeraConfig`]'s own fields (`adapter_*`, `fusion_*`), defined there once: the tuner config
holds only those it changes (`sera_settings`), and the tuner reads the rest from the base model's config when it
injects the modules.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
from dataclasses import dataclass, field

from peft.config import PeftConfig

from .configuration_sera import FUSION_NUM_EXPERTS, SeraConfig


def _sera_config_fields(prefix: str) -> tuple[str, ...]:
    return tuple(item.name for item in dataclasses.fields(SeraConfig) if item.name.startswith(prefix))


# The SeraConfig fields of each SERA module, read from SeraConfig itself; merge_and_unload writes them into the merged
# model's config.
SERA_ADAPTER_FIELDS = ("use_sera_adapter", *_sera_config_fields("adapter_"))
SERA_FUSION_FIELDS = ("use_sera_fusion", *_sera_config_fields("fusion_"))
SERA_MODULE_SETTINGS = tuple(name for name in SERA_ADAPTER_FIELDS + SERA_FUSION_FIELDS if not name.startswith("use_"))

# adapter_config.json files written before 0.2 carry the settings as top-level keys and these older switch names.
LEGACY_SWITCH_NAMES = {
    "train_head": "train_head_in_place",
    "train_encoder_norms_and_biases": "train_encoder_norms_and_biases_in_place",
}


class SeraPeftType(str, enum.Enum):  # noqa: UP042 (as peft's PeftType; str() of a StrEnum member differs)
    """PEFT type of the SERA tuner.

    peft's own `PeftType` enum is closed, so SERA brings its own. Being a `str` enum like `PeftType`, it equals (and
    hashes like) the plain string "SERA" that adapter_config.json stores, and it has the `.value` that peft's messages
    and `get_model_status` read.
    """

    SERA = "SERA"


@dataclass(init=False)
class SeraTunerConfig(PeftConfig):
    """
    Configuration of [`SeraTunerModel`]: SERA as a PEFT method.

    Applied to a [`SeraForReferringSegmentation`], the tuner injects SERA-Adapters into the vision blocks listed in
    `adapter_layers` and a SERA-Fusion at each level listed in `fusion_levels`, and trains the paper's set (see
    `modeling_sera.sera_parameters.trained_key_prefixes`, the one definition both this tuner and
    `SeraForReferringSegmentation.freeze_encoders` use): those modules, the encoders' LayerNorm and bias terms and the
    segmentation head (neck, decoder, projector, word_proj). Everything else stays frozen.

    The last two groups are tensors of the base model trained *in place*, as the switches' names say: with them on,
    `with model.disable_adapter():` removes the injected SERA modules from the forward pass but keeps the trained
    norms, biases and head. With both off only injected modules train, and disabling the adapter gives the base model
    back.
    A base model that already has SERA modules (a published SERA checkpoint) keeps them and trains them in place too.

    Args:
        use_sera_adapter (`bool`, defaults to `True`): Inject SERA-Adapters into the blocks in `adapter_layers`.
        use_sera_fusion (`bool`, defaults to `True`): Inject a SERA-Fusion at each level in `fusion_levels`.
        sera_settings (`dict`, *optional*):
            [`SeraConfig`] fields of the SERA modules (`adapter_layers`, `adapter_dim`, ..., `fusion_levels`,
            `fusion_top_k`, ...) that differ from the base model's config; the others are read from it when the
            modules are injected (and written here then, so that a saved adapter describes its modules in full).
            They may also be passed as keyword arguments: `SeraTunerConfig(adapter_dim=64)`.
        train_encoder_norms_and_biases_in_place (`bool`, defaults to `True`):
            Train every LayerNorm and every bias term of both encoders, in place (the paper: "<1% of backbone
            parameters").
        train_head_in_place (`bool`, defaults to `True`):
            Train the neck, decoder, projector and word projection, in place.

    Example:

    ```python
    >>> from peft import get_peft_model
    >>> from modeling_sera import SeraConfig, SeraForReferringSegmentation, SeraTunerConfig

    >>> baseline = SeraForReferringSegmentation(SeraConfig(use_sera_adapter=False, use_sera_fusion=False))
    >>> model = get_peft_model(baseline, SeraTunerConfig(fusion_top_k=2))
    >>> model.print_trainable_parameters()
    ```
    """

    use_sera_adapter: bool = field(default=True, metadata={"help": "Inject SERA-Adapters into the vision blocks."})
    use_sera_fusion: bool = field(default=True, metadata={"help": "Inject a SERA-Fusion at the chosen levels."})
    sera_settings: dict = field(
        default_factory=dict,
        metadata={"help": "SeraConfig adapter_*/fusion_* fields that differ from the base model's config."},
    )
    train_encoder_norms_and_biases_in_place: bool = field(
        default=True, metadata={"help": "Train the LayerNorm and bias terms of both encoders, in place."}
    )
    train_head_in_place: bool = field(
        default=True, metadata={"help": "Train the neck, decoder, projector and word_proj, in place."}
    )

    def __init__(
        self,
        use_sera_adapter: bool = True,
        use_sera_fusion: bool = True,
        sera_settings: dict | None = None,
        train_encoder_norms_and_biases_in_place: bool = True,
        train_head_in_place: bool = True,
        **kwargs,
    ):
        settings = dict(sera_settings or {})
        for name in SERA_MODULE_SETTINGS:  # SeraConfig fields given directly, or top-level in an old adapter config
            if name in kwargs:
                settings[name] = kwargs.pop(name)
        switches = {
            "train_encoder_norms_and_biases_in_place": train_encoder_norms_and_biases_in_place,
            "train_head_in_place": train_head_in_place,
        }
        for old_name, new_name in LEGACY_SWITCH_NAMES.items():
            if old_name in kwargs:
                switches[new_name] = kwargs.pop(old_name)
        self.use_sera_adapter = use_sera_adapter
        self.use_sera_fusion = use_sera_fusion
        self.sera_settings = settings
        for name, value in switches.items():
            setattr(self, name, value)
        super().__init__(**kwargs)  # peft's own fields (unknown ones raise TypeError); runs __post_init__

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = SeraPeftType.SERA
        # JSON and user code may hand over tuples or numpy ints; the merged SeraConfig wants plain int lists.
        for name in ("adapter_layers", "fusion_levels"):
            if name in self.sera_settings:
                self.sera_settings[name] = [int(index) for index in self.sera_settings[name]]
        self.check_settings()

    def check_settings(self) -> None:
        """Raise a `ValueError` naming the setting for what can be judged without the base model; the rest (block
        and level indices, widths) is checked by SeraConfig itself when the tuner applies the settings to the base
        model's config."""
        unknown = sorted(set(self.sera_settings) - set(SERA_MODULE_SETTINGS))
        if unknown:
            raise ValueError(
                f"sera_settings {unknown} are not SeraConfig fields of the SERA modules; use "
                f"{list(SERA_MODULE_SETTINGS)}."
            )
        settings = self.sera_settings
        if self.use_sera_adapter:
            layers = settings.get("adapter_layers")
            if layers is not None and not layers:
                raise ValueError("use_sera_adapter=True needs at least one block index in adapter_layers.")
            if layers is not None and len(set(layers)) != len(layers):
                raise ValueError(f"adapter_layers {layers} lists a block twice.")
            heads, dim = settings.get("adapter_num_heads"), settings.get("adapter_dim")
            if heads is not None and dim is not None and (heads < 1 or dim % heads):
                raise ValueError(f"adapter_num_heads={heads} must divide adapter_dim={dim}.")
        if self.use_sera_fusion:
            levels = settings.get("fusion_levels")
            if levels is not None and not levels:
                raise ValueError("use_sera_fusion=True needs at least one level index in fusion_levels.")
            if levels is not None and len(set(levels)) != len(levels):
                raise ValueError(f"fusion_levels {levels} lists a level twice.")
            top_k = settings.get("fusion_top_k", 1)
            if not 1 <= top_k <= FUSION_NUM_EXPERTS:
                raise ValueError(f"fusion_top_k={top_k} must be between 1 and {FUSION_NUM_EXPERTS}.")
        trained = (
            self.use_sera_adapter,
            self.use_sera_fusion,
            self.train_encoder_norms_and_biases_in_place,
            self.train_head_in_place,
        )
        if not any(trained):
            raise ValueError(
                "This SeraTunerConfig trains nothing: switch on at least one of use_sera_adapter, use_sera_fusion, "
                "train_encoder_norms_and_biases_in_place and train_head_in_place."
            )

    @classmethod
    def from_sera_config(cls, sera_config, **overrides) -> SeraTunerConfig:
        """The tuner settings that match a [`SeraConfig`] (e.g. a published checkpoint's), with `overrides` on top
        (tuner switches or SeraConfig module fields)."""
        settings = {name: getattr(sera_config, name) for name in SERA_MODULE_SETTINGS}
        switches = {"use_sera_adapter": sera_config.use_sera_adapter, "use_sera_fusion": sera_config.use_sera_fusion}
        return cls(**{**switches, "sera_settings": settings, **overrides})

    def sera_config_for(self, base_config):
        """The base model's config with the SERA modules this tuner uses switched on and its settings applied,
        validated the way SeraConfig validates itself (block and level indices against the backbone, widths against
        head counts): the config a SERA model built with the tuner's modules has."""
        merged = copy.deepcopy(base_config)
        for use_flag, fields in (("use_sera_adapter", SERA_ADAPTER_FIELDS), ("use_sera_fusion", SERA_FUSION_FIELDS)):
            if getattr(self, use_flag):
                setattr(merged, use_flag, True)
                for name in fields[1:]:
                    if name in self.sera_settings:
                        setattr(merged, name, self.sera_settings[name])
        merged.check_settings()
        return merged


__all__ = ["SERA_ADAPTER_FIELDS", "SERA_FUSION_FIELDS", "SERA_MODULE_SETTINGS", "SeraPeftType", "SeraTunerConfig"]
