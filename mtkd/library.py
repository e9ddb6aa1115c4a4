"""The model library: a folder of imported models, one subfolder per model.

::

    LIBRARY/<key>/                    a copy of the model: our model folder, our TorchScript
                                      or ONNX export folder, or a MONAI bundle folder
    LIBRARY/<key>/library_entry.json  name, format, labels, lineage and metrics summary,
                                      imported_from, imported_at, sha256 of the weights

An import is checked (metadata present, valid and unchanged, SHA-256 of the weights equal to
the metadata's, zip members that stay inside the folder and within the size limits of
:func:`mtkd.modelfiles.zips.check_zip_sizes`, the model opens with mtkd) in a hidden staging
folder inside the library and then renamed into place, so no half-imported entry is ever
visible and a failed import leaves nothing. Only the files the model needs are copied (its
metadata and weights; a bundle's metadata, inference config, weights, LICENSE and
docs/README.md). Each entry folder is a model source that
:func:`mtkd.modelfiles.sources.load_any_model` opens.

A folder of the library is an entry only if its ``library_entry.json`` is present and valid
(a JSON object with a known ``library_format`` and ``format``): other folders are never
listed, opened or deleted.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import time
import unicodedata
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mtkd.data.atomic import atomic_write_bytes, fsync_dir, missing_folders, remove_if_empty
from mtkd.errors import MTKDError, error_summary
from mtkd.modelfiles.files import METADATA, RUN_MODEL, WEIGHTS, model_folder, sha256_of
from mtkd.modelfiles.metadata import check_seal, file_name, validate_metadata

ENTRY_FILE = "library_entry.json"
ENTRY_VERSION = 1
FORMATS = ("pytorch", "torchscript", "onnx", "bundle")
BUNDLE_METADATA = Path("configs") / "metadata.json"
BUNDLE_WEIGHTS = Path("models") / "model.pt"
# The files of a bundle that an entry keeps (those present): what loading reads, and its
# licence and description.
BUNDLE_FILES = (
    BUNDLE_METADATA.as_posix(),
    *(f"configs/inference{suffix}" for suffix in (".json", ".yaml", ".yml")),
    BUNDLE_WEIGHTS.as_posix(),
    "LICENSE",
    "docs/README.md",
)
_EXPORT_FILES = {"torchscript": "model.ts", "onnx": "model.onnx"}
_STAGING = ".staging-"
_DELETING = ".deleting-"
_STALE_SECONDS = 24 * 3600
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul"} | {
    f"{p}{i}" for p in ("com", "lpt") for i in "123456789"
}
_NOT_A_MODEL = (
    "not a model: expected a run folder, a model folder (mtkd_model.json), an exported "
    "TorchScript/ONNX folder, a MONAI bundle folder (configs/metadata.json) or a .zip of one"
)


def default_library_root() -> Path:
    """``$MTKD_LIBRARY``, else ``~/.mtkd/models``."""
    value = os.environ.get("MTKD_LIBRARY")
    return Path(value).expanduser() if value else Path.home() / ".mtkd" / "models"


@dataclass
class LibraryEntry:
    """One model of the library, as listed (read from its ``library_entry.json``)."""

    key: str  # folder name in the library
    path: Path
    name: str
    format: str  # "pytorch" | "torchscript" | "onnx" | "bundle" ("" when unreadable)
    labels: list[str]
    size_bytes: int  # the whole entry folder
    created: str  # ISO time from the model's metadata, else the import time
    teacher: str  # the teacher of a distilled model (network and path), else ""
    validation_dice: float | None  # best mean validation Dice of the training run
    parameters: int | None
    imported_from: str
    imported_at: str
    sha256: str = ""  # of the weights file
    problem: str | None = None  # why the entry cannot be used; None when it is fine
    history: dict[str, Any] = field(default_factory=dict)  # e.g. the loop's version lineage

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {**asdict(self), "path": str(self.path)}


def slugify(name: str) -> str:
    """A lower-case, file-system-safe folder name for ``name`` (``"model"`` if nothing is left)."""
    text = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:64].strip("-")
    if not slug:
        return "model"
    return f"{slug}-model" if slug in _WINDOWS_RESERVED else slug


@dataclass
class _Candidate:
    """A model found in a source folder, checked: where, what, which weights, which SHA."""

    folder: Path
    shown: Path  # how errors name ``folder`` (the user's path, also for zip contents)
    format: str
    weights: str  # relative to ``folder``
    sha256: str
    name: str
    files: list[str]  # relative to ``folder``: what the entry keeps


def _read_json(path: Path, shown: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise MTKDError(f"unreadable model metadata ({error_summary(error)})", shown) from None
    if not isinstance(data, dict):
        raise MTKDError("model metadata is not a JSON object", shown)
    return data


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def _check_weights(folder: Path, shown: Path, relative: str, expected: Any) -> str:
    weights = folder / relative
    if not weights.is_file():
        raise MTKDError("the weights file is missing", shown / relative)
    digest = sha256_of(weights)
    if expected is not None and digest != expected:
        raise MTKDError(
            "SHA-256 of the weights does not match the metadata (the file was changed or "
            "damaged); refused to import",
            shown / relative,
        )
    return digest


def _inspect(folder: Path, shown: Path, fallback_name: str) -> _Candidate:
    """The checked model in ``folder``: ours (run, model or export folder) or a bundle."""
    if model_folder(folder) != folder:  # a run folder
        folder, shown = model_folder(folder), shown / RUN_MODEL
    if (folder / METADATA).is_file():
        metadata = _read_json(folder / METADATA, shown / METADATA)
        fmt = metadata.get("format", "pytorch")
        if fmt not in ("pytorch", "torchscript", "onnx"):
            raise MTKDError(f"unknown model format {fmt!r}", shown / METADATA)
        relative = WEIGHTS if fmt == "pytorch" else metadata.get("weights_file", _EXPORT_FILES[fmt])
        if (
            not isinstance(relative, str)
            or Path(relative).name != relative
            or relative in ("", "..", ".")
        ):
            raise MTKDError(
                f"weights_file must be a file name in the folder, not {relative!r}",
                shown / METADATA,
            )
        expected = metadata.get("weights_sha256")
        if not isinstance(expected, str) or not expected:
            raise MTKDError("the model metadata has no weights_sha256", shown / METADATA)
        check_seal(metadata, shown / METADATA)
        validate_metadata(metadata, shown / METADATA, require_network=fmt == "pytorch")
        digest = _check_weights(folder, shown, relative, expected)
        name = _text(metadata.get("name")) or fallback_name
        return _Candidate(folder, shown, fmt, relative, digest, name, [METADATA, relative])
    if (folder / BUNDLE_METADATA).is_file():
        metadata = _read_json(folder / BUNDLE_METADATA, shown / BUNDLE_METADATA)
        section = metadata.get("mtkd")
        if isinstance(section, dict):
            check_seal(section, shown / BUNDLE_METADATA, prefix="mtkd.")
        expected = section.get("weights_sha256") if isinstance(section, dict) else None
        relative = BUNDLE_WEIGHTS.as_posix()
        digest = _check_weights(folder, shown, relative, expected)  # third party: recorded
        section_name = section.get("name") if isinstance(section, dict) else None
        name = _text(metadata.get("name")) or _text(section_name) or fallback_name
        files = [f for f in BUNDLE_FILES if (folder / f).is_file()]
        return _Candidate(folder, shown, "bundle", relative, digest, name, files)
    weights_like = (WEIGHTS, *_EXPORT_FILES.values(), BUNDLE_WEIGHTS.as_posix(), "model/model.pt")
    if any((folder / relative).is_file() for relative in weights_like):
        raise MTKDError(
            f"the model metadata is missing ({METADATA}, or {BUNDLE_METADATA.as_posix()} for "
            "a MONAI bundle); refused to import weights without it",
            shown,
        )
    raise MTKDError(_NOT_A_MODEL, shown)


def _zip_model_prefix(names: list[str]) -> str:
    """Where the model lies in a zip, from its member names: ``""`` (its root) or ``"TOP/"``
    (its one top folder); a run folder's ``model/`` is added."""
    names = [n.replace("\\", "/").removeprefix("./") for n in names]
    present = set(names)
    prefix = ""
    markers = (METADATA, f"model/{METADATA}", BUNDLE_METADATA.as_posix())
    if not any(marker in present for marker in markers):
        tops = {n.split("/")[0] for n in names if not n.startswith(".")}
        tops = {t for t in tops if t and not t.startswith(".") and t != "__MACOSX"}
        if len(tops) == 1 and any(n.startswith(f"{next(iter(tops))}/") for n in names):
            prefix = f"{next(iter(tops))}/"
    if f"{prefix}{METADATA}" not in present and f"{prefix}model/{METADATA}" in present:
        prefix += "model/"
    return prefix


