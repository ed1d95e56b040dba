"""InceptionV3 (``keras.applications.InceptionV3``) in Flax NNX, layer for layer as Keras builds it.

Every convolution is Keras's ``conv2d_bn``: a convolution without bias, ``BatchNormalization(scale=
False)`` (no gamma; epsilon 1e-3, momentum 0.99: Keras's defaults) and ReLU. Keras names none of
them, so they carry the names a fresh Keras session gives them in creation order (``conv2d`` ..
``conv2d_93``, ``batch_normalization`` .. ``batch_normalization_93``); a file from a session that
numbered them otherwise is matched by their order (:mod:`imgcls_jax.weights.keras`). The network
is written once as a program of Keras's layer calls (:mod:`imgcls_jax.models.program`):

* ``stem``: 3x3/2 VALID (32), 3x3 VALID (32), 3x3 SAME (64), 3x3/2 max pooling, 1x1 (80), 3x3
  VALID (192), 3x3/2 max pooling;
* ``mixed0``..``mixed2``: 1x1; 1x1 -> 5x5; 1x1 -> 3x3 -> 3x3; 3x3 average pooling (SAME: the
  padding is not counted) -> 1x1; concatenated (256, 288, 288 channels);
* ``mixed3``: 3x3/2 VALID; 1x1 -> 3x3 -> 3x3/2 VALID; 3x3/2 max pooling (768);
* ``mixed4``..``mixed7``: 1x1; 1x1 -> 1x7 -> 7x1; 1x1 -> 7x1 -> 1x7 -> 7x1 -> 1x7; pooling -> 1x1
  (768);
* ``mixed8``: 1x1 -> 3x3/2; 1x1 -> 1x7 -> 7x1 -> 3x3/2; 3x3/2 max pooling (1280);
* ``mixed9``, ``mixed10``: 1x1; 1x1 -> (1x3, 3x1); 1x1 -> 3x3 -> (1x3, 3x1); pooling -> 1x1 (2048).

Inputs are normalised with ``"tf"`` preprocessing, as Keras's ImageNet weights expect; at least
75x75 (Keras's rule), 299x299 for Keras's ImageNet top. Kernels start as Keras's (glorot uniform).
The top, head and weight mapping are :class:`~imgcls_jax.models.convnet.KerasConvNet`'s.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
from flax import nnx

from imgcls_jax.models.conv import check_impl
from imgcls_jax.models.program import LayerProgram, ProgramConvNet, program_conv_ops, program_flops

MIN_SIZE = 75
#: Stage names in forward order (``top:N`` trains the last N and the head): Keras's names of the
#: concatenations that end each module, after the stem.
STAGE_NAMES = ("stem", *(f"mixed{i}" for i in range(11)))


def conv_bn(p: LayerProgram, x, filters: int, kh: int, kw: int, strides: int = 1, padding: str = "same"):
    """Keras's ``inception_v3.conv2d_bn``: convolution (no bias), BatchNorm without scale, ReLU."""
    x = p.conv(x, filters, (kh, kw), strides=strides, padding=padding)
    return p.relu(p.bn(x, scale=False))


def _pool_branch(p: LayerProgram, x, filters: int):
    return conv_bn(p, p.avg_pool(x, 3, 1, "same"), filters, 1, 1)


def _module_a(p: LayerProgram, x, pool_filters: int):
    """``mixed0``..``mixed2``."""
    b1 = conv_bn(p, x, 64, 1, 1)
    b5 = conv_bn(p, conv_bn(p, x, 48, 1, 1), 64, 5, 5)
    b3 = conv_bn(p, conv_bn(p, conv_bn(p, x, 64, 1, 1), 96, 3, 3), 96, 3, 3)
    return p.concat([b1, b5, b3, _pool_branch(p, x, pool_filters)])


