"""The ablation folder: ``ablation.yaml``, the grid it holds (its paths relative to the
folder, their absolute form beside them, as in a run's config), claimed by a new grid and
compared with the grid that continues it; any other folder that is not empty is refused."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from mtkd.ablation.grid import Ablation, grid_differences
from mtkd.config_paths import (
    ABSOLUTE_PATHS,
    PATH_KEYS,
    is_path_value,
    relative_paths,
    resolve_paths,
)
from mtkd.data.atomic import atomic_write_bytes
from mtkd.errors import MTKDError
from mtkd.folder_lock import LOCK_NAME

__all__ = ["claim_folder", "refuse_unrelated"]


def _place(root: dict[str, Any], dotted: str) -> tuple[dict[str, Any], str]:
    """(mapping, last key) of ``dotted`` under ``root``; an empty mapping where a parent is
    missing (nothing to resolve there)."""
    *parents, last = dotted.split(".")
    mapping = root
    for part in parents:
        mapping = mapping.get(part) or {}
    return mapping, last


def _grid_paths(grid: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """The places of a grid (``Ablation.to_dict()``) that hold a file or folder: (mapping,
    key) for the teacher, every path key of each cell's ``distill`` section and the recipe's
    path keys."""
    places = [(grid, "teacher", "distill.teacher")]
    distill_keys = [key for key in PATH_KEYS if key.startswith("distill.")]
    for cell in grid.get("cells") or []:
        for key in distill_keys:
            places.append((*_place(cell["distill"], key.removeprefix("distill.")), key))
    for key in PATH_KEYS:
        if key != "distill.teacher":
            places.append((*_place(grid.get("recipe") or {}, key), key))
    return [
        (mapping, last) for mapping, last, key in places if is_path_value(mapping.get(last), key)
    ]


def _grid_with_relative_paths(grid: dict[str, Any], root: Path) -> dict[str, Any]:
    """``grid`` as ``ablation.yaml`` stores it: paths relative to the ablation folder ``root``
    and, under ``absolute_paths``, each relative path's absolute form (as a run's config)."""
    grid = copy.deepcopy(grid)
    section: dict[str, str] = {}
    for mapping, key in _grid_paths(grid):
        written, absolute = relative_paths({"path": mapping[key]}, root, keys=("path",))
        mapping[key] = written["path"]
        if "path" in absolute:
            section[written["path"]] = absolute["path"]
    return {**grid, ABSOLUTE_PATHS: section} if section else grid


def _grid_with_absolute_paths(grid: dict[str, Any], root: Path) -> dict[str, Any]:
    """A stored grid with its paths absolute: read from ``root`` where they exist there (the
    folder moved with its data), else the absolute path stored beside them."""
    grid = copy.deepcopy(grid)
    section = grid.pop(ABSOLUTE_PATHS, None)
    section = section if isinstance(section, dict) else {}
    for mapping, key in _grid_paths(grid):
        fallback = {"path": section[mapping[key]]} if mapping[key] in section else None
        resolved, _ = resolve_paths({"path": mapping[key]}, root, fallback, keys=("path",))
        mapping[key] = resolved["path"]
    return grid


def claim_folder(root: Path, ablation: Ablation) -> None:
    """Write ``ablation.yaml`` into a new or empty folder; refuse one holding another grid.
    Paths are compared where they point, so a grid moved together with its data continues. A
    grid that gained or dropped cells or changed its sweep selection continues too
    (:func:`grid_differences`), and ``ablation.yaml`` then records them as they are now."""
    grid = _grid_with_absolute_paths(ablation.to_dict(), Path.cwd())
    path = root / "ablation.yaml"
    if path.is_file():
        try:
            stored = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise MTKDError(f"not valid YAML ({error})", path=path) from None
        stored = _grid_with_absolute_paths(stored, root) if isinstance(stored, dict) else {}
        differences = grid_differences(stored, grid)
        if differences:
            raise MTKDError(
                "this folder holds another ablation grid (it differs in "
                f"{', '.join(differences)}); continue it with the same configuration and "
                "options, or choose another output folder",
                path=root,
            )
        if all(stored.get(key) == grid.get(key) for key in ("cells", "sweep_selection")):
            return
    else:
        refuse_unrelated(root)
        root.mkdir(parents=True, exist_ok=True)
    stored = _grid_with_relative_paths(grid, root)
    atomic_write_bytes(path, yaml.safe_dump(stored, sort_keys=False).encode())


def refuse_unrelated(root: Path) -> None:
    """MTKDError unless ``root`` is missing, empty or holds an ablation (its lock aside)."""
    if (root / "ablation.yaml").is_file() or not root.exists():
        return
    if not root.is_dir() or any(path.name != LOCK_NAME for path in root.iterdir()):
        raise MTKDError(
            "not an ablation folder (no ablation.yaml) and not empty; choose another output folder",
            path=root,
        )
