"""What to distil: tap pairs (feature terms) and the output term, as validated configuration."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from mtkd.distill.losses import FEATURE_LOSSES, NEGATIVES, OUTPUT_LOSSES, default_temperature
from mtkd.errors import MTKDError

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_Spec = TypeVar("_Spec", "TapPair", "OutputTerm")


def _check_loss(loss: object, valid: Iterable[str], kind: str) -> None:
    if not isinstance(loss, str) or loss not in valid:
        raise MTKDError(f"unknown {kind} loss {loss!r}; valid: {', '.join(sorted(valid))}")


def _check_number(value: object, field: str, *, positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MTKDError(f"{field} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise MTKDError(f"{field} must be > 0, got {value}")
    if not positive and value < 0:
        raise MTKDError(f"{field} must be >= 0, got {value}")


def _from_dict(cls: type[_Spec], data: Mapping[str, Any]) -> _Spec:
    if not isinstance(data, Mapping):
        raise MTKDError(f"{cls.__name__} must be a mapping, got {type(data).__name__}")
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise MTKDError(
            f"{cls.__name__}: unknown key(s) {', '.join(map(str, unknown))}; "
            f"valid: {', '.join(fields)}"
        )
    try:
        return cls(**data)
    except TypeError as err:  # a required key is missing
        raise MTKDError(f"{cls.__name__}: {err}") from None


@dataclasses.dataclass
class TapPair:
    """One feature term: student tap <- teacher tap, compared by ``loss`` after a connector.

    ``student``/``teacher`` are module names (``model.get_submodule(name)``); ``name`` labels
    the term in logs and keys its connector (letters, digits, ``_`` and ``-``; default
    ``pair<i>``). ``temperature`` is used by InfoNCE and supcon and ignored by mse/cosine;
    None (the default) becomes the loss's default: 0.4 for InfoNCE (the paper), 0.1 for supcon
    (``default_temperature``). ``supcon``, the supervised voxel contrast, needs the batch's
    labels (``Distiller.forward(x, labels=...)``). ``negatives`` (InfoNCE only): ``batch``, the
    other images of the batch (the paper), or ``other_subjects``, only the images of other
    subjects, which needs each image's subject index (``Distiller.forward(x, subject=...)``).
    """

    student: str
    teacher: str
    loss: str = "infonce"
    weight: float = 0.1
    temperature: float | None = None
    name: str | None = None
    negatives: str = "batch"

    def __post_init__(self) -> None:
        for field in ("student", "teacher"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value:
                raise MTKDError(f"tap pair: '{field}' must be a module name, got {value!r}")
        if self.name is not None and (not isinstance(self.name, str) or not _NAME.match(self.name)):
            raise MTKDError(
                f"tap pair name {self.name!r} may hold only letters, digits, '_' and '-'"
            )
        _check_loss(self.loss, FEATURE_LOSSES, "feature")
        if self.negatives not in NEGATIVES:
            raise MTKDError(
                f"tap pair {self.label()}: negatives must be one of {', '.join(NEGATIVES)}, "
                f"got {self.negatives!r}"
            )
        if self.negatives != "batch" and self.loss != "infonce":
            raise MTKDError(
                f"tap pair {self.label()}: negatives {self.negatives!r} applies to the InfoNCE "
                f"loss only, not {self.loss!r}"
            )
        if self.temperature is None:
            self.temperature = default_temperature(self.loss)
        _check_number(self.weight, f"tap pair {self.label()}: weight", positive=False)
        _check_number(self.temperature, f"tap pair {self.label()}: temperature", positive=True)

    def label(self, index: int | None = None) -> str:
        """The pair's name, else ``pair<index>`` (or ``student<-teacher`` without an index)."""
        if self.name is not None:
            return self.name
        return f"pair{index}" if index is not None else f"{self.student}<-{self.teacher}"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TapPair:
        return _from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class OutputTerm:
    """The output-level term: ``loss`` between student and teacher logits (PMD by default)."""

    loss: str = "pmd"
    weight: float = 0.2
    temperature: float = 4.0

    def __post_init__(self) -> None:
        _check_loss(self.loss, OUTPUT_LOSSES, "output")
        _check_number(self.weight, "output term: weight", positive=False)
        _check_number(self.temperature, "output term: temperature", positive=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OutputTerm:
        return _from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
