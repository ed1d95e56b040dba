"""InceptionResNetV2 (``keras.applications.InceptionResNetV2``) in Flax NNX, layer for layer as
Keras builds it, written once as a program of Keras's layer calls
(:mod:`imgcls_jax.models.program`).

Keras's ``conv2d_bn``: a convolution without bias, ``BatchNormalization(scale=False)`` (no gamma;
epsilon 1e-3, momentum 0.99: Keras's defaults) and ReLU. Most carry no name, so they carry the
names a fresh Keras session gives them in creation order (``conv2d``, ``conv2d_1``, ...,
``batch_normalization``, ...); a file from a session that numbered them otherwise is matched by
their order (:mod:`imgcls_jax.weights.keras`). The named ones:

* ``stem`` (as InceptionV3's) and ``mixed_5b`` (96; 48 -> 64 5x5; 64 -> 96 -> 96; average pooling
  -> 64: 320 channels);
* ``block35_1`` .. ``block35_10``, ``block17_1`` .. ``block17_20``, ``block8_1`` .. ``block8_10``:
  the residual Inception blocks. Their branches are concatenated, projected back to the input's
  channels by a 1x1 convolution *with* bias and no BatchNorm (``<block>_conv``), scaled (0.17,
  0.1, 0.2; 1.0 for ``block8_10``), added to the input (Keras's ``CustomScaleLayer``: ``x + up *
  scale``) and ReLU'd (not ``block8_10``);
* ``mixed_6a`` and ``mixed_7a``: the reductions (3x3/2 VALID convolutions and max pooling);
* ``conv_7b`` (1536) + ``conv_7b_bn``.

Inputs are normalised with ``"tf"`` preprocessing, as Keras's ImageNet weights expect; at least
75x75 (Keras's rule), 299x299 for Keras's ImageNet top. Kernels start as Keras's (glorot uniform),
biases at zero. The top, head and weight mapping are
:class:`~imgcls_jax.models.convnet.KerasConvNet`'s.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
from flax import nnx

from imgcls_jax.models.conv import check_impl
from imgcls_jax.models.program import LayerProgram, ProgramConvNet, program_conv_ops, program_flops

MIN_SIZE = 75
#: The residual blocks: (type, how many, scale).
BLOCKS = (("block35", 10, 0.17), ("block17", 20, 0.1), ("block8", 10, 0.2))
#: Stage names in forward order (``top:N`` trains the last N and the head).
STAGE_NAMES = (
    "stem", "mixed_5b", *(f"block35_{i}" for i in range(1, 11)), "mixed_6a",
    *(f"block17_{i}" for i in range(1, 21)), "mixed_7a", *(f"block8_{i}" for i in range(1, 11)), "conv_7b",
)  # fmt: skip


def conv_bn(p: LayerProgram, x, filters: int, kernel, strides: int = 1, padding: str = "same",
            name: str | None = None):  # fmt: skip
    """Keras's ``inception_resnet_v2.conv2d_bn`` with its defaults: convolution (no bias),
    BatchNorm without scale (``<name>_bn``), ReLU."""
    x = p.conv(x, filters, kernel, strides=strides, padding=padding, name=name)
    return p.relu(p.bn(x, scale=False, name=None if name is None else f"{name}_bn"))


def _branches(p: LayerProgram, x, block_type: str) -> list:
    if block_type == "block35":
        return [
            conv_bn(p, x, 32, 1),
            conv_bn(p, conv_bn(p, x, 32, 1), 32, 3),
            conv_bn(p, conv_bn(p, conv_bn(p, x, 32, 1), 48, 3), 64, 3),
        ]
    inner, (first, second), kernels = {
        "block17": (128, (160, 192), ((1, 7), (7, 1))),
        "block8": (192, (224, 256), ((1, 3), (3, 1))),
    }[block_type]
    return [
        conv_bn(p, x, 192, 1),
        conv_bn(p, conv_bn(p, conv_bn(p, x, inner, 1), first, kernels[0]), second, kernels[1]),
    ]


def residual_block(p: LayerProgram, x, block_type: str, index: int, scale: float, activation: bool = True):
    """Keras's ``inception_resnet_block``."""
    name = f"{block_type}_{index}"
    p.stage(name)
    mixed = p.concat(_branches(p, x, block_type))
    up = p.conv(mixed, p.channels(x), 1, use_bias=True, name=f"{name}_conv")
    x = p.scale_add(x, up, scale)
    return p.relu(x) if activation else x


