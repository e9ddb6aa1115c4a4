"""Where a distillation teacher comes from, and how its output meets the student's structures.

``distill.teacher`` names either a network (our run or model folder, our training checkpoint,
a MONAI bundle, a TorchScript file or export, an ONNX export: opened by
:func:`mtkd.modelfiles.sources.load_any_model`) or a folder of another tool's stored outputs
(:mod:`mtkd.data.stored_outputs`). Feature-level terms need a network with taps (ours or a
bundle); the output-level term works with every kind.

Structures are matched by name, so the teacher may segment more or other structures than the
student: the teacher's probabilities of the student's structures are kept, background is one
minus their sum (clamped at 0), and the output term compares the student's logits with the
pseudo-logits ``log(clamp(p, 1e-6))``, whose temperature-T softmax is ``p^(1/T)`` normalised,
the usual softened target. A teacher of ours with the student's labels and activation passes
its raw logits, as before.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mtkd.config import DistillConfig
from mtkd.data.image_io import IMAGE_SUFFIXES
from mtkd.data.labels import LabelTable
from mtkd.data.stored_outputs import StoredOutputs, match_by_name, open_stored_outputs
from mtkd.distill.presets import feature_weights
from mtkd.errors import MTKDError
from mtkd.modelfiles.model_io import LoadedModel, sha256_of
from mtkd.modelfiles.sources import (
    folder_format,
    is_bundle_folder,
    is_model_folder,
    is_stored_output,
    is_torchscript_zip,
    load_any_model,
)

__all__ = [
    "TEACHER_KINDS",
    "MatchedLogits",
    "TeacherSource",
    "check_feature_terms",
    "is_stored_teacher",
    "pseudo_logits",
    "resolve_teacher",
    "teacher_kind",
    "teacher_transform",
]

TEACHER_KINDS = ("run", "checkpoint", "bundle", "torchscript", "onnx", "stored")
_WITHOUT_TAPS = {"torchscript": "TorchScript", "onnx": "ONNX", "stored": "stored outputs"}
EPS = 1e-6


@dataclass
class TeacherSource:
    """A resolved ``distill.teacher``: a network (``model``) or stored outputs (``stored``).

    ``kind`` is one of TEACHER_KINDS; ``path`` is the path as given.
    """

    path: Path
    kind: str
    model: LoadedModel | None = None
    stored: StoredOutputs | None = None

    @property
    def has_taps(self) -> bool:
        """True when feature-level terms can tap the teacher (a real ``nn.Module``)."""
        return self.model is not None and self.model.has_taps

    def describe(self) -> str:
        """What the teacher is, in words (for messages)."""
        if self.model is not None and not self.model.has_taps:
            return _WITHOUT_TAPS.get(self.kind, "a network without feature taps")
        return _WITHOUT_TAPS.get(self.kind, f"a {self.kind} teacher")

    def lineage(self) -> dict[str, Any]:
        """The teacher's record in a student's lineage: path, kind and, for a network, its
        name, the SHA-256 of its weights (of the file for a checkpoint or TorchScript/ONNX
        file, when its metadata gives none) and its own lineage."""
        if self.model is None:
            return {"path": str(self.path.resolve()), "kind": self.kind}
        metadata = self.model.metadata
        where = self.model.folder if self.kind == "run" else self.path
        info: dict[str, Any] = {"path": str(Path(where).resolve()), "kind": self.kind}
        network = metadata.get("network")
        if isinstance(network, dict) and "name" in network:
            info["network"] = network["name"]
        digest = metadata.get("weights_sha256")
        if not digest and self.path.is_file():
            digest = sha256_of(self.path)
        if digest:
            info["weights_sha256"] = digest
        info["lineage"] = metadata.get("lineage", {})
        return info


def _has_case_folders(path: Path) -> bool:
    """A folder of per-case folders of masks (TotalSegmentator's default output)."""
    return any(
        child.is_dir()
        and any(f.name.lower().endswith(IMAGE_SUFFIXES) for f in child.iterdir() if f.is_file())
        for child in path.iterdir()
    )


def is_stored_teacher(path: str | Path) -> bool:
    """True when ``path`` holds stored teacher outputs rather than a model."""
    path = Path(path)
    if is_stored_output(path):
        return True
    return (
        path.is_dir()
        and not is_model_folder(path)
        and not is_bundle_folder(path)
        and _has_case_folders(path)
    )


def _model_kind(path: Path) -> str:
    """The kind of a model source that ``load_any_model`` opens (same tests, same order)."""
    if path.is_dir():
        if is_model_folder(path):
            return {"torchscript": "torchscript", "onnx": "onnx"}.get(folder_format(path), "run")
        return "bundle"
    if path.suffix.lower() == ".onnx":
        return "onnx"
    if zipfile.is_zipfile(path):
        if is_torchscript_zip(path):
            return "torchscript"
        if path.suffix == ".zip":
            return "bundle"
    return "checkpoint"


def teacher_kind(path: str | Path) -> str:
    """Which of TEACHER_KINDS ``path`` is opened as (an existing path)."""
    path = Path(path)
    return "stored" if is_stored_teacher(path) else _model_kind(path)


def resolve_teacher(
    path: str | Path,
    structures: LabelTable,
    device: str | torch.device = "cpu",
    labels_json: str | Path | None = None,
) -> TeacherSource:
    """Open ``distill.teacher``: stored outputs for the student's ``structures`` (label names
    from the folder, else ``labels_json``), or a network on ``device``."""
    path = Path(path)
    if not path.exists():
        raise MTKDError("teacher not found", path)
    if is_stored_teacher(path):
        return TeacherSource(
            path, "stored", stored=open_stored_outputs(path, structures, labels_json)
        )
    return TeacherSource(path, _model_kind(path), model=load_any_model(path, device))


def check_feature_terms(source: TeacherSource, config: DistillConfig) -> None:
    """MTKDError naming the teacher when a feature-level term has a non-zero weight but the
    teacher has no taps (TorchScript, ONNX, stored outputs)."""
    if source.has_taps:
        return
    active = [label for label, weight in feature_weights(config).items() if weight > 0]
    if not active:
        return
    hint = ""
    if config.preset is not None:
        hint = f" (preset '{config.preset}' has them: drop it and give only distill.output)"
    raise MTKDError(
        f"feature-level terms ({', '.join(active)}) need the teacher network; it is "
        f"{source.describe()}: set their weights to 0 or use our run folder/MONAI bundle{hint}",
        source.path,
    )


def pseudo_logits(probabilities: torch.Tensor, activation: str) -> torch.Tensor:
    """(B, K + 1, *spatial) probabilities (channel 0 background) -> float32 logits for the
    output term: (B, K + 1, *spatial) ``log(clamp(p, 1e-6))`` for a softmax student, or for a
    sigmoid (one-structure) student (B, 1, *spatial) ``log p_1 - log p_0``."""
    log_p = torch.log(probabilities.float().clamp_min(EPS))
    if activation == "sigmoid":
        return log_p[:, 1:2] - log_p[:, 0:1]
    return log_p


class MatchedLogits:
    """A network teacher's logits (B, C_t, *spatial) -> pseudo-logits of the student's
    structures (B, C_s, *spatial), via probabilities (softmax, or sigmoid per channel)."""

    def __init__(
        self,
        channels: list[int],
        teacher_activation: str,
        student_activation: str,
        source: str | Path | None = None,
    ):
        self.channels = list(channels)
        self.teacher_activation = teacher_activation
        self.student_activation = student_activation
        self.source = source

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] <= max(self.channels):
            raise MTKDError(
                f"the teacher outputs {logits.shape[1]} channels, but its label table needs "
                f"channel {max(self.channels)}",
                self.source,
            )
        z = logits.float()
        p = torch.sigmoid(z) if self.teacher_activation == "sigmoid" else torch.softmax(z, dim=1)
        matched = p[:, self.channels]
        background = (1.0 - matched.sum(dim=1, keepdim=True)).clamp_min(0.0)
        return pseudo_logits(torch.cat([background, matched], dim=1), self.student_activation)


def teacher_transform(
    model: LoadedModel, structures: LabelTable, activation: str
) -> MatchedLogits | None:
    """None when the teacher has the student's labels and activation (its raw logits are
    compared), else the name matching of :class:`MatchedLogits`. A softmax teacher's channel
    of a structure is its label value, a sigmoid teacher's its position in the table."""
    if model.labels.names == structures.names and model.activation == activation:
        return None
    values = match_by_name(model.labels, structures, model.folder)
    if model.activation == "sigmoid":
        channels = [model.labels.label_values.index(value) for value in values]
    else:
        channels = values
    return MatchedLogits(channels, model.activation, activation, model.folder)
