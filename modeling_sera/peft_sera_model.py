"""`SeraTunerModel`: SERA as a PEFT tuner.

Injection: SERA's targets are structural (vision blocks and feature levels by index), so the tuner places its
layers itself instead of matching module-name patterns: a `SeraAdapterLayer` around the `mlp` of every block in
`adapter_layers` and a `SeraFusionLayer` in the model's `fusion` ModuleDict for every level in `fusion_levels`. SERA
modules the base model already has (a published SERA checkpoint) are kept and trained in place, never wrapped twice.

Trainable set: the model's own definition (`modeling_sera.trained_key_prefixes`, also behind `freeze_encoders`): the
SERA modules, the encoders' LayerNorm and bias terms and the head (neck, decoder, projector, word_proj), the last two
switchable. They are base-model tensors trained in place (like `bias="all"` in LoRA), as the switches' names say
(`train_*_in_place`), which is why a model holds one SERA adapter at a time and why `disable_adapter()` gives the base
model back only with both switched off.

Checkpoint: the adapter file holds exactly the trained tensors plus the BatchNorm statistics of the trained modules,
under the names a SERA model built with the tuner's settings would give them (adapter name removed, `sera_fusion`
dropped). An adapter trained on a baseline base model therefore has the same keys as one trained on a SERA checkpoint,
and `merge_and_unload` yields exactly those names.
"""

from __future__ import annotations

import functools
import re
import warnings

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from .modeling_sera import sentence_width, vision_blocks
from .peft_sera_config import SERA_ADAPTER_FIELDS, SERA_FUSION_FIELDS, SeraTunerConfig
from .peft_sera_layer import SeraAdapterLayer, SeraFusionLayer, SeraLayer
from .sera_adapter import SeraAdaptedMLP, SeraAdapter
from .sera_parameters import is_under_prefixes, set_trainable, trained_key_prefixes


CHECKPOINT_PREFIX = "base_model.model."  # what peft puts in front of every key of a PeftModel's state dict


# Classes are recognised by name so that a base model loaded as remote code (whose classes live in
# `transformers_modules`, not in this package) is handled like one built from the package.
def is_sera_segmentation_model(module: nn.Module) -> bool:
    return any(cls.__name__ == "SeraForReferringSegmentation" for cls in type(module).__mro__)


def is_native_adapted_mlp(module: nn.Module) -> bool:
    return not isinstance(module, SeraLayer) and any(cls.__name__ == "SeraAdaptedMLP" for cls in type(module).__mro__)


@functools.cache
def adapter_child_names() -> frozenset[str]:
    """Names of a SeraAdapter's submodules: an adapter named like one would make `sera_adapter.<name>.` ambiguous."""
    with torch.device("meta"):  # only the structure is needed: no memory, no draw from the random generator
        return frozenset(name for name, _ in SeraAdapter(8, 8, dim=8, num_heads=1).named_children())


def find_sera_model(model: nn.Module) -> tuple[str, nn.Module]:
    """The SeraForReferringSegmentation inside `model` (a PeftModel, a tuner or the model itself) and the state-dict
    key prefix that leads to it."""
    for name, module in model.named_modules():
        if is_sera_segmentation_model(module):
            return (f"{name}." if name else ""), module
    raise ValueError(
        f"The SERA tuner applies to a SeraForReferringSegmentation; found none in {type(model).__name__}."
    )


def sera_trained_key_prefixes(sera: nn.Module, config: SeraTunerConfig, adapter_name: str | None = None) -> set[str]:
    """State-dict key prefixes (relative to the SERA model) of every tensor the tuner trains and saves: the model's
    one definition (`trained_key_prefixes`) with the tuner's switches."""
    return trained_key_prefixes(
        sera,
        train_encoder_norms_and_biases=config.train_encoder_norms_and_biases_in_place,
        train_head=config.train_head_in_place,
        adapter_name=adapter_name,
    )


