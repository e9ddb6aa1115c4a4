"""A protocol's specification: its stages as run configurations, read from a protocol file
(a shipped preset or any file of the same form) with its placeholders filled and the command
line's overrides applied, and written back out as plain run configurations
(``--write-configs``). The file's form is in :mod:`mtkd.protocols`.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
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
from mtkd.errors import MTKDError, one_line

PRESETS = Path(__file__).resolve().parent.parent / "presets"
PLACEHOLDERS = ("DATA", "RUNS")
STAGE_KEYS = ("baseline_of", "config")
PROTOCOL_KEYS = ("protocol", "description", "expects", "reference", "common", "stages")
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

# A command-line override: (stage, "students" or None for every stage; key path; value).
Override = tuple[str | None, list[str], Any]

__all__ = [
    "PRESETS",
    "Protocol",
    "Stage",
    "available_protocols",
    "load_protocol",
    "parse_override",
    "protocol_file",
    "require_filled",
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


def _command_line_path(target: str | None, path: list[str], value: Any) -> Override:
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


def parse_override(text: str) -> Override:
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
    stages_raw = _stage_bodies(raw, source)
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
    _check_targets(sets, stages_raw, source)
    dicts, twins, own_file = _stage_dicts(stages_raw, common, source)
    for stage in list(dicts):
        kind = dicts[stage].get("kind") or "train"
        for path, value in _addressed(sets, stage, twins.get(stage), kind):
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
    protocol = Protocol(
        name=str(raw.get("protocol") or source.stem),
        description=str(raw.get("description") or ""),
        source=source,
        stages=stages,
        expects=_expectations(raw, source),
        reference=dict(raw.get("reference") or {}),
    )
    _check_twins(protocol)
    return protocol


def _stage_bodies(raw: dict[str, Any], source: Path) -> dict[Any, Any]:
    """The protocol file's ``stages`` mapping, its keys and stage names checked."""
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
    return stages_raw


def _check_targets(sets: list[Override], stages_raw: dict[Any, Any], source: Path) -> None:
    """Every ``--set STAGE:...`` names a stage (or ``students``) that takes overrides."""
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


def _addressed(
    sets: list[Override], stage: str, twin_of: str | None, kind: str
) -> list[tuple[list[str], Any]]:
    """The overrides that reach ``stage`` (its own, its twin's, ``students``', everyone's)."""
    names = {stage, twin_of, "students" if kind == "distill" else None} - {None}
    return [(path, value) for target, path, value in sets if target is None or target in names]


def _stage_dicts(
    stages_raw: dict[Any, Any], common: dict[str, Any], source: Path
) -> tuple[dict[str, dict[str, Any]], dict[str, str], set[str]]:
    """Each stage's configuration merged onto ``common`` (none yet for a derived no-KD twin),
    the twins (stage -> the distillation stage it is the twin of) and the stages with their
    own config file."""
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
    return dicts, twins, own_file


def _expectations(raw: dict[str, Any], source: Path) -> dict[str, Any]:
    """The protocol's ``expects`` (``reference`` checked too: both must be mappings)."""
    for key in ("expects", "reference"):
        if not isinstance(raw.get(key) or {}, dict):
            raise MTKDError(f"protocol key '{key}' must be a mapping", source)
    expects = dict(raw.get("expects") or {})
    if not isinstance(expects.get("layout") or "", str):
        raise MTKDError("protocol key 'expects.layout' must be a layout name (msd)", source)
    structures = expects.get("structures") or []
    if not isinstance(structures, list) or not all(isinstance(n, str) for n in structures):
        raise MTKDError("protocol key 'expects.structures' must be a list of names", source)
    return expects


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
