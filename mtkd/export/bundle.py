"""A model of ours as a MONAI bundle, checked numerically and with MONAI's own bundle checks.

::

    BUNDLE/configs/metadata.json   MONAI metadata (versions, network_data_format, ...) and an
                                   ``mtkd`` section (labels, preprocessing, network spec,
                                   lineage, SHA-256 of model.pt, the numerical export check)
    BUNDLE/configs/inference.json  ``python -m monai.bundle run --config_file
                                   configs/inference.json`` segments every NIfTI in ``data/``
    BUNDLE/models/model.pt         state_dict of the segmentation network
    BUNDLE/docs/README.md          what the model is, labels, preprocessing, lineage
    BUNDLE/LICENSE                 licensing note

The inference config comes from :mod:`mtkd.export.bundle_config` (bundles of the thesis U-Nets
name mtkd's ``ThesisUNet`` and need the mtkd package), the metadata, README and licence from
:mod:`mtkd.export.bundle_metadata`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import SimpleITK as sitk
import torch

from mtkd.data.atomic import atomic_path, atomic_write_bytes, temporary_sibling
from mtkd.data.image_io import check_writable
from mtkd.errors import MTKDError
from mtkd.export.bundle_config import inference_config, segmentation_network, segmentation_spec
from mtkd.export.bundle_metadata import LICENSE_TEXT, bundle_metadata, bundle_readme
from mtkd.export.verify import check_export, sample_input
from mtkd.modelfiles.bundle import METADATA, MTKD_SECTION, WEIGHTS, bundle_folder, load_bundle
from mtkd.modelfiles.bundle_config import network_definition, read_config
from mtkd.modelfiles.metadata import seal
from mtkd.modelfiles.model_io import LoadedModel, sha256_of

SCHEMA_RESOURCE = "monai_bundle_schema.json"
CONFIG = Path("configs") / "inference.json"
README = Path("docs") / "README.md"
LICENSE = Path("LICENSE")


# --- writing and verifying -------------------------------------------------------------------


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


def _check_target(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise MTKDError("bundle target exists and is not a folder", folder)
    check_writable(folder / METADATA)  # a file among the folders above, or no access
    if not folder.exists() or not any(folder.iterdir()):
        return
    try:
        ours = MTKD_SECTION in json.loads((folder / METADATA).read_text())
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise MTKDError("bundle target folder is not empty (and not a bundle mtkd wrote)", folder)


def _move_into(staging: Path, folder: Path) -> None:
    for source in sorted(p for p in staging.rglob("*") if p.is_file()):
        destination = folder / source.relative_to(staging)
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, destination)


def write_bundle(
    model: LoadedModel,
    folder: str | Path,
    sample_image: sitk.Image,
    *,
    name: str | None = None,
    version: str = "0.1.0",
    authors: str = "unspecified (exported with mtkd)",
    copyright: str = "unspecified; see LICENSE",
) -> dict[str, Any]:
    """Write ``model`` as a MONAI bundle in ``folder`` and return its metadata.

    The bundle is assembled next to ``folder``, rebuilt with :func:`load_bundle`, compared with
    ``model`` on ``sample_image`` (:func:`check_export`, recorded in ``mtkd.export_check``),
    checked with :func:`verify_bundle`, and only then moved into ``folder`` file by file.
    """
    folder = Path(folder)
    _check_target(folder)
    network, definition = segmentation_network(model)
    spec = segmentation_spec(model)
    staging = temporary_sibling(folder)
    staging.mkdir(parents=True)
    try:
        with atomic_path(staging / WEIGHTS) as temporary:
            state = {k: v.detach().cpu() for k, v in network.state_dict().items()}
            torch.save(state, temporary)
        metadata = bundle_metadata(
            model,
            network,
            spec,
            sha256_of(staging / WEIGHTS),
            name=name or model.name,
            version=version,
            authors=authors,
            copyright=copyright,
        )
        config = inference_config(definition, model.prep, model.activation, len(model.labels))
        _write_json(staging / CONFIG, config)
        metadata[MTKD_SECTION] = seal(metadata[MTKD_SECTION])
        _write_json(staging / METADATA, metadata)
        rebuilt = load_bundle(staging)
        if rebuilt.labels != model.labels or rebuilt.prep != model.prep:
            raise MTKDError("the bundle reads back with other labels or preprocessing", folder)
        sample = sample_input(model, sample_image)
        metadata[MTKD_SECTION]["export_check"] = check_export(
            model.network, rebuilt.network, sample, folder
        )
        metadata[MTKD_SECTION] = seal(metadata[MTKD_SECTION])
        _write_json(staging / METADATA, metadata)
        atomic_write_bytes(staging / README, bundle_readme(metadata).encode())
        atomic_write_bytes(staging / LICENSE, LICENSE_TEXT.encode())
        verify_bundle(staging)
        folder.mkdir(parents=True, exist_ok=True)
        _move_into(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return metadata


def _fake_size_factor(metadata: dict[str, Any]) -> int:
    """``n`` for MONAI's fake input: sides of at least 16 (64 for divisors of 32 and more)."""
    try:
        shape = metadata["network_data_format"]["inputs"]["image"]["spatial_shape"]
    except (KeyError, TypeError):
        return 1
    multiples = [
        int(m.group(1))
        for item in shape
        if isinstance(item, str) and (m := re.fullmatch(r"\s*(\d+)\s*\*\s*n\s*", item))
    ]
    if not multiples:
        return 1
    multiple = max(multiples)
    return max(1, math.ceil((64 if multiple >= 32 else 16) / multiple))


