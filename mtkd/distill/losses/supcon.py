"""Supervised voxel-level contrastive distillation (the "supervised contrastive" of MTMS-CKD).

Student voxel embeddings are pulled towards teacher embeddings of voxels of the same
ground-truth class and pushed away from those of the other classes (Khosla et al., NeurIPS 2020;
in the pixel-contrast form of Wang et al., ICCV 2021, "Exploring Cross-Image Pixel Contrast for
Semantic Segmentation"), with class-balanced anchor sampling and a per-class memory of recent
teacher embeddings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtkd.errors import MTKDError

DEFAULT_TEMPERATURE = 0.1
ANCHORS_PER_CLASS = 128
MAX_ANCHORS = 1024
MEMORY_SIZE = 256
_SEED_RANGE = 2**62


def resize_labels(labels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Class-index labels (B, *L) or (B, 1, *L) -> int64 (B, *size), by nearest neighbour.

    The values are kept as they are (an ignore value too); labels already of ``size`` are only
    converted to int64.
    """
    size = tuple(int(n) for n in size)
    if labels.ndim == len(size) + 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != len(size) + 1:
        raise MTKDError(
            f"labels must be class indices (B, *spatial) or (B, 1, *spatial) for "
            f"{len(size)}-D feature maps, got shape {tuple(labels.shape)}"
        )
    if labels.is_floating_point():
        labels = labels.round()
    if tuple(labels.shape[1:]) == size:
        return labels.long()
    resized = F.interpolate(labels[:, None].double(), size=size, mode="nearest")
    return resized[:, 0].long()


