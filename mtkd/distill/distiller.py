"""The Distiller: a student, a frozen teacher, learnable connectors, and one distillation loss."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mtkd.distill.connectors import Connector, check_alignable
from mtkd.distill.losses import check_logits, get_feature_loss, get_output_loss
from mtkd.distill.spec import OutputTerm, TapPair
from mtkd.errors import MTKDError
from mtkd.models.taps import FeatureRecorder, first_tensor, resolve_module


@dataclass
class DistillOutput:
    """One distillation forward pass.

    student_logits / teacher_logits: (B, C, *spatial) (the first tensor when a network returns a
    list, e.g. deep supervision); terms: the unweighted loss of each tap pair (by pair label)
    and of the output term (by its loss name); loss: the weighted sum of the terms (scalar);
    student_output: what the student returned, untouched (for deep-supervision losses).
    """

    student_logits: torch.Tensor
    teacher_logits: torch.Tensor
    terms: dict[str, torch.Tensor]
    loss: torch.Tensor
    student_output: Any = field(default=None, repr=False)


def _logits(output: object, who: str) -> torch.Tensor:
    tensor = first_tensor(output)
    if tensor is None:
        raise MTKDError(f"the {who} returned {type(output).__name__}, not a tensor or a list")
    return tensor


class Distiller(nn.Module):
    """Student + frozen teacher + one connector per tap pair.

    The teacher is kept out of the module tree (no parameters, no ``state_dict`` entries), stays
    in eval mode, never needs gradients and runs under ``torch.no_grad()``; ``.to()``/``.cuda()``
    still move it. The connectors (``self.connectors``, keyed by pair label) are created once,
    here, from a probe forward pass on ``example_input`` (B, C_in, *spatial); they are trained
    with the student (``trainable_parameters()``) and saved in ``state_dict()``, while
    ``self.student`` stays the plain network to export.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        pairs: Sequence[TapPair],
        output: OutputTerm | None,
        example_input: torch.Tensor,
    ):
        super().__init__()
        self.student = student
        self._frozen: list[nn.Module] = [teacher]  # a list keeps it out of the module tree
        teacher.eval()
        teacher.requires_grad_(False)
        self.pairs = list(pairs)
        self.output = output
        self.labels = [pair.label(i) for i, pair in enumerate(self.pairs)]
        self._check_labels()
        for label, pair in zip(self.labels, self.pairs):
            for net, tap, who in (
                (student, pair.student, "student"),
                (teacher, pair.teacher, "teacher"),
            ):
                try:
                    resolve_module(net, tap)
                except MTKDError as err:
                    raise MTKDError(f"tap pair '{label}', {who}: {err.problem}") from None
        self._feature_losses = [get_feature_loss(pair.loss) for pair in self.pairs]
        self._output_loss = get_output_loss(output.loss) if output is not None else None
        self.connectors = nn.ModuleDict()
        self._build_connectors(example_input)

    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher network."""
        return self._frozen[0]

    def _check_labels(self) -> None:
        names = list(self.labels)
        if self.output is not None:
            names.append(self.output.loss)
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise MTKDError(f"distillation term names must be unique, repeated: {duplicates}")

    def _probe(self, example_input: torch.Tensor) -> tuple[dict, dict, torch.Size, torch.Size]:
        """Shapes of every tap and of both outputs for ``example_input``, in eval mode."""
        was_training = self.student.training
        self.student.eval()
        try:
            with torch.no_grad():
                with FeatureRecorder(self.teacher, [p.teacher for p in self.pairs]) as t_rec:
                    t_logits = _logits(self.teacher(example_input), "teacher")
                with FeatureRecorder(self.student, [p.student for p in self.pairs]) as s_rec:
                    s_logits = _logits(self.student(example_input), "student")
        finally:
            self.student.train(was_training)
        self._check_fired(s_rec, t_rec)
        s_shapes = {k: v.shape for k, v in s_rec.features.items()}
        t_shapes = {k: v.shape for k, v in t_rec.features.items()}
        return s_shapes, t_shapes, s_logits.shape, t_logits.shape

    def _build_connectors(self, example_input: torch.Tensor) -> None:
        s_shapes, t_shapes, s_out, t_out = self._probe(example_input)
        if self.output is not None:
            check_logits(s_out, t_out)
        reference = next(itertools.chain(self.student.parameters(), [example_input]))
        for label, pair in zip(self.labels, self.pairs):
            s_shape, t_shape = s_shapes[pair.student], t_shapes[pair.teacher]
            check_alignable(s_shape, t_shape, pair)
            connector = Connector.for_shapes(s_shape, t_shape)
            try:
                self.connectors[label] = connector.to(reference.device, reference.dtype)
            except KeyError:
                raise MTKDError(f"'{label}' cannot name a tap pair; choose another name") from None

    @staticmethod
    def _check_fired(s_rec: FeatureRecorder, t_rec: FeatureRecorder) -> None:
        for who, rec in (("student", s_rec), ("teacher", t_rec)):
            if rec.missing():
                raise MTKDError(
                    f"{who} tap(s) {', '.join(rec.missing())} did not run during the forward "
                    f"pass; pick modules that are called (`mtkd taps` lists them)"
                )

    def forward(self, x: torch.Tensor) -> DistillOutput:
        """Run both networks on x (B, C_in, *spatial); return logits, terms and the loss."""
        with (
            torch.no_grad(),
            FeatureRecorder(self.teacher, [p.teacher for p in self.pairs]) as t_rec,
        ):
            teacher_logits = _logits(self.teacher(x), "teacher")
        with FeatureRecorder(self.student, [p.student for p in self.pairs]) as s_rec:
            student_output = self.student(x)
        student_logits = _logits(student_output, "student")
        self._check_fired(s_rec, t_rec)
        terms: dict[str, torch.Tensor] = {}
        weights: dict[str, float] = {}
        for label, pair, loss_fn in zip(self.labels, self.pairs, self._feature_losses):
            projected, aligned = self.connectors[label](
                s_rec.features[pair.student], t_rec.features[pair.teacher].detach()
            )
            terms[label] = loss_fn(projected, aligned, pair.temperature)
            weights[label] = pair.weight
        if self.output is not None and self._output_loss is not None:
            terms[self.output.loss] = self._output_loss(
                student_logits, teacher_logits, self.output.temperature
            )
            weights[self.output.loss] = self.output.weight
        loss = student_logits.new_zeros((), dtype=torch.float32)
        for name, value in terms.items():
            loss = loss + weights[name] * value
        return DistillOutput(student_logits, teacher_logits, terms, loss, student_output)

    def train(self, mode: bool = True) -> Distiller:
        """Set the student and connectors to ``mode``; the teacher stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Distiller:
        if recurse:
            self.teacher._apply(fn)
        return super()._apply(fn, recurse)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters to optimise: the student's, then the connectors'."""
        return [*self.student.parameters(), *self.connectors.parameters()]

    def connector_state_dict(self) -> dict[str, torch.Tensor]:
        """The connectors' weights, keyed ``<pair label>.proj.weight`` etc."""
        return self.connectors.state_dict()

    def load_connector_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load weights saved by ``connector_state_dict()``."""
        self.connectors.load_state_dict(state)
