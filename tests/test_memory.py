"""What the process keeps between runs (issue #23, item 12): the caches of compiled steps and of
``predict``'s forward pass hold the programs, never a model's arrays (a search's trials, or a
test suite, would keep every model it ever built alive: up to 32 of them)."""

import gc

import jax
import numpy as np
import pytest

from imgcls_jax import create_model, predict
from imgcls_jax.config import PhaseConfig
from imgcls_jax.train import OptimizerSpec, init_state, make_eval_step, make_train_step, split_model


def _live() -> dict[int, int]:
    gc.collect()
    return {id(a): a.nbytes for a in jax.live_arrays()}


@pytest.mark.parametrize("name", ["vgg16", "mobilenetv2"])
def test_compiled_steps_and_predict_hold_no_model_arrays(name):
    before = _live()
    model = create_model(name, num_classes=3, head_units=(8,), pooling="avg", input_shape=(32, 32, 3))
    split = split_model(model, model.trainable_layers("top:1"))
    spec, hyper = OptimizerSpec.for_phase(PhaseConfig(trainable="top:1"), 2, model.head_layers)
    state = init_state(split, spec.build(hyper))
    batch = {"image": np.zeros((2, 32, 32, 3), np.uint8), "label": np.zeros(2, np.int32)}
    state, _ = make_train_step(split, spec, hyper=hyper)(state, split.frozen, batch)
    make_eval_step(split)(state.params, split.frozen, {**batch, "mask": np.ones(2, bool)})
    predict(model, batch["image"])
    held = sum(_live().values()) - sum(before.values())
    assert held > 1e6  # the model and its state are alive here (the measurement sees them)
    del model, split, state, batch
    left = {k: v for k, v in _live().items() if k not in before}
    assert sum(left.values()) < 1e5, f"{len(left)} arrays, {sum(left.values()) / 1e6:.1f} MB still alive"
