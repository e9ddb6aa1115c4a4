"""The schema of a model's metadata, its checks and its checksum (no torch needed).

The metadata (``mtkd_model.json``, the ``mtkd`` section of a bundle's ``configs/metadata.json``,
the copy embedded in an exported TorchScript or ONNX file, a sidecar ``FILE.json``) tells how
to feed a network and read its output. Every loader checks it with :func:`validate_metadata`
against the tables below (one row per key: what it must hold, whether it is required) before
it is used, so an edited or damaged value is refused by name instead of giving a wrong
segmentation or a traceback.

``metadata_sha256`` is the SHA-256 of the canonical JSON of the metadata without itself and
without ``weights_sha256`` (which the weights file checks). Writers add it (:func:`seal`);
loaders refuse metadata that does not match it (:func:`check_seal`). Metadata written before
it existed (no ``metadata_sha256``) is loaded with the schema checks only.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtkd.errors import MTKDError

FORMATS = ("pytorch", "torchscript", "onnx")
ACTIVATIONS = ("softmax", "sigmoid")
HU_RANGE = (-100_000.0, 100_000.0)  # a window bound outside this is not a CT intensity
SPACING_RANGE_MM = (1e-3, 1e3)  # as mtkd.data.image_io; a value <= 0 keeps that axis
MAX_SLICE_SIDE = 2048  # 2-D network input side (voxels)
MAX_PATCH_SIDE = 1024  # 3-D network input side (voxels)
MAX_IN_CHANNELS = 64
MAX_SIZE_MULTIPLE = 1024
MAX_TEXT = 1000  # characters of a name or a date
CHECKSUM_KEY = "metadata_sha256"
_UNSEALED = (CHECKSUM_KEY, "weights_sha256")

Check = Callable[[Any], str | None]  # None when the value is fine, else what is wrong


@dataclass(frozen=True)
class Key:
    """One row of a schema table: the check of the value and whether the key must be there."""

    check: Check
    required: bool = False


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def integer(low: int, high: int) -> Check:
    def check(value: Any) -> str | None:
        if not _is_int(value) or not low <= value <= high:
            return f"must be a whole number from {low} to {high}"
        return None

    return check


def choice(*options: Any) -> Check:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or value not in options:
            return f"must be one of {', '.join(map(str, options))}"
        return None

    return check


def text(value: Any) -> str | None:
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        return f"must be a text of at most {MAX_TEXT} characters"
    if any(ord(ch) < 32 for ch in value):
        return "must not hold control characters"
    return None


def boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


def json_object(value: Any) -> str | None:
    return None if isinstance(value, dict) else "must be a JSON object"


def object_or_null(value: Any) -> str | None:
    return None if value is None or isinstance(value, dict) else "must be a JSON object or null"


def text_or_null(value: Any) -> str | None:
    return None if value is None else text(value)


def sha256_hex(value: Any) -> str | None:
    if (
        not isinstance(value, str)
        or len(value) != 64
        or any(c not in "0123456789abcdef" for c in value)
    ):
        return "must be 64 lower-case hexadecimal digits (a SHA-256)"
    return None


def file_name(value: Any) -> str | None:
    if (
        not isinstance(value, str)
        or value in ("", ".", "..")
        or Path(value).name != value
        or "\\" in value
        or "\x00" in value
    ):
        return "must be a file name in the model folder"
    return None


def sizes(count: int, high: int) -> Check:
    def check(value: Any) -> str | None:
        if (
            not isinstance(value, list)
            or len(value) != count
            or not all(_is_int(v) and 1 <= v <= high for v in value)
        ):
            return f"must be {count} whole numbers from 1 to {high}"
        return None

    return check


def hu_window(value: Any) -> str | None:
    low, high = HU_RANGE
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(_is_number(v) and low <= v <= high for v in value)
    ):
        return f"must be [low, high], two finite numbers from {low:g} to {high:g} HU"
    if not value[0] < value[1]:
        return "must have low < high (an empty or reversed window maps every voxel alike)"
    return None


def spacing(value: Any) -> str | None:
    low, high = SPACING_RANGE_MM
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) != 3
        or not all(_is_number(v) and (v <= 0 or low <= v <= high) for v in value)
    ):
        return (
            f"must be null or 3 finite numbers (mm; from {low:g} to {high:g}, or <= 0 to keep "
            "that axis)"
        )
    return None


# mtkd_model.json (and the mtkd section of a bundle, the metadata of an exported file)
MODEL_KEYS: dict[str, Key] = {
    "format_version": Key(integer(1, 1)),
    "name": Key(text),
    "created": Key(text),
    "format": Key(choice(*FORMATS)),
    "weights_file": Key(file_name),
    "network": Key(json_object),  # a registered network's spec: also checked by the registry
    "parameters": Key(integer(0, 10**12)),
    "labels": Key(json_object, required=True),  # also checked by the label rules below
    "activation": Key(choice(*ACTIVATIONS), required=True),
    "preprocessing": Key(json_object, required=True),
    "size_multiple": Key(integer(1, MAX_SIZE_MULTIPLE)),
    "lineage": Key(json_object),
    "metrics": Key(json_object),
    "postprocessing": Key(json_object),  # its structure names: mtkd.infer.postprocess
    "weights_sha256": Key(sha256_hex),
    CHECKSUM_KEY: Key(sha256_hex),
    "source_weights_sha256": Key(text_or_null),
    "exporter": Key(object_or_null),
    "export_check": Key(object_or_null),
    "exported": Key(object_or_null),
    "mtkd_version": Key(text),
}
# Other top-level keys are kept and ignored (notes, later additions that change nothing).

PREPROCESSING_KEYS: dict[str, Key] = {
    "dims": Key(choice(2, 3), required=True),
    "hu_window": Key(hu_window, required=True),
    "spacing": Key(spacing),
    "crop_foreground": Key(boolean, required=True),
    "slice_size": Key(sizes(2, MAX_SLICE_SIDE), required=True),
    "patch_size": Key(sizes(3, MAX_PATCH_SIDE), required=True),
    "in_channels": Key(integer(1, MAX_IN_CHANNELS)),
}
# Every key of the preprocessing changes what the network sees: unknown keys are refused.

NETWORK_KEYS: dict[str, Key] = {
    "name": Key(text, required=True),
    "params": Key(json_object, required=True),
    "reconstruction": Key(choice("none", "masked", "unmasked")),
    "mask_ratio": Key(lambda v: None if _is_number(v) and 0 <= v < 1 else "must be in [0, 1)"),
    "mask_patch": Key(integer(1, MAX_PATCH_SIDE)),
    "registered": Key(boolean),
}


def _invalid(key: str, problem: str, value: Any, where: str | Path | None) -> MTKDError:
    return MTKDError(f"invalid model metadata: {key} {problem} (it is {_shown(value)})", where)


def check_table(
    data: Any,
    table: Mapping[str, Key],
    where: str | Path | None,
    prefix: str = "",
    closed: bool = False,
) -> None:
    """MTKDError naming ``where`` and the key for a value of ``data`` that breaks ``table``
    (a missing required key; with ``closed``, also a key the table does not know)."""
    if not isinstance(data, dict):
        raise MTKDError(
            f"invalid model metadata: {prefix.rstrip('.') or 'it'} must be a JSON "
            f"object (it is {_shown(data)})",
            where,
        )
    for key, rule in table.items():
        if key not in data:
            if rule.required:
                raise MTKDError(f"invalid model metadata: {prefix}{key} is missing", where)
            continue
        problem = rule.check(data[key])
        if problem:
            raise _invalid(prefix + key, problem, data[key], where)
    if closed:
        unknown = sorted(str(k) for k in data if k not in table)
        if unknown:
            raise MTKDError(
                f"invalid model metadata: {prefix}{unknown[0]} is not a known key (known: "
                f"{', '.join(table)}); a model of a newer mtkd?",
                where,
            )


def validate_preprocessing(prep: Any, where: str | Path | None, prefix: str = "") -> None:
    """Check a preprocessing object (``Preprocessing.to_dict()`` form) against the table."""
    check_table(prep, PREPROCESSING_KEYS, where, f"{prefix}preprocessing.", closed=True)


def validate_labels(
    labels: Any,
    activation: Any,
    out_channels: int | None,
    where: str | Path | None,
    prefix: str = "",
) -> None:
    """Labels must name values 1..K (channel k is label k) with sane names; a sigmoid output
    has one label; ``out_channels`` (when known) must be K + 1 (softmax) or 1 (sigmoid)."""
    from mtkd.data.labels import LabelTable

    key = f"{prefix}labels"
    try:
        table = LabelTable.from_dict(labels)
    except MTKDError as error:
        raise MTKDError(f"invalid model metadata: {key}: {error.problem}", where) from None
    values = table.label_values
    if values != list(range(1, len(values) + 1)):
        raise _invalid(key, f"must number the structures 1..{len(values)}", labels, where)
    long = [name for name in table.names if len(name) > MAX_TEXT]
    if long:
        raise _invalid(key, f"names must be at most {MAX_TEXT} characters", long[0], where)
    if activation == "sigmoid" and len(values) != 1:
        raise _invalid(key, "must hold one structure for a sigmoid output", labels, where)
    if out_channels is None:
        return
    expected = 1 if activation == "sigmoid" else len(values) + 1
    if out_channels != expected:
        raise MTKDError(
            f"invalid model metadata: {key} names {len(values)} structure(s), so a {activation} "
            f"network needs {expected} output channel(s), but the network has {out_channels}",
            where,
        )


def spec_channels(
    spec: Any, prep: dict[str, Any], where: str | Path | None, prefix: str = ""
) -> int | None:
    """Check a registered network spec (against the registry and the preprocessing) and return
    its output channels; None for a spec the registry does not describe."""
    check_table(spec, NETWORK_KEYS, where, f"{prefix}network.")
    if spec.get("registered") is False:
        return None
    from mtkd.models import network_info

    try:
        params = network_info(spec["name"], **spec["params"]).params
    except MTKDError as error:
        problem = f"invalid model metadata: {prefix}network: {error.problem}"
        raise MTKDError(problem, where) from None
    except (TypeError, ValueError, KeyError, IndexError, OverflowError) as error:
        raise MTKDError(
            f"invalid model metadata: {prefix}network.params cannot build "
            f"{spec['name']!r} ({type(error).__name__})",
            where,
        ) from None
    for name, expected in (("spatial_dims", prep["dims"]), ("in_channels", _channels_in(prep))):
        if name in params and params[name] != expected:
            raise MTKDError(
                f"invalid model metadata: {prefix}network.params.{name} is {params[name]!r} but "
                f"the preprocessing gives {expected}",
                where,
            )
    channels = params.get("out_channels")
    return channels if _is_int(channels) else None


def _channels_in(prep: dict[str, Any]) -> int:
    return prep.get("in_channels", 1)


def validate_metadata(
    metadata: Any,
    where: str | Path | None,
    out_channels: int | None = None,
    *,
    require_network: bool = False,
    prefix: str = "",
) -> None:
    """Check model metadata against the schema; MTKDError naming ``where`` and the key.

    ``out_channels``: the network's output channels when the caller knows them; else those of
    the metadata's registered network spec, if any. ``require_network``: the metadata must
    hold the network spec (a PyTorch model folder or checkpoint is built from it).
    ``prefix`` is put before key names in messages (``"mtkd."`` for a bundle's section).
    """
    check_table(metadata, MODEL_KEYS, where, prefix)
    validate_preprocessing(metadata["preprocessing"], where, prefix)
    if require_network and "network" not in metadata:
        raise MTKDError(f"invalid model metadata: {prefix}network is missing", where)
    if "network" in metadata:
        channels = spec_channels(metadata["network"], metadata["preprocessing"], where, prefix)
        out_channels = out_channels if out_channels is not None else channels
    validate_labels(metadata["labels"], metadata["activation"], out_channels, where, prefix)


# --- the checksum ----------------------------------------------------------------------------


def metadata_digest(metadata: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON (sorted keys, no spaces, ASCII) of ``metadata`` as it
    reads back from its JSON file, without ``metadata_sha256`` and ``weights_sha256``."""
    plain = json.loads(json.dumps(dict(metadata), default=str))
    for key in _UNSEALED:
        plain.pop(key, None)
    canonical = json.dumps(plain, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def seal(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """``metadata`` with its ``metadata_sha256`` (to be written as is)."""
    return {**metadata, CHECKSUM_KEY: metadata_digest(metadata)}


def check_seal(metadata: Any, where: str | Path | None, prefix: str = "") -> bool:
    """MTKDError naming ``where`` if ``metadata_sha256`` does not match the metadata; True when
    it matches, False when there is none (metadata of an older mtkd: schema checks only)."""
    if not isinstance(metadata, dict) or CHECKSUM_KEY not in metadata:
        return False
    if metadata[CHECKSUM_KEY] != metadata_digest(metadata):
        raise MTKDError(
            f"the model metadata was changed after it was written ({prefix}{CHECKSUM_KEY} does "
            "not match its contents); export the model again, or restore the original file",
            where,
        )
    return True