def _zip_needed(source: Path) -> tuple[str, set[str]]:
    """(prefix, member names) of the files a model in zip ``source`` needs: our metadata and
    the weights it may name, or a bundle's :data:`BUNDLE_FILES`."""
    try:
        with zipfile.ZipFile(source) as archive:
            infos = archive.infolist()
            prefix = _zip_model_prefix([info.filename for info in infos])
            wanted = {*BUNDLE_FILES, METADATA, WEIGHTS, f"model/{WEIGHTS}", *_EXPORT_FILES.values()}
            by_name = {info.filename.replace("\\", "/").removeprefix("./"): info for info in infos}
            info = by_name.get(prefix + METADATA)
            if info is not None:
                from mtkd.modelfiles.zips import check_zip_sizes

                check_zip_sizes([info], source)
                metadata = json.loads(archive.read(info).decode("utf-8"))
                named = metadata.get("weights_file") if isinstance(metadata, dict) else None
                if file_name(named) is None:
                    wanted.add(named)
    except MTKDError:
        raise
    except Exception as error:  # noqa: BLE001 - damaged zips and metadata fail in many ways
        problem = f"unreadable zip or model metadata ({error_summary(error)})"
        raise MTKDError(problem, source) from None
    return prefix, {prefix + name for name in wanted}


