"""Hostile model files: code-running pickles, damaged weights and checkpoints, metadata and
weights of the wrong shape, SHA-256 mismatches (hypothesis; shared pieces in
Testing/hostile.py)."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import torch
from hostile import HOSTILE, assert_clear, attempt, scratch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from mtkd.errors import MTKDError
from mtkd.library import ModelLibrary
from mtkd.modelfiles.bundle import load_bundle
from mtkd.modelfiles.checkpoint import load_checkpoint
from mtkd.modelfiles.files import sha256_of
from mtkd.modelfiles.model_io import LoadedModel, load_model
from mtkd.modelfiles.sources import load_any_model

# --- model files ---------------------------------------------------------------------------------


class RunsCode:
    """Pickles to ``os.makedirs(marker)``: unpickling it with code allowed creates the marker."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def wrap(payload: object, layers: list[str]) -> object:
    """``payload`` nested in containers (innermost first) as a state_dict might hold it."""
    for layer in layers:
        if layer == "list":
            payload = [torch.zeros(1), payload]
        elif layer == "tuple":
            payload = (payload,)
        elif layer == "dict":
            payload = {"weight": torch.ones(2), "extra": payload}
        else:
            payload = {"model": payload, "format": 1}
    return payload


def copy_model(teacher_run: Path, folder: Path) -> Path:
    return Path(shutil.copytree(teacher_run / "model", folder / "model"))


def record_sha(model: Path) -> None:
    """Make the metadata's SHA-256 match model.pt, so a refusal cannot come from the checksum."""
    metadata = json.loads((model / "mtkd_model.json").read_text())
    metadata["weights_sha256"] = sha256_of(model / "model.pt")
    (model / "mtkd_model.json").write_text(json.dumps(metadata))


def test_the_pickle_payload_is_live(tmp_path):
    """The payload the next test uses does run code when pickle is allowed to."""
    marker = tmp_path / "ran"
    torch.save(wrap(RunsCode(str(marker)), ["dict"]), tmp_path / "x.pt")
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert marker.is_dir()


@settings(HOSTILE, max_examples=20)
@given(
    layers=st.lists(st.sampled_from(["list", "tuple", "dict", "state"]), max_size=3),
    where=st.sampled_from(["model folder", "checkpoint", "library"]),
)
def test_code_running_pickles_are_refused(teacher_run, base, layers, where):
    """A weights file or checkpoint holding an object whose unpickling would run code (at any
    depth) is refused by every loader, and the code never runs (weights-only loading)."""
    with scratch(base) as folder:
        folder = Path(folder)
        marker = folder / "code-ran"
        payload = wrap(RunsCode(str(marker)), layers)
        if where == "checkpoint":
            path = folder / "last.pt"
            metadata = json.loads((teacher_run / "model" / "mtkd_model.json").read_text())
            torch.save({"format": 1, "model": payload, "model_metadata": metadata}, path)
            calls = [lambda: load_checkpoint(path), lambda: load_any_model(path)]
        else:
            model = copy_model(teacher_run, folder)
            path = model / "model.pt"
            torch.save(payload, path)
            record_sha(model)
            library = ModelLibrary(folder / "library")
            if where == "library":
                calls = [lambda: library.import_model(model)]
            else:
                calls = [lambda: load_model(model), lambda: load_any_model(model)]
        for call in calls:
            outcome = attempt(call)
            assert_clear(outcome, model if where == "library" else path)
            assert not marker.exists(), "the pickle ran code"
        if where == "library":
            assert library.entries() == []


@settings(HOSTILE, max_examples=30)
@given(
    where=st.sampled_from(["model folder", "checkpoint"]),
    damage=st.one_of(
        st.tuples(st.just("truncate"), st.floats(0.0, 1.0, exclude_max=True), st.just(b"")),
        st.tuples(
            st.just("overwrite"),
            st.floats(0.0, 1.0, exclude_max=True),
            st.binary(min_size=1, max_size=16),
        ),
    ),
)
def test_damaged_weights_and_checkpoints_fail_clearly(teacher_run, base, where, damage):
    """A weights file or checkpoint cut short or overwritten (its SHA-256 recorded anew, so
    the bytes themselves are judged): MTKDError naming the file, or a loaded model."""
    kind, fraction, replacement = damage
    with scratch(base) as folder:
        folder = Path(folder)
        if where == "checkpoint":
            path = folder / "last.pt"
            shutil.copy(teacher_run / "checkpoints" / "last.pt", path)
        else:
            model = copy_model(teacher_run, folder)
            path = model / "model.pt"
        data = bytearray(path.read_bytes())
        start = int(len(data) * fraction)
        if kind == "truncate":
            data = data[:start]
        else:
            data[start : start + len(replacement)] = replacement
        path.write_bytes(bytes(data))
        if where == "checkpoint":
            outcome = attempt(lambda: load_any_model(path))
        else:
            record_sha(model)
            outcome = attempt(lambda: load_any_model(model))
        if isinstance(outcome, MTKDError):
            assert_clear(outcome, path)
        else:
            assert isinstance(outcome, LoadedModel)