def architecture(p: LayerProgram, x):
    """Keras's ``InceptionResNetV2`` backbone as a program (see :mod:`imgcls_jax.models.program`)."""
    p.stage("stem")
    x = conv_bn(p, conv_bn(p, x, 32, 3, strides=2, padding="valid"), 32, 3, padding="valid")
    x = p.max_pool(conv_bn(p, x, 64, 3), 3, 2)
    x = conv_bn(p, x, 80, 1, padding="valid")
    x = p.max_pool(conv_bn(p, x, 192, 3, padding="valid"), 3, 2)
    p.stage("mixed_5b")
    b0 = conv_bn(p, x, 96, 1)
    b1 = conv_bn(p, conv_bn(p, x, 48, 1), 64, 5)
    b2 = conv_bn(p, conv_bn(p, conv_bn(p, x, 64, 1), 96, 3), 96, 3)
    x = p.concat([b0, b1, b2, conv_bn(p, p.avg_pool(x, 3, 1, "same"), 64, 1)])
    for i in range(1, 11):
        x = residual_block(p, x, "block35", i, 0.17)
    p.stage("mixed_6a")
    b0 = conv_bn(p, x, 384, 3, strides=2, padding="valid")
    b1 = conv_bn(p, conv_bn(p, conv_bn(p, x, 256, 1), 256, 3), 384, 3, strides=2, padding="valid")
    x = p.concat([b0, b1, p.max_pool(x, 3, 2)])
    for i in range(1, 21):
        x = residual_block(p, x, "block17", i, 0.1)
    p.stage("mixed_7a")
    b0 = conv_bn(p, conv_bn(p, x, 256, 1), 384, 3, strides=2, padding="valid")
    b1 = conv_bn(p, conv_bn(p, x, 256, 1), 288, 3, strides=2, padding="valid")
    b2 = conv_bn(p, conv_bn(p, conv_bn(p, x, 256, 1), 288, 3), 320, 3, strides=2, padding="valid")
    x = p.concat([b0, b1, b2, p.max_pool(x, 3, 2)])
    for i in range(1, 11):
        x = residual_block(p, x, "block8", i, 0.2 if i < 10 else 1.0, activation=i < 10)
    p.stage("conv_7b")
    return conv_bn(p, x, 1536, 1, name="conv_7b")


class InceptionResNetV2(ProgramConvNet):
    """``keras.applications.InceptionResNetV2`` (top, transfer head or features; see
    :class:`~imgcls_jax.models.convnet.KerasConvNet`). Stages: ``stem``, ``mixed_5b``,
    ``block35_1`` .. ``block35_10``, ``mixed_6a``, ``block17_1`` .. ``block17_20``, ``mixed_7a``,
    ``block8_1`` .. ``block8_10``, ``conv_7b``; features ``[N, h, w, 1536]`` (8x8 at 299 px, 1x1
    at 75). ``conv_impl``: how the 3x3 stride-1 SAME convolutions run (:mod:`imgcls_jax.models.conv`)."""

    preprocessing = "tf"
    min_size = MIN_SIZE
    architecture = staticmethod(architecture)

    def __init__(
        self,
        *,
        include_top: bool = True,
        pooling: str | None = None,
        num_classes: int | None = None,
        head_units: Sequence[int] = (),
        dropout: float = 0.0,
        input_shape: tuple[int, int, int] = (299, 299, 3),
        dtype=jnp.float32,
        preprocessing: str = "tf",
        conv_impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        self._setup(
            "inceptionresnetv2", include_top=include_top, pooling=pooling, num_classes=num_classes,
            head_units=head_units, dropout=dropout, input_shape=input_shape, dtype=dtype,
            preprocessing=preprocessing,
        )  # fmt: skip
        self.conv_impl = check_impl(conv_impl)
        self._build_program(rngs)


#: Analytic FLOPs and the convolutions they count (:mod:`imgcls_jax.models.program`).
flops, conv_ops = program_flops, program_conv_ops
