"""The classic transfer-learning fast path: run the frozen base once, train the head on its outputs.

While the convolutional base is frozen and the training images are not augmented, every epoch
would push the same pixels through the same base. :func:`compute_features` runs the base once
per image (``model.pool(model.features(images))``: ``float32[N, 512]`` with avg/max pooling) and
:class:`FeatureBatches` serves those vectors in batches shaped like the image pipeline's, so
the same jitted steps train the head with ``forward=head_forward``. No TensorFlow here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imgcls_jax.train.faults import kill_point
from imgcls_jax.train.steps import cached_jit


def compute_features(model, pipeline) -> tuple[np.ndarray, np.ndarray]:
    """``(features float32[N, ...], labels int32[N])`` for every image of an evaluation pipeline
    (``training=False``: source order, padded last batch whose padding is dropped here)."""
    from imgcls_jax.data import prefetch_to_device

    if pipeline.training:
        raise ValueError("compute_features needs an evaluation pipeline (training=False): every image once")
    graphdef, state = nnx.split(model)

    def build():
        def base(state, images):
            m = nnx.merge(graphdef, state)
            return m.pool(m.features(images)).astype(jnp.float32)

        return jax.jit(base)

    base = cached_jit(("base_features", graphdef), build)  # compiled once per model graph and shape

    feats, labels = [], []
    for batch in prefetch_to_device(pipeline.epoch(0)):
        mask = np.asarray(batch["mask"])
        feats.append(np.asarray(base(state, batch["image"]))[mask])
        labels.append(np.asarray(batch["label"])[mask])
        kill_point("features")
    features, labels = np.concatenate(feats), np.concatenate(labels).astype(np.int32)
    if len(labels) != pipeline.num_examples:
        raise RuntimeError(f"computed features of {len(labels)} images, expected {pipeline.num_examples}")
    return features, labels


class FeatureBatches:
    """Batches of cached features, shaped like :class:`imgcls_jax.data.Pipeline`'s.

    Training: a fresh permutation per epoch from ``(seed, epoch)``, last incomplete batch
    dropped. Evaluation: source order, last batch padded and masked (every example counts once).
    Batches are ``{"features": float32[B, ...], "label": int32[B], "mask": bool[B]}``.
    """

    def __init__(self, features: np.ndarray, labels: np.ndarray, *, batch_size: int, training: bool, seed=0):
        if len(features) != len(labels):
            raise ValueError(f"{len(features)} feature rows but {len(labels)} labels")
        if training and len(labels) < batch_size:
            raise ValueError(f"{len(labels)} training examples is fewer than one batch of {batch_size}")
        self.features, self.labels = features, labels
        self.batch_size, self.training, self.seed = batch_size, training, seed

    @property
    def num_examples(self) -> int:
        return len(self.labels)

    def __len__(self) -> int:
        n, b = self.num_examples, self.batch_size
        return n // b if self.training else math.ceil(n / b)

    def epoch(self, epoch: int = 0) -> Iterator[dict[str, np.ndarray]]:
        n, b = self.num_examples, self.batch_size
        if self.training:
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
            for i in range(len(self)):
                idx = order[i * b : (i + 1) * b]
                yield {"features": self.features[idx], "label": self.labels[idx], "mask": np.ones(b, bool)}
            return
        for i in range(len(self)):
            feats, labels = self.features[i * b : (i + 1) * b], self.labels[i * b : (i + 1) * b]
            real = len(labels)
            pad = [(0, b - real)] + [(0, 0)] * (feats.ndim - 1)
            yield {
                "features": np.pad(feats, pad),
                "label": np.pad(labels, (0, b - real)),
                "mask": np.arange(b) < real,
            }
