"""Analytic FLOP counts of the models, per image: what benchmarks divide by time.

FLOPs count a multiply-add as 2: the matmul work of one image (convolutions and dense layers;
biases, BatchNorm, activations, pooling and the optimizer are left out). A family lists its
forward pass's convolutions as :class:`ConvOp` (input size, kernel, stride, the zero padding
the model applies, channels, groups) and :func:`count_flops` adds them up for a mode
(:func:`vgg_flops`; ``flops`` in :mod:`~imgcls_jax.models.efficientnet`,
:mod:`~imgcls_jax.models.resnet`, :mod:`~imgcls_jax.models.mobilenet`). Two conventions for the
taps that fall on zero padding:

* ``padding="full"``: every output position does ``k x k`` taps: the textbook figure (VGG16 with
  its ImageNet top: 15.47 GMACs = 30.9 GFLOP forward at 224x224).
* ``padding="valid"``: taps on the zero padding are not counted, as XLA's cost analysis counts a
  convolution. On an ``H x H`` map a 3x3 SAME convolution's output rows see ``3H - 2`` of ``3H``
  taps, which matters on small maps (a 2x2 map keeps 4/9 of the taps) and less at 224 (3%).

A training step costs forward + weight gradient + input gradient of every layer except the
first (nothing asks for the gradient of the image): about 3x the forward pass. A frozen-base
step costs the base's forward plus the head's three passes. The optimizer's update (Adam: ~10
FLOPs per trained parameter per *step*) is not in the per-image count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from imgcls_jax.models.vgg import BLOCKS, FILTERS

#: What a step does with each image: inference, training every layer, or training the head only.
FLOP_MODES = ("forward", "train", "frozen")
NO_PADDING = ((0, 0), (0, 0))


@dataclass(frozen=True)
class ConvOp:
    """One convolution of a forward pass: input ``(h, w)``, kernel ``k x k`` (``k x kw`` when
    ``kw`` is set, e.g. Inception's 1x7), ``stride``, zero padding ``pads = ((top, bottom), (left,
    right))`` (explicit or SAME's implicit one), channels ``cin -> cout``, ``groups`` (``cin`` for
    a depthwise convolution; ``cout = cin * depth_multiplier`` then)."""

    h: int
    w: int
    k: int
    stride: int
    pads: tuple[tuple[int, int], tuple[int, int]]
    cin: int
    cout: int
    groups: int = 1
    kw: int | None = None

    @property
    def kernel(self) -> tuple[int, int]:
        """``(kh, kw)``."""
        return (self.k, self.k if self.kw is None else self.kw)

    @property
    def out(self) -> tuple[int, int]:
        """The output ``(h, w)``."""
        return tuple(
            (n + before + after - k) // self.stride + 1
            for n, k, (before, after) in zip((self.h, self.w), self.kernel, self.pads)
        )

    def flops(self, padding: str = "full") -> float:
        """Forward FLOPs of one image (multiply-add = 2); ``padding="valid"`` leaves out the taps
        on the zero padding."""
        taps = [
            _taps(n, o, k, self.stride, p[0], padding)
            for n, o, k, p in zip((self.h, self.w), self.out, self.kernel, self.pads)
        ]
        return 2.0 * taps[0] * taps[1] * self.cin * self.cout / self.groups


def _taps(size: int, out: int, k: int, stride: int, before: int, padding: str) -> int:
    """Kernel taps summed over the ``out`` output positions along one axis of length ``size``."""
    if padding == "full":
        return out * k
    if padding != "valid":
        raise ValueError(f"padding must be 'full' or 'valid', got {padding!r}")
    return sum(1 for o in range(out) for j in range(k) if 0 <= o * stride + j - before < size)


def same_pads(size: int, k: int, stride: int) -> tuple[int, int]:
    """The zero padding ``(before, after)`` of a ``"SAME"`` convolution along an axis of ``size``
    (TensorFlow's and XLA's rule: the odd pixel after)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return (total // 2, total - total // 2)


def square(image_size: int | Sequence[int]) -> tuple[int, int]:
    """``(height, width)`` of an ``image_size`` given as one int or a pair."""
    return (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)


def count_flops(model, ops: Sequence[ConvOp], mode: str = "forward", padding: str = "full") -> float:
    """FLOPs of one image through ``model``: the convolutions ``ops`` (its backbone's, in forward
    order) and the dense layers of its top or head (``model.head_layers`` with a kernel: a
    normalisation layer there is left out; a 1x1 convolution on the pooled map counts as dense).

    ``mode``: ``"forward"``; ``"train"`` (every layer's forward, weight gradient and input
    gradient, except the first convolution's input gradient: 3 x forward - first conv);
    ``"frozen"`` (the backbone's forward, the dense layers' three passes). ``padding``: see the
    module docstring."""
    if mode not in FLOP_MODES:
        raise ValueError(f"mode must be one of {FLOP_MODES}, got {mode!r}")
    convs = [op.flops(padding) for op in ops]
    head = [getattr(model, name) for name in model.head_layers]
    dense = [2.0 * float(layer.kernel.size) for layer in head if hasattr(layer, "kernel")]  # not norms
    if mode == "forward":
        return sum(convs) + sum(dense)
    if mode == "frozen":
        return sum(convs) + 3 * sum(dense)
    return 3 * sum(convs) - convs[0] + 3 * sum(dense)


def vgg_flops(
    model, image_size: int | tuple[int, int], mode: str = "forward", *, padding: str = "full"
) -> float:
    """Analytic FLOPs of one image through ``model`` (a :class:`imgcls_jax.models.VGG`).

    Args:
      model: the VGG, whose architecture and dense layers (top or head) are counted.
      image_size: input height and width in pixels (an int for square inputs).
      mode: ``"forward"`` (inference), ``"train"`` (all layers trained: forward, weight and input
        gradients, no input gradient of the first conv) or ``"frozen"`` (base forward only, the
        dense layers trained).
      padding: ``"full"`` (9 taps everywhere, the textbook count) or ``"valid"`` (taps on the
        zero padding not counted, XLA's convention).
    Returns: FLOPs per image (float).
    """
    height, width = square(image_size)
    ops, cin = [], 3
    for block, (n_conv, filters) in enumerate(zip(BLOCKS[model.arch], FILTERS)):
        h, w = height >> block, width >> block
        for _ in range(n_conv):
            ops.append(ConvOp(h, w, 3, 1, ((1, 1), (1, 1)), cin, filters))
            cin = filters
    return count_flops(model, ops, mode, padding)
