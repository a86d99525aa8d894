"""Which of SERA's parameters train in the paper's regime, and where pretrained encoder weights go.

One definition of the trainable set (`trained_key_prefixes`), read by `SeraForReferringSegmentation.freeze_encoders`
and by the PEFT tuner, and one remap of plain encoder checkpoints onto SERA's adapted encoders
(`load_encoder_weights`).
"""

import torch
from torch import nn


# What trains in the paper's regime, relative to a SeraForReferringSegmentation: see `trained_key_prefixes`.
HEAD_MODULE_NAMES = ("model.neck", "model.decoder", "model.word_proj", "projector")
ENCODER_MODULE_NAMES = ("model.vision_model", "model.text_model")


def is_under_prefixes(key: str, prefixes) -> bool:
    """Whether a parameter or state-dict key is one of `prefixes` or lies under one of them (at a `.` boundary)."""
    return any(key == prefix or key.startswith(prefix + ".") for prefix in prefixes)


def trained_key_prefixes(
    model: nn.Module,
    train_encoder_norms_and_biases: bool = True,
    train_head: bool = True,
    adapter_name: str | None = None,
) -> set[str]:
    """The one definition of what trains (the paper's regime), as parameter / state-dict key prefixes relative to a
    `SeraForReferringSegmentation`: `freeze_encoders` and the PEFT tuner both use it.

    - the SERA modules: every SERA-Adapter inside the vision blocks and every SERA-Fusion. A PEFT tuner layer holds
      one per adapter name (a `ModuleDict`), restricted to `adapter_name` when it is given;
    - `train_encoder_norms_and_biases`: every LayerNorm parameter and every bias of both encoders outside the
      SERA-Adapters ("<1% of backbone parameters");
    - `train_head`: the neck, the decoder, the word projection and the projector.

    Modules are recognised by structure (`reads_sera_words`, `sera_adapter`, `sera_fusion`), not by class, so that a
    model loaded as remote code is handled like one built from this package.
    """

    def per_adapter(container_name: str, container: nn.Module) -> set[str]:
        if not isinstance(container, nn.ModuleDict):  # a native module
            return {container_name}
        return {f"{container_name}.{name}" for name in container if adapter_name in (None, name)}

    prefixes: set[str] = set()
    adapters: set[str] = set()  # every SERA-Adapter container, whichever adapter name it belongs to
    for name, module in model.get_submodule(ENCODER_MODULE_NAMES[0]).named_modules(prefix=ENCODER_MODULE_NAMES[0]):
        if getattr(module, "reads_sera_words", False):
            adapters.add(f"{name}.sera_adapter")
            prefixes |= per_adapter(f"{name}.sera_adapter", module.sera_adapter)
    for level, module in model.get_submodule("model.fusion").items():
        container = module._modules.get("sera_fusion")
        prefixes |= (
            per_adapter(f"model.fusion.{level}.sera_fusion", container)
            if container is not None
            else {f"model.fusion.{level}"}
        )
    if train_encoder_norms_and_biases:
        for encoder_name in ENCODER_MODULE_NAMES:
            for module_name, module in model.get_submodule(encoder_name).named_modules(prefix=encoder_name):
                if is_under_prefixes(module_name, adapters):
                    continue
                is_norm = isinstance(module, nn.LayerNorm)
                for param_name, _ in module.named_parameters(recurse=False):
                    if is_norm or param_name == "bias":
                        prefixes.add(f"{module_name}.{param_name}")
    if train_head:
        prefixes.update(HEAD_MODULE_NAMES)
    return prefixes


def set_trainable(model: nn.Module, prefixes: set[str], trainable: bool = True) -> None:
    """Make exactly the parameters under `prefixes` trainable (none at all with `trainable=False`)."""
    for name, param in model.named_parameters():
        param.requires_grad_(trainable and is_under_prefixes(name, prefixes))


def load_encoder_weights(target: nn.Module, source: nn.Module | dict[str, torch.Tensor]) -> None:
    """Copy a pretrained encoder's weights (a model, or its state dict) into SERA's copy of it, whose adapted blocks
    wrap `mlp` as `mlp.base_layer`; SERA-Adapter tensors are left as they are. The one remap from plain encoder names
    to SERA's: fails loudly (`ValueError`) if any pretrained tensor finds no home or any encoder tensor stays unset."""
    source_state = source if isinstance(source, dict) else source.state_dict()
    source_name = "state dict" if isinstance(source, dict) else type(source).__name__
    plain_to_target = {
        key.replace(".base_layer.", "."): key for key in target.state_dict() if "sera_adapter" not in key
    }
    unexpected = [key for key in source_state if key not in plain_to_target]
    missing = [key for key in plain_to_target if key not in source_state]
    if unexpected or missing:
        raise ValueError(
            f"The pretrained {source_name} does not match SERA's encoder: unexpected {unexpected[:5]}, "
            f"missing {missing[:5]}. Check that the checkpoint is the architecture named in its config."
        )
    target.load_state_dict({plain_to_target[key]: value for key, value in source_state.items()}, strict=False)


__all__ = [
    "ENCODER_MODULE_NAMES",
    "HEAD_MODULE_NAMES",
    "is_under_prefixes",
    "load_encoder_weights",
    "set_trainable",
    "trained_key_prefixes",
]
