"""Hostile configs, tune files and manifests (issue #19, item 4): property tests (hypothesis).

Every input is either accepted, and then behaves as a config (each field typed as its dataclass
declares, read from the dataclass's own type hints; the same config back from its JSON), or
refused with the library's own error naming the field or line (``ConfigError``,
``DatasetError``): never another exception from inside Python, numpy,
JAX or Optuna. The fields mutated come from ``dataclasses.fields``, so a field added later is
tested with no change here. No training: each example costs milliseconds.
"""

import dataclasses
import inspect
import json
import math
import os
import re
import types
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from imgcls_jax import config as config_module
from imgcls_jax.config import AugmentConfig, ConfigError, PhaseConfig, TrainConfig
from imgcls_jax.data.folders import DatasetError, Record, read_manifest, write_manifest
from imgcls_jax.hpo.command import load_tune_config
from imgcls_jax.hpo.space import parse_space

#: Examples per property (CI: ~1-2 s per 100 on a loaded 2-core machine); more for a deeper
#: search by hand: IMGCLS_HOSTILE_EXAMPLES=5000 pytest tests/test_hostile_configs.py
EXAMPLES = int(os.environ.get("IMGCLS_HOSTILE_EXAMPLES", "300"))
PROPERTY = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# ------------------------------------------------------------------------ hostile JSON values
EDGE_NUMBERS = st.sampled_from(
    [0, 1, -1, 2, 3, 7, 32, 2**31 - 1, 2**31, 2**32, 2**63, 10**400, -(10**400), 0.0, -0.0, 0.5, 1.0,
     1.5, 1e-300, 5e-324, 1e308, math.nan, math.inf, -math.inf]
)  # fmt: skip
EDGE_TEXTS = st.sampled_from(
    ["", " ", "\x00", "a\x00b", "\ud800", "\udc80", "ünïcødé/数据/🙂", "../..", "top:99", "top:-1", "top:x",
     "top:" + "9" * 5000, "x" * 5000, "None", "null", "1e3", "[1, 2]"]
)  # fmt: skip


def _module_strings() -> list[str]:
    """Every string of the config module's choice tuples (optimizers, schedules, poolings, ...):
    plausible values, so that mutations also land on accepted configs."""
    found = set()
    for name, value in vars(config_module).items():
        if not name.isupper():
            continue
        if isinstance(value, tuple) and all(isinstance(v, str | None) for v in value):
            found |= {v for v in value if v is not None}
        if isinstance(value, dict):
            found |= {k for k in value if isinstance(k, str)}
    return sorted(found | {"vgg16", "vgg19", "head", "all", "top:1", "top:2", "imagenet", "memory"})


TEXTS = st.one_of(st.text(max_size=10), EDGE_TEXTS, st.sampled_from(_module_strings()))
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), EDGE_NUMBERS,
    st.floats(allow_nan=True, allow_infinity=True), TEXTS,
)  # fmt: skip
JSONISH = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXTS, inner, max_size=3)),
    max_leaves=6,
)


def plausible(hint) -> st.SearchStrategy:
    """Values near the valid ones for a field typed ``hint`` (from the dataclass's type hints)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return st.one_of([plausible(a) for a in args])
    if hint is type(None):
        return st.none()
    if hint is bool:
        return st.booleans()
    if hint is int:
        return st.one_of(st.integers(-3, 300), EDGE_NUMBERS)
    if hint is float:
        return st.one_of(st.floats(-0.5, 1.5), st.integers(0, 3), EDGE_NUMBERS)
    if hint is str:
        return TEXTS
    if origin in (tuple, list):
        item = args[0] if args else object
        return st.lists(plausible(item) if item is not Ellipsis else SCALARS, max_size=3)
    if origin is dict:
        return st.dictionaries(
            st.sampled_from(["train", "val", "test", "x y", ""]), plausible(args[1]), max_size=3
        )
    return JSONISH


# -------------------------------------------------------------------- the dataclasses' own types
def conforms(value, hint) -> bool:
    """Whether ``value`` is of the type ``hint`` says (bools are not numbers, floats are finite)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint is bool:
        return type(value) is bool
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if hint is Path:
        return isinstance(value, str | Path)
    if hint in (dict, list, tuple):
        return isinstance(value, hint)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return isinstance(value, tuple) and all(conforms(v, args[0]) for v in value)
        return isinstance(value, tuple) and len(value) == len(args) and all(map(conforms, value, args))
    if origin is list:
        return isinstance(value, list) and all(conforms(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            conforms(k, args[0]) and conforms(v, args[1]) for k, v in value.items()
        )
    if dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint)
        return isinstance(value, hint) and all(
            conforms(getattr(value, f.name), hints[f.name]) for f in dataclasses.fields(hint)
        )
    raise AssertionError(f"no rule for the type {hint!r}: add one to conforms()")


