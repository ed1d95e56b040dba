"""A search space over :class:`~imgcls_jax.config.TrainConfig` fields, declared as plain JSON.

Each entry maps a *path* into the config to a distribution::

    {
      "phases.0.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-1, "log": true},
      "phases.*.weight_decay":  {"type": "float", "low": 1e-6, "high": 1e-2, "log": true},
      "dropout":                {"type": "float", "low": 0.0, "high": 0.6},
      "head_units":             {"type": "categorical", "choices": [[64], [128], [256, 64]]},
      "head_units.0":           {"type": "int", "low": 16, "high": 256, "log": true},
      "batch_size":             {"type": "categorical", "choices": [8, 16]},
      "augment.rotation":       {"type": "float", "low": 0.0, "high": 0.2},
      "augment_strength":       {"type": "float", "low": 0.0, "high": 1.5},
      "phases.1.trainable":     {"type": "categorical", "choices": ["top:1", "top:2", "all"]},
      "phases.0.schedule":      {"type": "categorical", "choices": ["constant", "cosine"]},
      "label_smoothing":        {"type": "float", "low": 0.0, "high": 0.2},
      "model":                  {"type": "categorical", "choices": ["vgg16", "efficientnetb0"]}
    }

A path is a ``TrainConfig`` field, then dict keys / list indices separated by dots; ``*``
applies one sampled value to every phase. ``augment.<name>`` may name any
:class:`~imgcls_jax.data.augment.AugmentConfig` field. ``augment_strength`` is special: it
multiplies every magnitude of the base config's ``augment`` (rotation, zoom, translation,
brightness, contrast, saturation, hue, mixup/cutmix alphas), clipped to each field's range.

Distributions: ``float`` and ``int`` take ``low < high``, optional ``log`` (``low > 0``) and
``step``; ``categorical`` takes a non-empty ``choices`` list (lists such as head widths are
stored in Optuna as their JSON text). :func:`parse_space` checks everything (paths, ranges,
types, and that the extreme values build a valid config) before any trial runs.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from imgcls_jax.config import AugmentConfig, ConfigError, PhaseConfig, TrainConfig

AUGMENT_STRENGTH = "augment_strength"
#: The augmentation magnitudes ``augment_strength`` scales, with their upper bounds.
_STRENGTH_FIELDS = {
    "rotation": 1.0, "zoom": 1.0, "translation": 1.0, "brightness": 1.0, "contrast": 1.0,
    "saturation": 1.0, "hue": 0.5, "mixup_alpha": math.inf, "cutmix_alpha": math.inf,
}  # fmt: skip
_KEYS = {
    "float": {"low", "high", "log", "step"},
    "int": {"low", "high", "log", "step"},
    "categorical": {"choices"},
}


@dataclass(frozen=True)
class Param:
    """One searched parameter: ``path`` into the config and its distribution."""

    path: str
    kind: str  # "float", "int" or "categorical"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()

    @property
    def encoded(self) -> bool:
        """True when the choices are not plain scalars and Optuna stores their JSON text."""
        return any(not isinstance(c, (str, int, float, bool, type(None))) for c in self.choices)

    def suggest(self, trial) -> Any:
        """Sample this parameter from an ``optuna.Trial`` (decoded: lists come back as lists)."""
        if self.kind == "float":
            return trial.suggest_float(self.path, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(
                self.path, int(self.low), int(self.high), log=self.log, step=int(self.step or 1)
            )
        if self.encoded:
            return json.loads(trial.suggest_categorical(self.path, [json.dumps(c) for c in self.choices]))
        return trial.suggest_categorical(self.path, list(self.choices))

    def extremes(self) -> list:
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]


def parse_space(space: dict, base: TrainConfig) -> list[Param]:
    """Check ``space`` (see the module docstring) against ``base``; return its parameters.

    Raises :class:`ConfigError` naming the parameter for an unknown path, an empty or
    reversed range, a bad distribution, or a value that does not build a valid ``TrainConfig``.
    """
    if not isinstance(space, dict) or not space:
        raise ConfigError(
            f"the search space must be a non-empty mapping of path -> distribution, got {space!r}"
        )
    params = [_parse_param(path, spec) for path, spec in space.items()]
    for param in params:
        _resolve(asdict(base), param.path)  # unknown paths fail here, before sampling anything
        for value in param.extremes():
            try:
                apply_params(base, {param.path: value})
            except (TypeError, ValueError) as e:
                raise ConfigError(f"search space {param.path!r}: value {value!r} is invalid: {e}") from e
    return params


def _finite(value) -> bool:
    """A finite int or float (not a bool; an int too large for a float is not finite)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _parse_param(path: str, spec: dict) -> Param:
    if not isinstance(path, str):
        raise ConfigError(f"search space: parameter names must be strings, got {path!r}")
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str) or spec.get("type") not in _KEYS:
        raise ConfigError(
            f"search space {path!r}: expected {{'type': 'float'|'int'|'categorical', ...}}, got {spec!r}"
        )
    kind = spec["type"]
    unknown = sorted(set(spec) - _KEYS[kind] - {"type"})
    if unknown:
        raise ConfigError(f"search space {path!r}: unknown key(s) {unknown} for type {kind!r}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"search space {path!r}: 'choices' must be a non-empty list, got {choices!r}")
        if len({json.dumps(c, sort_keys=True) for c in choices}) != len(choices):
            raise ConfigError(f"search space {path!r}: duplicate choices in {choices!r}")
        return Param(path, kind, choices=tuple(choices))
    low, high, log, step = spec.get("low"), spec.get("high"), spec.get("log", False), spec.get("step")
    if not isinstance(log, bool):
        raise ConfigError(f"search space {path!r}: 'log' must be true or false, got {log!r}")
    numbers = (low, high) if step is None else (low, high, step)
    if not all(_finite(v) for v in numbers):
        raise ConfigError(f"search space {path!r}: low/high/step must be finite numbers, got {spec!r}")
    if kind == "int" and not all(float(v).is_integer() for v in numbers):
        raise ConfigError(f"search space {path!r}: an int range needs integer low/high/step, got {spec!r}")
    if not low < high:
        raise ConfigError(f"search space {path!r}: empty range: low {low} must be < high {high}")
    if log and low <= 0:
        raise ConfigError(f"search space {path!r}: a log range needs low > 0, got {low}")
    if step is not None and (step <= 0 or log):
        raise ConfigError(f"search space {path!r}: step must be > 0 and cannot be combined with log")
    return Param(path, kind, float(low) if kind == "float" else int(low), high, log, step)


def _resolve(tree: dict, path: str) -> list[tuple[Any, Any]]:
    """The (container, key) pairs ``path`` names in ``tree`` (several for ``phases.*``)."""
    if path == AUGMENT_STRENGTH:
        return [(tree, "augment")]
    parts = path.split(".")
    known = sorted(f.name for f in fields(TrainConfig))
    if parts[0] not in tree:
        raise ConfigError(
            f"search space: unknown parameter {path!r}: {parts[0]!r} is not a TrainConfig field "
            f"(known: {known} and {AUGMENT_STRENGTH!r})"
        )
    targets = [(tree, parts[0])]
    for i, part in enumerate(parts[1:], start=1):
        where = ".".join(parts[:i])
        next_targets = []
        for holder, key in targets:
            node = holder[key]
            if isinstance(node, (list, tuple)):
                if part == "*":
                    keys = range(len(node))
                elif re.fullmatch("[0-9]{1,9}", part) and int(part) < len(node):
                    keys = [int(part)]
                else:
                    raise ConfigError(
                        f"search space: unknown parameter {path!r}: {where} has {len(node)} entries, "
                        f"no index {part!r}"
                    )
                if isinstance(node, tuple):
                    holder[key] = node = list(node)
                next_targets += [(node, k) for k in keys]
            elif isinstance(node, dict):
                allowed = set(node)
                if where == "augment":
                    allowed |= _augment_fields()
                elif where.startswith("phases."):
                    allowed = {f.name for f in fields(PhaseConfig)}
                if part not in allowed:
                    raise ConfigError(
                        f"search space: unknown parameter {path!r}: {part!r} is not a key of {where} "
                        f"(known: {sorted(allowed)})"
                    )
                next_targets.append((node, part))
            else:
                raise ConfigError(
                    f"search space: unknown parameter {path!r}: {where} is a {type(node).__name__}"
                )
        targets = next_targets
    return targets


def _augment_fields() -> set[str]:
    return {f.name for f in fields(AugmentConfig)}


def apply_params(base: TrainConfig, values: dict[str, Any]) -> TrainConfig:
    """A new config: ``base`` with each path in ``values`` set (see the module docstring).

    Raises ``ValueError``/``TypeError`` when a value does not fit its field.
    """
    tree = json.loads(json.dumps(asdict(base)))  # plain, mutable lists and dicts
    for path, value in values.items():
        for holder, key in _resolve(tree, path):
            if path == AUGMENT_STRENGTH:
                holder[key] = _scaled_augment(holder[key], value)
            else:
                holder[key] = _checked(
                    path, holder.get(key) if isinstance(holder, dict) else holder[key], value
                )
    return TrainConfig(**tree)  # the config checks every field


def _checked(path: str, old, value):
    if isinstance(old, bool) or isinstance(value, bool):
        if not isinstance(value, bool) or not isinstance(old, bool | type(None)):
            raise TypeError(f"{path} holds {old!r}; {value!r} is not of the same kind")
    elif isinstance(old, int) and not isinstance(value, int):
        raise TypeError(
            f"{path} is an integer field (now {old!r}); use an 'int' or integer choices, got {value!r}"
        )
    elif isinstance(old, (list, tuple)) and not isinstance(value, list):
        raise TypeError(f"{path} holds a list ({old!r}); choices must be lists, got {value!r}")
    return value


def _scaled_augment(augment: dict, strength) -> dict:
    if not _finite(strength) or strength < 0:
        raise ValueError(f"{AUGMENT_STRENGTH} must be a number >= 0, got {strength!r}")
    scaled = dict(augment)
    for name, high in _STRENGTH_FIELDS.items():
        if name in scaled:
            scaled[name] = min(float(scaled[name]) * strength, high)
    return scaled
