"""Every path argument of the ``mtkd`` command given something it cannot use.

The subcommands and their arguments are read from the argparse parser itself
(:func:`mtkd.cli.build_parser`); each string-valued argument is classified by its ``dest`` as an
input path of a kind (config YAML, JSON, image, label map, model, dataset, run folder, library
folder), an output path, or not a path, with a test that fails when a new argument appears
unclassified. Each input path is given a folder, a binary file of random bytes (named as the
argument expects), a truncated real file of its kind and a missing file; each output path an
existing file where a folder is expected, an existing folder where a file is expected, and a
parent that is a file. ``mtkd.cli.main`` runs in-process and must end with exit status 2 and
exactly one ``mtkd: error:`` line naming the offending path: no traceback, no other exception,
no ITK text on the process's standard error, nothing written (outputs go under one folder that
must not appear, the working directory stays empty, the given files stay as they were).

Cases that fail today because of a defect in a file this test does not own are marked
``xfail(strict=True)`` with the defect: fixing it turns the case into an error to flip.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from conftest import DATA, tiny_config
from helpers import untrained_model

from mtkd.cli import build_parser, main
from mtkd.modelfiles.model_io import WEIGHTS

# ------------------------------------------------------------------ classification

# What a path argument is, by its dest: the kind decides which real file is truncated for it.
INPUT_KINDS_BY_DEST = {
    "config": "yaml",
    "resume": "run",
    "model": "model",
    "teacher": "model",
    "student": "model",
    "source": "model",
    "image": "image",
    "images": "image",
    "sample": "image",
    "ct": "image",
    "reference": "label",
    "data": "dataset",
    "split": "json",
    "labels_json": "json",
    "reference_labels": "json",
    "teacher_labels": "json",
    "student_labels": "json",
    "root": "library",
}
OUTPUT_DESTS = {"output", "csv", "run_dir", "runs", "write_configs"}
NOT_PATH_DESTS = {"device", "name", "key", "set", "stage", "cells", "keep_largest"}
# Where the dest alone cannot tell (the same dest means something else in this command).
EXPLICIT = {
    ("demo", "labels"): "label",  # a label map image, not label names
    ("taps", "model"): None,  # a registered network name
    ("protocol", "name"): "yaml",  # a shipped protocol name or a protocol YAML file
    ("config", "preset"): "yaml",  # metavar PROTOCOL: a protocol name or file
}
SUFFIX = {
    "yaml": ".yaml",
    "json": ".json",
    "image": ".nii.gz",
    "label": ".nii.gz",
    "model": ".pt",
    "dataset": ".nii.gz",
    "run": "",
    "library": "",
}


def _subcommands(parser: argparse.ArgumentParser, prefix: str = ""):
    """(command name, its parser) for every leaf subcommand, ``library list`` included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subcommands(sub, f"{prefix}{name} ")
    if prefix and not any(isinstance(a, argparse._SubParsersAction) for a in parser._actions):
        yield prefix.strip(), parser


