"""Protocols: whole experiments as presets (``mtkd protocol NAME``).

A protocol is one YAML file (``mtkd/presets/<name>.yaml``, or any file of the same form):

- ``common``: run-configuration keys shared by every stage (data, split);
- ``stages``: named run configurations, merged onto ``common`` and run in order, each in
  ``RUNS/<stage>``. A stage may instead name a complete run configuration file
  (``config: FILE``, relative to the protocol file). ``baseline_of: STAGE`` makes a no-KD
  twin: the named distillation stage's configuration with ``distill.scale: 0`` (METHOD.md
  section 3, fix 3); a twin with its own file must equal its stage but for that;
- ``expects``: what the dataset must be (``layout``, ``structures``), checked before training;
- ``reference``: published numbers printed beside ours (optional).

``${DATA}`` and ``${RUNS}`` in string values are filled from ``--data`` and ``--runs``. Other
relative paths are read from the folder of the file that holds them (the protocol file, or a
stage's config file), as in every configuration file; a ``--set`` path from the working
directory.
Overrides (``--epochs``, ``--slice-size``, ``--patch-size``, ``--device`` and
``--set [STAGE:]KEY=VALUE``) change the loaded stages, never the preset file: tests run the
real preset at a tiny size. ``--set`` addressed to a stage also reaches its no-KD twin;
``students:`` addresses every distillation stage.

Running a protocol skips a stage whose run folder holds a model, resumes one that holds a
checkpoint, starts the others, then evaluates every model on the test patients: per-volume
Dice and HD95 per structure, and the paper's pooled slice Dice (:mod:`mtkd.infer.pooled`),
written to ``RUNS/report.json`` and ``RUNS/report.md``.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mtkd.config import (
    RunConfig,
    differing_keys,
    dump_config,
    is_run_name,
    read_yaml,
    resolve_file_paths,
)
from mtkd.config_paths import PATH_KEYS, absolute, is_path_value, resolve_paths
from mtkd.data.atomic import atomic_write_bytes
from mtkd.data.splits import read_split
from mtkd.errors import MTKDError, one_line
from mtkd.metrics import format_missed
from mtkd.run_folder import FINISHED, STOPPED, RunDir

PRESETS = Path(__file__).resolve().parent / "presets"
PLACEHOLDERS = ("DATA", "RUNS")
STAGE_KEYS = ("baseline_of", "config")
PROTOCOL_KEYS = ("protocol", "description", "expects", "reference", "common", "stages")
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

__all__ = [
    "Protocol",
    "Stage",
    "available_protocols",
    "evaluate_protocol",
    "format_report",
    "load_protocol",
    "protocol_file",
    "run_protocol",
    "select_stages",
    "write_configs",
]


@dataclass
class Stage:
    """One run of a protocol: its name (= run folder name) and resolved configuration."""

    name: str
    config: RunConfig
    baseline_of: str | None = None

    @property
    def is_student(self) -> bool:
        return self.config.kind == "distill"


@dataclass
class Protocol:
    name: str
    description: str
    source: Path
    stages: list[Stage]
    expects: dict[str, Any] = field(default_factory=dict)
    reference: dict[str, Any] = field(default_factory=dict)

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise MTKDError(f"protocol '{self.name}' has no stage '{name}'", self.source)

    @property
    def dims(self) -> int:
        return self.stages[0].config.data.dims


# ------------------------------------------------------------------------------ loading
def available_protocols() -> list[str]:
    """Names of the protocols shipped in ``mtkd/presets``."""
    return sorted(path.stem for path in PRESETS.glob("*.yaml"))


def protocol_file(name: str | Path) -> Path:
    """A shipped protocol's file, or ``name`` itself when it is a protocol file (or a folder
    holding ``protocol.yaml``, as ``--write-configs`` writes)."""
    path = Path(name)
    if path.is_dir() and (path / "protocol.yaml").is_file():
        return path / "protocol.yaml"
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    shipped = PRESETS / f"{name}.yaml"
    if str(name) in available_protocols() and shipped.is_file():
        return shipped
    raise MTKDError(
        f"unknown protocol '{name}'; shipped protocols: {', '.join(available_protocols())} "
        "(or give a protocol YAML file)"
    )


def _read_yaml(path: Path) -> dict[str, Any]:
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise MTKDError("must be a mapping of keys to values", path)
    return data


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings are merged key by key, anything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _fill(value: Any, values: dict[str, str | None], where: Path) -> Any:
    """``value`` with ``${NAME}`` replaced in every string (unknown names are errors; names
    without a value stay as they are)."""
    if isinstance(value, dict):
        return {key: _fill(item, values, where) for key, item in value.items()}
    if isinstance(value, list):
        return [_fill(item, values, where) for item in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name not in values:
            raise MTKDError(
                f"unknown placeholder ${{{name}}}; known: "
                + ", ".join(f"${{{n}}}" for n in values),
                where,
            )
        return match.group(0) if values[name] is None else str(values[name])

    return _PLACEHOLDER.sub(replace, value)


def _paths_from(data: dict[str, Any], file: Path) -> dict[str, Any]:
    """``data`` (configuration keys read from ``file``) with its relative paths read from the
    file's folder; ``${NAME}`` placeholders are left for :func:`_fill`."""
    return resolve_paths(data, file.absolute().parent, source=file)[0]


