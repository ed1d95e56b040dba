"""The transfer-learning recipe behind ``imgcls-jax train --data DIR`` (and ``examples/train.py``).

With Keras's ImageNet weights available: the head alone on the frozen base (Adam), then the top
two stages fine-tuned with SGD-momentum, the base at 0.1x the head's rate, cosine decay. Without
them (no file, no network): a loud warning, and every layer trained from scratch (Adam, cosine),
which needs far more data and epochs for the same accuracy. Both with the original experiment's
head (global average pooling, Dense(256) + ReLU, dropout 0.5) and augmentation (horizontal flip,
rotation 0.05, zoom 0.1, translation 0.1).
"""

from __future__ import annotations

import logging
from pathlib import Path

from imgcls_jax.config import AugmentConfig, PhaseConfig, TrainConfig

log = logging.getLogger(__name__)

#: ``--weights`` values besides a path.
WEIGHT_CHOICES = ("auto", "imagenet", "none")
#: Peak learning rates when none is given: transfer learning, and training from scratch.
TRANSFER_LR, SCRATCH_LR = 1e-3, 1e-4


def resolve_weights(choice: str, model: str) -> tuple[str | None, str]:
    """``(weights for TrainConfig, what to tell the user)`` for ``--weights`` ``choice``:
    ``"auto"`` (ImageNet when Keras's file resolves, else from scratch with a loud warning),
    ``"imagenet"`` (an error if unavailable), ``"none"`` or a path to a Keras weight file."""
    from imgcls_jax.weights import ChecksumError, WeightsUnavailableError, resolve_imagenet

    if choice == "none":
        return None, "none: trained from scratch (asked for)"
    if choice not in ("auto", "imagenet"):
        return choice, f"Keras weight file {choice}"
    try:
        path, _ = resolve_imagenet(model, include_top=False)
        return "imagenet", f"ImageNet (Keras file {path})"
    except (WeightsUnavailableError, ChecksumError) as exc:
        if choice == "imagenet":
            raise
        banner = "=" * 78
        log.warning(
            "\n%s\nImageNet weights are NOT available, so this run trains %s FROM SCRATCH.\n"
            "Expect far lower accuracy than transfer learning. Why:\n%s\n%s",
            banner, model, exc, banner,
        )  # fmt: skip
        return None, "NONE: ImageNet weights unavailable, trained FROM SCRATCH (see log)"


def recipe_phases(weights: str | None, epochs: int, learning_rate: float | None = None) -> list[PhaseConfig]:
    """The recipe's phases for ``epochs`` in all: transfer learning when there are ``weights``
    (half the epochs on the head, at least one each), else one phase training every layer."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if weights is None:
        lr = learning_rate or SCRATCH_LR
        return [PhaseConfig(epochs=epochs, trainable="all", optimizer="adam", learning_rate=lr)]
    lr, head = learning_rate or TRANSFER_LR, max(epochs // 2, 1)
    return [
        PhaseConfig(epochs=head, trainable="head", optimizer="adam", learning_rate=lr),
        PhaseConfig(
            epochs=max(epochs - head, 1), trainable="top:2", optimizer="sgd", learning_rate=lr,
            base_lr_multiplier=0.1, schedule="cosine",
        ),
    ]  # fmt: skip


def recipe_config(
    data: str,
    *,
    weights: str | None,
    run_dir: str | None = None,
    model: str = "vgg16",
    epochs: int = 12,
    learning_rate: float | None = None,
    image_size: int = 224,
    batch_size: int = 32,
    seed: int = 0,
    dtype: str = "float32",
    init_from: str | None = None,
) -> TrainConfig:
    """The recipe as a :class:`~imgcls_jax.config.TrainConfig` (``weights`` as resolved by
    :func:`resolve_weights`); ``run_dir`` defaults to ``runs/<data folder name>``. With
    ``init_from`` (a pretrained whole model, head included), the transfer-learning phases."""
    return TrainConfig(
        data=str(data), run_dir=str(run_dir or Path("runs") / Path(data).resolve().name), model=model,
        weights=weights, image_size=image_size, batch_size=batch_size, seed=seed, dtype=dtype,
        pooling="avg", head_units=(256,), dropout=0.5, monitor="val_accuracy",
        augment=AugmentConfig(flip="horizontal", rotation=0.05, zoom=0.1, translation=0.1),
        phases=recipe_phases(weights or init_from, epochs, learning_rate), init_from=init_from,
    )  # fmt: skip
