"""Analytic FLOP counts of the models, per image: what benchmarks divide by time.

FLOPs count a multiply-add as 2. :func:`vgg_flops` is the analytic count of the matmul work of
one image (convolutions and dense layers; biases, ReLUs, pooling and the optimizer are left
out). Two conventions for the 3x3 SAME convolutions:

* ``padding="full"``: every output position does 9 taps: the textbook figure (VGG16 with its
  ImageNet top: 15.47 GMACs = 30.9 GFLOP forward at 224x224).
* ``padding="valid"``: taps that fall on the zero padding are not counted, as XLA's cost analysis
  counts a convolution. On an ``H x H`` map each output row/column sees ``3H - 2`` of ``3H`` taps,
  which matters on small maps (a 2x2 map keeps 4/9 of the taps) and less at 224 (3%).

A training step costs forward + weight gradient + input gradient of every layer except the
first (nothing asks for the gradient of the image): about 3x the forward pass. A frozen-base
step costs the base's forward plus the head's three passes. The optimizer's update (Adam: ~10
FLOPs per trained parameter per *step*) is not in the per-image count.
"""

from __future__ import annotations

from imgcls_jax.models.vgg import BLOCKS, FILTERS

#: What a step does with each image: inference, training every layer, or training the head only.
FLOP_MODES = ("forward", "train", "frozen")


def _conv_taps(size: int, padding: str) -> int:
    """Kernel taps summed over the output positions of one row (or column) of a 3x3 SAME conv."""
    if padding == "full":
        return 3 * size
    if padding == "valid":
        return 3 * size - 2 if size > 1 else 1
    raise ValueError(f"padding must be 'full' or 'valid', got {padding!r}")


def _dense_shapes(model) -> list[tuple[int, int]]:
    """``(in, out)`` of the model's dense layers in forward order (Keras top or transfer head)."""
    shapes = []
    for name in model.head_layers:
        layer = getattr(model, name)
        shapes.append(tuple(int(d) for d in layer.kernel[...].shape))
    return shapes


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
    if mode not in FLOP_MODES:
        raise ValueError(f"mode must be one of {FLOP_MODES}, got {mode!r}")
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    conv = []  # forward FLOPs of each conv layer, in order
    cin = 3
    for block, (n_conv, filters) in enumerate(zip(BLOCKS[model.arch], FILTERS)):
        h, w = height >> block, width >> block
        for _ in range(n_conv):
            conv.append(2.0 * _conv_taps(h, padding) * _conv_taps(w, padding) * cin * filters)
            cin = filters
    dense = [2.0 * fin * fout for fin, fout in _dense_shapes(model)]
    if mode == "forward":
        return sum(conv) + sum(dense)
    if mode == "frozen":
        return sum(conv) + 3 * sum(dense)
    return 3 * sum(conv) - conv[0] + 3 * sum(dense)
