"""A Keras functional network written once, as a program of Keras layer calls, for the families
whose graphs branch and concatenate and whose layers mostly have no name of their own (Inception
V3, Inception-ResNet V2, NASNet).

A family writes its architecture as a function ``architecture(p, x)`` calling ``p.conv``,
``p.bn``, ``p.relu``, ``p.max_pool``, ``p.concat``, ... in the order Keras's source calls its
layers, and :class:`LayerProgram` runs it four ways:

* ``"build"``: creates each weighted layer on the model, named as Keras names it: the given name,
  or for an unnamed layer the name a fresh Keras session gives it (``conv2d``, ``conv2d_1``, ...,
  ``batch_normalization``, ...: Keras numbers a class's unnamed layers in the order they are
  created, which is this call order), grouped by the stages the program opens with ``p.stage``;
* ``"run"``: computes on arrays ``[N, H, W, C]`` with those layers;
* ``"shape"``: follows the map's ``(h, w, c)`` only (the feature map's size for any input);
* ``"flops"``: lists the convolutions as :class:`~imgcls_jax.models.flops.ConvOp` as well.

:class:`ProgramConvNet` is the :class:`~imgcls_jax.models.convnet.KerasConvNet` whose backbone is
such a program.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from imgcls_jax.models.conv import ConvGeneralDilated
from imgcls_jax.models.convnet import KerasConvNet
from imgcls_jax.models.flops import NO_PADDING, ConvOp, count_flops, square
from imgcls_jax.models.layers import (
    BatchNorm,
    SeparableConv2D,
    avg_pool2d,
    conv2d,
    init_glorot_kernels,
    init_he_normal_kernels,
    keras_pads,
    max_pool2d,
    pad2d,
)

MODES = ("build", "run", "shape", "flops")


class Shape(NamedTuple):
    """A map's height, width and channels (what the program follows outside ``"run"``)."""

    h: int
    w: int
    c: int


def _pair(kernel: int | Sequence[int]) -> tuple[int, int]:
    return (kernel, kernel) if isinstance(kernel, int) else (int(kernel[0]), int(kernel[1]))


