"""EfficientNet B0-B7's architecture as Keras's ``efficientnet.py`` builds it: the block table
(:data:`BLOCKS_ARGS`), each variant's width and depth coefficients (:data:`VARIANTS`), Keras's
rounding, and the Keras-named weighted layers with their weight shapes."""

from __future__ import annotations

import math
from dataclasses import dataclass

from imgcls_jax.models.base import LayerSpec

#: Keras's ``DEFAULT_BLOCKS_ARGS`` as (kernel, repeats, filters_in, filters_out, expand_ratio,
#: strides); every block has ``id_skip=True`` and ``se_ratio=0.25``.
BLOCKS_ARGS = (
    (3, 1, 32, 16, 1, 1),
    (3, 2, 16, 24, 6, 2),
    (5, 2, 24, 40, 6, 2),
    (3, 3, 40, 80, 6, 2),
    (5, 3, 80, 112, 6, 1),
    (5, 4, 112, 192, 6, 2),
    (3, 1, 192, 320, 6, 1),
)
SE_RATIO = 0.25
DEPTH_DIVISOR = 8
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99
#: Keras's ``IMAGENET_STDDEV_RGB``: what the published files hold as the Normalization variance.
IMAGENET_STDDEV_RGB = (0.229, 0.224, 0.225)
POOLINGS = (None, "avg", "max")
MIN_SIZE = 32
#: The backbone's stages (``trainable="top:N"`` trains the last N and the head).
STAGES = ("stem", *(f"block{i}" for i in range(1, len(BLOCKS_ARGS) + 1)), "top")


@dataclass(frozen=True)
class Variant:
    """Keras's ``EfficientNet(width_coefficient, depth_coefficient, default_size, dropout_rate)``."""

    width: float
    depth: float
    default_size: int
    dropout_rate: float
    drop_connect_rate: float = 0.2


VARIANTS = {
    "efficientnetb0": Variant(1.0, 1.0, 224, 0.2),
    "efficientnetb1": Variant(1.0, 1.1, 240, 0.2),
    "efficientnetb2": Variant(1.1, 1.2, 260, 0.3),
    "efficientnetb3": Variant(1.2, 1.4, 300, 0.3),
    "efficientnetb4": Variant(1.4, 1.8, 380, 0.4),
    "efficientnetb5": Variant(1.6, 2.2, 456, 0.4),
    "efficientnetb6": Variant(1.8, 2.6, 528, 0.5),
    "efficientnetb7": Variant(2.0, 3.1, 600, 0.5),
}


def round_filters(filters: int, width: float) -> int:
    """Keras's ``round_filters``: ``filters * width`` to a multiple of 8, never 10% below."""
    filters *= width
    new = max(DEPTH_DIVISOR, int(filters + DEPTH_DIVISOR / 2) // DEPTH_DIVISOR * DEPTH_DIVISOR)
    return int(new + DEPTH_DIVISOR if new < 0.9 * filters else new)


@dataclass(frozen=True)
class Block:
    """One inverted-residual block: Keras name prefix (``"block2a_"``), stage (1-7) and shapes."""

    prefix: str
    stage: int
    kernel: int
    strides: int
    filters_in: int
    filters_out: int
    expand_ratio: int
    drop_rate: float

    @property
    def filters(self) -> int:
        """Channels of the expanded (depthwise) part."""
        return self.filters_in * self.expand_ratio

    @property
    def se_filters(self) -> int:
        return max(1, int(self.filters_in * SE_RATIO))

    @property
    def residual(self) -> bool:
        return self.strides == 1 and self.filters_in == self.filters_out

    def layer_specs(self) -> list[LayerSpec]:
        """This block's weighted layers in Keras's order, with Keras's weight shapes."""
        p, k, f = self.prefix, self.kernel, self.filters
        specs = []
        if self.expand_ratio != 1:
            specs += [_conv_spec(f"{p}expand_conv", 1, self.filters_in, f), _bn_spec(f"{p}expand_bn", f)]
        se = self.se_filters
        specs += [
            LayerSpec(f"{p}dwconv", ((k, k, f, 1),), ("depthwise_kernel",)),
            _bn_spec(f"{p}bn", f),
            LayerSpec(f"{p}se_reduce", ((1, 1, f, se), (se,))),
            LayerSpec(f"{p}se_expand", ((1, 1, se, f), (f,))),
            _conv_spec(f"{p}project_conv", 1, f, self.filters_out),
            _bn_spec(f"{p}project_bn", self.filters_out),
        ]
        return specs


def _conv_spec(name: str, k: int, cin: int, cout: int) -> LayerSpec:
    return LayerSpec(name, ((k, k, cin, cout),), ("kernel",))


def _bn_spec(name: str, channels: int) -> LayerSpec:
    return LayerSpec(name, ((channels,),) * 4, ("gamma", "beta", "moving_mean", "moving_variance"))


def blocks(arch: str, drop_connect_rate: float | None = None) -> list[Block]:
    """The blocks of ``arch`` in order, as Keras's ``EfficientNet`` builds them."""
    variant = VARIANTS[arch]
    rate = variant.drop_connect_rate if drop_connect_rate is None else drop_connect_rate
    repeats = [int(math.ceil(variant.depth * args[1])) for args in BLOCKS_ARGS]
    total, out, b = float(sum(repeats)), [], 0
    for stage, ((kernel, _, fin, fout, expand, strides), n) in enumerate(zip(BLOCKS_ARGS, repeats), 1):
        fin, fout = round_filters(fin, variant.width), round_filters(fout, variant.width)
        for j in range(n):
            out.append(
                Block(f"block{stage}{chr(j + 97)}_", stage, kernel, strides if j == 0 else 1,
                      fin if j == 0 else fout, fout, expand, rate * b / total)
            )  # fmt: skip
            b += 1
    return out


def base_layer_specs(arch: str) -> list[LayerSpec]:
    """The weighted layers of ``arch`` without its top, in Keras's order (what a notop file has)."""
    width = VARIANTS[arch].width
    stem, top = round_filters(32, width), round_filters(1280, width)
    specs = [
        LayerSpec("normalization", ((3,), (3,), ()), ("mean", "variance", "count")),
        _conv_spec("stem_conv", 3, 3, stem),
        _bn_spec("stem_bn", stem),
    ]
    last = stem
    for block in blocks(arch):
        specs += block.layer_specs()
        last = block.filters_out
    return specs + [_conv_spec("top_conv", 1, last, top), _bn_spec("top_bn", top)]
