"""Hostile model metadata, property-based (hypothesis): every key of ``mtkd_model.json`` (and
of its preprocessing and network spec) given a wrong type, an out-of-range, NaN, infinite,
huge or empty value, deleted, or joined by an unknown key. ``load_model``,
``load_any_model`` and ``mtkd library import`` each either load a model that is what the
metadata says (HU window low < high, one label per output channel, checked by running the
network) or raise an MTKDError naming the metadata file and the key; never another
exception. Import refuses exactly what loading refuses. Metadata that records its checksum
(``metadata_sha256``) is refused after any edit.

Example tests of the same checks: Testing/modelfiles/test_library.py (edited, reversed,
short-label metadata; zip bombs; non-entry folders), Testing/modelfiles/test_bundle.py and
Testing/export/test_export.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hostile import HOSTILE, assert_clear, attempt, scratch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from mtkd.data.preprocess import Preprocessing
from mtkd.errors import MTKDError
from mtkd.infer.inference import first_output
from mtkd.library import ModelLibrary
from mtkd.modelfiles.metadata import CHECKSUM_KEY, MODEL_KEYS, PREPROCESSING_KEYS, seal
from mtkd.modelfiles.model_io import LoadedModel, load_model
from mtkd.modelfiles.sources import load_any_model

DELETE = "<delete>"
# Keys whose problems another check names: the weights' SHA-256 (the weights file) and the
# checksum itself (its own message).
NAMED_ELSEWHERE = {"weights_sha256", CHECKSUM_KEY}
PATHS = (
    [(key,) for key in MODEL_KEYS if key not in NAMED_ELSEWHERE]
    + [("preprocessing", key) for key in PREPROCESSING_KEYS]
    + [("network", "name"), ("network", "params"), ("network", "reconstruction")]
    + [("network", "params", key) for key in ("out_channels", "in_channels", "spatial_dims")]
    + [("labels", "1"), ("labels", "3")]
)

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
EXTREMES = st.sampled_from(
    [
        float("nan"),
        float("inf"),
        -float("inf"),
        10**30,
        -(10**30),
        2**63,
        1e308,
        "",
        [],
        {},
        0,
        -1,
        "x" * 100_000,
        [10**9] * 3,
        [0, 0],
        [float("nan"), 1.0],
        [1.0, float("inf")],
        [300, -200],
        [40, 40],
        "abc",
        {"1": "liver"},
        {"1": "liver", "2": "spleen", "3": "kidney", "4": "extra"},
        {"1": "liver", "2": "spleen", "7": "kidney"},
        {"1": "liver", "2": "liver", "3": "kidney"},
        {"1": "", "2": "spleen", "3": "kidney"},
        {"1": "a\nb", "2": "spleen", "3": "kidney"},
    ]
)
NEAR_VALID = (
    st.lists(st.floats(-2000, 2000) | st.just(float("nan")), min_size=2, max_size=2)
    | st.lists(st.integers(-4, 5000), min_size=2, max_size=3)
    | st.integers(-3, 5)
    | st.sampled_from(["softmax", "sigmoid", "pytorch", "onnx", "thesis_unet", "unet", "none"])
)
VALUES = JSON | EXTREMES | NEAR_VALID | st.just(DELETE)


def _set(metadata: dict, path: tuple[str, ...], value: object) -> None:
    """Put ``value`` at ``path`` (creating nothing above it but the last key)."""
    target = metadata
    for key in path[:-1]:
        if not isinstance(target, dict):
            return
        target = target.setdefault(key, {})
    if not isinstance(target, dict):
        return
    if value == DELETE:
        target.pop(path[-1], None)
    else:
        target[path[-1]] = value


def _copy_model(teacher_run: Path, folder: Path) -> Path:
    return Path(shutil.copytree(teacher_run / "model", folder / "model"))


def _assert_what_it_says(model: LoadedModel, metadata: dict) -> None:
    """A loaded model is the one its metadata describes, and not a silently wrong one: a
    usable HU window, the stated preprocessing, one label per output channel (run)."""
    prep = model.prep
    assert prep == Preprocessing.from_dict(metadata["preprocessing"])
    low, high = prep.hu_window
    assert low < high
    assert prep.dims in (2, 3) and min(prep.slice_size) >= 1 and min(prep.patch_size) >= 1
    assert model.labels.label_values == list(range(1, len(model.labels) + 1))
    side = [model.size_multiple] * prep.dims
    with torch.no_grad():
        logits = first_output(model.network(torch.zeros(1, prep.in_channels, *side)))
    expected = 1 if model.activation == "sigmoid" else len(model.labels) + 1
    assert logits.shape[1] == expected, (logits.shape, model.labels)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hostile-metadata")


@settings(HOSTILE, max_examples=80)
@given(
    changes=st.lists(st.tuples(st.sampled_from(PATHS), VALUES), min_size=1, max_size=2),
    extra=st.sampled_from([None, (), ("preprocessing",), ("network",)]),
    sealed=st.booleans(),
)
def test_hostile_metadata_values(teacher_run, base, changes, extra, sealed):
    """Each changed value, checksum resealed (so the schema decides) or dropped (metadata of
    an older mtkd): a model that is what its metadata says, or MTKDError naming the file and
    a changed key, alike for load_model, load_any_model and the library import."""
    with scratch(base) as folder:
        folder = Path(folder)
        model = _copy_model(teacher_run, folder)
        metadata_file = model / "mtkd_model.json"
        metadata = json.loads(metadata_file.read_text())
        for path, value in changes:
            _set(metadata, path, value)
        if extra is not None:
            _set(metadata, (*extra, "unknown_key"), 1)
        metadata.pop(CHECKSUM_KEY, None)
        if sealed:
            metadata = seal(metadata)
        metadata_file.write_text(json.dumps(metadata))
        keys = {part for path, _ in changes for part in path} | {"unknown_key"}
        keys -= {"1", "3"}  # a label's value is named as "labels"

        outcomes = [attempt(lambda: load_model(model)), attempt(lambda: load_any_model(model))]
        library = ModelLibrary(folder / "library")
        imported = attempt(lambda: library.import_model(model))
        refused = [isinstance(o, MTKDError) for o in outcomes]
        event("refused" if refused[0] else "loaded")
        assert refused[0] == refused[1] == isinstance(imported, MTKDError), (outcomes, imported)
        for outcome in [*outcomes, imported]:
            if isinstance(outcome, MTKDError):
                assert_clear(outcome, metadata_file)
                assert any(key in str(outcome) for key in keys), (str(outcome), keys)
        if refused[0]:
            assert library.entries() == []
            return
        for outcome in outcomes:
            _assert_what_it_says(outcome, metadata)
        _assert_what_it_says(load_any_model(imported.path), metadata)


@settings(HOSTILE, max_examples=30)
@given(path=st.sampled_from(PATHS), value=JSON | EXTREMES | st.just(DELETE))
def test_any_edit_of_sealed_metadata_is_refused(teacher_run, base, path, value):
    """Metadata that records its checksum refuses any edit that changes its contents (the
    checksum named), before the value is used."""
    with scratch(base) as folder:
        model = _copy_model(teacher_run, Path(folder))
        metadata_file = model / "mtkd_model.json"
        original = json.loads(metadata_file.read_text())
        metadata = json.loads(metadata_file.read_text())
        _set(metadata, path, value)
        if json.dumps(metadata, sort_keys=True) == json.dumps(original, sort_keys=True):
            return  # the "edit" changed nothing
        metadata_file.write_text(json.dumps(metadata))
        library = ModelLibrary(Path(folder) / "library")
        for call in (
            lambda: load_model(model),
            lambda: load_any_model(model),
            lambda: library.import_model(model),
        ):
            assert_clear(attempt(call), metadata_file, CHECKSUM_KEY, "changed")
        assert library.entries() == []
