"""A Keras-style text summary of a model's parameter layers."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx


def summary(model: nnx.Module) -> str:
    """One row per layer with parameters: name, parameter shapes and count, then the total."""
    rows, total = [], 0
    for name, params in nnx.to_pure_dict(nnx.state(model, nnx.Param)).items():
        leaves = jax.tree_util.tree_leaves_with_path(params)
        count = sum(int(np.prod(leaf.shape)) for _, leaf in leaves)
        shapes = ", ".join(
            f"{jax.tree_util.keystr(path, simple=True)} {tuple(leaf.shape)}" for path, leaf in leaves
        )
        rows.append((str(name), shapes, count))
        total += count
    width = max(len(r[0]) for r in rows) if rows else 5
    lines = [f"{'layer':<{width}}  {'params':>11}  shapes", "-" * (width + 40)]
    lines += [f"{name:<{width}}  {count:>11,}  {shapes}" for name, shapes, count in rows]
    lines += ["-" * (width + 40), f"{'total':<{width}}  {total:>11,}"]
    return "\n".join(lines)
