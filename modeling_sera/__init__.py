"""SERA: referring image segmentation with spatio-semantic expert routing, for transformers and peft.

Importing this package registers SERA with the transformers Auto classes (so `AutoModel.from_config` and
`AutoProcessor` work in-process) and marks the classes for remote code, so that `save_pretrained` writes the files
`AutoModel.from_pretrained(..., trust_remote_code=True)` needs on a machine without this package. It also registers
the peft type "SERA" (`SeraTunerConfig`, see peft_sera.py); peft is reached only through this import, so the
remote-code files (configuration_sera.py, modeling_sera.py, sera_*.py) never need it. Finally it registers the
"referring-image-segmentation" pipeline (pipeline_sera.py), so that `pipeline(...)` knows the task in-process.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageSegmentation, AutoProcessor
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_sera import SeraConfig
from .image_processing_sera import SeraImageProcessor, letterbox_geometry
from .modeling_sera import (
    MODEL_INPUT_NAMES,
    SeraForReferringSegmentation,
    SeraModel,
    SeraModelOutput,
    SeraPreTrainedModel,
    SeraReferringSegmentationOutput,
    trained_key_prefixes,
)
from .peft_sera import SeraTunerConfig, SeraTunerModel  # registers the peft type "SERA"
from .pipeline_sera import ReferringImageSegmentationPipeline
from .processing_sera import SeraProcessor


AutoConfig.register(SeraConfig.model_type, SeraConfig, exist_ok=True)
AutoModel.register(SeraConfig, SeraForReferringSegmentation, exist_ok=True)
AutoModelForImageSegmentation.register(SeraConfig, SeraForReferringSegmentation, exist_ok=True)
AutoImageProcessor.register(SeraConfig, slow_image_processor_class=SeraImageProcessor, exist_ok=True)
AutoProcessor.register(SeraConfig, SeraProcessor, exist_ok=True)
SeraConfig.register_for_auto_class()
SeraForReferringSegmentation.register_for_auto_class("AutoModel")
SeraImageProcessor.register_for_auto_class("AutoImageProcessor")
SeraProcessor.register_for_auto_class("AutoProcessor")
# pt_model names a transformers class, since a saved config can only refer to those (see pipeline_sera.py).
PIPELINE_REGISTRY.register_pipeline(
    "referring-image-segmentation",
    pipeline_class=ReferringImageSegmentationPipeline,
    pt_model=AutoModel,
    type="multimodal",
)

__all__ = [
    "MODEL_INPUT_NAMES",
    "ReferringImageSegmentationPipeline",
    "SeraConfig",
    "SeraForReferringSegmentation",
    "SeraImageProcessor",
    "SeraModel",
    "SeraModelOutput",
    "SeraPreTrainedModel",
    "SeraProcessor",
    "SeraReferringSegmentationOutput",
    "SeraTunerConfig",
    "SeraTunerModel",
    "letterbox_geometry",
    "trained_key_prefixes",
]
