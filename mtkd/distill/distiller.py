"""The Distiller: a student, a frozen teacher, learnable connectors, and one distillation loss."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mtkd.distill.connectors import Connector, ContrastConnector, check_alignable
from mtkd.distill.losses import (
    SUPERVISED_FEATURE_LOSSES,
    check_logits,
    get_feature_loss,
    get_output_loss,
)
from mtkd.distill.spec import OutputTerm, TapPair
from mtkd.errors import MTKDError
from mtkd.models.taps import FeatureRecorder, first_tensor, resolve_module


@dataclass
class DistillOutput:
    """One distillation forward pass.

    student_logits / teacher_logits: (B, C, *spatial) (the first tensor when a network returns a
    list, e.g. deep supervision; for a teacher, after its ``teacher_transform``, or the stored
    teacher logits given to ``forward``); terms: the unweighted loss of each tap pair (by pair
    label) and of the output term (by its loss name); loss: the weighted sum of the terms (scalar);
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

    ``teacher_transform`` maps the teacher's output (B, C_t, *spatial) to logits comparable with
    the student's (B, C_s, *spatial), e.g. when the teacher segments other structures;
    ``teacher_in_channels`` repeats the CT channel of the input for a teacher that takes another
    number of channels than the student. A teacher that is not an ``nn.Module`` (an ONNX
    session wrapper) needs no tap pairs and is only called. ``teacher=None`` distils from stored
    teacher outputs: no tap pairs, and ``forward`` takes the teacher logits.

    A pair with the supervised voxel contrast (loss ``supcon``) gets a
    :class:`ContrastConnector` instead: a student and a teacher projection head (both trained,
    both in the connectors) and the loss with its memory of teacher embeddings per class; its
    classes are the student's output channels (2 for a one-channel sigmoid output), and
    ``forward`` then needs the batch's ground-truth ``labels``, in which the value
    ``ignore_index`` (if given) marks voxels never sampled.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        pairs: Sequence[TapPair],
        output: OutputTerm | None,
        example_input: torch.Tensor,
        *,
        teacher_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        teacher_in_channels: int | None = None,
        ignore_index: int | None = None,
    ):
        super().__init__()
        self.student = student
        self._frozen: list[nn.Module] = [] if teacher is None else [teacher]  # out of the tree
        if teacher is not None:
            teacher.eval()
            if isinstance(teacher, nn.Module):
                for parameter in teacher.parameters():  # (ScriptModules lack requires_grad_)
                    parameter.requires_grad_(False)
        self.pairs = list(pairs)
        self.output = output
        self.teacher_transform = teacher_transform
        self.teacher_in_channels = teacher_in_channels
        self.ignore_index = ignore_index
        self.labels = [pair.label(i) for i, pair in enumerate(self.pairs)]
        self._check_labels()
        if self.pairs and not isinstance(teacher, nn.Module):
            raise MTKDError(
                f"feature-level terms ({', '.join(self.labels)}) need the teacher network"
            )
        for label, pair in zip(self.labels, self.pairs):
            for net, tap, who in (
                (student, pair.student, "student"),
                (teacher, pair.teacher, "teacher"),
            ):
                try:
                    resolve_module(net, tap)
                except MTKDError as err:
                    raise MTKDError(f"tap pair '{label}', {who}: {err.problem}") from None
        self._feature_losses = [  # None: a supervised loss, owned by the pair's connector
            None if pair.loss in SUPERVISED_FEATURE_LOSSES else get_feature_loss(pair.loss)
            for pair in self.pairs
        ]
        self._output_loss = get_output_loss(output.loss) if output is not None else None
        self.connectors = nn.ModuleDict()
        self._build_connectors(example_input)

    @property
    def teacher(self) -> nn.Module | None:
        """The frozen teacher network (None when distilling from stored outputs)."""
        return self._frozen[0] if self._frozen else None

    def _teacher_input(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C_in, *spatial) with its CT channel repeated to the teacher's channels."""
        channels = self.teacher_in_channels
        if channels is None or channels == x.shape[1]:
            return x
        return x[:, :1].expand(x.shape[0], channels, *x.shape[2:])

    def _teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's logits for x, through ``teacher_transform`` (call under no_grad)."""
        logits = _logits(self.teacher(self._teacher_input(x)), "teacher")
        return logits if self.teacher_transform is None else self.teacher_transform(logits)

    def _check_labels(self) -> None:
        names = list(self.labels)
        if self.output is not None:
            names.append(self.output.loss)
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise MTKDError(f"distillation term names must be unique, repeated: {duplicates}")

    def _probe(
        self, example_input: torch.Tensor
    ) -> tuple[dict, dict, torch.Size, torch.Size | None]:
        """Shapes of every tap and of both outputs for ``example_input``, in eval mode (the
        teacher's output shape is None without a teacher network)."""
        was_training = self.student.training
        self.student.eval()
        t_rec, t_out = None, None
        try:
            with torch.no_grad():
                if self.teacher is not None:
                    with FeatureRecorder(self.teacher, [p.teacher for p in self.pairs]) as t_rec:
                        t_out = self._teacher_logits(example_input).shape
                with FeatureRecorder(self.student, [p.student for p in self.pairs]) as s_rec:
                    s_logits = _logits(self.student(example_input), "student")
        finally:
            self.student.train(was_training)
        self._check_fired(s_rec, t_rec)
        s_shapes = {k: v.shape for k, v in s_rec.features.items()}
        t_shapes = {k: v.shape for k, v in t_rec.features.items()} if t_rec else {}
        return s_shapes, t_shapes, s_logits.shape, t_out

    def _build_connectors(self, example_input: torch.Tensor) -> None:
        s_shapes, t_shapes, s_out, t_out = self._probe(example_input)
        if self.output is not None and t_out is not None:
            check_logits(s_out, t_out)
        reference = next(itertools.chain(self.student.parameters(), [example_input]))
        num_classes = max(2, int(s_out[1]))  # one sigmoid channel: background and foreground
        for index, (label, pair) in enumerate(zip(self.labels, self.pairs)):
            s_shape, t_shape = s_shapes[pair.student], t_shapes[pair.teacher]
            check_alignable(s_shape, t_shape, pair)
            if pair.loss in SUPERVISED_FEATURE_LOSSES:
                connector = ContrastConnector.for_shapes(
                    s_shape,
                    t_shape,
                    num_classes,
                    temperature=pair.temperature,
                    ignore_index=self.ignore_index,
                    seed=torch.initial_seed() + index,
                )
            else:
                connector = Connector.for_shapes(s_shape, t_shape)
            try:
                self.connectors[label] = connector.to(reference.device, reference.dtype)
            except KeyError:
                raise MTKDError(f"'{label}' cannot name a tap pair; choose another name") from None

    @staticmethod
    def _check_fired(s_rec: FeatureRecorder | None, t_rec: FeatureRecorder | None) -> None:
        for who, rec in (("student", s_rec), ("teacher", t_rec)):
            if rec is not None and rec.missing():
                raise MTKDError(
                    f"{who} tap(s) {', '.join(rec.missing())} did not run during the forward "
                    f"pass; pick modules that are called (`mtkd taps` lists them)"
                )

    def forward(
        self,
        x: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        subject: torch.Tensor | None = None,
    ) -> DistillOutput:
        """Run both networks on x (B, C_in, *spatial); return logits, terms and the loss.

        Without a teacher network, ``teacher_logits`` (B, C_s, *spatial) are the stored
        teacher's (pseudo-)logits for x; with one, they must be None. ``labels`` (B, *spatial)
        or (B, 1, *spatial), the class index of every voxel of x, are needed by ``supcon``
        pairs (each resizes them to its tap by nearest neighbour) and unused otherwise.
        ``subject`` (B,), the integer subject (patient) index of each image, is needed by
        InfoNCE pairs with ``negatives: other_subjects`` and unused otherwise.
        """
        self._check_labels_given(x, labels)
        self._check_subject_given(subject)
        if self.teacher is None:
            if teacher_logits is None:
                raise ValueError("a Distiller without a teacher network needs teacher_logits")
            t_rec = None
            teacher_logits = teacher_logits.detach()
        else:
            if teacher_logits is not None:
                raise ValueError("teacher_logits are computed by the teacher network")
            with (
                torch.no_grad(),
                FeatureRecorder(self.teacher, [p.teacher for p in self.pairs]) as t_rec,
            ):
                teacher_logits = self._teacher_logits(x)
        with FeatureRecorder(self.student, [p.student for p in self.pairs]) as s_rec:
            student_output = self.student(x)
        student_logits = _logits(student_output, "student")
        self._check_fired(s_rec, t_rec)
        terms: dict[str, torch.Tensor] = {}
        weights: dict[str, float] = {}
        for label, pair, loss_fn in zip(self.labels, self.pairs, self._feature_losses):
            student_map = s_rec.features[pair.student]
            teacher_map = t_rec.features[pair.teacher].detach()
            if loss_fn is None:
                terms[label] = self.connectors[label].loss(student_map, teacher_map, labels)
            else:
                projected, aligned = self.connectors[label](student_map, teacher_map)
                if pair.negatives == "other_subjects":
                    terms[label] = loss_fn(projected, aligned, pair.temperature, subject)
                else:
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

    def _check_subject_given(self, subject: torch.Tensor | None) -> None:
        needing = [
            label
            for label, pair in zip(self.labels, self.pairs)
            if pair.negatives == "other_subjects"
        ]
        if needing and subject is None:
            raise MTKDError(
                f"tap pair(s) {', '.join(needing)} take InfoNCE negatives from other subjects "
                f"only (distill.negatives: other_subjects), which needs each image's subject: "
                f"call the distiller with subject=(B,) integer subject indices"
            )

    def _check_labels_given(self, x: torch.Tensor, labels: torch.Tensor | None) -> None:
        supervised = [
            label
            for label, pair in zip(self.labels, self.pairs)
            if pair.loss in SUPERVISED_FEATURE_LOSSES
        ]
        if not supervised:
            return
        if labels is None:
            raise MTKDError(
                f"tap pair(s) {', '.join(supervised)} use the supervised voxel contrast "
                f"('supcon'), which needs the batch's ground-truth labels: "
                f"call the distiller with labels=(B, *spatial) class indices"
            )
        spatial = tuple(x.shape[2:])
        if tuple(labels.shape) not in ((x.shape[0], *spatial), (x.shape[0], 1, *spatial)):
            raise MTKDError(
                f"labels must be class indices (B, *spatial) or (B, 1, *spatial) matching the "
                f"input {tuple(x.shape)}, got {tuple(labels.shape)}"
            )

    def train(self, mode: bool = True) -> Distiller:
        """Set the student and connectors to ``mode``; the teacher stays in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Distiller:
        if recurse and isinstance(self.teacher, nn.Module):
            self.teacher._apply(fn)
        return super()._apply(fn, recurse)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters to optimise: the student's, then the connectors' (with the
        projection heads of ``supcon`` pairs)."""
        return [*self.student.parameters(), *self.connectors.parameters()]

    def connector_state_dict(self) -> dict[str, torch.Tensor]:
        """The connectors' weights, keyed ``<pair label>.proj.weight`` etc.; for a ``supcon``
        pair ``<label>.student_head.*``, ``<label>.teacher_head.*`` and the memory and
        sampling state ``<label>.criterion.*``."""
        return self.connectors.state_dict()

    def load_connector_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load weights saved by ``connector_state_dict()``."""
        self.connectors.load_state_dict(state)