class SupervisedVoxelContrast(nn.Module):
    """Supervised contrastive loss between student and teacher voxel embeddings.

    For embeddings s (student) and t (teacher), both (B, D, *spatial) and L2-normalised along D
    here, and class labels y (resized to the embeddings' grid by nearest neighbour):

    - anchors: for each class present in the batch (``ignore_index`` excluded), at most
      ``min(anchors_per_class, max_anchors // classes present)`` voxels drawn at random without
      replacement from that class's voxels over the whole batch (a rare class gets as many
      anchors as a common one, up to its voxel count); anchor i is the student embedding s_i;
    - keys: the teacher embeddings t_j of the same drawn voxels, plus the memory: up to
      ``memory_size`` teacher embeddings per class kept from earlier training calls (first in,
      first out; detached);
    - positives P(i): the keys of anchor i's class (its own voxel's t_i among them); negatives
      N(i): the keys of the other classes.

    The loss, with temperature tau, is the mean over anchors of

        L_i = -1/|P(i)| sum_{p in P(i)} log( e_ip / (e_ip + sum_{n in N(i)} e_in) ),
        e_ij = exp(s_i . t_j / tau)

    Anchors without a negative (a batch and memory holding a single class) are left out; with no
    anchor left the loss is 0 (with a gradient path, no NaN).

    State: the memory (``memory`` (K, M, D), ``memory_count``, ``memory_next``) and the
    sampling state (``seed``, ``step``) are buffers, so they follow ``.to()`` and are saved in
    ``state_dict()``: a restored module draws the same anchors and sees the same memory as the
    one it was saved from. The draws of a call come from a generator seeded with
    (``seed``, ``step``); ``step`` and the memory advance only in training mode. ``seed``
    defaults to ``torch.initial_seed()``, so a run is deterministic given the torch seed.

    Args:
        dim: embedding channels D.
        num_classes: label values 0 .. K-1 (2 for binary labels).
        temperature: tau > 0 (default 0.1).
        anchors_per_class: most anchors per class and call.
        max_anchors: most anchors per call (lowers the per-class number when many classes are
            present; each present class keeps at least one).
        memory_size: teacher embeddings kept per class (0: no memory).
        ignore_index: a label value whose voxels are never drawn (None: none).
        seed: base seed of the draws (None: ``torch.initial_seed()``).
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        *,
        temperature: float = DEFAULT_TEMPERATURE,
        anchors_per_class: int = ANCHORS_PER_CLASS,
        max_anchors: int = MAX_ANCHORS,
        memory_size: int = MEMORY_SIZE,
        ignore_index: int | None = None,
        seed: int | None = None,
    ):
        super().__init__()
        if isinstance(temperature, bool) or not (
            isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0
        ):
            raise MTKDError(f"supcon temperature must be a finite number > 0, got {temperature}")
        for name, value, low in (
            ("dim", dim, 1),
            ("num_classes", num_classes, 2),
            ("anchors_per_class", anchors_per_class, 1),
            ("max_anchors", max_anchors, 1),
            ("memory_size", memory_size, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise MTKDError(f"supcon {name} must be an integer >= {low}, got {value!r}")
        self.dim = dim
        self.num_classes = num_classes
        self.temperature = float(temperature)
        self.anchors_per_class = anchors_per_class
        self.max_anchors = max_anchors
        self.memory_size = memory_size
        self.ignore_index = ignore_index
        seed = torch.initial_seed() if seed is None else int(seed)
        self.register_buffer("seed", torch.tensor(seed % _SEED_RANGE, dtype=torch.long))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("memory", torch.zeros(num_classes, memory_size, dim))
        self.register_buffer("memory_count", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("memory_next", torch.zeros(num_classes, dtype=torch.long))

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """The loss (float32 scalar) for embeddings (B, D, *spatial) and labels (B, *L) or
        (B, 1, *L) (class indices, resized here to *spatial by nearest neighbour)."""
        if student.shape != teacher.shape or student.ndim < 3 or student.shape[1] != self.dim:
            raise MTKDError(
                f"supcon needs student and teacher embeddings of the same shape (B, {self.dim}, "
                f"*spatial), got student {tuple(student.shape)} and teacher "
                f"{tuple(teacher.shape)}"
            )
        labels = resize_labels(labels.to(student.device), student.shape[2:])
        if labels.shape[0] != student.shape[0]:
            raise MTKDError(
                f"supcon: {labels.shape[0]} label maps for a batch of {student.shape[0]} images"
            )
        flat_labels = labels.reshape(-1)
        with torch.autocast(device_type=student.device.type, enabled=False):
            index = self._draw(flat_labels)
            positions = student.shape[2:].numel()
            image, position = index // positions, index % positions
            anchors = F.normalize(student.flatten(2)[image, :, position].float(), dim=1)
            keys = F.normalize(teacher.flatten(2)[image, :, position].float(), dim=1)
            classes = flat_labels[index]
            memory_keys, memory_classes = self.memory_entries()
            loss = _contrast(
                anchors,
                classes,
                torch.cat([keys, memory_keys.to(keys)]),
                torch.cat([classes, memory_classes]),
                self.temperature,
            )
            if loss is None:  # no anchor has a negative: 0, with a gradient path
                loss = (student.float().sum() + teacher.float().sum()) * 0.0
        if self.training:
            self._remember(keys.detach(), classes)
            self.step += 1
        return loss

    def memory_entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored teacher embeddings (F, D) and their classes (F,) int64."""
        filled = (
            torch.arange(self.memory_size, device=self.memory.device) < self.memory_count[:, None]
        )
        classes = torch.arange(self.num_classes, device=self.memory.device)
        return self.memory[filled], classes[:, None].expand_as(filled)[filled]

    def reset_memory(self) -> None:
        """Empty the memory."""
        self.memory.zero_()
        self.memory_count.zero_()
        self.memory_next.zero_()

    def _generator(self, device: torch.device) -> torch.Generator:
        generator = torch.Generator(device=device)
        seed, step = int(self.seed), int(self.step)
        return generator.manual_seed((seed * 1_000_003 + step) % _SEED_RANGE)

    def _draw(self, labels: torch.Tensor) -> torch.Tensor:
        """Flat indices (A,) of the anchors drawn from labels (N,): class by class, at most the
        per-class number each, in ascending class order."""
        valid = labels if self.ignore_index is None else labels[labels != self.ignore_index]
        present = torch.unique(valid).tolist()
        bad = [c for c in present if not 0 <= c < self.num_classes]
        if bad:
            hint = "" if self.ignore_index is None else f" or the ignore index {self.ignore_index}"
            raise MTKDError(
                f"supcon: label values {bad} are not classes 0..{self.num_classes - 1}{hint}"
            )
        if not present:
            return labels.new_zeros(0)
        per_class = max(1, min(self.anchors_per_class, self.max_anchors // len(present)))
        generator = self._generator(labels.device)
        drawn = []
        for value in present:
            where = torch.nonzero(labels == value).squeeze(1)
            if where.numel() > per_class:
                order = torch.randperm(where.numel(), generator=generator, device=where.device)
                where = where[order[:per_class]]
            drawn.append(where)
        return torch.cat(drawn)

    @torch.no_grad()
    def _remember(self, keys: torch.Tensor, classes: torch.Tensor) -> None:
        """Append teacher embeddings keys (A, D) of classes (A,) to their classes' memories."""
        if self.memory_size == 0:
            return
        for value in torch.unique(classes).tolist():
            new = keys[classes == value][-self.memory_size :].to(self.memory.dtype)
            count = new.shape[0]
            slots = (self.memory_next[value] + torch.arange(count, device=new.device)) % (
                self.memory_size
            )
            self.memory[value].index_copy_(0, slots, new)
            self.memory_next[value] = (self.memory_next[value] + count) % self.memory_size
            self.memory_count[value] = torch.clamp(
                self.memory_count[value] + count, max=self.memory_size
            )

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_classes={self.num_classes}, temperature={self.temperature}, "
            f"anchors_per_class={self.anchors_per_class}, max_anchors={self.max_anchors}, "
            f"memory_size={self.memory_size}, ignore_index={self.ignore_index}"
        )


def _contrast(
    anchors: torch.Tensor,
    anchor_classes: torch.Tensor,
    keys: torch.Tensor,
    key_classes: torch.Tensor,
    temperature: float,
) -> torch.Tensor | None:
    """Mean pixel-contrast loss of normalised anchors (A, D) against keys (K, D); None when no
    anchor has a negative key. Every anchor must have a positive key (its own voxel's)."""
    negative = anchor_classes[:, None] != key_classes[None, :]  # (A, K)
    usable = negative.any(dim=1)
    if not bool(usable.any()):
        return None
    anchors, negative = anchors[usable], negative[usable]
    logits = anchors @ keys.T / temperature  # (A', K)
    negatives = logits.masked_fill(~negative, -math.inf).logsumexp(dim=1, keepdim=True)
    log_prob = logits - torch.logaddexp(logits, negatives)  # each key against all negatives
    positive = (~negative).float()
    per_anchor = -(log_prob * positive).sum(dim=1) / positive.sum(dim=1)
    return per_anchor.mean()