def _pooled(n: int, k: int, strides: int, padding: str) -> int:
    return -(-n // strides) if padding == "same" else (n - k) // strides + 1


class LayerProgram:
    """Runs an architecture function on ``model`` in ``mode`` (see the module docstring).
    ``rngs``: for ``"build"``. After a run, ``stages`` (build) is ``[(stage, [layer names])]`` in
    creation order and ``ops`` (build, shape, flops) the convolutions in forward order."""

    def __init__(self, model: KerasConvNet, mode: str, rngs: nnx.Rngs | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.model, self.mode, self.rngs = model, mode, rngs
        self.counts: Counter[str] = Counter()
        self.stages: list[tuple[str, list[str]]] = []
        self.ops: list[ConvOp] = []
        self.he_normal: list[str] = []  # convolutions Keras initialises with he_normal

    @property
    def running(self) -> bool:
        return self.mode == "run"

    def channels(self, x) -> int:
        """The channels of ``x`` (an array when running, a :class:`Shape` otherwise)."""
        return x.shape[-1] if self.running else x.c

    def dims(self, x) -> Shape:
        """``(h, w, c)`` of ``x`` (an array when running, a :class:`Shape` otherwise)."""
        return Shape(*x.shape[1:]) if self.running else x

    # ----------------------------------------------------------------------------- naming
    def stage(self, name: str) -> None:
        """Open stage ``name``: the weighted layers created from here on belong to it."""
        if self.mode == "build":
            self.stages.append((name, []))

    def _name(self, prefix: str, name: str | None) -> str:
        if name is not None:
            return name
        n = self.counts[prefix]
        self.counts[prefix] += 1
        return prefix if n == 0 else f"{prefix}_{n}"

    def _add(self, name: str, make: Callable[[], nnx.Module]) -> None:
        if self.mode == "build":
            if not self.stages:
                raise ValueError("an architecture program must open a stage before its first layer")
            setattr(self.model, name, make())
            self.stages[-1][1].append(name)

    # ----------------------------------------------------------------------------- weighted layers
    def conv(
        self,
        x,
        filters: int,
        kernel,
        *,
        strides: int = 1,
        padding: str = "same",
        use_bias: bool = False,
        name: str | None = None,
        he_normal: bool = False,
    ):
        """Keras's ``Conv2D(filters, kernel, strides, padding, use_bias, name)``; ``he_normal``:
        its ``kernel_initializer="he_normal"`` (default: glorot uniform)."""
        name = self._name("conv2d", name)
        if self.running:
            return getattr(self.model, name)(x)
        if he_normal and self.mode == "build":
            self.he_normal.append(name)
        (kh, kw), model = _pair(kernel), self.model
        op = ConvOp(
            x.h, x.w, kh, strides, keras_pads((x.h, x.w), (kh, kw), strides, padding), x.c, filters, kw=kw
        )
        plain = (kh, kw) == (3, 3) and strides == 1 and padding == "same"
        extra = {"conv_general_dilated": ConvGeneralDilated(model.conv_impl)} if plain else {}
        self._add(
            name,
            lambda: conv2d(
                x.c,
                filters,
                (kh, kw),
                strides=strides,
                padding=padding.upper(),
                use_bias=use_bias,
                dtype=model.dtype,
                rngs=self.rngs,
                **extra,
            ),
        )
        self.ops.append(op)
        return Shape(*op.out, filters)

    def separable(
        self,
        x,
        filters: int,
        kernel: int,
        *,
        strides: int = 1,
        padding: str = "same",
        name: str | None = None,
    ):
        """Keras's ``SeparableConv2D(filters, kernel, strides, padding, use_bias=False, name)``."""
        name = self._name("separable_conv2d", name)
        if self.running:
            return getattr(self.model, name)(x, strides, padding)
        model = self.model
        depthwise = ConvOp(
            x.h, x.w, kernel, strides, keras_pads((x.h, x.w), kernel, strides, padding), x.c, x.c, groups=x.c
        )
        h, w = depthwise.out
        self._add(
            name,
            lambda: SeparableConv2D(
                x.c, filters, kernel, dtype=model.dtype, impl=model.depthwise_impl, rngs=self.rngs
            ),
        )
        self.ops += [depthwise, ConvOp(h, w, 1, 1, NO_PADDING, x.c, filters)]
        return Shape(h, w, filters)

    def bn(
        self, x, *, scale: bool = True, epsilon: float = 1e-3, momentum: float = 0.99, name: str | None = None
    ):
        """Keras's ``BatchNormalization(scale, epsilon, momentum, name)`` (Keras's defaults)."""
        name = self._name("batch_normalization", name)
        if self.running:
            return getattr(self.model, name)(x)
        self._add(
            name, lambda: BatchNorm(x.c, epsilon=epsilon, momentum=momentum, scale=scale, rngs=self.rngs)
        )
        return x

    # ----------------------------------------------------------------------------- other layers
    def relu(self, x):
        return nnx.relu(x) if self.running else x

    def max_pool(self, x, k: int, strides: int, padding: str = "valid"):
        """Keras's ``MaxPooling2D(k, strides, padding)``."""
        if self.running:
            return max_pool2d(x, k, strides, padding)
        return Shape(_pooled(x.h, k, strides, padding), _pooled(x.w, k, strides, padding), x.c)

    def avg_pool(self, x, k: int, strides: int, padding: str = "valid"):
        """Keras's ``AveragePooling2D(k, strides, padding)`` (``"same"``: padding not counted)."""
        if self.running:
            return avg_pool2d(x, k, strides, padding)
        return Shape(_pooled(x.h, k, strides, padding), _pooled(x.w, k, strides, padding), x.c)

    def pad(self, x, pads: tuple[tuple[int, int], tuple[int, int]]):
        """Keras's ``ZeroPadding2D(pads)``."""
        if self.running:
            return pad2d(x, pads)
        (top, bottom), (left, right) = pads
        return Shape(x.h + top + bottom, x.w + left + right, x.c)

    def crop(self, x, crops: tuple[tuple[int, int], tuple[int, int]]):
        """Keras's ``Cropping2D(crops)``."""
        (top, bottom), (left, right) = crops
        if self.running:
            return x[:, top : x.shape[1] - bottom, left : x.shape[2] - right]
        return Shape(x.h - top - bottom, x.w - left - right, x.c)

    def concat(self, xs: Sequence):
        """Keras's ``Concatenate(axis=-1)``."""
        if self.running:
            return jnp.concatenate(list(xs), axis=-1)
        return Shape(xs[0].h, xs[0].w, sum(x.c for x in xs))

    def add(self, *xs):
        """Keras's ``Add``."""
        if self.running:
            out = xs[0]
            for x in xs[1:]:
                out = out + x
            return out
        if len({(x.h, x.w, x.c) for x in xs}) != 1:
            raise ValueError(f"cannot add maps of shapes {xs}")
        return xs[0]

    def scale_add(self, x, up, scale: float):
        """Inception-ResNet's ``CustomScaleLayer``: ``x + up * scale``."""
        return x + up * scale if self.running else self.add(x, up)


class ProgramConvNet(KerasConvNet):
    """A :class:`~imgcls_jax.models.convnet.KerasConvNet` whose backbone is the program
    ``architecture(p, x) -> x`` (a static method of the family): :meth:`_build_program` creates
    its layers and stages, :meth:`backbone` runs it, :meth:`feature_size` follows its shapes and
    :meth:`conv_ops` lists its convolutions. A family sets ``conv_impl`` (3x3 stride-1 SAME
    convolutions, :mod:`imgcls_jax.models.conv`) and, with separable convolutions,
    ``depthwise_impl`` before building."""

    architecture: Callable = staticmethod(lambda p, x: x)

    def _build_program(self, rngs: nnx.Rngs, top_dropout: float = 0.0) -> None:
        """Create the backbone's layers (kernels initialised as Keras's: glorot uniform, or
        he_normal where the program says so) and the head."""
        program = LayerProgram(self, "build", rngs)
        out = self.architecture(program, Shape(*self.input_shape))
        self._stages = tuple((name, tuple(layers)) for name, layers in program.stages)
        he = [getattr(self, name).kernel for name in program.he_normal]
        init_glorot_kernels([k for k in self.conv_kernels() if all(k is not h for h in he)], rngs.params())
        if he:
            init_he_normal_kernels(he, rngs.params())
        self._build_head(out.c, rngs, top_dropout=top_dropout)

    @property
    def stages(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """The stages the architecture opened, each with its weighted layers in creation order."""
        return self._stages

    def backbone(self, x: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """Preprocessed images ``[N, H, W, 3]`` -> the last feature map (``dropout_key`` unused: no
        stochastic layer in these backbones)."""
        return self.architecture(LayerProgram(self, "run"), x)

    def feature_size(self, image_size: Sequence[int]) -> tuple[int, int]:
        """``(h, w)`` of the feature map for an ``(H, W)`` input, followed through the program."""
        out = self.architecture(LayerProgram(self, "shape"), Shape(*image_size[:2], 3))
        return (out.h, out.w)

    def conv_ops(self, image_size: int | tuple[int, int]) -> list[ConvOp]:
        """The convolutions (separable ones as depthwise + pointwise) for one ``image_size`` input,
        in forward order."""
        program = LayerProgram(self, "flops")
        self.architecture(program, Shape(*square(image_size), 3))
        return program.ops


def program_flops(
    model: ProgramConvNet, image_size: int | tuple[int, int], mode: str = "forward", *, padding: str = "full"
) -> float:
    """Analytic FLOPs of one image through ``model`` (multiply-add = 2): its convolutions
    (:meth:`ProgramConvNet.conv_ops`; a depthwise one at ``k * k`` multiply-adds per output) and
    the dense layers of its top or head; BatchNorm, activations, additions, concatenations,
    pooling and the optimizer are left out. ``mode``: ``"forward"``, ``"train"`` (forward, weight
    and input gradients; no input gradient of the first convolution) or ``"frozen"``;
    ``padding``: ``"full"`` (textbook: ``k x k`` taps everywhere) or ``"valid"`` (taps on zero
    padding left out, as XLA counts). Returns FLOPs per image."""
    return count_flops(model, model.conv_ops(image_size), mode, padding)


def program_conv_ops(model: ProgramConvNet, image_size: int | tuple[int, int]) -> list[ConvOp]:
    """:meth:`ProgramConvNet.conv_ops` as a function of ``(model, image_size)``, the form every
    family's ``conv_ops`` has."""
    return model.conv_ops(image_size)