class SeraTunerModel(BaseTuner):
    """
    SERA (Spatio-Semantic Expert Routing) as a PEFT method for [`SeraForReferringSegmentation`].

    Created by `peft.get_peft_model(model, SeraTunerConfig(...))`; see [`SeraTunerConfig`] for what it injects and
    trains, and this module's docstring for the checkpoint format.

    Example:

    ```python
    >>> from peft import PeftModel, get_peft_model
    >>> from modeling_sera import SeraConfig, SeraForReferringSegmentation, SeraTunerConfig

    >>> baseline = dict(use_sera_adapter=False, use_sera_fusion=False)
    >>> base = SeraForReferringSegmentation.from_encoders(vision_id, text_id, **baseline)
    >>> model = get_peft_model(base, SeraTunerConfig())
    >>> ...  # train
    >>> model.save_pretrained("sera-adapter")  # adapter_config.json + adapter_model.safetensors
    >>> model = PeftModel.from_pretrained(base_again, "sera-adapter")
    >>> merged = model.merge_and_unload()  # a plain SeraForReferringSegmentation with SERA modules switched on
    ```
    """

    prefix: str = "sera_"
    tuner_layer_cls = SeraLayer
    target_module_mapping: dict[str, list[str]] = {}

    # ------------------------------------------------------------------ checks

    def _check_new_adapter_config(self, config: SeraTunerConfig) -> None:
        if len(self.peft_config) > 1:
            raise ValueError(
                "A model holds one SERA adapter at a time: SERA trains the encoders' norm and bias terms, the head "
                "and any SERA modules of the base checkpoint in place, which two adapters would share. Merge or "
                "unload the current adapter first, or wrap a separate copy of the base model."
            )
        adapter_name = next(name for name, conf in self.peft_config.items() if conf is config)
        if adapter_name in adapter_child_names() or not adapter_name.isidentifier():
            raise ValueError(
                f"Adapter name {adapter_name!r} would be ambiguous in SERA state-dict keys; use an identifier other "
                f"than {sorted(adapter_child_names())}."
            )

    def _check_base_model(self, model: nn.Module, config: SeraTunerConfig) -> None:
        """Validate `config` against `model` before anything is changed."""
        if not is_sera_segmentation_model(model):
            raise ValueError(f"The SERA tuner applies to a SeraForReferringSegmentation, got {type(model).__name__}.")
        if any(isinstance(module, SeraLayer) for module in model.modules()):
            raise ValueError(
                "This model already holds SERA tuner layers; call unload() or merge_and_unload() on its PeftModel "
                "first."
            )
        base_config = model.config
        for use_flag, fields, modules in (
            ("use_sera_adapter", SERA_ADAPTER_FIELDS, "SERA-Adapters"),
            ("use_sera_fusion", SERA_FUSION_FIELDS, "SERA-Fusion"),
        ):
            if not getattr(base_config, use_flag):
                continue
            differences = [
                f"{name}: tuner {config.sera_settings[name]!r}, model {getattr(base_config, name)!r}"
                for name in fields
                if name in config.sera_settings and config.sera_settings[name] != getattr(base_config, name)
            ]
            if differences:
                raise ValueError(
                    f"The base model already has {modules}; the tuner trains them in place and its settings must "
                    f"match the model's ({'; '.join(differences)}). SeraTunerConfig.from_sera_config(model.config) "
                    "copies them."
                )
        config.sera_config_for(base_config)  # raises for blocks, levels or widths the model lacks

    # --------------------------------------------------------------- injection

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Inject the SERA modules the config names and set the trainable set.

        `state_dict` is accepted for API compatibility and not needed: the config names every SERA module. With
        `low_cpu_mem_usage` peft creates the modules on the meta device and the checkpoint fills them.
        """
        config = self.peft_config[adapter_name]
        self._check_new_adapter_config(config)
        self._check_base_model(model, config)
        settings = config.sera_config_for(model.config)
        # Written down in full, so that the saved adapter describes its modules without the base model's config.
        for use_flag, fields in (("use_sera_adapter", SERA_ADAPTER_FIELDS), ("use_sera_fusion", SERA_FUSION_FIELDS)):
            if getattr(config, use_flag):
                config.sera_settings.update({name: getattr(settings, name) for name in fields[1:]})

        sera_model = model.model
        vision_width = model.config.vision_config.hidden_size
        module_names = {module: name for name, module in model.named_modules()}

        if config.use_sera_adapter:
            blocks = vision_blocks(sera_model.vision_model)
            for index in settings.adapter_layers:
                block = blocks[index]
                if is_native_adapted_mlp(block.mlp):
                    continue  # a SERA checkpoint's own adapter: trained in place
                key = module_names[block.mlp]
                self._create_and_replace(settings, adapter_name, block.mlp, "mlp", block, current_key=key)
                self.targeted_module_names.append(key)

        if config.use_sera_fusion:
            for level in settings.fusion_levels:
                if str(level) in sera_model.fusion:
                    continue  # a SERA checkpoint's own SERA-Fusion: trained in place
                layer = SeraFusionLayer(
                    adapter_name, settings, vision_width, sentence_width(model.config), config.inference_mode
                )
                # SeraModel's own init, on the device, dtype and train/eval mode of the vision tower it follows.
                self._initialize(layer.sera_fusion[adapter_name], owner=sera_model, reference=sera_model.vision_model)
                layer.train(sera_model.vision_model.training)
                sera_model.fusion[str(level)] = layer
                self.targeted_module_names.append(f"{module_names[sera_model.fusion]}.{level}")

        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)
        self._mark_only_adapters_as_trainable(model)

    def _create_and_replace(self, settings, adapter_name, target, target_name, parent, current_key, **kwargs):
        """Wrap a vision block's `mlp` (`target`) in a SeraAdapterLayer built from `settings` (the SeraConfig of
        `SeraTunerConfig.sera_config_for`)."""
        config = self.model.config
        new_module = SeraAdapterLayer(
            target,
            adapter_name,
            settings,
            config.vision_config.hidden_size,
            config.text_config.hidden_size,
            self.peft_config[adapter_name].inference_mode,
        )
        # The vision tower's own init (as for the adapters of a SERA model), on the MLP's device, dtype and mode.
        self._initialize(new_module.sera_adapter[adapter_name], owner=self.model.model.vision_model, reference=target)
        new_module.train(target.training)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    @torch.no_grad()
    def _initialize(module: nn.Module, owner: nn.Module, reference: nn.Module) -> None:
        """Initialise a new SERA module as the model would have (with `owner`'s `_init_weights`: the vision tower's
        for adapters, SERA's for fusion) and put it on `reference`'s device and dtype."""
        if any(param.device.type == "meta" for param in module.parameters()):
            return  # low_cpu_mem_usage: the checkpoint brings the values
        for submodule in module.modules():
            owner._init_weights(submodule)
        reference_param = next(reference.parameters())
        module.to(reference_param.device, dtype=reference_param.dtype)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        """Make exactly SERA's trainable set trainable (see `sera_trained_key_prefixes`): beyond the adapter modules
        this includes base-model tensors (encoder norms and biases, head); nothing at all in inference mode."""
        config = next(iter(self.peft_config.values()))
        set_trainable(model, sera_trained_key_prefixes(model, config), trainable=not config.inference_mode)

    def train(self, mode: bool = True):
        """As `nn.Module.train`, but BatchNorm layers outside the trained set (a head with `train_head_in_place=False`)
        stay in eval mode: frozen means their running statistics do not move either, so disabling the adapter after
        training gives the base model back when nothing trains in place."""
        super().train(mode)
        config = next(iter(self.peft_config.values()), None)
        if mode and config is not None:
            prefixes = sera_trained_key_prefixes(self.model, config)
            for name, module in self.model.named_modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and not is_under_prefixes(name, prefixes):
                    module.eval()
        return self

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        # SERA modules sit on the model's activation path (BatchNorm, attention), so they keep the base model's
        # dtype instead of being upcast to float32 like low-rank deltas.
        return

    def disable_adapter_layers(self) -> None:
        config = next(iter(self.peft_config.values()))
        in_place = [
            name
            for name in ("train_encoder_norms_and_biases_in_place", "train_head_in_place")
            if getattr(config, name)
        ]
        if any(is_native_adapted_mlp(module) for module in self.model.modules()) or any(
            not isinstance(module, SeraLayer) for module in self.model.model.fusion.values()
        ):
            in_place.append("the base checkpoint's own SERA modules")
        if in_place:
            warnings.warn(
                "Disabling the SERA adapter removes the injected SERA modules from the forward pass, but what is "
                f"trained in place ({', '.join(in_place)}) keeps its trained values: this is not the base model.",
                stacklevel=3,
            )
        self._enable_adapter_layers(enabled=False)

    # ------------------------------------------------------ merge and unload

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        """Merging turns every tuner layer into the native module (`SeraAdaptedMLP`, `SeraFusion`) and switches the
        SERA modules on in the model's config; unloading removes them. Nothing is folded into base weights, so
        `progressbar` and `safe_merge` have no effect."""
        adapter_name = self._adapter_to_unload(adapter_names)
        model = self.model
        for name, module in list(model.named_modules()):
            if isinstance(module, SeraAdapterLayer):
                parent_name, _, child_name = name.rpartition(".")
                replacement = module.base_layer
                if merge and adapter_name in module.sera_adapter:
                    replacement = SeraAdaptedMLP(
                        module.base_layer, module.sera_adapter[adapter_name], module.scale[adapter_name]
                    ).train(module.training)
                setattr(model.get_submodule(parent_name), child_name, replacement)
        fusion = model.model.fusion
        for level, module in list(fusion.items()):
            if isinstance(module, SeraFusionLayer):
                if merge and adapter_name in module.sera_fusion:
                    fusion[level] = module.sera_fusion[adapter_name]
                else:
                    del fusion[level]
        if merge:
            merged_config = self.peft_config[adapter_name].sera_config_for(model.config)
            for name in SERA_ADAPTER_FIELDS + SERA_FUSION_FIELDS:
                setattr(model.config, name, getattr(merged_config, name))
        if hasattr(model, "peft_config"):
            del model.peft_config
        return model

    def _adapter_to_unload(self, adapter_names: list[str] | None) -> str:
        names = list(adapter_names) if adapter_names is not None else list(self.active_adapters)
        if len(names) != 1 or names[0] not in self.peft_config:
            raise ValueError(f"SERA merges or unloads exactly one existing adapter, got {names}.")
        return names[0]

    # ------------------------------------------------- state-dict conversion

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        root, sera = find_sera_model(model)
        prefixes = {root + prefix for prefix in sera_trained_key_prefixes(sera, config, adapter_name)}
        return {key: value for key, value in state_dict.items() if is_under_prefixes(key, prefixes)}

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # `...mlp.sera_adapter.<name>.x` -> `...mlp.sera_adapter.x` and `...fusion.0.sera_fusion.<name>.x` ->
        # `...fusion.0.x`: the names of the native SeraAdaptedMLP / SeraFusion.
        name = re.escape(adapter_name)
        key = re.sub(rf"\.sera_adapter\.{name}\.", ".sera_adapter.", key)
        return re.sub(rf"\.sera_fusion\.{name}\.", ".", key)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        root, sera = find_sera_model(model)
        prefixes = {root + prefix for prefix in sera_trained_key_prefixes(sera, config, adapter_name)}
        checkpoint_key_to_model_key = {}
        for model_key in model.state_dict():
            if not is_under_prefixes(model_key, prefixes):
                continue
            checkpoint_key = cls._remove_adapter_name_from_key(model_key, adapter_name)
            checkpoint_key_to_model_key[checkpoint_key] = model_key
            if not model_key.startswith(CHECKPOINT_PREFIX):
                # Layers injected without a PeftModel around them: the checkpoint still carries the prefix.
                checkpoint_key_to_model_key[CHECKPOINT_PREFIX + checkpoint_key] = model_key
        loaded = {checkpoint_key_to_model_key[key] for key in state_dict if key in checkpoint_key_to_model_key}
        missing = sorted(set(checkpoint_key_to_model_key.values()) - loaded)
        if missing:
            warnings.warn(
                f"The SERA adapter checkpoint lacks {len(missing)} tensors the tuner trains (e.g. {missing[:3]}); "
                "they keep their current values.",
                stacklevel=3,
            )
        return {checkpoint_key_to_model_key.get(key, key): value for key, value in state_dict.items()}


__all__ = ["SeraTunerModel", "find_sera_model", "sera_trained_key_prefixes"]
