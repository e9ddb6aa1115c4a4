"""Run configuration files: reading YAML safely (size, aliases, encoding), loading a
:class:`~mtkd.config.run_config.RunConfig` with its paths read from the file's folder, and
writing one, relative to a run folder. PyYAML is imported when a file is read or written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mtkd.config.run_config import RunConfig
from mtkd.config_paths import (
    ABSOLUTE_PATHS,
    ABSOLUTE_PATHS_COMMENT,
    PathOrigin,
    fallback_section,
    relative_paths,
    resolve_paths,
)
from mtkd.errors import MTKDError, one_line

MAX_CONFIG_BYTES = 16 * 2**20


def read_yaml(path: str | Path) -> Any:
    """The content of a YAML configuration file (``{}`` when empty); MTKDError naming the file
    when it is missing or not valid YAML."""
    import yaml

    path = Path(path)
    if path.is_dir():
        raise MTKDError("is a folder, not a configuration file (YAML)", path=path)
    if not path.is_file():
        raise MTKDError("configuration file not found", path=path)
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise MTKDError(
                f"too large for a configuration file (over {MAX_CONFIG_BYTES // 2**20} MiB)", path
            )
        text = path.read_bytes().decode("utf-8")
        data = yaml.safe_load(text)
        _check_expanded_size(data, path)
    except OSError as error:
        raise MTKDError(f"cannot read ({error.strerror or error})", path=path) from None
    except UnicodeDecodeError:
        raise MTKDError(
            "not a configuration file: binary content, not UTF-8 text", path=path
        ) from None
    except yaml.YAMLError as error:
        raise MTKDError(f"not valid YAML ({one_line(error)})", path=path) from None
    except RecursionError:
        raise MTKDError("not a configuration: nested too deeply", path=path) from None
    return {} if data is None else data


MAX_CONFIG_VALUES = 100_000


def _check_expanded_size(data: Any, path: Path) -> None:
    """MTKDError when YAML aliases (``&a`` ... ``*a``) make ``data`` refer to itself, or
    expand it past MAX_CONFIG_VALUES values (a few lines can stand for billions)."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: Any) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        if id(node) in open_nodes:
            raise MTKDError("a YAML alias refers to a value that contains it (a loop)", path)
        if id(node) not in sizes:
            open_nodes.add(id(node))
            children = node.values() if isinstance(node, dict) else node
            sizes[id(node)] = 1 + sum(size(child) for child in children)
            open_nodes.discard(id(node))
        return sizes[id(node)]

    if size(data) > MAX_CONFIG_VALUES:
        raise MTKDError(
            f"too many values for a configuration (over {MAX_CONFIG_VALUES:,} once YAML "
            "aliases are expanded)",
            path,
        )


def load_config(path: str | Path) -> RunConfig:
    """Read a YAML run configuration; errors name the file and the key.

    Paths come back absolute: a relative one is read from the file's folder, else (when it
    does not exist there) from the file's ``absolute_paths`` section, as a run writes it."""
    path = Path(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise MTKDError("a configuration must be a mapping of keys to values", path=path)
    data, origin = resolve_file_paths(data, path)
    config = RunConfig.from_dict(data, source=path)
    config.origin = origin
    return config


def resolve_file_paths(data: dict[str, Any], path: str | Path) -> tuple[dict, PathOrigin]:
    """The configuration ``data`` read from file ``path`` with its paths absolute (its
    ``absolute_paths`` section taken out), and where they were read from."""
    data = dict(data)
    fallback = fallback_section(data.pop(ABSOLUTE_PATHS, None), path)
    data, tried = resolve_paths(data, Path(path).absolute().parent, fallback, source=path)
    return data, PathOrigin(Path(path), tried)


def dump_config(config: RunConfig, folder: str | Path | None = None) -> str:
    """The configuration as YAML text (keys in declaration order). Written into ``folder``
    (a run folder), its paths are relative to that folder, with their absolute form in an
    ``absolute_paths`` section; without ``folder`` they are written as they are."""
    import yaml

    data = config.to_dict()
    if folder is None:
        return yaml.safe_dump(data, sort_keys=False)
    data, section = relative_paths(data, folder)
    text = yaml.safe_dump(data, sort_keys=False)
    if section:
        text += ABSOLUTE_PATHS_COMMENT + yaml.safe_dump({ABSOLUTE_PATHS: section}, sort_keys=False)
    return text