def _field_paths() -> list[tuple]:
    """Every field of TrainConfig, of its AugmentConfig and of its first PhaseConfig, with its
    type hint; split fractions too."""
    paths = []
    for cls, prefix in ((TrainConfig, ()), (AugmentConfig, ("augment",)), (PhaseConfig, ("phases", 0))):
        hints = typing.get_type_hints(cls)
        paths += [((*prefix, f.name), hints[f.name]) for f in dataclasses.fields(cls)]
    return paths + [(("splits", "train"), float), (("splits", "val"), float)]


FIELD_PATHS = _field_paths()


def base_dict() -> dict:
    """A valid config as the JSON a user would write (two phases: the recipe's shape)."""
    base = TrainConfig(
        data="data",
        weights="random",
        phases=[PhaseConfig(), PhaseConfig(trainable="top:2", optimizer="sgd", learning_rate=1e-4)],
    )
    return json.loads(base.to_json())


@st.composite
def mutations(draw):
    """``(raw config dict, [(path, kind)])``: a valid config with 1-3 hostile edits: a field set
    to a hostile or plausible value, deleted (its default then applies), or an unknown key."""
    raw, edits = base_dict(), []
    for _ in range(draw(st.integers(1, 3))):
        path, hint = draw(st.sampled_from(FIELD_PATHS))
        kind = draw(st.sampled_from(["hostile", "plausible", "plausible", "delete", "unknown"]))
        holder = raw
        try:
            for key in path[:-1]:
                holder = holder[key]
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit replaced or removed the container
        if not isinstance(holder, dict):
            continue
        if kind == "delete":
            holder.pop(path[-1], None)
        elif kind == "unknown":
            holder[draw(st.sampled_from(["learning_rat", "epoch", "lr", "Data", "ünknown", ""]))] = 1
        else:
            holder[path[-1]] = draw(JSONISH if kind == "hostile" else plausible(hint))
        edits.append((path, kind))
    return raw, edits


def _names_a_field(message: str, edits) -> bool:
    if re.search(r"unknown (TrainConfig|AugmentConfig|PhaseConfig) field", message):
        return True
    names = {str(p) for path, _ in edits for p in path if isinstance(p, str)}
    return any(name in message for name in names)


@PROPERTY
@given(mutations())
def test_a_mutated_config_is_a_typed_config_or_a_config_error_naming_a_field(case):
    raw, edits = case
    try:
        cfg = TrainConfig.from_json(json.dumps(raw))  # as a user's file reaches it
    except ConfigError as e:
        event("refused")
        assert _names_a_field(str(e), edits), (str(e), edits)
        assert len(str(e)) < 2000  # a 5000-digit number or text is cut, not pasted
        return
    event("accepted")
    assert conforms(cfg, TrainConfig), cfg
    assert TrainConfig.from_json(cfg.to_json()) == cfg


