"""Model definitions, the interface every family implements, and the registry by name."""

from imgcls_jax.models.base import Classifier, LayerSpec, Trainable, parse_trainable
from imgcls_jax.models.convnet import KerasConvNet
from imgcls_jax.models.convnext import ConvNeXt
from imgcls_jax.models.efficientnet import EfficientNet
from imgcls_jax.models.efficientnet_v2 import EfficientNetV2
from imgcls_jax.models.mobilenet import MobileNetV2
from imgcls_jax.models.mobilenet_v3 import MobileNetV3
from imgcls_jax.models.preprocessing import MODES, preprocess_input
from imgcls_jax.models.registry import (
    ModelInfo,
    create_model,
    list_models,
    model_from_config,
    model_info,
    register_model,
)
from imgcls_jax.models.resnet import ResNet50
from imgcls_jax.models.summary import summary
from imgcls_jax.models.vgg import VGG

__all__ = [
    "MODES",
    "VGG",
    "Classifier",
    "ConvNeXt",
    "EfficientNet",
    "EfficientNetV2",
    "KerasConvNet",
    "LayerSpec",
    "MobileNetV2",
    "MobileNetV3",
    "ModelInfo",
    "ResNet50",
    "Trainable",
    "create_model",
    "list_models",
    "model_from_config",
    "model_info",
    "parse_trainable",
    "preprocess_input",
    "register_model",
    "summary",
]
