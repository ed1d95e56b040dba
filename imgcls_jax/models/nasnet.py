"""NASNetMobile and NASNetLarge (``keras.applications.NASNetMobile`` / ``NASNetLarge``) in Flax
NNX, layer for layer as Keras's ``nasnet.py`` builds them, written once as a program of Keras's
layer calls (:mod:`imgcls_jax.models.program`).

* Stem: ``stem_conv1`` (3x3/2 VALID, no bias) + ``stem_bn1``, then two reduction cells ``stem_1``
  and ``stem_2``.
* Then ``num_blocks`` normal cells (``0``, ``1``, ...), a reduction cell ``reduce_<n>``, normal
  cells, a reduction cell, normal cells (:data:`VARIANTS`), each with its filters (``penultimate /
  24``, doubled at each reduction; the stem cells a quarter and a half of it); a final ReLU.
* Every cell first adjusts the previous cell's input ``p`` to its own input: a factorized
  reduction (``adjust_conv_1_<id>`` on a 1x1/2 average pooling of ReLU(p), ``adjust_conv_2_<id>``
  on the same of ReLU(p) shifted by one pixel, concatenated, ``adjust_bn_<id>``) when their widths
  differ, a 1x1 projection (``adjust_conv_projection_<id>`` + ``adjust_bn_<id>``) when only the
  channels do; then ReLU + 1x1 ``normal_conv_1_<id>`` / ``reduction_conv_1_<id>`` + BatchNorm
  of its input (``h``), and the branches Keras's cells combine: separable blocks
  (``separable_conv_{1,2}_<branch>_<id>`` with their ``_bn``: ReLU, separable convolution (at
  stride 2 after Keras's ``correct_pad`` zero padding, VALID), BatchNorm, ReLU, separable
  convolution, BatchNorm), 3x3 average poolings (SAME: padding not counted; in a reduction cell,
  3x3/2 VALID pooling of the zero-padded ``h``, the zeros counted as Keras counts them) and max
  poolings, added in pairs and concatenated (normal cells: 6x the filters, reduction cells 4x).
* NASNetMobile (``skip_reduction=False``) passes a reduction cell's input on as the next cell's
  ``p``; NASNetLarge (``skip_reduction=True``) passes the input of the cell before it.

BatchNorm: momentum 0.9997, epsilon 1e-3 everywhere, in float32 under bfloat16 compute too.
Kernels start as Keras's: he_normal for the plain convolutions, glorot uniform for the separable
ones. Inputs are normalised with ``"tf"`` preprocessing, as Keras's ImageNet weights expect; at
least 32x32 (Keras's rule); the ImageNet top takes 224x224 (Mobile) or 331x331 (Large). The top,
head and weight mapping are :class:`~imgcls_jax.models.convnet.KerasConvNet`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax.numpy as jnp
from flax import nnx

from imgcls_jax.models.conv import check_impl
from imgcls_jax.models.layers import choose_depthwise_impl, correct_pad
from imgcls_jax.models.program import LayerProgram, ProgramConvNet, program_conv_ops, program_flops

BN = {"epsilon": 1e-3, "momentum": 0.9997}
FILTER_MULTIPLIER = 2


@dataclass(frozen=True)
class Variant:
    """Keras's ``NASNet`` arguments of an application, and its default (ImageNet) size."""

    penultimate_filters: int
    num_blocks: int
    stem_block_filters: int
    skip_reduction: bool
    default_size: int

    def stage_names(self) -> tuple[str, ...]:
        """``stem``, ``stem_1``, ``stem_2``, ``normal_0`` ..., ``reduce_<n>``, ...: Keras's cells'
        block ids (a normal cell's id is its number)."""
        n = self.num_blocks
        cells = [f"normal_{i}" for i in range(n)]
        cells += [f"reduce_{n}", *(f"normal_{n + i + 1}" for i in range(n))]
        cells += [f"reduce_{2 * n}", *(f"normal_{2 * n + i + 1}" for i in range(n))]
        return ("stem", "stem_1", "stem_2", *cells)


