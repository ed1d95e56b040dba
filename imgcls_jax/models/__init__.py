"""Model definitions, the interface every family implements, and the registry by name."""

from imgcls_jax.models.base import Classifier, LayerSpec, Trainable, parse_trainable
from imgcls_jax.models.convnet import KerasConvNet
from imgcls_jax.models.convnext import ConvNeXt
from imgcls_jax.models.densenet import DenseNet
from imgcls_jax.models.describe import summary
from imgcls_jax.models.efficientnet import EfficientNet
from imgcls_jax.models.efficientnet_v2 import EfficientNetV2
from imgcls_jax.models.inception_resnet_v2 import InceptionResNetV2
from imgcls_jax.models.inception_v3 import InceptionV3
from imgcls_jax.models.mobilenet import MobileNetV2
from imgcls_jax.models.mobilenet_v1 import MobileNet
from imgcls_jax.models.mobilenet_v3 import MobileNetV3
from imgcls_jax.models.nasnet import NASNet
from imgcls_jax.models.preprocessing import MODES, preprocess_input
from imgcls_jax.models.registry import (
    ModelInfo,
    create_model,
    list_models,
    model_from_config,
    model_info,
    register_model,
)
from imgcls_jax.models.resnet import ResNet, ResNet50
from imgcls_jax.models.vgg import VGG
from imgcls_jax.models.xception import Xception

__all__ = [
    "MODES",
    "VGG",
    "Classifier",
    "ConvNeXt",
    "DenseNet",
    "EfficientNet",
    "EfficientNetV2",
    "InceptionResNetV2",
    "InceptionV3",
    "KerasConvNet",
    "LayerSpec",
    "MobileNet",
    "MobileNetV2",
    "MobileNetV3",
    "ModelInfo",
    "NASNet",
    "ResNet",
    "ResNet50",
    "Trainable",
    "Xception",
    "create_model",
    "list_models",
    "model_from_config",
    "model_info",
    "parse_trainable",
    "preprocess_input",
    "register_model",
    "summary",
]
