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
    ``image_size``: the phase's input size (default: ``TrainConfig.image_size``). Phases of
    growing sizes train at low resolution first and adapt at a higher one (progressive resizing);
    it needs a pooled head (``TrainConfig.pooling`` "avg" or "max"), whose weights do not depend
    on the input size.
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
    image_size: int | None = None

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"PhaseConfig.epochs must be >= 1, got {self.epochs}")
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"PhaseConfig.image_size must be >= 1 or None, got {self.image_size}")


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
    #: Keep an exponential moving average of the weights with this decay per step (e.g. 0.999;
    #: timm's ``--model-ema``, Keras's ``use_ema``) and validate, checkpoint and evaluate it
    #: instead of the raw weights. Each phase starts its average afresh. None: no average.
    ema_decay: float | None = None
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
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"TrainConfig.ema_decay must be in (0, 1) or None, got {self.ema_decay}")
        sizes = sorted({self.phase_image_size(i) for i in range(len(self.phases))})
        if len(sizes) > 1 and self.pooling is None:
            raise ValueError(
                f"phases of different image sizes {sizes} need a pooled head (pooling 'avg' or "
                "'max'): with pooling None the head's first kernel depends on the input size"
            )

    def phase_image_size(self, phase_index: int) -> int:
        """Input height and width of phase ``phase_index``."""
        return self.phases[phase_index].image_size or self.image_size

    def phase_of_epoch(self, epoch: int) -> int:
        """Index of the phase that trains (0-based, run-wide) ``epoch``; the last phase for
        epochs past the end."""
        end = 0
        for index, phase in enumerate(self.phases):
            end += phase.epochs
            if epoch < end:
                return index
        return len(self.phases) - 1

    def image_size_at(self, epoch: int | None = None) -> int:
        """Input size the model had at ``epoch`` (default: the end of the run), the size at
        which a checkpoint of that epoch is evaluated and predicts."""
        phase = len(self.phases) - 1 if epoch is None else self.phase_of_epoch(epoch)
        return self.phase_image_size(phase)

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