@contextmanager
def _quiet_monai() -> Iterator[None]:
    """MONAI's bundle checks log every step at INFO; keep warnings and errors only."""
    logger = logging.getLogger("monai.bundle.scripts")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def verify_bundle(folder: str | Path, schema: str | Path | None = None) -> None:
    """MONAI's ``verify_metadata`` (against ``schema``, default mtkd's offline schema) and
    ``verify_net_in_out`` on the bundle's network, then a weights-only load of the bundle.

    Nothing of the bundle's config is executed: MONAI gets a config holding only the checked,
    literal ``network_def``. Failures raise MTKDError naming the bundle.
    """
    from monai.bundle import verify_metadata, verify_net_in_out

    path = Path(folder)
    root = bundle_folder(path)
    metadata_file = root / METADATA
    if not metadata_file.is_file():
        raise MTKDError("bundle file is missing (configs/metadata.json)", metadata_file)
    config, config_file = read_config(root)
    definition = network_definition(config, config_file)
    try:
        metadata = json.loads(metadata_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise MTKDError(f"unreadable metadata ({error})", metadata_file) from None
    with ExitStack() as stack:
        stack.enter_context(_quiet_monai())
        if schema is None:
            traversable = resources.files("mtkd").joinpath("resources", SCHEMA_RESOURCE)
            schema_file = stack.enter_context(resources.as_file(traversable))
        else:
            schema_file = Path(schema)
        if not schema_file.is_file():  # MONAI would try to download it
            raise MTKDError("schema file not found", schema_file)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no hash value provided" for the local schema
            try:
                verify_metadata(
                    meta_file=str(metadata_file), filepath=str(schema_file), create_dir=False
                )
            except Exception as error:  # noqa: BLE001 - MONAI raises several types
                raise MTKDError(
                    f"bundle metadata fails MONAI's check against {schema_file.name}: {error}",
                    path,
                ) from None
        with tempfile.TemporaryDirectory(prefix="mtkd-bundle-") as scratch:
            network_only = Path(scratch) / "network.json"
            network_only.write_text(json.dumps({"network_def": definition}))
            try:
                verify_net_in_out(
                    net_id="network_def",
                    meta_file=str(metadata_file),
                    config_file=str(network_only),
                    device="cpu",
                    n=_fake_size_factor(metadata),
                )
            except Exception as error:  # noqa: BLE001 - MONAI raises several types
                raise MTKDError(
                    f"bundle network fails MONAI's input/output check: {error}", path
                ) from None
    load_bundle(root)