def _teacher_text(lineage: Any) -> str:
    teacher = lineage.get("teacher") if isinstance(lineage, dict) else None
    if isinstance(teacher, str):
        return teacher
    if not isinstance(teacher, dict):
        return ""
    what = _text(teacher.get("network")) or _text(teacher.get("kind")) or "teacher"
    where = _text(teacher.get("path"))
    return f"{what} from {where}" if where else what


def _dice(metrics: Any) -> float | None:
    if not isinstance(metrics, dict):
        return None
    for key in ("best_val_dice", "val_dice", "mean_dice", "dice"):
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def _created(metadata: dict[str, Any]) -> str:
    created = _text(metadata.get("created"))
    if created:
        return created
    lineage = metadata.get("lineage")
    return _text(lineage.get("exported")) if isinstance(lineage, dict) else ""


def _open_check(folder: Path, shown: Path) -> dict[str, Any]:
    """Open the staged model with mtkd (as its users will) and describe it."""
    from torch import nn

    from mtkd.modelfiles.sources import load_any_model
    from mtkd.models import count_parameters

    try:
        model = load_any_model(folder, "cpu")
    except MTKDError as error:
        where = shown
        if error.path is not None and Path(error.path).is_relative_to(folder):
            where = shown / Path(error.path).relative_to(folder)  # the user's file, not ours
        raise MTKDError(f"mtkd cannot open this model: {error.problem}", where) from None
    except (KeyError, TypeError, ValueError, RuntimeError) as error:  # malformed metadata
        raise MTKDError(f"mtkd cannot open this model ({error_summary(error)})", shown) from None
    metadata = model.metadata
    parameters = metadata.get("parameters")
    if isinstance(model.network, nn.Module):
        parameters = count_parameters(model.network)
    return {
        "labels": list(model.labels.names),
        "parameters": parameters if isinstance(parameters, int) else None,
        "created": _created(metadata),
        "teacher": _teacher_text(metadata.get("lineage")),
        "validation_dice": _dice(metadata.get("metrics")),
    }


def _folder_size(folder: Path) -> int:
    total = 0
    for path in folder.rglob("*"):
        try:
            if path.is_file():
                total += path.stat().st_size
        except OSError:
            continue
    return total


