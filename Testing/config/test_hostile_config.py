"""Hostile configuration files, split files and device names, generated (hypothesis).

Every key of a run configuration given a wrong type, NaN, infinity, a negative, huge or empty
value; configuration and protocol files that are random bytes or cut short; split files of any
JSON shape; device names from an alphabet of near misses. Each ends in a valid result or in an
MTKDError whose one-line message names the file (never another exception).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import ROOT
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from mtkd.config import RunConfig, dump_config, load_config
from mtkd.data.splits import Split, read_split
from mtkd.devices import check_device_name, is_device_name, resolve_device
from mtkd.errors import MTKDError
from mtkd.protocols import PRESETS, load_protocol
from MTKDLib.devices import check_device

# The same examples on every run, bounded, no per-example deadline, no database in the tree
# (the settings style of Testing/hostile.py).
HOSTILE = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=150,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
EXAMPLES = ROOT / "examples"

# A valid distillation config touching every section; hostile values replace parts of it.
BASE = {
    "kind": "distill",
    "name": "student",
    "data": {"source": "data", "labels_json": "labels.json", "structures": ["liver"]},
    "split": {"fixed": {"train": ["a"], "val": ["b"], "test": ["c"]}},
    "model": {"name": "thesis_s1", "params": {"channels": [4, 8]}},
    "multitask": {"reconstruction": "none"},
    "train": {"device": "cpu"},
    "distill": {
        "teacher": "teacher",
        "pairs": [{"student": "a", "teacher": "b", "temperature": 0.4}],
        "output": {"loss": "pmd"},
    },
}


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (keys and list indices) into ``value``, sections and leaves alike."""
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*prefix, index))
    return found


KEYS = _paths(RunConfig.from_dict(BASE).to_dict())

NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, -1, 0, -0.0, 1e-300, 1e300]),
    st.integers(min_value=-(10**30), max_value=10**30),
)
TEXT = st.one_of(
    st.text(max_size=12),
    st.sampled_from(
        ["", " ", "..", "/", "a/b", "tpu:7", "cuda:-1", "\x00", ".nan", "~", "~nobody9/x"]
    ),
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(TEXT, st.integers(-3, 3)), inner, max_size=3),
    ),
    max_leaves=8,
)


def _set(data: Any, path: tuple, value: Any) -> None:
    for part in path[:-1]:
        data = data[part]
    data[path[-1]] = value


def _finite_numbers(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite_numbers(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite_numbers(v) for v in value)
    return True


def _refused_naming(error: MTKDError, path: Path) -> None:
    message = str(error)
    assert str(path) in message, message
    assert "\n" not in message, message


def _load(path: Path) -> RunConfig | None:
    """The config read from ``path``, or None after checking the error names the file."""
    try:
        config = load_config(path)
    except MTKDError as error:
        _refused_naming(error, path)
        event("refused")
        return None
    event("loaded")
    data = config.to_dict()
    assert _finite_numbers(data), data
    assert is_device_name(config.train.device)
    again = path.with_name("again.yaml")
    again.write_text(dump_config(config), encoding="utf-8")
    assert load_config(again).to_dict() == data  # what loads also writes and reads back
    return config


@HOSTILE
@given(changes=st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=1, max_size=3))
@example(changes=[(("train", "optimizer", "lr"), math.nan)])
@example(changes=[(("model",), {"\n": None})])  # a key that would break the line
@example(changes=[(("model", "params", "channels"), {0: math.inf})])
@example(changes=[(("data", "source"), "~nobody9/x"), (("distill", "teacher"), "a\x00b")])
def test_config_values_of_every_key(tmp_path, changes):
    data = copy.deepcopy(BASE)
    for path, value in changes:
        try:
            _set(data, path, value)
        except (KeyError, IndexError, TypeError):  # an earlier change replaced a section
            continue
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    _load(path)


@HOSTILE
@given(content=st.binary(max_size=300))
def test_config_files_of_random_bytes(tmp_path, content):
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    _load(path)


@HOSTILE
@given(
    name=st.sampled_from(["teacher.yaml", "distill_thesis.yaml"]),
    cut=st.floats(min_value=0, max_value=1),
    garbage=st.binary(max_size=8),
)
def test_config_files_cut_short(tmp_path, name, cut, garbage):
    """A real configuration cut anywhere (a copy interrupted), maybe with bytes appended."""
    content = (EXAMPLES / name).read_bytes()
    path = tmp_path / name
    path.write_bytes(content[: int(len(content) * cut)] + garbage)
    _load(path)


