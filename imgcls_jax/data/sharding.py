"""Each process's share of the images in a multi-process run. No TensorFlow here."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

log = logging.getLogger(__name__)


def shard_records(
    records: Sequence[Any],
    process_index: int | None = None,
    process_count: int | None = None,
    *,
    seed: int = 0,
    equal_sizes: bool = False,
) -> list:
    """This process's disjoint share of ``records`` (objects with ``path`` and ``label``).

    Records are sorted by path, shuffled within each class with ``seed`` and laid out class after
    class; process ``i`` takes every ``process_count``-th from position ``i``. So the shares are a
    partition of ``records``, each class is split as evenly as possible (stratified), and the result
    is the same on every machine. ``equal_sizes`` drops the few (< ``process_count``) records that
    make shares unequal: training needs every process to run the same number of steps.
    Defaults: ``jax.process_index()`` and ``jax.process_count()``.
    """
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard_records: need 0 <= process_index < process_count, got {index} of {count}")
    by_class: dict[Any, list] = {}
    for r in sorted(records, key=lambda r: r.path):
        by_class.setdefault(r.label, []).append(r)
    ordered = []
    for label, members in sorted(by_class.items()):
        order = np.random.default_rng([seed, int(label)]).permutation(len(members))
        ordered += [members[i] for i in order]
    if len(ordered) < count:
        raise ValueError(f"shard_records: {len(ordered)} records cannot give each of {count} processes one")
    share = ordered[index::count]
    if equal_sizes:
        dropped = len(ordered) % count
        share = share[: len(ordered) // count]
        if dropped and index == 0:
            log.info("shard_records: %d records left out so that all %d shares are equal", dropped, count)
    return share