def _fsync_tree(folder: Path) -> None:
    """Flush every file of ``folder`` to disk before it is renamed into the library."""
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _entry_record(folder: Path) -> dict[str, Any] | None:
    """The parsed ``library_entry.json`` of ``folder`` if it makes ``folder`` a library entry
    (a JSON object with a known ``library_format`` and ``format``), else None."""
    try:
        if folder.is_symlink() or not (folder / ENTRY_FILE).is_file():
            return None
        record = json.loads((folder / ENTRY_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    version = record.get("library_format")
    if isinstance(version, bool) or not isinstance(version, int):
        return None
    if not 1 <= version <= ENTRY_VERSION or record.get("format") not in FORMATS:
        return None
    return record


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class ModelLibrary:
    """The models in folder ``root``, one subfolder (its key) per model."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    # --- reading ---------------------------------------------------------------------------

    def entries(self) -> list[LibraryEntry]:
        """All entries, sorted by name; an entry whose model is unusable (e.g. its weights
        file is gone) is listed with its ``problem``. Folders that are not entries are left
        out (:meth:`other_folders`). A missing library folder, or one that is a file, has no
        entries (:meth:`check_root` tells the latter apart)."""
        found = []
        for child in self._children():
            record = _entry_record(child)
            if record is not None:
                found.append(self._read_entry(child, record))
        return sorted(found, key=lambda entry: (entry.name.lower(), entry.key))

    def other_folders(self) -> list[str]:
        """Names of the library's visible subfolders that are not entries (sorted)."""
        return sorted(c.name for c in self._children() if _entry_record(c) is None)

    def check_root(self) -> None:
        """MTKDError naming the root if it exists and is not a folder."""
        if self.root.exists() and not self.root.is_dir():
            raise MTKDError("the model library is a file, not a folder", self.root)

    def _children(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        try:
            return [c for c in self.root.iterdir() if not c.name.startswith(".") and c.is_dir()]
        except OSError as error:
            raise MTKDError(
                f"cannot read the model library ({error_summary(error)})", self.root
            ) from None

    def get(self, key: str) -> LibraryEntry:
        """The entry ``key``; MTKDError if the library has none."""
        path = self.path_of(key)
        return self._read_entry(path, _entry_record(path) or {})

    def path_of(self, key: str) -> Path:
        """The folder of entry ``key`` (a model source for ``load_any_model``); MTKDError if
        there is none or the folder is not a library entry."""
        path = self._entry_path(key)
        if not path.is_dir():
            raise MTKDError(f"the model library has no model {key!r}", self.root)
        if _entry_record(path) is None:
            raise MTKDError(
                f"{key!r} is not a library entry (no valid {ENTRY_FILE}): mtkd never opens or "
                "deletes other folders of the library",
                path,
            )
        return path

    def _entry_path(self, key: str) -> Path:
        if (
            not isinstance(key, str)
            or not key
            or key.startswith(".")
            or "/" in key
            or "\\" in key
            or "\x00" in key
            or Path(key).name != key
            or Path(key).is_absolute()
            or re.match(r"^[A-Za-z]:", key)
        ):
            raise MTKDError(f"{key!r} is not a model key of this library", self.root)
        return self.root / key

    def _read_entry(self, path: Path, record: dict[str, Any]) -> LibraryEntry:
        entry = LibraryEntry(
            key=path.name,
            path=path,
            name=path.name,
            format="",
            labels=[],
            size_bytes=_folder_size(path),
            created="",
            teacher="",
            validation_dice=None,
            parameters=None,
            imported_from="",
            imported_at="",
        )
        labels = record.get("labels")
        entry.name = _text(record.get("name")) or path.name
        entry.format = record.get("format") if record.get("format") in FORMATS else ""
        entry.labels = [str(n) for n in labels] if isinstance(labels, list) else []
        entry.created = _text(record.get("created")) or _text(record.get("imported_at"))
        entry.teacher = _text(record.get("teacher"))
        entry.validation_dice = _dice({"dice": record.get("validation_dice")})
        parameters = record.get("parameters")
        entry.parameters = parameters if isinstance(parameters, int) else None
        entry.imported_from = _text(record.get("imported_from"))
        entry.imported_at = _text(record.get("imported_at"))
        entry.sha256 = _text(record.get("sha256"))
        history = record.get("history")
        entry.history = history if isinstance(history, dict) else {}
        weights = record.get("weights_file")
        if not isinstance(weights, str) or not (path / weights).is_file():
            entry.problem = f"the weights file is missing ({weights})"
        return entry

    # --- changing --------------------------------------------------------------------------

    def import_model(
        self, source: str | Path, name: str | None = None, history: dict[str, Any] | None = None
    ) -> LibraryEntry:
        """Copy the model at ``source`` into the library, checked, and return its entry.

        ``source``: a run folder (its ``model/``), a model folder, an exported TorchScript or
        ONNX folder, a MONAI bundle folder, or a ``.zip`` of one of those. ``name`` defaults to
        the model's own name. ``history`` (JSON-ready) is kept with the entry, e.g. the
        version lineage of the annotate-then-distill loop (previous version, cases added,
        Dice before and after). MTKDError naming the path for missing metadata, a weights SHA-256
        that differs from the metadata's, a zip member escaping the folder, or no model at all.
        """
        source = Path(source).expanduser()
        if not source.exists():
            raise MTKDError("model not found", source)
        created = self._prepare_root()
        staging = self.root / f"{_STAGING}{secrets.token_hex(6)}"
        imported = False
        try:
            staging.mkdir()
            staged, candidate = self._stage(source, staging)
            if sha256_of(staged / candidate.weights) != candidate.sha256:
                raise MTKDError("the weights changed while being copied; import again", source)
            description = _open_check(staged, candidate.shown)
            display = _text(name) or candidate.name
            record = {
                "library_format": ENTRY_VERSION,
                "name": display,
                "format": candidate.format,
                "weights_file": candidate.weights,
                "sha256": candidate.sha256,
                **description,
                "imported_from": str(source.resolve()),
                "imported_at": _now(),
                "history": history or {},
            }
            record["created"] = record["created"] or record["imported_at"]
            text = json.dumps(record, indent=2) + "\n"
            atomic_write_bytes(staged / ENTRY_FILE, text.encode())
            _fsync_tree(staged)
            key = self._place(staged, slugify(display))
            imported = True
        except OSError as error:
            raise MTKDError(f"import failed ({error_summary(error)})", source) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            if not imported:
                remove_if_empty(created)  # a failed first import leaves no empty library behind
        return self.get(key)

    def delete(self, key: str) -> None:
        """Remove entry ``key`` (a folder name of this library; nothing else is accepted)."""
        path = self.path_of(key)
        doomed = self.root / f"{_DELETING}{secrets.token_hex(6)}-{key}"
        try:
            os.rename(path, doomed)  # the entry disappears at once, then its files go
        except OSError as error:
            raise MTKDError(f"cannot delete ({error_summary(error)})", path) from None
        shutil.rmtree(doomed, ignore_errors=True)

    def _prepare_root(self) -> list[Path]:
        """Make the root (and the folders above it that are missing); clear leftovers of a
        crash. Returns the folders it made, innermost first."""
        self.check_root()
        created = missing_folders(self.root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise MTKDError(
                f"cannot create the model library ({error_summary(error)})", self.root
            ) from None
        now = time.time()
        for child in self.root.iterdir():  # leftovers of a crash or a killed process
            deleting = child.name.startswith(_DELETING)
            if deleting or child.name.startswith(_STAGING):
                try:
                    stale = deleting or now - child.stat().st_mtime > _STALE_SECONDS
                except OSError:
                    continue
                if stale:
                    shutil.rmtree(child, ignore_errors=True)
        return created

    def _stage(self, source: Path, staging: Path) -> tuple[Path, _Candidate]:
        """Copy (folder) or extract (zip) the checked model of ``source`` to ``staging/entry``."""
        target = staging / "entry"
        if source.is_dir():
            candidate = _inspect(source, source, source.name)
            folder = candidate.folder.resolve()
            try:
                nested = os.path.commonpath([folder, self.root.resolve()]) == str(folder)
            except ValueError:  # different drives
                nested = False
            if nested:
                raise MTKDError("the model library lies inside this model folder", source)
            target.mkdir()
            for relative in candidate.files:  # only what the model needs
                (target / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(candidate.folder / relative, target / relative)
            return target, candidate
        if not zipfile.is_zipfile(source):
            raise MTKDError(_NOT_A_MODEL, source)
        from mtkd.modelfiles.sources import is_torchscript_zip
        from mtkd.modelfiles.zips import safe_extract

        if is_torchscript_zip(source):
            raise MTKDError(
                "a lone TorchScript file carries no checked metadata; import the folder that "
                "'mtkd export --format torchscript' wrote (or a zip of it)",
                source,
            )
        prefix, needed = _zip_needed(source)
        unpacked = safe_extract(source, staging / "unpacked", keep=needed.__contains__)
        root = unpacked / prefix if prefix else unpacked
        shown = source / prefix.rstrip("/") if prefix else source
        candidate = _inspect(root, shown, source.stem)
        os.rename(candidate.folder, target)
        return target, candidate

    def _place(self, staged: Path, base: str) -> str:
        """Rename ``staged`` to a free key ``base``, ``base-2``, ...; returns the key."""
        for number in range(1, 10_000):
            key = base if number == 1 else f"{base}-{number}"
            target = self.root / key
            if os.path.lexists(target):
                continue
            try:
                os.rename(staged, target)
            except OSError:
                if os.path.lexists(target):
                    continue  # taken meanwhile by another import
                raise
            fsync_dir(self.root)
            return key
        raise MTKDError(f"no free key for {base!r}", self.root)