VARIANTS = {
    "nasnetmobile": Variant(1056, 4, 32, False, 224),
    "nasnetlarge": Variant(4032, 6, 96, True, 331),
}


def _separable_block(p: LayerProgram, x, filters: int, kernel: int, block_id: str, strides: int = 1):
    """Keras's ``_separable_conv_block``."""
    x = p.relu(x)
    if strides == 2:
        x = p.pad(x, correct_pad(p.dims(x)[:2], kernel))
    x = p.separable(x, filters, kernel, strides=strides, padding="valid" if strides == 2 else "same",
                    name=f"separable_conv_1_{block_id}")  # fmt: skip
    x = p.relu(p.bn(x, name=f"separable_conv_1_bn_{block_id}", **BN))
    x = p.separable(x, filters, kernel, name=f"separable_conv_2_{block_id}")
    return p.bn(x, name=f"separable_conv_2_bn_{block_id}", **BN)


def _adjust_block(p: LayerProgram, prev, ip, filters: int, block_id: str):
    """Keras's ``_adjust_block``: ``prev`` made to match ``ip``'s width and ``filters``."""
    if prev is None:
        return ip
    (_, w_prev, c_prev), (_, w_ip, _) = p.dims(prev), p.dims(ip)
    if w_prev != w_ip:
        prev = p.relu(prev)
        p1 = p.avg_pool(prev, 1, 2)
        p1 = p.conv(p1, filters // 2, 1, name=f"adjust_conv_1_{block_id}", he_normal=True)
        p2 = p.crop(p.pad(prev, ((0, 1), (0, 1))), ((1, 0), (1, 0)))
        p2 = p.conv(p.avg_pool(p2, 1, 2), filters // 2, 1, name=f"adjust_conv_2_{block_id}", he_normal=True)
        return p.bn(p.concat([p1, p2]), name=f"adjust_bn_{block_id}", **BN)
    if c_prev != filters:
        prev = p.conv(p.relu(prev), filters, 1, name=f"adjust_conv_projection_{block_id}", he_normal=True)
        return p.bn(prev, name=f"adjust_bn_{block_id}", **BN)
    return prev


def _first(p: LayerProgram, kind: str, ip, prev, filters: int, block_id: str):
    """A cell's adjusted ``p`` and its ``h`` (ReLU, 1x1 ``<kind>_conv_1_<id>``, BatchNorm)."""
    prev = _adjust_block(p, prev, ip, filters, block_id)
    h = p.conv(p.relu(ip), filters, 1, name=f"{kind}_conv_1_{block_id}", he_normal=True)
    return prev, p.bn(h, name=f"{kind}_bn_1_{block_id}", **BN)


def normal_cell(p: LayerProgram, ip, prev, filters: int, block_id: str):
    """Keras's ``_normal_a_cell``: ``(output, ip)``."""
    p.stage(f"normal_{block_id}")
    prev, h = _first(p, "normal", ip, prev, filters, block_id)
    x1 = p.add(_separable_block(p, h, filters, 5, f"normal_left1_{block_id}"),
               _separable_block(p, prev, filters, 3, f"normal_right1_{block_id}"))  # fmt: skip
    x2 = p.add(_separable_block(p, prev, filters, 5, f"normal_left2_{block_id}"),
               _separable_block(p, prev, filters, 3, f"normal_right2_{block_id}"))  # fmt: skip
    x3 = p.add(p.avg_pool(h, 3, 1, "same"), prev)
    x4 = p.add(p.avg_pool(prev, 3, 1, "same"), p.avg_pool(prev, 3, 1, "same"))
    x5 = p.add(_separable_block(p, h, filters, 3, f"normal_left5_{block_id}"), h)
    return p.concat([prev, x1, x2, x3, x4, x5]), ip


def reduction_cell(p: LayerProgram, ip, prev, filters: int, block_id: str):
    """Keras's ``_reduction_a_cell``: ``(output, ip)``."""
    p.stage(block_id)
    prev, h = _first(p, "reduction", ip, prev, filters, block_id)
    h3 = p.pad(h, correct_pad(p.dims(h)[:2], 3))
    x1 = p.add(_separable_block(p, h, filters, 5, f"reduction_left1_{block_id}", 2),
               _separable_block(p, prev, filters, 7, f"reduction_right1_{block_id}", 2))  # fmt: skip
    x2 = p.add(p.max_pool(h3, 3, 2), _separable_block(p, prev, filters, 7, f"reduction_right2_{block_id}", 2))
    x3 = p.add(p.avg_pool(h3, 3, 2), _separable_block(p, prev, filters, 5, f"reduction_right3_{block_id}", 2))
    x4 = p.add(x2, p.avg_pool(x1, 3, 1, "same"))
    x5 = p.add(_separable_block(p, x1, filters, 3, f"reduction_left4_{block_id}"), p.max_pool(h3, 3, 2))
    return p.concat([x2, x3, x4, x5]), ip


def architecture(p: LayerProgram, x, variant: Variant):
    """Keras's ``NASNet`` backbone of ``variant`` as a program (see :mod:`imgcls_jax.models.program`)."""
    n, m = variant.num_blocks, FILTER_MULTIPLIER
    filters = variant.penultimate_filters // 24
    p.stage("stem")
    x = p.conv(
        x, variant.stem_block_filters, 3, strides=2, padding="valid", name="stem_conv1", he_normal=True
    )
    x = p.bn(x, name="stem_bn1", **BN)
    x, prev = reduction_cell(p, x, None, filters // m**2, "stem_1")
    x, prev = reduction_cell(p, x, prev, filters // m, "stem_2")
    for stage in range(3):
        if stage:
            x, before = reduction_cell(p, x, prev, filters * m**stage, f"reduce_{n * stage}")
            prev = prev if variant.skip_reduction else before
        for i in range(n):
            x, prev = normal_cell(p, x, prev, filters * m**stage, f"{n * stage + i + (1 if stage else 0)}")
    return p.relu(x)


class NASNet(ProgramConvNet):
    """``keras.applications.NASNetMobile`` / ``NASNetLarge`` (``arch``: ``"nasnetmobile"`` or
    ``"nasnetlarge"``; top, transfer head or features: see
    :class:`~imgcls_jax.models.convnet.KerasConvNet`). Stages (:meth:`Variant.stage_names`):
    ``stem``, ``stem_1``, ``stem_2``, then the cells (``normal_0`` ..., ``reduce_4`` ...);
    features ``[N, h, w, C]`` (C = 1056 / 4032; 7x7 at 224 px, 11x11 at 331). ``conv_impl`` (3x3
    SAME convolutions: none here, for the common signature) and ``depthwise_impl`` (the separable
    convolutions' depthwise part, :func:`~imgcls_jax.models.layers.choose_depthwise_impl`)."""

    preprocessing = "tf"

    def __init__(
        self,
        arch: str = "nasnetmobile",
        *,
        include_top: bool = True,
        pooling: str | None = None,
        num_classes: int | None = None,
        head_units: Sequence[int] = (),
        dropout: float = 0.0,
        input_shape: tuple[int, int, int] = (224, 224, 3),
        dtype=jnp.float32,
        preprocessing: str = "tf",
        depthwise_impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        if arch not in VARIANTS:
            raise ValueError(f"unknown NASNet architecture {arch!r}; expected one of {sorted(VARIANTS)}")
        self._setup(
            arch, include_top=include_top, pooling=pooling, num_classes=num_classes, head_units=head_units,
            dropout=dropout, input_shape=input_shape, dtype=dtype, preprocessing=preprocessing,
        )  # fmt: skip
        self.variant = VARIANTS[arch]
        self.conv_impl = check_impl("auto")
        choose_depthwise_impl(depthwise_impl)  # checks the name
        self.depthwise_impl = depthwise_impl
        self._build_program(rngs)

    def architecture(self, p: LayerProgram, x):  # type: ignore[override]
        """:func:`architecture` of this model's variant."""
        return architecture(p, x, self.variant)


#: Analytic FLOPs and the convolutions they count (:mod:`imgcls_jax.models.program`).
flops, conv_ops = program_flops, program_conv_ops