NOT_A_STATE_DICT = st.one_of(
    st.integers(),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=3),
    st.builds(torch.zeros, st.integers(0, 3)),
    st.dictionaries(st.integers(), st.builds(torch.zeros, st.integers(0, 2)), max_size=2),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5) | st.none(), max_size=2),
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
METADATA_KEYS = ["network", "labels", "preprocessing", "activation", "format"]


@settings(HOSTILE, max_examples=30)
@given(
    change=st.one_of(
        st.tuples(st.just("weights"), NOT_A_STATE_DICT),
        st.tuples(st.just("metadata"), JSON),
        st.tuples(st.just("metadata bytes"), st.binary(max_size=40)),  # e.g. not UTF-8
        st.tuples(st.sampled_from(METADATA_KEYS), JSON | st.just("DELETE")),
    )
)
def test_model_metadata_and_weights_of_the_wrong_shape(teacher_run, base, change):
    """A model folder (its SHA-256 recorded) whose weights hold no state_dict of named tensors,
    whose metadata is not a JSON object, or whose network, labels, preprocessing, activation
    or format is missing or any JSON value: MTKDError naming the weights or the metadata file,
    or a loaded model."""
    what, value = change
    with scratch(base) as folder:
        model = copy_model(teacher_run, Path(folder))
        metadata_file = model / "mtkd_model.json"
        if what == "weights":
            torch.save(value, model / "model.pt")
            record_sha(model)
            named = model / "model.pt"
        else:
            metadata = json.loads(metadata_file.read_text())
            if what == "metadata bytes":
                metadata = None
            elif what == "metadata":
                metadata = value
            elif value == "DELETE":
                metadata.pop(what, None)
            else:
                metadata[what] = value
            if what == "metadata bytes":
                metadata_file.write_bytes(value)
            else:
                metadata_file.write_text(json.dumps(metadata))
            named = metadata_file
        for call in (lambda: load_model(model), lambda: load_any_model(model)):
            outcome = attempt(call)
            event("refused" if isinstance(outcome, MTKDError) else "loaded")
            if isinstance(outcome, MTKDError):
                assert_clear(outcome, named if what == "weights" else model)
            else:
                assert isinstance(outcome, LoadedModel)


@settings(HOSTILE, max_examples=20)
@given(
    change=st.one_of(
        st.tuples(
            st.just("overwrite"),
            st.floats(0, 1, exclude_max=True),
            st.binary(min_size=1, max_size=8),
        ),
        st.tuples(st.just("append"), st.just(0.0), st.binary(min_size=1, max_size=8)),
        st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True), st.just(b"")),
        st.tuples(
            st.just("recorded"),
            st.just(0.0),
            st.text("0123456789abcdef", min_size=64, max_size=64).map(str.encode),
        ),  # noqa: E501
    ),
    where=st.sampled_from(["model folder", "library folder", "library zip", "bundle"]),
)
def test_sha256_mismatch_is_refused(teacher_run, written_bundle, base, change, where):
    """Weights that differ from the SHA-256 their metadata records (changed, extended, cut, or
    a different checksum recorded) are refused by the model loader, the library import (of a
    folder or a zip) and the bundle loader, naming the weights file."""
    kind, fraction, data = change
    with scratch(base) as folder:
        folder = Path(folder)
        if where == "bundle":
            model = Path(shutil.copytree(written_bundle, folder / "bundle"))
            weights = model / "models" / "model.pt"
            metadata_file = model / "configs" / "metadata.json"
        else:
            model = copy_model(teacher_run, folder)
            weights, metadata_file = model / "model.pt", model / "mtkd_model.json"
        before = weights.read_bytes()
        if kind == "recorded":
            metadata = json.loads(metadata_file.read_text())
            section = metadata["mtkd"] if where == "bundle" else metadata
            if data.decode() == section["weights_sha256"]:
                return  # the one draw that is not a mismatch
            section["weights_sha256"] = data.decode()
            metadata_file.write_text(json.dumps(metadata))
        else:
            body = bytearray(before)
            start = int(len(body) * fraction)
            if kind == "overwrite":
                body[start : start + len(data)] = data
            elif kind == "append":
                body += data
            else:
                body = body[:start]
            if bytes(body) == before:
                return  # overwritten with the same bytes: nothing to detect
            weights.write_bytes(bytes(body))
        library = ModelLibrary(folder / "library")
        if where == "model folder":
            outcomes = [attempt(lambda: load_model(model)), attempt(lambda: load_any_model(model))]
        elif where == "library folder":
            outcomes = [attempt(lambda: library.import_model(model))]
        elif where == "library zip":
            archive = folder / "model.zip"
            with zipfile.ZipFile(archive, "w") as zipped:
                for file in model.iterdir():
                    zipped.write(file, f"model/{file.name}")
            outcomes = [attempt(lambda: library.import_model(archive))]
        else:
            outcomes = [attempt(lambda: load_bundle(model))]
        for outcome in outcomes:
            assert_clear(outcome, weights, "SHA-256")
        assert library.entries() == []