# ------------------------------------------------------------------------------ split files
JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), NUMBERS, TEXT),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=10,
)
PART = st.sampled_from(["train", "val", "test", "student_train", "tset"])
CASE_IDS = st.lists(st.one_of(st.sampled_from(["a", "b", "c", "d"]), JSON), max_size=5)
SPLITS = st.one_of(JSON, st.dictionaries(PART, st.one_of(CASE_IDS, JSON), max_size=4))


def _read(path: Path) -> Split | None:
    try:
        split = read_split(path)
    except MTKDError as error:
        _refused_naming(error, path)
        event("refused")
        return None
    event("read")
    parts = [split.train, split.val, split.test]
    assert all(isinstance(i, str) and i for part in [*parts, split.student_train] for i in part)
    ids = [case_id for part in parts for case_id in part]
    assert len(ids) == len(set(ids))  # no case twice, none in two lists
    assert set(split.student_train) <= set(split.train)
    return split


@HOSTILE
@given(value=SPLITS)
def test_split_files_of_any_json_shape(tmp_path, value):
    path = tmp_path / "split.json"
    path.write_text(json.dumps(value), encoding="utf-8")
    _read(path)


@HOSTILE
@given(content=st.binary(max_size=200), cut=st.floats(min_value=0, max_value=1))
def test_split_files_of_random_or_cut_bytes(tmp_path, content, cut):
    valid = json.dumps({"train": ["a", "b"], "val": ["c"], "test": ["d"]}).encode()
    for data in (content, valid[: int(len(valid) * cut)]):
        path = tmp_path / "split.json"
        path.write_bytes(data)
        _read(path)


# ------------------------------------------------------------------------------ device names
DEVICES = st.one_of(
    st.text(alphabet="cpudamsuto:0123456789-+ \n\x00٣Ｃ", max_size=10),
    st.sampled_from(["auto", "cpu", "cuda", "cuda:0", "cuda:1", "mps", "cuda:007"]),
)


@HOSTILE
@given(name=DEVICES)
def test_device_names_follow_one_rule_everywhere(tmp_path, name):
    """The Slicer panels, the engine and the configuration accept the same names, and the
    engine's refusal is always an MTKDError."""
    valid = is_device_name(name)
    event("valid" if valid else "invalid")
    for check in (check_device_name, check_device):
        if valid:
            assert check(name) == name
        else:
            with pytest.raises(MTKDError, match="unknown device"):
                check(name)
    try:
        device = resolve_device(name)
    except MTKDError as error:
        assert ("unknown device" in str(error)) == (not valid), error
    else:
        assert valid and isinstance(device, torch.device)
    path = tmp_path / "device.yaml"
    path.write_text(
        yaml.safe_dump({"train": {"device": name}}, allow_unicode=True), encoding="utf-8"
    )
    if valid:
        assert load_config(path).train.device == name
    else:
        with pytest.raises(MTKDError) as error:
            load_config(path)
        _refused_naming(error.value, path)
        assert "train.device" in str(error.value)


# ------------------------------------------------------------------------------ protocols
PRESET = yaml.safe_load((PRESETS / "thesis-2d-spleen.yaml").read_text(encoding="utf-8"))
PROTOCOL_KEYS = _paths(PRESET)


@settings(HOSTILE, max_examples=80)
@given(changes=st.lists(st.tuples(st.sampled_from(PROTOCOL_KEYS), VALUES), min_size=1, max_size=2))
@example(changes=[(("stages", "s1_kd", "distill"), None)])  # its no-KD twin copies it
@example(changes=[(("stages",), {"a\nb": {}})])
def test_protocol_files_with_hostile_values(tmp_path, changes):
    data = copy.deepcopy(PRESET)
    for path, value in changes:
        try:
            _set(data, path, value)
        except (KeyError, IndexError, TypeError):
            continue
    path = tmp_path / "protocol.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    try:
        protocol = load_protocol(path, data=tmp_path, runs=tmp_path / "runs")
    except MTKDError as error:
        event("refused")
        message = str(error)
        assert str(path) in message or str(tmp_path) in message, message
        assert "\n" not in message, message
    else:
        event("loaded")
        assert protocol.stages and all(_finite_numbers(s.config.to_dict()) for s in protocol.stages)
