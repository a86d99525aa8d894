"""SERA: referring image segmentation with spatio-semantic expert routing, for transformers and peft.

Importing this package registers SERA with the transformers Auto classes (so `AutoModel.from_config` and
`AutoProcessor` work in-process) and marks the classes for remote code, so that `save_pretrained` writes the files
`AutoModel.from_pretrained(..., trust_remote_code=True)` needs on a machine without this package.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageSegmentation

from .configuration_sera import SeraConfig
from .modeling_sera import (
    SeraForReferringSegmentation,
    SeraModel,
    SeraModelOutput,
    SeraPreTrainedModel,
    SeraReferringSegmentationOutput,
)


AutoConfig.register(SeraConfig.model_type, SeraConfig, exist_ok=True)
AutoModel.register(SeraConfig, SeraForReferringSegmentation, exist_ok=True)
AutoModelForImageSegmentation.register(SeraConfig, SeraForReferringSegmentation, exist_ok=True)
SeraConfig.register_for_auto_class()
SeraForReferringSegmentation.register_for_auto_class("AutoModel")

__all__ = [
    "SeraConfig",
    "SeraForReferringSegmentation",
    "SeraModel",
    "SeraModelOutput",
    "SeraPreTrainedModel",
    "SeraReferringSegmentationOutput",
]
