"""Tuner layers of the SERA PEFT method.

- `SeraAdapterLayer` is the model's own `SeraAdaptedMLP` (same forward, `base_layer(x) + scale * adapter(x, words)`)
  with the adapter held per adapter name as peft expects.
- `SeraFusionLayer` is an entry of the model's `fusion` ModuleDict: the model's own `SeraFusion`, one per adapter name,
  with no base layer (a model without SERA-Fusion passes its level grids on untouched).

Both build their modules from a `SeraConfig` (the base model's config with the tuner's settings applied, see
`SeraTunerModel.sera_settings_for`), as `SeraModel` builds its own. Neither can be folded into base weights:
`SeraTunerModel.merge_and_unload` turns them into the native modules.
"""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .configuration_sera import FUSION_NUM_EXPERTS
from .sera_adapter import SeraAdaptedMLP, SeraAdapter
from .sera_fusion import SeraFusion
from .sera_routing import RouterDecision


class SeraLayer(BaseTunerLayer):
    """What both SERA tuner layers share: one container of SERA modules keyed by adapter name, and no merging."""

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(
            "SERA modules are networks of their own and cannot be folded into the base weights; use "
            "merge_and_unload(), which turns them into the native SERA modules of a plain "
            "SeraForReferringSegmentation."
        )

    def unmerge(self) -> None:
        # Nothing is ever merged in place (see merge), so there is nothing to undo.
        return

    def _active_modules(self) -> list[tuple[str, nn.Module]]:
        """The (adapter name, module) pairs that take part in the forward pass."""
        if self.disable_adapters:
            return []
        container = getattr(self, self.adapter_layer_names[0])
        return [(name, container[name]) for name in self.active_adapters if name in container]


class SeraAdapterLayer(SeraAdaptedMLP, SeraLayer):
    """A vision block's `mlp` plus a SERA-Adapter per adapter name: `SeraAdaptedMLP`'s forward over the active ones
    (none while the adapters are disabled, which leaves `base_layer(x)`)."""

    adapter_layer_names = ("sera_adapter",)
    other_param_names = ("scale",)

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        settings,
        hidden_size: int,
        text_hidden_size: int,
        inference_mode: bool = False,
    ) -> None:
        super().__init__(base_layer, nn.ModuleDict(), {})
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, settings, hidden_size, text_hidden_size, inference_mode)

    def update_layer(
        self, adapter_name: str, settings, hidden_size: int, text_hidden_size: int, inference_mode: bool = False
    ) -> None:
        """Add a SERA-Adapter built from `settings` (a `SeraConfig`) under `adapter_name`."""
        self.sera_adapter[adapter_name] = SeraAdapter.from_settings(hidden_size, text_hidden_size, settings)
        self.scale[adapter_name] = settings.adapter_scale
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def active_sera_adapters(self) -> list[tuple[SeraAdapter, float]]:
        return [(adapter, self.scale[name]) for name, adapter in self._active_modules()]

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        # peft's default reads `base_layer.weight`, which a transformer block's MLP does not have: follow the MLP's
        # first parameter instead.
        reference = next(self.base_layer.parameters(), None)
        if adapter_name not in self.sera_adapter or reference is None:
            return
        if any(param.device.type == "meta" for param in self.sera_adapter[adapter_name].parameters()):
            return
        self.sera_adapter[adapter_name].to(device if device is not None else reference.device, dtype=reference.dtype)

    def __repr__(self) -> str:
        return "sera." + super().__repr__()


class SeraFusionLayer(nn.Module, SeraLayer):
    """A SERA-Fusion for one vision level, in the slot `SeraModel` reads (`model.fusion[str(level)]`).

    Returns `(grid, RouterDecision)` like `SeraFusion`. With the adapters disabled the grid passes through untouched
    and the decision is all zeros (no expert ran), which adds nothing to the router losses.
    """

    adapter_layer_names = ("sera_fusion",)

    def __init__(
        self, adapter_name: str, settings, channels: int, sentence_dim: int, inference_mode: bool = False
    ) -> None:
        super().__init__()
        self.sera_fusion = nn.ModuleDict()
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, settings, channels, sentence_dim, inference_mode)

    def update_layer(
        self, adapter_name: str, settings, channels: int, sentence_dim: int, inference_mode: bool = False
    ) -> None:
        """Add a SERA-Fusion built from `settings` (a `SeraConfig`) under `adapter_name`."""
        self.sera_fusion[adapter_name] = SeraFusion.from_settings(channels, settings, sentence_dim)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    # BaseTunerLayer reads `weight` and `bias` from the base layer, which a fusion entry lacks (the lookup would
    # recurse into itself); report them missing instead, so `getattr(layer, "weight", None)` works.
    @property
    def weight(self) -> torch.Tensor:
        raise AttributeError("A SeraFusionLayer has no base layer, hence no weight.")

    @property
    def bias(self) -> torch.Tensor:
        raise AttributeError("A SeraFusionLayer has no base layer, hence no bias.")

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        # There is no base layer to follow (peft's default would recurse through `weight`); the tuner creates the
        # fusion on the vision tower's device and a loaded checkpoint arrives on the loading device.
        if device is not None and adapter_name in self.sera_fusion:
            self.sera_fusion[adapter_name].to(device)

    def forward(self, grid: torch.Tensor, sentence: torch.Tensor | None = None) -> tuple[torch.Tensor, RouterDecision]:
        active = self._active_modules()
        if active:
            _, fusion = active[0]  # the tuner keeps one SERA adapter per model
            return fusion(grid, sentence)
        no_expert = grid.new_zeros(grid.shape[0], FUSION_NUM_EXPERTS)
        return grid, RouterDecision(logits=no_expert, weights=no_expert)

    def __repr__(self) -> str:
        return "sera." + super().__repr__()


__all__ = ["SeraAdapterLayer", "SeraFusionLayer", "SeraLayer"]
