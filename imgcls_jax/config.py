"""One config object from which a training run is fully reproducible (saved beside every run)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


@dataclass
class PhaseConfig:
    """One transfer-learning phase: which layers train, for how long, with what optimizer.

    ``trainable``: ``"head"``, ``"all"`` or ``"top:N"`` (last N VGG blocks + head).
    ``learning_rate`` is the peak rate of ``schedule`` (per optimizer step), after
    ``warmup_epochs`` of linear warmup. ``schedule``: ``constant``, ``cosine``, ``piecewise``,
    ``exponential`` or ``plateau`` (constant, multiplied by ``plateau_factor`` when the
    monitored validation metric has not improved for ``plateau_patience`` epochs).
    ``base_lr_multiplier`` scales the learning rate of the convolutional base relative to the
    head (e.g. 0.1 when fine-tuning).
    """

    epochs: int = 1
    trainable: str = "head"
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    base_lr_multiplier: float = 1.0
    plateau_factor: float = 0.1
    plateau_patience: int = 2

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"PhaseConfig.epochs must be >= 1, got {self.epochs}")


@dataclass
class TrainConfig:
    """Everything a run needs. ``data`` is an image folder (``root/<class>/...`` or pre-split
    ``root/{train,val,test}/<class>/...``); a flat folder is split by ``splits`` (stratified,
    seeded)."""

    data: str = ""
    run_dir: str = "runs/run"
    splits: dict[str, float] = field(default_factory=lambda: {"train": 0.75, "val": 0.25})
    #: Folder-name glob patterns left out of ``data`` (e.g. ``["* GT"]``: segmentation masks).
    exclude: list[str] = field(default_factory=list)
    image_size: int = 224
    batch_size: int = 32
    eval_batch_size: int | None = None
    model: str = "vgg16"
    weights: str | None = None
    pooling: str | None = "avg"
    head_units: tuple[int, ...] = (256,)
    dropout: float = 0.5
    dtype: str = "float32"
    #: Initializer of the kernels not loaded from ``weights`` (see ``imgcls_jax.models.VGG``):
    #: ``glorot_uniform`` (Keras's default), ``he_normal``, ``he_uniform``.
    kernel_init: str = "glorot_uniform"
    augment: dict = field(default_factory=lambda: {"flip": "horizontal", "rotation": 0.05, "zoom": 0.1})
    phases: list[PhaseConfig] = field(default_factory=lambda: [PhaseConfig()])
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    seed: int = 0
    monitor: str = "val_accuracy"
    early_stopping_patience: int | None = None
    keep_checkpoints: int = 2
    cache: str | None = "memory"
    #: Train a head-only phase on base outputs computed once, when there is no augmentation.
    cache_features: bool = True

    def __post_init__(self):
        self.phases = [p if isinstance(p, PhaseConfig) else PhaseConfig(**p) for p in self.phases]
        self.head_units = tuple(self.head_units)
        if self.monitor not in ("val_accuracy", "val_loss"):
            raise ValueError(
                f"TrainConfig.monitor must be 'val_accuracy' or 'val_loss', got {self.monitor!r}"
            )
        if not self.phases:
            raise ValueError("TrainConfig.phases must hold at least one phase")

    def to_json(self, path=None) -> str:
        text = json.dumps(asdict(self), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, path_or_text) -> TrainConfig:
        text = (
            Path(path_or_text).read_text() if not str(path_or_text).lstrip().startswith("{") else path_or_text
        )
        raw = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; known: {sorted(known)}")
        return cls(**raw)