def _command_line_path(
    target: str | None, path: list[str], value: Any
) -> tuple[str | None, list[str], Any]:
    """A ``--set`` override, a path value made absolute (read from the working directory)."""
    key = ".".join(path)
    if key in PATH_KEYS and is_path_value(value, key):
        value = str(absolute(value))
    return target, path, value


def _unfilled(value: Any) -> set[str]:
    if isinstance(value, dict):
        return set().union(*(_unfilled(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(_unfilled(v) for v in value)) if value else set()
    return set(_PLACEHOLDER.findall(value)) if isinstance(value, str) else set()


def parse_override(text: str) -> tuple[str | None, list[str], Any]:
    """``[STAGE:]KEY.PATH=VALUE`` -> (stage or None, key path, VALUE parsed as YAML)."""
    target, key, value = None, text, None
    if "=" not in text:
        raise MTKDError(f"--set '{text}': expected [STAGE:]KEY=VALUE, e.g. train.epochs=2")
    key, _, raw = text.partition("=")
    if ":" in key:
        target, _, key = key.partition(":")
    path = [part for part in key.strip().split(".") if part]
    if not path or (target is not None and not target.strip()):
        raise MTKDError(f"--set '{text}': expected [STAGE:]KEY=VALUE, e.g. train.epochs=2")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise MTKDError(f"--set '{text}': the value is not valid YAML ({error})") from None
    return (target.strip() if target else None), path, value


def _set(data: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        if not isinstance(data.get(key), dict):
            data[key] = {}
        data = data[key]
    data[path[-1]] = copy.deepcopy(value)


def load_protocol(
    name: str | Path,
    *,
    data: str | Path | None = None,
    runs: str | Path | None = None,
    overrides: Iterable[str] = (),
    epochs: int | None = None,
    slice_size: list[int] | None = None,
    patch_size: list[int] | None = None,
    device: str | None = None,
) -> Protocol:
    """Read protocol ``name`` (shipped name or file), fill ``${DATA}``/``${RUNS}``, apply the
    overrides and validate every stage as a :class:`RunConfig`."""
    source = protocol_file(name)
    raw = _read_yaml(source)
    unknown = sorted(str(key) for key in set(raw) - set(PROTOCOL_KEYS))
    if unknown:
        raise MTKDError(
            f"unknown protocol key(s) {', '.join(unknown)}; known: {', '.join(PROTOCOL_KEYS)}",
            source,
        )
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, dict) or not stages_raw:
        raise MTKDError("a protocol needs 'stages': a mapping of stage names to configs", source)
    for stage in stages_raw:
        if not is_run_name(stage):
            raise MTKDError(
                f"stage name {one_line(repr(stage), 60)} must be a folder name (printable "
                "text without '/' or '\\')",
                source,
            )
    common = raw.get("common") or {}
    if not isinstance(common, dict):
        raise MTKDError("'common' must be a mapping of run-configuration keys", source)
    common = _paths_from(common, source)
    values = {
        "DATA": None if data is None else str(Path(data).resolve()),
        "RUNS": None if runs is None else str(Path(runs).resolve()),
    }
    sets = [_command_line_path(*parse_override(text)) for text in overrides]
    if epochs is not None:
        sets.append((None, ["train", "epochs"], int(epochs)))
    if slice_size is not None:
        sets.append((None, ["data", "slice_size"], [int(s) for s in slice_size]))
    if patch_size is not None:
        sets.append((None, ["data", "patch_size"], [int(s) for s in patch_size]))
    if device is not None:
        sets.append((None, ["train", "device"], device))
    targets = set(stages_raw) | {"students"}
    for target, path, _ in sets:
        if target is not None and target not in targets:
            raise MTKDError(
                f"--set {target}:{'.'.join(path)}: no stage '{target}'; stages: "
                f"{', '.join(stages_raw)} (or 'students' for every distillation stage)",
                source,
            )
        body = stages_raw.get(target) if target else None
        if isinstance(body, dict) and body.get("baseline_of") and "config" not in body:
            raise MTKDError(
                f"--set {target}:{'.'.join(path)}: '{target}' is the no-KD twin of "
                f"'{body['baseline_of']}' and follows it; address '{body['baseline_of']}'",
                source,
            )

    def addressed(stage: str, twin_of: str | None, kind: str) -> list[tuple[list[str], Any]]:
        names = {stage, twin_of, "students" if kind == "distill" else None} - {None}
        return [(path, value) for target, path, value in sets if target is None or target in names]

    dicts: dict[str, dict[str, Any]] = {}
    twins: dict[str, str] = {}
    own_file: set[str] = set()
    for stage, body in stages_raw.items():
        body = body or {}
        if not isinstance(body, dict):
            raise MTKDError(f"stage '{stage}' must be a mapping", source)
        if body.get("baseline_of") is not None:
            twins[stage] = str(body["baseline_of"])
        if "config" in body:
            config_path = source.parent / str(body["config"])
            extra = sorted(set(body) - set(STAGE_KEYS))
            if extra:
                raise MTKDError(
                    f"stage '{stage}' names a config file; put {', '.join(extra)} in that file",
                    source,
                )
            stage_file, _ = resolve_file_paths(_read_yaml(config_path), config_path)
            dicts[stage] = _merge(common, stage_file)
            own_file.add(stage)
        elif stage in twins:
            extra = sorted(set(body) - set(STAGE_KEYS))
            if extra:
                raise MTKDError(
                    f"stage '{stage}' is the no-KD twin of '{twins[stage]}' and takes its "
                    f"whole configuration; remove {', '.join(extra)}",
                    source,
                )
        else:
            inline = {k: v for k, v in body.items() if k not in STAGE_KEYS}
            dicts[stage] = _merge(common, _paths_from(inline, source))
    for stage, twin_of in twins.items():
        if twin_of not in stages_raw or twin_of in twins:
            raise MTKDError(
                f"stage '{stage}': baseline_of '{twin_of}' must name a distillation stage", source
            )
        if (dicts[twin_of].get("kind") or "train") != "distill":
            raise MTKDError(
                f"stage '{stage}': baseline_of '{twin_of}', which is not a distillation", source
            )
    for stage in list(dicts):
        kind = dicts[stage].get("kind") or "train"
        for path, value in addressed(stage, twins.get(stage), kind):
            _set(dicts[stage], path, value)
        dicts[stage] = _fill(dicts[stage], values, source)
    for stage, twin_of in twins.items():
        if stage not in own_file:  # derived: the KD stage's final config, no distillation
            dicts[stage] = copy.deepcopy(dicts[twin_of])
            distill = dicts[stage].setdefault("distill", {})
            if isinstance(distill, dict):  # else the stage's validation names the key
                distill["scale"] = 0.0
    stages = []
    for stage in stages_raw:  # the order of the file
        body = dicts[stage]
        body["name"] = stage
        config = RunConfig.from_dict(body, source=f"{source} (stage '{stage}')")
        stages.append(Stage(stage, config, twins.get(stage)))
    for key in ("expects", "reference"):
        if not isinstance(raw.get(key) or {}, dict):
            raise MTKDError(f"protocol key '{key}' must be a mapping", source)
    expects = dict(raw.get("expects") or {})
    if not isinstance(expects.get("layout") or "", str):
        raise MTKDError("protocol key 'expects.layout' must be a layout name (msd)", source)
    structures = expects.get("structures") or []
    if not isinstance(structures, list) or not all(isinstance(n, str) for n in structures):
        raise MTKDError("protocol key 'expects.structures' must be a list of names", source)
    protocol = Protocol(
        name=str(raw.get("protocol") or source.stem),
        description=str(raw.get("description") or ""),
        source=source,
        stages=stages,
        expects=expects,
        reference=dict(raw.get("reference") or {}),
    )
    _check_twins(protocol)
    return protocol


def _check_twins(protocol: Protocol) -> None:
    """A no-KD twin is its stage's configuration with every distillation weight at zero."""
    for stage in protocol.stages:
        if stage.baseline_of is None:
            continue
        kd = protocol.stage(stage.baseline_of).config.to_dict()
        twin = stage.config.to_dict()
        if twin["distill"]["scale"] != 0:
            raise MTKDError(
                f"stage '{stage.name}' is a no-KD twin: its distill.scale must be 0",
                protocol.source,
            )
        for config in (kd, twin):
            config["name"] = None
            config["distill"]["scale"] = None
        differing = differing_keys(kd, twin)
        if differing:
            raise MTKDError(
                f"stage '{stage.name}' must be '{stage.baseline_of}' with distill.scale 0 (the "
                f"same recipe, METHOD.md fix 3), but differs in {', '.join(differing)}",
                protocol.source,
            )


def require_filled(protocol: Protocol) -> None:
    """Refuse to run while a stage still holds a ``${...}`` placeholder."""
    missing = set()
    for stage in protocol.stages:
        missing |= _unfilled(stage.config.to_dict())
    if missing:
        options = {"DATA": "--data DATASET", "RUNS": "--runs FOLDER"}
        needed = ", ".join(options.get(name, f"${{{name}}}") for name in sorted(missing))
        raise MTKDError(f"protocol '{protocol.name}' needs {needed}", protocol.source)


def select_stages(protocol: Protocol, selection: Iterable[str] | None) -> list[Stage]:
    """``all`` (default), ``teacher``/``teachers`` (training stages), ``students``
    (distillation stages) or stage names; in the protocol's order."""
    wanted = set(selection or ["all"])
    known = {stage.name for stage in protocol.stages}
    groups = {"all", "teacher", "teachers", "students"}
    unknown = sorted(wanted - known - groups)
    if unknown:
        raise MTKDError(
            f"unknown stage(s) {', '.join(unknown)}; choose all, teacher, students or "
            f"{', '.join(s.name for s in protocol.stages)}"
        )
    chosen = []
    for stage in protocol.stages:
        if (
            "all" in wanted
            or stage.name in wanted
            or (stage.is_student and "students" in wanted)
            or (not stage.is_student and wanted & {"teacher", "teachers"})
        ):
            chosen.append(stage)
    return chosen


# ------------------------------------------------------------------------- writing configs
def write_configs(protocol: Protocol, folder: str | Path) -> list[Path]:
    """Write each stage as a complete run configuration (``<stage>.yaml``, runnable with
    ``mtkd train``/``mtkd distill``) and a ``protocol.yaml`` that runs them as this protocol
    (``mtkd protocol FOLDER``). Placeholders without a value stay in place."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise MTKDError("not a folder", folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise MTKDError(f"cannot create the folder ({error.strerror or error})", folder) from None
    written = []
    stages: dict[str, Any] = {}
    for stage in protocol.stages:
        path = folder / f"{stage.name}.yaml"
        command = "train" if stage.config.kind == "train" else "distill"
        header = (
            f"# Stage '{stage.name}' of protocol {protocol.name} (from {protocol.source.name}).\n"
            f"# mtkd {command} {path.name} --run-dir RUNS/{stage.name}\n"
        )
        if stage.baseline_of:
            header += (
                f"# The no-KD twin of {stage.baseline_of}.yaml: keep both identical but for "
                "distill.scale (0 here); `mtkd protocol` checks it.\n"
            )
        atomic_write_bytes(path, (header + dump_config(stage.config, folder)).encode())
        written.append(path)
        entry: dict[str, Any] = {"config": path.name}
        if stage.baseline_of:
            entry["baseline_of"] = stage.baseline_of
        stages[stage.name] = entry
    document = {
        "protocol": protocol.name,
        "description": protocol.description,
        "expects": protocol.expects,
        "reference": protocol.reference,
        "stages": stages,
    }
    header = (
        f"# Protocol {protocol.name}, written by `mtkd protocol --write-configs`.\n"
        f"# Edit the stage files, then: mtkd protocol {folder} --runs RUNS [--data DATASET]\n"
    )
    target = folder / "protocol.yaml"
    atomic_write_bytes(target, (header + yaml.safe_dump(document, sort_keys=False)).encode())
    return [target, *written]


# --------------------------------------------------------------------------------- running
def check_expectations(protocol: Protocol) -> None:
    """The dataset has the layout and structures the protocol expects (clear errors early)."""
    from mtkd.data.datasets import load_dataset

    config = protocol.stages[0].config
    dataset = load_dataset(config.data.source, labels_json=config.data.labels_json)
    layout = protocol.expects.get("layout")
    if layout and dataset.layout != layout:
        raise MTKDError(
            f"protocol '{protocol.name}' expects a {layout.upper()} dataset (dataset.json, "
            f"imagesTr/, labelsTr/), found the '{dataset.layout}' layout; see README "
            "'Protocols' for how to get the data",
            dataset.root,
        )
    wanted = list(protocol.expects.get("structures") or [])
    missing = [name for name in wanted if name not in dataset.labels.names]
    if missing:
        raise MTKDError(
            f"protocol '{protocol.name}' needs the structure(s) {', '.join(missing)}; the "
            f"dataset has {', '.join(dataset.labels.names)}",
            dataset.root,
        )


def run_protocol(
    protocol: Protocol,
    runs: str | Path,
    selection: Iterable[str] | None = None,
    *,
    device: str = "auto",
    evaluate: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any] | None:
    """Run the selected stages in order (skip finished ones, resume stopped ones), then
    evaluate every finished model of the protocol; returns the report (None without).

    One protocol process per ``runs`` folder (its lock; each stage's run folder has its own).
    """
    from mtkd.folder_lock import FolderLock

    require_filled(protocol)
    runs = Path(runs)
    check_expectations(protocol)
    with FolderLock(runs, f"mtkd protocol {protocol.name}"):
        return _run_stages(protocol, runs, selection, device, evaluate, log)


def _run_stages(
    protocol: Protocol,
    runs: Path,
    selection: Iterable[str] | None,
    device: str,
    evaluate: bool,
    log: Callable[[str], None],
) -> dict[str, Any] | None:
    from mtkd.engine.trainer import Trainer

    for stage in select_stages(protocol, selection):
        run_dir = runs / stage.name
        folder = RunDir(run_dir)
        state = folder.state
        folder.check_holds(
            stage.config, f"stage '{stage.name}': use another --runs folder or remove this one"
        )
        if state == FINISHED:
            log(f"[{protocol.name}] {stage.name}: done, skipped ({folder.model})")
            continue
        if stage.is_student and stage.config.distill is not None:  # no-KD twins too
            teacher = Path(stage.config.distill.teacher)
            ours = teacher.parent == runs.resolve()
            if (ours and RunDir(teacher).state != FINISHED) or not teacher.exists():
                raise MTKDError(
                    f"stage '{stage.name}' needs its teacher, which has no model yet; run "
                    f"the teacher first (--stage {teacher.name if ours else 'teacher'})",
                    teacher,
                )
        if state == STOPPED:
            log(f"[{protocol.name}] {stage.name}: resuming from its checkpoint")
            Trainer(folder.load_config(), run_dir, resume=True, log=log).run()
        else:
            log(f"[{protocol.name}] {stage.name}: training ({stage.config.kind})")
            Trainer(stage.config, run_dir, log=log).run()
    if not evaluate:
        return None
    report = evaluate_protocol(protocol, runs, device=device, log=log)
    write_report(report, runs)
    log(format_report(report))
    log(f"report: {runs / 'report.md'} and {runs / 'report.json'}")
    return report


# ------------------------------------------------------------------------------ evaluation
def _shared_split(protocol: Protocol, runs: Path, finished: list[Stage]) -> dict[str, list]:
    """The split every finished stage used (they must agree: the same patients)."""
    split, first = None, None
    for stage in finished:
        path = RunDir(runs / stage.name).split
        if not path.is_file():
            raise MTKDError("run folder without split.json", path.parent)
        current = read_split(path).to_dict()
        if split is None:
            split, first = current, stage.name
            continue
        for part in ("train", "val", "test"):
            if sorted(current[part]) != sorted(split[part]):
                raise MTKDError(
                    f"stages '{first}' and '{stage.name}' used different {part} patients; "
                    "a protocol's stages must share one split",
                    path,
                )
    return split or {}


def _clean(value: Any) -> Any:
    """JSON-safe: NaN -> null, infinities -> "inf"/"-inf"."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _mean(values: list[float]) -> float:
    from mtkd.metrics import nanmean

    return nanmean(list(values))


def evaluate_protocol(
    protocol: Protocol, runs: str | Path, *, device: str = "auto", log=print
) -> dict[str, Any]:
    """Evaluate every finished stage's model on the test patients of the shared split."""
    from mtkd.data.datasets import load_dataset
    from mtkd.devices import resolve_device
    from mtkd.infer.evaluate import summarise
    from mtkd.infer.pooled import evaluate_with_slices
    from mtkd.infer.predictor import Predictor
    from mtkd.modelfiles.model_io import load_model

    runs = Path(runs)
    finished = [s for s in protocol.stages if RunDir(runs / s.name).state == FINISHED]
    if not finished:
        raise MTKDError(f"no finished stage of protocol '{protocol.name}' to evaluate", runs)
    split = _shared_split(protocol, runs, finished)
    test = list(split.get("test", []))
    if not test:
        raise MTKDError("the split has no test patients to evaluate on", runs)
    config = finished[0].config
    dataset = load_dataset(config.data.source, labels_json=config.data.labels_json)
    torch_device = resolve_device(device)
    models: dict[str, Any] = {}
    for stage in finished:
        log(f"[{protocol.name}] evaluating {stage.name} on {len(test)} test case(s)")
        model = load_model(runs / stage.name, torch_device)
        result = evaluate_with_slices(Predictor(model, torch_device), dataset, test)
        summary = summarise(result.scores)
        pooled, per_slice = result.pooled(), result.mean_slice()
        pooled["mean"] = _mean(list(pooled.values()))
        per_slice["mean"] = _mean(list(per_slice.values()))
        run_split = read_split(RunDir(runs / stage.name).split)
        trained_on = (
            run_split.student_train if stage.config.train_on == "student_train" else run_split.train
        )
        metadata = model.metadata
        models[stage.name] = {
            "run": str((runs / stage.name).resolve()),
            "kind": stage.config.kind,
            "network": stage.config.model.name,
            "parameters": metadata.get("parameters"),
            "distilled": bool(metadata.get("lineage", {}).get("distilled", False)),
            "baseline_of": stage.baseline_of,
            "train_cases": sorted(trained_on),
            "best_val_dice": metadata.get("metrics", {}).get("best_val_dice"),
            "summary": summary,
            "pooled_slice_dice": pooled,
            "mean_slice_dice": per_slice,
            "test_slices": result.counts.slices,
            "seconds_per_volume": _mean(result.seconds),
            "per_volume": [
                {
                    "case": s.case_id,
                    "structure": s.structure,
                    "dice": s.dice,
                    "hd95_mm": s.hd95_mm,
                    "outcome": s.outcome,
                }
                for s in result.scores
            ],
        }
    teacher = next((models[s.name] for s in finished if not s.is_student), None)
    for stage in finished:
        entry = models[stage.name]
        if teacher is not None and stage.is_student:
            ours, theirs = entry["summary"]["mean"]["dice"], teacher["summary"]["mean"]["dice"]
            entry["teacher_dice_kept"] = ours / theirs if theirs and theirs > 0 else math.nan
    return _clean(
        {
            "protocol": protocol.name,
            "description": protocol.description,
            "data": config.data.source,
            "runs": str(runs.resolve()),
            "dims": protocol.dims,
            "structures": list(
                dataset.labels.names if not config.data.structures else config.data.structures
            ),
            "split": split,
            "models": models,
            "reference": protocol.reference,
        }
    )


def _score(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    return f"{value:.3f}" if abs(value) < 1000 else f"{value:.1f}"


def _missed(mean: dict[str, Any]) -> str:
    if "missed" not in mean:  # a report written before the count existed
        return "n/a"
    return format_missed(int(mean["missed"]), int(mean.get("spurious") or 0))


def format_report(report: dict[str, Any]) -> str:
    """The report as Markdown: one row per model."""
    split = report.get("split", {})
    reference = report.get("reference") or {}
    structures = report["structures"]
    lines = [
        f"# Protocol {report['protocol']}",
        "",
        f"Data: `{report['data']}`; runs: `{report['runs']}`.",
        f"Patients (split by patient): train {len(split.get('train', []))} (students "
        f"{len(split.get('student_train', []))}), validation {len(split.get('val', []))} (from "
        f"the training patients), test {len(split.get('test', []))}: "
        f"{', '.join(split.get('test', []))}.",
        "",
        "Dice and HD95 per volume on each CT's grid, mean over the test volumes; pooled slice "
        "Dice: overlaps summed over every test slice (the paper's metric); mean slice Dice: "
        "per-slice Dice averaged over the slices holding the structure. A structure a model "
        "leaves empty in a test volume (missed: how many) counts in HD95 as the CT's diagonal "
        "in mm, as does one labelled where the reference has none (spurious).",
        "",
    ]
    header = ["model", "network", "params", "KD", "train cases"]
    header += [f"Dice {name}" for name in structures] if len(structures) > 1 else []
    header += ["mean Dice", "mean HD95 mm", "missed", "pooled slice Dice", "mean slice Dice"]
    header += ["teacher Dice kept", "s/volume"]
    if reference:
        header.append("paper")
    rows = []
    for name, model in report["models"].items():
        summary = model["summary"]
        kd = "-" if model["kind"] == "train" else ("yes" if model["distilled"] else "no")
        row = [
            name,
            model["network"],
            f"{model['parameters']:,}" if isinstance(model["parameters"], int) else "n/a",
            kd,
            str(len(model["train_cases"])),
        ]
        if len(structures) > 1:
            row += [_score(summary.get(s, {}).get("dice")) for s in structures]
        row += [
            _score(summary["mean"]["dice"]),
            _score(summary["mean"]["hd95_mm"]),
            _missed(summary["mean"]),
            _score(model["pooled_slice_dice"]["mean"]),
            _score(model["mean_slice_dice"]["mean"]),
            _score(model.get("teacher_dice_kept")) if model["kind"] == "distill" else "-",
            _score(model["seconds_per_volume"]),
        ]
        if reference:
            row.append(_score(reference.get(name)))
        rows.append(row)
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if reference.get("metric"):
        lines += ["", f"paper: {reference['metric']}."]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], runs: str | Path) -> None:
    runs = Path(runs)
    text = json.dumps(report, indent=2) + "\n"
    atomic_write_bytes(runs / "report.json", text.encode())
    atomic_write_bytes(runs / "report.md", format_report(report).encode())