def _module_c(p: LayerProgram, x, filters: int):
    """``mixed4``..``mixed7``: factorised 7x7 convolutions of ``filters`` inner channels."""
    b1 = conv_bn(p, x, 192, 1, 1)
    b7 = conv_bn(p, conv_bn(p, conv_bn(p, x, filters, 1, 1), filters, 1, 7), 192, 7, 1)
    d = conv_bn(p, x, filters, 1, 1)
    for f, (kh, kw) in ((filters, (7, 1)), (filters, (1, 7)), (filters, (7, 1)), (192, (1, 7))):
        d = conv_bn(p, d, f, kh, kw)
    return p.concat([b1, b7, d, _pool_branch(p, x, 192)])


def _module_e(p: LayerProgram, x):
    """``mixed9``, ``mixed10``: the expanded filter banks."""
    b1 = conv_bn(p, x, 320, 1, 1)
    b3 = conv_bn(p, x, 384, 1, 1)
    b3 = p.concat([conv_bn(p, b3, 384, 1, 3), conv_bn(p, b3, 384, 3, 1)])
    d = conv_bn(p, conv_bn(p, x, 448, 1, 1), 384, 3, 3)
    d = p.concat([conv_bn(p, d, 384, 1, 3), conv_bn(p, d, 384, 3, 1)])
    return p.concat([b1, b3, d, _pool_branch(p, x, 192)])


def architecture(p: LayerProgram, x):
    """Keras's ``InceptionV3`` backbone as a program (see :mod:`imgcls_jax.models.program`).
    Long: the module sequence is Keras's, one line per call."""
    p.stage("stem")
    x = conv_bn(p, x, 32, 3, 3, strides=2, padding="valid")
    x = conv_bn(p, x, 32, 3, 3, padding="valid")
    x = p.max_pool(conv_bn(p, x, 64, 3, 3), 3, 2)
    x = conv_bn(p, x, 80, 1, 1, padding="valid")
    x = p.max_pool(conv_bn(p, x, 192, 3, 3, padding="valid"), 3, 2)
    for i, pool_filters in enumerate((32, 64, 64)):
        p.stage(f"mixed{i}")
        x = _module_a(p, x, pool_filters)
    p.stage("mixed3")
    b3 = conv_bn(p, x, 384, 3, 3, strides=2, padding="valid")
    d = conv_bn(p, conv_bn(p, x, 64, 1, 1), 96, 3, 3)
    d = conv_bn(p, d, 96, 3, 3, strides=2, padding="valid")
    x = p.concat([b3, d, p.max_pool(x, 3, 2)])
    for i, filters in enumerate((128, 160, 160, 192)):
        p.stage(f"mixed{4 + i}")
        x = _module_c(p, x, filters)
    p.stage("mixed8")
    b3 = conv_bn(p, conv_bn(p, x, 192, 1, 1), 320, 3, 3, strides=2, padding="valid")
    b7 = conv_bn(p, conv_bn(p, conv_bn(p, x, 192, 1, 1), 192, 1, 7), 192, 7, 1)
    b7 = conv_bn(p, b7, 192, 3, 3, strides=2, padding="valid")
    x = p.concat([b3, b7, p.max_pool(x, 3, 2)])
    for i in (9, 10):
        p.stage(f"mixed{i}")
        x = _module_e(p, x)
    return x


class InceptionV3(ProgramConvNet):
    """``keras.applications.InceptionV3`` (top, transfer head or features; see
    :class:`~imgcls_jax.models.convnet.KerasConvNet`). Stages: ``stem``, ``mixed0`` ..
    ``mixed10``; features ``[N, h, w, 2048]`` (8x8 at 299 px, 1x1 at 75). ``conv_impl``: how the
    3x3 stride-1 SAME convolutions run (:mod:`imgcls_jax.models.conv`)."""

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
            "inceptionv3", include_top=include_top, pooling=pooling, num_classes=num_classes,
            head_units=head_units, dropout=dropout, input_shape=input_shape, dtype=dtype,
            preprocessing=preprocessing,
        )  # fmt: skip
        self.conv_impl = check_impl(conv_impl)
        self._build_program(rngs)


#: Analytic FLOPs and the convolutions they count (:mod:`imgcls_jax.models.program`).
flops, conv_ops = program_flops, program_conv_ops
