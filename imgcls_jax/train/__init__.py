"""Training: the trainer (``fit``), pure jitted steps, optimizers and schedules, the one
evaluation loop, run folders and checkpoints. No TensorFlow here (the data layer loads it when a
run reads its images)."""

from imgcls_jax.train.checkpoints import (
    Checkpoints,
    CheckpointWriteError,
    model_items,
    restore_model,
    set_model_items,
)
from imgcls_jax.train.evaluation import EvalTotals, evaluate_batches
from imgcls_jax.train.imported import initialize_from, write_run_folder
from imgcls_jax.train.loop import FitResult, NonFiniteLossError, Trainer, fit
from imgcls_jax.train.optim import (
    OptimizerSpec,
    lr_scale,
    make_optimizer,
    make_schedule,
    set_lr_scale,
    trainable_layers,
)
from imgcls_jax.train.rundir import METRIC_FIELDS, NotARunError, RunDir, RunMismatchError
from imgcls_jax.train.state import SplitModel, TrainState, ema_update, init_state, split_model
from imgcls_jax.train.steps import (
    cross_entropy,
    eval_outputs,
    head_forward,
    image_forward,
    make_eval_step,
    make_train_step,
)

__all__ = [
    "METRIC_FIELDS",
    "CheckpointWriteError",
    "Checkpoints",
    "EvalTotals",
    "FitResult",
    "NonFiniteLossError",
    "NotARunError",
    "OptimizerSpec",
    "RunDir",
    "RunMismatchError",
    "SplitModel",
    "TrainState",
    "Trainer",
    "cross_entropy",
    "ema_update",
    "eval_outputs",
    "evaluate_batches",
    "fit",
    "head_forward",
    "image_forward",
    "initialize_from",
    "init_state",
    "lr_scale",
    "make_eval_step",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "model_items",
    "restore_model",
    "set_lr_scale",
    "set_model_items",
    "split_model",
    "trainable_layers",
    "write_run_folder",
]
