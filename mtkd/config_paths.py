"""The paths a run configuration names, and the one rule that reads them.

The rule: a relative path in a configuration FILE is relative to that file's folder; in memory
(a :class:`mtkd.config.RunConfig` built from a dict, e.g. by the command line or the demo) it
is relative to the working directory, and a run makes it absolute when it starts.

A run stores its configuration in ``RUN/config.yaml`` with each path relative to the run
folder and, in an ``absolute_paths`` section, the absolute path it had when the run was made.
Reading the file tries the relative path first (the run folder moved together with its data),
then the absolute one (the run folder moved alone), so a run resumes, exports and evaluates from
any working directory. When neither exists, :func:`missing_path_message` says which key, which
paths were tried and from which folder.

Only dicts and paths here (no YAML, no dataclasses): :mod:`mtkd.config` reads and writes files.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtkd.errors import MTKDError

# every key of a run configuration whose value is a file or folder
PATH_KEYS = (
    "data.source",
    "data.labels_json",
    "model.init_from",
    "distill.teacher",
    "distill.unlabelled",
    "distill.anchor.model",
)
# words that a path key may hold instead of a path (a folder of that name is written ./train)
PATH_KEYWORDS = {"distill.unlabelled": ("none", "train", "auto")}
# the section a run writes beside the relative paths: {dotted key: absolute path}
ABSOLUTE_PATHS = "absolute_paths"
ABSOLUTE_PATHS_COMMENT = (
    "# Where each path above was when the run was made; read when the path relative to this\n"
    "# file's folder is missing (the run folder was moved without its data).\n"
)


@dataclass
class PathOrigin:
    """Where a configuration's paths were read from: ``file`` (None: given in memory, read
    from the working directory) and, per key, the absolute paths tried, in order."""

    file: Path | None = None
    tried: dict[str, list[Path]] = field(default_factory=dict)


def get_key(data: Mapping[str, Any], key: str) -> Any:
    """The value at dotted ``key`` (``data.source``) of nested mappings; None when absent."""
    value: Any = data
    for part in key.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _set_key(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        data = data[part]
    data[last] = value


def is_path_value(value: Any, key: str | None = None) -> bool:
    """A path to resolve: a non-empty string without a ``${NAME}`` placeholder (protocols)
    that is not one of the words (:data:`PATH_KEYWORDS`) path key ``key`` also takes."""
    if not isinstance(value, str) or not value.strip() or "${" in value:
        return False
    return value not in PATH_KEYWORDS.get(key or "", ())


def absolute(value: str | Path, folder: str | Path | None = None) -> Path:
    """``value`` as an absolute path (``~`` expanded), a relative one read from ``folder``
    (default: the working directory); symbolic links resolved. MTKDError when ``value`` cannot
    be a path (a NUL character, ``~name`` of an unknown user)."""
    if "\0" in str(value):
        raise MTKDError(f"{_quoted(value)} is not a path: it holds a NUL character")
    try:
        path = Path(value).expanduser()
    except RuntimeError:  # ~name of a user this computer does not have
        raise MTKDError(f"{_quoted(value)}: no such user's home folder") from None
    if not path.is_absolute() and folder is not None:
        path = Path(folder) / path
    return path.resolve()


def _quoted(value: str | Path) -> str:
    text = repr(str(value))
    return text if len(text) <= 80 else text[:77] + "..."


def fallback_section(value: Any, source: str | Path | None) -> dict[str, str]:
    """The ``absolute_paths`` section of a configuration file, checked."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise MTKDError(f"config key '{ABSOLUTE_PATHS}' must be a mapping", path=source)
    for key, path in value.items():
        if key not in PATH_KEYS:
            raise MTKDError(
                f"config key {_quoted(f'{ABSOLUTE_PATHS}.{key}')}: not a path key; known: "
                f"{', '.join(PATH_KEYS)}",
                path=source,
            )
        if not isinstance(path, str) or not path:
            raise MTKDError(f"config key '{ABSOLUTE_PATHS}.{key}' must be a path", path=source)
    return dict(value)


def resolve_paths(
    data: Mapping[str, Any],
    folder: str | Path | None,
    fallback: Mapping[str, str] | None = None,
    keys: Iterable[str] = PATH_KEYS,
    source: str | Path | None = None,
) -> tuple[dict[str, Any], dict[str, list[Path]]]:
    """A copy of the configuration ``data`` with every path absolute, and the paths tried;
    MTKDError naming the key and ``source`` (the file ``data`` was read from) for a value
    that cannot be a path.

    A relative path is read from ``folder`` (None: the working directory). When it does not
    exist and ``fallback`` (an ``absolute_paths`` section) holds the key, that path is used
    if it exists. With neither existing the first is kept: the run reports it with
    :func:`missing_path_message` when it needs the path.
    """
    import copy

    resolved = copy.deepcopy(dict(data))
    tried: dict[str, list[Path]] = {}
    for key in keys:
        value = get_key(resolved, key)
        if not is_path_value(value, key):
            continue
        try:
            candidates = [absolute(value, folder)]
            if fallback and is_path_value(fallback.get(key)):
                other = absolute(fallback[key])
                if other != candidates[0]:
                    candidates.append(other)
        except MTKDError as error:
            raise MTKDError(f"config key '{key}': {error.problem}", source) from None
        chosen = next((path for path in candidates if path.exists()), candidates[0])
        _set_key(resolved, key, str(chosen))
        tried[key] = candidates
    return resolved, tried


def relative_paths(
    data: Mapping[str, Any], folder: str | Path, keys: Iterable[str] = PATH_KEYS
) -> tuple[dict[str, Any], dict[str, str]]:
    """A copy of ``data`` with every path relative to ``folder`` (where the configuration
    file is written), and the ``absolute_paths`` section: {key: absolute path}. Relative paths
    in ``data`` are read from the working directory. A path that has no relative form (another
    drive on Windows) stays absolute."""
    import copy

    written = copy.deepcopy(dict(data))
    base = absolute(folder)
    section: dict[str, str] = {}
    for key in keys:
        value = get_key(written, key)
        if not is_path_value(value, key):
            continue
        path = absolute(value)
        try:
            relative = Path(os.path.relpath(path, base)).as_posix()
        except ValueError:  # no relative path between two Windows drives
            _set_key(written, key, str(path))
            continue
        if relative in PATH_KEYWORDS.get(key, ()):
            relative = f"./{relative}"  # a folder named like a keyword: still a path
        _set_key(written, key, relative)
        section[key] = str(path)
    return written, section


def missing_path_message(
    key: str, value: str, origin: PathOrigin | None, run_dir: str | Path | None = None
) -> str:
    """The error for a path key whose file or folder exists nowhere tried: the key, the
    paths tried, the folder relative paths were read from and the run folder."""
    tried = (origin.tried.get(key) if origin else None) or [absolute(value)]
    message = f"config key '{key}': not found at {tried[0]}"
    if key in PATH_KEYWORDS:
        words = ", ".join(PATH_KEYWORDS[key])
        message = f"config key '{key}' takes {words} or a folder; not found at {tried[0]}"
    for path in tried[1:]:
        message += f" nor at {path} (its absolute path when the run was made)"
    if origin is not None and origin.file is not None:
        message += f"; relative paths are read from the folder of {absolute(origin.file)}"
    else:
        message += f"; relative paths are read from the working directory {Path.cwd()}"
    if run_dir is not None:
        message += f"; run folder {absolute(run_dir)}"
    return message
