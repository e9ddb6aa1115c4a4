"""``mtkd export``: a model as TorchScript, ONNX or a MONAI bundle, checked on a CT sample
(the exporters share :mod:`mtkd.export.common`, where the export folder is described)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from mtkd.errors import MTKDError
from mtkd.export.common import EXPORT_FORMATS, load_sample
from mtkd.modelfiles.model_io import LoadedModel
from mtkd.run_folder import RunDir


def _training_run(model: LoadedModel) -> Path | None:
    """The run folder that trained ``model``: the model's own parent (``RUN/model``), else
    the run its lineage names."""
    parent = model.folder.parent
    if RunDir(parent).is_run:
        return parent
    lineage = model.metadata.get("lineage")
    run = lineage.get("run") if isinstance(lineage, dict) else None
    return Path(run) if isinstance(run, str) and run else None


def _run_sample(model: LoadedModel, model_path: Path) -> Path:
    """The first test (else validation) case of the run that trained ``model``."""
    from mtkd.config import load_config
    from mtkd.data.datasets import load_dataset

    ask = "give a CT with --sample"
    run = _training_run(model)
    if run is None:
        raise MTKDError(
            f"the model names no training run to take a CT sample from; {ask}", model_path
        )
    split_file, config_file = RunDir(run).split, RunDir(run).config
    if not RunDir(run).is_run:
        raise MTKDError(f"the model's run has no split.json/config.yaml; {ask}", run)
    try:
        split = json.loads(split_file.read_text())
        case_ids = [*split.get("test", []), *split.get("val", [])]
    except (OSError, ValueError, AttributeError, TypeError) as error:
        raise MTKDError(f"unreadable split ({error}); {ask}", split_file) from None
    if not case_ids:
        raise MTKDError(f"the run's split has no test or validation case; {ask}", split_file)
    try:
        config = load_config(config_file)  # its paths found from any working directory
        config.check_paths(("data.source", "data.labels_json"), run_dir=run)
        data = config.data
        dataset = load_dataset(data.source, labels_json=data.labels_json)
        return dataset.case(str(case_ids[0])).image
    except MTKDError as error:
        raise MTKDError(f"cannot find the run's sample case ({error}); {ask}", run) from None


def export_model_as(
    model_path: str | Path,
    fmt: str,
    out: str | Path,
    sample: str | Path | None = None,
) -> dict[str, Any]:
    """Export the model at ``model_path`` (any source ``load_any_model`` opens) as ``fmt``
    ("torchscript", "onnx" or "bundle") to folder ``out``, checked on a CT sample: ``sample``,
    or else the first test/validation case of the model's training run.

    Returns {"format", "path", "max_abs_diff", "bound", "seconds", "sample"} for the CLI.
    """
    from mtkd.modelfiles.sources import load_any_model

    if fmt not in EXPORT_FORMATS:
        raise MTKDError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    started = time.perf_counter()
    model = load_any_model(model_path, "cpu")
    sample_path = Path(sample) if sample is not None else _run_sample(model, Path(model_path))
    image, sample_name = load_sample(sample_path)
    out = Path(out)
    if fmt == "torchscript":
        from mtkd.export.torchscript import export_torchscript

        check = export_torchscript(model, out, image, sample_name=sample_name)["export_check"]
    elif fmt == "onnx":
        from mtkd.export.onnx import export_onnx

        check = export_onnx(model, out, image, sample_name=sample_name)["export_check"]
    else:
        from mtkd.export.bundle import verify_bundle, write_bundle

        written = write_bundle(model, out, image)
        verify_bundle(out)
        check = _bundle_check(written)
        if not check:
            raise MTKDError("the bundle writer recorded no numerical check", out)
    return {
        "format": fmt,
        "path": str(out),
        "max_abs_diff": check.get("max_abs_diff"),
        "bound": check.get("bound"),
        "seconds": round(time.perf_counter() - started, 3),
        "sample": sample_name,
    }


def _bundle_check(record: Any) -> dict[str, Any]:
    """The numerical check in a bundle's metadata (``metadata["mtkd"]["export_check"]``)."""
    if isinstance(record, dict):
        if "max_abs_diff" in record:
            return record
        for value in record.values():
            found = _bundle_check(value)
            if found:
                return found
    return {}