@PROPERTY
@given(
    st.one_of(
        st.text(max_size=40).map(lambda t: "{" + t),
        mutations().map(lambda case: json.dumps(case[0], allow_nan=True)),
        mutations().map(lambda case: json.dumps(case[0])[: len(json.dumps(case[0])) // 2]),  # cut short
        st.integers(1, 3000).map(lambda n: "{" + '"data": ' + "[" * n + "]" * n + "}"),  # deep nesting
        st.sampled_from(['{"seed": 1' + "0" * 5000 + "}", '{"dropout": 1e999}', '{"data": "\\ud800"}']),
    )
)
def test_config_json_text_is_a_config_or_a_config_error(text):
    try:
        cfg = TrainConfig.from_json(text)
    except ConfigError as e:
        assert str(e) and len(str(e)) < 2000
    else:
        assert conforms(cfg, TrainConfig)


def test_config_files_that_are_not_json_name_the_file(tmp_path):
    cases = {
        "binary.json": b"\xff\xfe\x00garbage",
        "deep.json": b"[" * 100_000,
        "nan.json": b'{"dropout": NaN}',
        "list.json": b"[1, 2]",
        "typo.json": b'{"data": "x", "learning_rat": 1}',
        "bool.json": b'{"data": "x", "batch_size": true}',
        "phase.json": b'{"data": "x", "phases": [{"epochs": 1}, "head"]}',
    }
    expected = {
        "binary.json": "not a UTF-8 text file",
        "deep.json": "not valid JSON",
        "nan.json": "TrainConfig.dropout must be a number in [0, 1), got nan",
        "list.json": "must be a JSON object of TrainConfig fields",
        "typo.json": "'learning_rat': 'learning_rate' is a field of 'phases' (PhaseConfig)",
        "bool.json": "TrainConfig.batch_size must be an integer >= 1 and <= 2147483647, got True",
        "phase.json": "TrainConfig.phases[1] must be a JSON object of PhaseConfig fields, got 'head'",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ConfigError) as info:
            TrainConfig.from_json(tmp_path / name)
        assert str(info.value).startswith(str(tmp_path / name)), str(info.value)
        assert expected[name] in str(info.value), str(info.value)
    with pytest.raises(FileNotFoundError, match="no such config file"):
        TrainConfig.from_json(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="no such config file"):
        TrainConfig.from_json("x" * 5000)  # a name too long for the file system: not an OSError


def test_values_that_used_to_slip_through_are_refused():
    """Each was accepted, or raised OverflowError/TypeError, before the checks of issue #19."""
    refused = {
        "seed": 2**70,  # jax.random.key: OverflowError at the first step
        "batch_size": 2**40,
        "image_size": [64, 31],  # below VGG16's 32 (a [H, W] list was a TypeError before)
        "dropout": 10**400,  # math.isfinite(10**400): OverflowError
        "head_units": [2**40],
        "data": "a\x00b",
        "run_dir": "\ud800",  # os.mkdir: UnicodeEncodeError
        "splits": {"train": 0.5, "": 0.5},  # "" marks a class without images in the manifest
        "model": "resnet",
    }
    for name, value in refused.items():
        with pytest.raises(ConfigError, match=f"TrainConfig.{name}"):
            TrainConfig(**{"data": "x", name: value})
    assert TrainConfig(data="x", weights="random", image_size=[64, 96]).phase_size(0) == (64, 96)  # as Keras
    with pytest.raises(ConfigError, match=r"TrainConfig.phases\[0\].learning_rate"):
        TrainConfig(phases=[{"learning_rate": 10**400}])
    with pytest.raises(ConfigError, match=r"TrainConfig.augment.rotation"):
        TrainConfig(augment={"rotation": 10**400})
    with pytest.raises(ConfigError, match=r"TrainConfig.phases\[0\].trainable"):
        TrainConfig(phases=[{"trainable": "top:" + "9" * 5000}])


# --------------------------------------------------------------------------------- tune files
SPACE_PATHS = st.one_of(
    st.sampled_from([".".join(map(str, path)) for path, _ in FIELD_PATHS]),
    st.sampled_from(["augment_strength", "phases.*.learning_rate", "phases.9.epochs", "phases.².epochs",
                     "phases.0.learning_rate.x", "head_units.0", "splits.val", "", ".", "phases.*"]),
    TEXTS,
)  # fmt: skip


@st.composite
def distributions(draw):
    spec = {"type": draw(st.one_of(st.sampled_from(["float", "int", "categorical"]), SCALARS))}
    for key in draw(st.sets(st.sampled_from(["low", "high", "log", "step", "choices", "extra"]))):
        if key == "choices":
            spec[key] = draw(
                st.one_of(st.lists(st.one_of(plausible(float), plausible(int), JSONISH), max_size=3), SCALARS)
            )
        elif key == "log":
            spec[key] = draw(st.one_of(st.booleans(), SCALARS))
        else:
            spec[key] = draw(st.one_of(st.floats(-1, 2), st.integers(0, 64), SCALARS))
    return spec


@st.composite
def sound_parameters(draw):
    """``(path, distribution)`` pairs a user would write for a field of the config: a numeric
    range from the field's own type hint, or choices of plausible values (often, not always,
    valid for the field)."""
    path, hint = draw(st.sampled_from(FIELD_PATHS))
    dotted = ".".join(map(str, path))
    if hint in (int, float) or hint in (int | None, float | None):
        kind = "int" if int in typing.get_args(hint) or hint is int else "float"
        low = draw(st.integers(0, 4) if kind == "int" else st.floats(0, 0.5))
        high = low + draw(st.integers(1, 64) if kind == "int" else st.floats(0.01, 1))
        return dotted, {"type": kind, "low": low, "high": high, "log": draw(st.booleans()) and low > 0}
    choices = draw(st.lists(plausible(hint), min_size=1, max_size=3, unique_by=repr))
    return dotted, {"type": "categorical", "choices": choices}


def _search():
    from imgcls_jax.hpo.trials import search

    return search


def _search_keywords() -> list[str]:
    return [n for n in inspect.signature(_search()).parameters if n not in ("base_config", "space")]


STUDIES = st.one_of(
    st.just({"n_trials": 2}),
    st.just({"n_trials": 2}),
    JSONISH,
    st.dictionaries(st.sampled_from(_search_keywords()), SCALARS, max_size=3),
)


@PROPERTY
@given(
    st.one_of(
        st.dictionaries(SPACE_PATHS, distributions(), max_size=3),
        st.lists(sound_parameters(), min_size=1, max_size=3).map(dict),
    ),
    STUDIES,
)
def test_a_hostile_tune_file_is_parsed_or_a_config_or_search_space_error(space, study):
    base = TrainConfig(**base_dict())
    try:
        loaded = load_tune_config(json.dumps({"base": base_dict(), "space": space, "study": study}))
    except ConfigError as e:
        assert "study" in str(e)
        return
    assert loaded.base == base
    hints = typing.get_type_hints(_search())
    for key, value in loaded.study.items():  # what reaches search() has search()'s types
        assert conforms(value, hints[key]), (key, value)
    try:
        params = parse_space(loaded.space, loaded.base)
    except ConfigError as e:
        event("space refused")
        assert "search space" in str(e)
        return
    event("space accepted")
    assert [p.path for p in params] == list(space)


# ---------------------------------------------------------------------------------- manifests
def _manifest(tmp_path) -> tuple:
    root = tmp_path / "images"
    records = []
    for label, name in enumerate(["cat", "dog", "émeu"]):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(3):
            (root / name / f"{i}.png").write_bytes(b"")  # existence is all the reader checks
            records.append(Record(str(root / name / f"{i}.png"), label, ["train", "val", "test"][i]))
    path = write_manifest(tmp_path / "manifest.csv", records, ["cat", "dog", "émeu", "empty"], root=root)
    return path, root


@st.composite
def manifest_edits(draw):
    """A list of edits to a manifest's text lines: replace a field, delete/duplicate/append a
    line, change the header, add a column, write bytes that are not UTF-8."""
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(
            st.sampled_from(["field", "field", "delete", "duplicate", "append", "header", "column", "bytes"])
        )
        line, column = draw(st.integers(0, 12)), draw(st.integers(0, 3))
        value = draw(
            st.one_of(
                TEXTS,
                st.sampled_from(["0", "1", "2", "3", "4", "-1", "cat", "dog", "val", "x.png", "cat/0.png"]),
            )
        )
        edits.append((kind, line, column, value))
    return edits


def _apply(lines: list[str], edits) -> bytes:
    import csv
    import io

    tail = b""
    for kind, line, column, value in edits:
        line = min(line, len(lines) - 1) if lines else 0
        if kind == "field" and lines:
            row = next(csv.reader([lines[line]]), [""])
            row = (row + [""] * 4)[:4]
            row[column] = value
            out = io.StringIO()  # "\r\n" ends the row so that a field holding either is quoted
            csv.writer(out, lineterminator="\r\n").writerow(row)
            lines[line] = out.getvalue().removesuffix("\r\n")
        elif kind == "delete" and lines:
            del lines[line]
        elif kind == "duplicate" and lines:
            lines.append(lines[line])
        elif kind == "append":
            lines.append(value)
        elif kind == "header" and lines:
            lines[0] = value
        elif kind == "column" and lines:
            lines[line] += "," + value
        elif kind == "bytes":
            tail = b"\xff\xfe"
    text = "\n".join(lines) + "\n"
    return text.encode("utf-8", "surrogatepass") + tail  # a lone surrogate: bytes that are not UTF-8


@PROPERTY
@given(manifest_edits())
def test_a_hand_edited_manifest_is_read_consistently_or_a_dataset_error_naming_the_line(tmp_path, edits):
    path, root = _manifest(tmp_path)  # the same images every example; the manifest written anew
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_bytes(_apply(lines, edits))
    try:
        records, names = read_manifest(path, root=str(root), check_splits=["train", "val", "test"])
    except DatasetError as e:
        event("refused")
        message = str(e)
        assert message.startswith(str(path)), message
        whole_file = (
            "not 0..K-1",
            "lists no images",
            "not a UTF-8",
            "not a readable CSV",
            "image(s) not found",
        )
        assert re.search(r", line \d+: ", message) or any(w in message for w in whole_file), message
        return
    event("accepted")
    # Accepted: what a reader of the manifest relies on holds (checked here without the reader).
    assert len(set(names)) == len(names) and all(names)
    assert all(0 <= r.label < len(names) for r in records)
    assert len({os.path.normpath(r.path) for r in records}) == len(records)
    assert all(os.path.isfile(r.path) for r in records if r.split in ("train", "val", "test"))


def test_manifest_errors_name_the_line(tmp_path):
    path, root = _manifest(tmp_path)
    good = path.read_text(encoding="utf-8").splitlines()  # header, 9 images, 1 empty class
    edits = {
        "label": (3, good[3].replace(",0,cat,", ",x,cat,"), r"line 4: label 'x' is not an integer >= 0"),
        "name": (
            3,
            good[3].replace(",0,cat,", ",0,dog,"),
            r"line 4: label 0 is 'dog' here but 'cat' on line 2",
        ),
        "class": (
            5,
            good[5].replace(",1,dog,", ",2,dog,"),
            r"line 6: class 'dog' has label 2 here but 1 on line 5",
        ),
        "duplicate": (10, good[1], r"line 11: 'cat/0.png' is listed again \(first on line 2\)"),
        "columns": (2, good[2] + ",extra", r"line 3: expected 4 fields, got 5"),
        "header": (0, "path,label,name,split", r"line 1: the header must be path,label,class_name,split"),
        "split": (2, good[2].replace(",val", ",../x"), r"line 3: split '../x' must be"),
        "missing": (2, good[2].replace("cat/1.png", "cat/9.png"), r"1 listed image\(s\) not found: line 3: "),
    }
    for index, line, message in edits.values():
        lines = list(good)
        lines[index] = line
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        with pytest.raises(DatasetError, match=message):
            read_manifest(path, root=str(root), check_splits=["val"])
    path.write_text("\n".join(good[:-1]) + "\n", encoding="utf-8")  # the empty class's line deleted
    assert read_manifest(path, root=str(root))[1] == ["cat", "dog", "émeu"]  # K = 3 now, still 0..K-1
    path.write_text("\n".join(good[:7] + good[10:]) + "\n", encoding="utf-8")  # every 'émeu' line
    with pytest.raises(DatasetError, match=r"no line for label\(s\) \[2\]"):
        read_manifest(path)
    with pytest.raises(DatasetError, match="no such manifest file"):
        read_manifest(tmp_path / "none.csv")
