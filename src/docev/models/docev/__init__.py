"""DocEV Preview for torchtune: architecture sizes, builders and weight conversion."""

from docev.models.docev._arch import DocEVArch, hf_config, hf_param_shapes, preview, tiny
from docev.models.docev._checkpointer import DocEVCheckpointer
from docev.models.docev._component_builders import (
    docev,
    docev_decoder,
    ldpv2_connector,
    lora_docev_decoder,
    siglip_vision_encoder,
)
from docev.models.docev._connector import LDPv2Connector
from docev.models.docev._convert_weights import arch_from_hf_config, docev_hf_to_tune, docev_tune_to_hf
from docev.models.docev._fusion import DocEVModel, image_feature_counts, image_positions, pack_image_features
from docev.models.docev._materialize import init_rope, materialize
from docev.models.docev._model_builders import (
    docev_from_arch,
    docev_preview,
    docev_tiny,
    lora_docev_preview,
    lora_docev_tiny,
    lora_problems,
)
from docev.models.docev._vision import SiglipVisionEncoder

__all__ = [
    "DocEVArch",
    "DocEVCheckpointer",
    "DocEVModel",
    "LDPv2Connector",
    "SiglipVisionEncoder",
    "arch_from_hf_config",
    "docev",
    "docev_decoder",
    "docev_from_arch",
    "docev_hf_to_tune",
    "docev_preview",
    "docev_tiny",
    "docev_tune_to_hf",
    "hf_config",
    "hf_param_shapes",
    "image_feature_counts",
    "image_positions",
    "init_rope",
    "ldpv2_connector",
    "lora_docev_decoder",
    "lora_docev_preview",
    "lora_docev_tiny",
    "lora_problems",
    "materialize",
    "pack_image_features",
    "preview",
    "tiny",
    "siglip_vision_encoder",
]