def _string_arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Arguments that take free text: not flags, not numbers, not a fixed set of choices."""
    return [
        action
        for action in parser._actions
        if action.option_strings != ["-h", "--help"]
        and not isinstance(action, argparse._SubParsersAction)
        and action.nargs != 0
        and action.type is None
        and action.choices is None
    ]


def classify(command: str, dest: str) -> str | None:
    """'yaml', 'json', ... for an input path, 'output', None for not a path; KeyError if
    unclassified."""
    if (command, dest) in EXPLICIT:
        return EXPLICIT[(command, dest)]
    if dest in OUTPUT_DESTS:
        return "output"
    if dest in INPUT_KINDS_BY_DEST:
        return INPUT_KINDS_BY_DEST[dest]
    if dest in NOT_PATH_DESTS:
        return None
    raise KeyError((command, dest))


COMMANDS = dict(_subcommands(build_parser()))
ARGUMENTS = [(c, a.dest) for c, p in COMMANDS.items() for a in _string_arguments(p)]


def test_every_string_argument_is_classified():
    """A new argument of any subcommand must be classified here (and so swept if a path)."""
    unclassified = []
    for command, dest in ARGUMENTS:
        try:
            classify(command, dest)
        except KeyError:
            unclassified.append(f"mtkd {command} {dest}")
    assert not unclassified, f"classify these arguments in this file: {unclassified}"
    assert len(COMMANDS) >= 14 and ("library list", "root") in ARGUMENTS  # the walk saw them


def test_the_tables_name_no_argument_that_is_gone():
    dests = {dest for _, dest in ARGUMENTS}
    stale = (set(INPUT_KINDS_BY_DEST) | OUTPUT_DESTS | NOT_PATH_DESTS) - dests
    stale |= {key for key in EXPLICIT if key not in ARGUMENTS}
    assert not stale, stale


# ------------------------------------------------------------------ fixtures


@dataclass
class World:
    """Real, small, valid inputs for every command (under ``root``)."""

    root: Path
    ct: Path
    seg: Path
    labels_json: Path
    dataset: Path
    model: Path
    train_yaml: Path
    distill_yaml: Path
    split: Path
    ablation_yaml: Path
    protocol_yaml: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("world")
    size, index = [40, 30, 12], [40, 30, 45]
    ct = sitk.RegionOfInterest(sitk.ReadImage(str(DATA / "abdomen_ct.nii.gz")), size, index)
    seg = sitk.RegionOfInterest(
        sitk.ReadImage(str(DATA / "abdomen_seg_total_fast.nii.gz")), size, index
    )
    dataset = root / "dataset"
    for folder in ("images", "labels"):
        (dataset / folder).mkdir(parents=True)
    for case in ("a", "b", "c"):
        sitk.WriteImage(ct, str(dataset / "images" / f"{case}.nii.gz"))
        sitk.WriteImage(seg, str(dataset / "labels" / f"{case}.nii.gz"))
    sitk.WriteImage(ct, str(root / "ct.nii.gz"))
    sitk.WriteImage(seg, str(root / "seg.nii.gz"))
    labels_json = root / "labels.json"
    shutil.copy(DATA / "labels_total_v2.json", labels_json)
    model = untrained_model(root / "model", ("liver", "spleen", "kidney_right"))
    split = {"train": ["a"], "val": ["b"], "test": ["c"]}
    train = tiny_config((dataset, split), "train", name="tiny")
    train["data"]["labels_json"] = str(labels_json)
    (root / "train.yaml").write_text(yaml.safe_dump(train))
    distill = tiny_config(
        (dataset, split), "distill", name="student", distill={"teacher": str(model)}
    )
    distill["data"]["labels_json"] = str(labels_json)
    (root / "distill.yaml").write_text(yaml.safe_dump(distill))
    ablation = {**distill, "ablation": {"seeds": [0], "pairs": [["B-B"]]}}
    (root / "ablation.yaml").write_text(yaml.safe_dump(ablation))
    common = {key: value for key, value in train.items() if key not in ("kind", "name")}
    common["data"] = {**common["data"], "source": "${DATA}"}
    common["split"] = {"seed": 0, "test_fraction": 0.34, "val_fraction": 0.34}  # any data
    protocol = {"protocol": "tiny", "common": common, "stages": {"teacher": {"kind": "train"}}}
    (root / "protocol.yaml").write_text(yaml.safe_dump(protocol))
    (root / "split.json").write_text(json.dumps(split))
    return World(
        root,
        root / "ct.nii.gz",
        root / "seg.nii.gz",
        labels_json,
        dataset,
        model,
        root / "train.yaml",
        root / "distill.yaml",
        root / "split.json",
        root / "ablation.yaml",
        root / "protocol.yaml",
    )


def _valid_values(world: World, out: Path) -> dict[str, dict]:
    """Per command, values (by dest) of a valid call; outputs under ``out``."""
    cpu = {"device": "cpu"}
    return {
        "train": {"config": world.train_yaml, "run_dir": out / "run", **cpu},
        "distill": {"config": world.distill_yaml, "run_dir": out / "run", **cpu},
        "evaluate": {
            "model": world.model,
            "data": world.dataset,
            "labels_json": world.labels_json,
            "csv": out / "scores.csv",
            **cpu,
        },
        "segment": {"model": world.model, "images": world.ct, "output": out / "seg.nii.gz", **cpu},
        "compare": {
            "image": world.ct,
            "teacher": world.model,
            "student": world.model,
            "output": out / "comparison",
            **cpu,
        },
        "export": {
            "model": world.model,
            "format": "torchscript",
            "output": out / "exported",
            "sample": world.ct,
        },
        "demo": {"output": out / "demo", "ct": world.ct, "labels": world.seg, "quick": True},
        "synth": {"output": out / "synth", "subjects": 1, "size": [48, 48, 16]},
        "protocol": {
            "name": world.protocol_yaml,
            "data": world.dataset,
            "runs": out / "runs",
            "epochs": 1,
            **cpu,
        },
        "ablate": {"config": world.ablation_yaml, "output": out / "ablation"},
        "library list": {"root": world.root / "library"},
        "library import": {"source": world.model, "root": out / "library"},
        "library delete": {"key": "nothing", "root": world.root / "library", "yes": True},
        "config": {},
    }


# Values other arguments need when one argument is under test.
CONTEXT = {
    ("train", "resume"): {"config": None, "run_dir": None},
    ("distill", "resume"): {"config": None, "run_dir": None},
    ("evaluate", "split"): {},
    ("compare", "reference_labels"): {"reference": "seg"},
    ("compare", "teacher_labels"): {"teacher": "seg"},
    ("compare", "student_labels"): {"student": "seg"},
    ("protocol", "name"): {"runs": None, "write_configs": "out/configs"},
}


def argv_for(command: str, values: dict) -> list[str]:
    """The command line the parser reads back as ``values`` (positionals in order)."""
    argv = command.split()
    for action in COMMANDS[command]._actions:
        value = values.get(action.dest)
        if value is None or action.dest == "help":
            continue
        if action.nargs == 0:
            argv += [action.option_strings[-1]] if value else []
            continue
        items = [str(v) for v in value] if isinstance(value, list) else [str(value)]
        argv += ([action.option_strings[-1]] if action.option_strings else []) + items
    return argv


def _values(world: World, out: Path, command: str, dest: str, hostile: Path) -> dict:
    values = dict(_valid_values(world, out)[command])
    for key, value in CONTEXT.get((command, dest), {}).items():
        if value == "seg":
            value = world.seg
        elif isinstance(value, str) and value.startswith("out/"):
            value = out / value[4:]
        values[key] = value
    values[dest] = hostile
    return values


# ------------------------------------------------------------------ hostile inputs


def _real_file(world: World, kind: str) -> Path:
    """A valid file of ``kind`` to truncate."""
    return {
        "yaml": world.train_yaml,
        "json": world.labels_json,
        "image": world.ct,
        "label": world.seg,
        "dataset": world.ct,
        "model": world.model / WEIGHTS,
        "run": world.train_yaml,  # a run folder's config.yaml, given instead of the folder
        "library": world.model / WEIGHTS,
    }[kind]


def make_hostile(world: World, where: Path, kind: str, hostile: str) -> Path:
    """A folder, random bytes, a truncated real file or a missing path, named as ``kind``
    expects (``input.yaml``, ``input.nii.gz``, ...)."""
    where.mkdir(parents=True)
    path = where / f"input{SUFFIX[kind]}"
    if hostile == "folder":
        path.mkdir()
    elif hostile == "binary":
        path.write_bytes(np.random.default_rng(14).bytes(4096))
    elif hostile == "truncated":
        data = _real_file(world, kind).read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return path


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


def run_cli(argv: list[str], capfd) -> tuple[int, list[str]]:
    """Exit status and standard-error lines (file descriptor 2: ITK's own text included)."""
    capfd.readouterr()
    code = main(argv)
    return code, capfd.readouterr().err.splitlines()


def assert_one_error_line(code: int, lines: list[str], path: Path) -> None:
    text = "\n".join(lines)
    assert "Traceback" not in text and "WARNING" not in text, text
    assert code == 2, text
    errors = [line for line in lines if line.startswith("mtkd: error:")]
    assert len(errors) == 1, text
    assert str(path) in errors[0], text
    others = [line for line in lines if not line.startswith(("mtkd: error:", "MTKD-PROGRESS"))]
    assert not others, text


# Arguments whose folder (or missing path) is a valid value, not an error: the call succeeds.
VALID = {
    ("library list", "root", "folder"),  # an empty library
    ("library list", "root", "missing"),  # a library not made yet
    ("library import", "root", "folder"),  # imports into it
    ("library import", "root", "missing"),  # creates it
    ("library delete", "root", "folder"),  # the key is the error, not the root
    ("library delete", "root", "missing"),
}

# Defects in files this test does not own (the failing command is in the reason).
DEFECTS = {}


def _input_cases():
    for command, dest in ARGUMENTS:
        kind = classify(command, dest)
        if kind in (None, "output"):
            continue
        for hostile in ("folder", "binary", "truncated", "missing"):
            marks = []
            if (command, dest, hostile) in DEFECTS:
                marks.append(
                    pytest.mark.xfail(strict=True, reason=DEFECTS[(command, dest, hostile)])
                )
            yield pytest.param(
                command,
                dest,
                kind,
                hostile,
                marks=marks,
                id=f"{command}-{dest}-{hostile}".replace(" ", "_"),
            )


@pytest.mark.parametrize(("command", "dest", "kind", "hostile"), list(_input_cases()))
def test_input_path_argument(world, tmp_path, monkeypatch, capfd, command, dest, kind, hostile):
    """One clear line naming the path, exit status 2, nothing written, for every input path
    argument given a folder, random bytes, a truncated real file or a missing path."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MTKD_LIBRARY", str(tmp_path / "default-library"))
    out = tmp_path / "outputs"
    path = make_hostile(world, tmp_path / "hostile", kind, hostile)
    before, world_before = _snapshot(tmp_path / "hostile"), _snapshot(world.root)
    code, lines = run_cli(argv_for(command, _values(world, out, command, dest, path)), capfd)
    if (command, dest, hostile) in VALID:  # it may use the folder it was given
        assert code in (0, 2) and "Traceback" not in "\n".join(lines), lines
    else:
        assert_one_error_line(code, lines, path)
        assert not out.exists(), sorted(_snapshot(out))
        assert _snapshot(tmp_path / "hostile") == before
    assert _snapshot(world.root) == world_before
    assert not any(cwd.iterdir()) and not (tmp_path / "default-library").exists()


# ------------------------------------------------------------------ output paths

# (command, dest): what the argument names. Each gets "parent is a file"; a folder argument
# also gets "an existing file", a file argument "an existing folder".
OUTPUT_TARGETS = {
    ("train", "run_dir"): "folder",
    ("distill", "run_dir"): "folder",
    ("evaluate", "csv"): "file",
    ("segment", "output"): "file or folder",
    ("compare", "output"): "folder",
    ("export", "output"): "folder",
    ("demo", "output"): "folder",
    ("synth", "output"): "folder",
    ("protocol", "runs"): "folder",
    ("protocol", "write_configs"): "folder",
    ("ablate", "output"): "folder",
}
# Output arguments left out of the sweep, and why.
NOT_SWEPT = {}

OUTPUT_DEFECTS: dict[tuple[str, str, str], str] = {}


def test_every_output_argument_is_swept():
    outputs = {(c, d) for c, d in ARGUMENTS if classify(c, d) == "output"}
    assert outputs == set(OUTPUT_TARGETS) | set(NOT_SWEPT)


def _output_cases():
    for (command, dest), target in OUTPUT_TARGETS.items():
        shapes = ["parent is a file"]
        shapes += ["existing file"] if target == "folder" else []
        shapes += ["existing folder"] if target == "file" else []
        for shape in shapes:
            marks = []
            if (command, dest, shape) in OUTPUT_DEFECTS:
                reason = OUTPUT_DEFECTS[(command, dest, shape)]
                marks.append(pytest.mark.xfail(strict=True, reason=reason))
            name = f"{command}-{dest}-{shape}".replace(" ", "_")
            yield pytest.param(command, dest, shape, marks=marks, id=name)


@pytest.mark.parametrize(("command", "dest", "shape"), list(_output_cases()))
def test_output_path_argument(world, tmp_path, monkeypatch, capfd, command, dest, shape):
    """An output that cannot be written there: one line naming it, exit 2, and the file or
    folder in the way left as it was."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    blocker = tmp_path / "in-the-way"
    if shape == "existing folder":
        blocker.mkdir()
        (blocker / "keep.txt").write_text("mine")
        target = named = blocker
    else:
        blocker.write_text("mine")
        target = blocker if shape == "existing file" else blocker / "sub" / "out.csv"
        named = blocker
    out = tmp_path / "outputs"
    values = dict(_valid_values(world, out)[command])
    values[dest] = target
    world_before = _snapshot(world.root)
    code, lines = run_cli(argv_for(command, values), capfd)
    assert_one_error_line(code, lines, named)
    if shape == "existing folder":
        assert [p.name for p in blocker.iterdir()] == ["keep.txt"]
    else:
        assert blocker.read_text() == "mine"
    assert not out.exists() and not any(cwd.iterdir())
    assert _snapshot(world.root) == world_before
