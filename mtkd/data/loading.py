"""Cases read once, preprocessed once, cached in memory; 2-D slice and 3-D patch datasets.

Epochs after the first never re-read or re-resample a volume: :class:`VolumeCache` keeps
each preprocessed case as tensors; the datasets only index, crop and augment them.

With stored teacher outputs (:mod:`mtkd.data.stored_outputs`) each case also carries the
teacher's map, preprocessed with the same spatial transforms as the image (nearest for label
maps, bilinear for probabilities) and cropped, sliced and augmented together with it: items
then hold ``"teacher"`` (K + 1, *spatial) probabilities of the student's K structures
(channel 0 background), aligned voxel for voxel with ``"image"`` and ``"label"``.

A run with precomputed teacher targets (:mod:`mtkd.engine.teacher_targets`) attaches the
teacher's logits (C, X, Y, Z) float16 to each training case once they are computed; they travel
the same way, and items hold them as ``"teacher"`` (C, *spatial) float32 logits.

Cases can be unlabelled (images for teacher targets only): their label file, if any, is never
read; their ``label`` is a zero placeholder and items say ``"has_label": False``. Every item
also carries ``"subject"``, the index of its patient (cases of one patient share it), and
``"annotated"``, which of the K + 1 channels the case's label map annotates: False for the
structures the case does not annotate (:mod:`mtkd.data.partial_labels`), whose voxels the
segmentation loss does not count as background (:mod:`mtkd.engine.seg_loss`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    RandCropByLabelClassesd,
    RandFlipd,
    RandGaussianNoised,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
)
from torch.utils.data import Dataset

from mtkd.config import AugmentConfig
from mtkd.data.datasets import Case
from mtkd.data.image_io import read_image, read_label
from mtkd.data.labels import LabelTable, check_label_map, remap_label_array
from mtkd.data.preprocess import Preprocessing, build_transforms, to_metatensor
from mtkd.data.stored_outputs import StoredOutputs
from mtkd.errors import MTKDError


@dataclass
class PreparedCase:
    """One preprocessed case: image (1, X, Y, Z) float in 0..1, label (1, X, Y, Z) int64 (zeros
    when ``has_label`` is False), and with stored teacher outputs the teacher's map on the same
    grid: a label map (1, X, Y, Z) int64 in the student's numbering or probabilities
    (K, X, Y, Z) of the K structures. ``subject``: the index of the case's patient;
    ``annotated``: (K + 1,) bool, False for the structures the case does not annotate."""

    case_id: str
    image: torch.Tensor
    label: torch.Tensor
    teacher: torch.Tensor | None = None  # or precomputed teacher logits (C, X, Y, Z) float16
    has_label: bool = True
    subject: int = 0
    annotated: torch.Tensor | None = None


def _read(case: Case, source_table: LabelTable, mapping: dict[int, int], labelled: bool = True):
    """The case's SimpleITK image and its {"image", "label"} MetaTensors (1, X, Y, Z); without
    ``labelled`` the label file is not read and the label is zeros on the image's grid."""
    image = read_image(case.image)
    if not labelled:
        image_meta = to_metatensor(image)
        zeros = torch.zeros(image_meta.shape, dtype=torch.int64)
        return image, {"image": image_meta, "label": MetaTensor(zeros, affine=image_meta.affine)}
    if case.label is None:
        raise MTKDError(f"case {case.case_id} has no label map", path=case.image)
    label = read_label(case.label, reference=image)
    present = check_label_map(label, source_table, case.label)
    drawn = [name for name in case.not_annotated if source_table.value_of(name) in present]
    if drawn:
        raise MTKDError(
            f"the label map has voxels of {', '.join(drawn)}, which dataset.json lists as not "
            f"annotated in case '{case.case_id}' (mtkd.not_annotated)",
            case.label,
        )
    label_meta = to_metatensor(label, dtype=torch.int64)
    remapped = remap_label_array(label_meta.as_tensor().numpy(), mapping)
    label_meta = MetaTensor(torch.as_tensor(remapped), affine=label_meta.affine)
    return image, {"image": to_metatensor(image), "label": label_meta}


def read_case(case: Case, source_table: LabelTable, mapping: dict[int, int]) -> dict:
    """Read, check and remap one case -> {"image", "label"} MetaTensors (1, X, Y, Z)."""
    return _read(case, source_table, mapping)[1]


def _teacher_tensor(teacher: MetaTensor, is_label_map: bool) -> torch.Tensor:
    """A preprocessed teacher map: label map (1, X, Y, Z) int64 or probabilities (K, X, Y, Z)."""
    teacher = teacher.as_tensor()
    if is_label_map:
        return teacher.round().long().contiguous()
    return teacher.float().clamp(0.0, 1.0).contiguous()


def teacher_probabilities(teacher: torch.Tensor, structures: int) -> torch.Tensor:
    """A cached teacher map -> (K + 1, *spatial) float probabilities, channel 0 background.

    ``teacher``: a label map (1, *spatial) of values 0..K (one-hot), or probabilities
    (K, *spatial) of the structures (background = 1 - their sum, clamped at 0).
    """
    if not teacher.is_floating_point():
        return F.one_hot(teacher[0].long(), structures + 1).movedim(-1, 0).float()
    background = (1.0 - teacher.sum(0, keepdim=True)).clamp_min(0.0)
    return torch.cat([background, teacher.float()])


class VolumeCache:
    """Preprocessed cases by id, each read and resampled exactly once.

    With ``teacher`` (stored teacher outputs) each case of ``teacher_cases`` (default: all)
    also gets its teacher map. With ``teacher_logits`` the teacher's precomputed logits are
    attached later (:meth:`attach_teacher_logits`). The cases of ``unlabelled`` are read
    without their labels.
    Subjects are numbered 0.. in the order of the sorted patient ids of ``cases``.
    """

    def __init__(
        self,
        cases: list[Case],
        source_table: LabelTable,
        mapping: dict[int, int],
        prep: Preprocessing,
        teacher: StoredOutputs | None = None,
        teacher_cases: list[str] | None = None,
        unlabelled: Iterable[str] = (),
        teacher_logits: bool = False,
    ):
        self._cases = {case.case_id: case for case in cases}
        self.unlabelled = set(unlabelled)
        patients = sorted({case.patient_id for case in cases})
        number = {patient: index for index, patient in enumerate(patients)}
        self.subjects = {case.case_id: number[case.patient_id] for case in cases}
        self._table = source_table
        self._mapping = mapping
        self._prep = prep
        self._transforms = build_transforms(prep, with_label=True)
        self.teacher = teacher
        self.teacher_logits = teacher_logits
        self._teacher_cases = None if teacher_cases is None else set(teacher_cases)
        self._prepared: dict[str, PreparedCase] = {}
        self.reads = 0  # how many volumes were read from disk (tests check it stays flat)

    @property
    def carries_teacher(self) -> bool:
        """Whether training items carry teacher maps (stored outputs or precomputed logits)."""
        return self.teacher is not None or self.teacher_logits

    def attach_teacher_logits(self, case_id: str, logits: torch.Tensor) -> None:
        """Keep the teacher's logits (C, X, Y, Z) of ``case_id``, on its cached image's grid."""
        case = self[case_id]
        if tuple(logits.shape[1:]) != tuple(case.image.shape[1:]):
            raise ValueError(
                f"teacher logits {tuple(logits.shape)} do not match the image "
                f"{tuple(case.image.shape)} of case {case_id}"
            )
        case.teacher = logits.to("cpu", torch.float16).contiguous()

    @property
    def teacher_structures(self) -> int | None:
        """K, the number of structures of the teacher maps (None without stored outputs)."""
        return None if self.teacher is None else len(self.teacher.structures)

    def __getitem__(self, case_id: str) -> PreparedCase:
        if case_id not in self._prepared:
            labelled = case_id not in self.unlabelled
            image, raw = _read(self._cases[case_id], self._table, self._mapping, labelled)
            stored = self.teacher.read(case_id, image) if self._has_teacher(case_id) else None
            if stored is None:
                data = self._transforms(raw)
            else:  # the teacher map follows the image through the same spatial steps
                mode = "nearest" if stored.is_label_map else "bilinear"
                transforms = build_transforms(self._prep, with_label=True, extra={"teacher": mode})
                data = transforms({**raw, "teacher": stored.data})
            self.reads += 1
            self._prepared[case_id] = PreparedCase(
                case_id,
                data["image"].as_tensor().float().contiguous(),
                data["label"].as_tensor().round().long().contiguous(),
                None if stored is None else _teacher_tensor(data["teacher"], stored.is_label_map),
                has_label=labelled,
                subject=self.subjects[case_id],
                annotated=self.annotated(case_id),
            )
        return self._prepared[case_id]

    def annotated(self, case_id: str) -> torch.Tensor:
        """(K + 1,) bool: False for the channels of the structures ``case_id`` does not
        annotate (structures the run does not train are not channels)."""
        channels = max(self._mapping.values(), default=0) + 1
        mask = torch.ones(channels, dtype=torch.bool)
        for name in self._cases[case_id].not_annotated:
            channel = self._mapping.get(self._table.value_of(name))
            if channel is not None:
                mask[channel] = False
        return mask

    def _has_teacher(self, case_id: str) -> bool:
        if self.teacher is None:
            return False
        return self._teacher_cases is None or case_id in self._teacher_cases

    def warm(self, case_ids: list[str]) -> None:
        for case_id in case_ids:
            self[case_id]


def augmentations(
    augment: AugmentConfig, spatial_axes: tuple[int, ...], with_teacher: bool = False
) -> list:
    """Random dict transforms for {"image", "label"[, "teacher"]} samples (channel-first); the
    spatial ones move every key alike, the intensity ones touch the image only."""
    keys = ["image", "label", "teacher"] if with_teacher else ["image", "label"]
    steps: list = []
    if augment.flip_prob > 0:
        steps += [
            RandFlipd(keys, prob=augment.flip_prob, spatial_axis=axis) for axis in spatial_axes
        ]
    if augment.rotate90_prob > 0:
        steps.append(RandRotate90d(keys, prob=augment.rotate90_prob, spatial_axes=(0, 1)))
    if augment.intensity_scale > 0:
        steps.append(
            RandScaleIntensityd("image", factors=augment.intensity_scale, prob=augment.prob)
        )
    if augment.intensity_shift > 0:
        steps.append(
            RandShiftIntensityd("image", offsets=augment.intensity_shift, prob=augment.prob)
        )
    if augment.noise_std > 0:
        steps.append(RandGaussianNoised("image", prob=augment.prob, std=augment.noise_std))
    return steps


class _SeededDataset(Dataset):
    """A dataset whose random transforms are reseeded by the trainer at every epoch."""

    transforms: Compose | None = None
    cache: VolumeCache

    def reseed(self, seed: int) -> None:
        if self.transforms is not None:
            self.transforms.set_random_state(seed=seed % (2**32))

    def _augment(self, sample: dict) -> dict:
        return sample if self.transforms is None else self.transforms(sample)

    def _item(self, sample: dict, case: PreparedCase) -> dict:
        """Plain tensors; the teacher map as (K + 1, *spatial) probabilities (precomputed
        logits as (C, *spatial) float32); ``has_label`` (bool) and ``subject`` (int64)
        scalars, batched to (B,); ``annotated`` (K + 1,) bool, batched to (B, K + 1)."""
        item = {
            "image": _plain(sample["image"]).float(),
            "label": _plain(sample["label"]).long(),
            "has_label": torch.tensor(case.has_label),
            "subject": torch.tensor(case.subject, dtype=torch.int64),
            "annotated": case.annotated,
        }
        if "teacher" in sample and self.cache.teacher_logits:
            item["teacher"] = _plain(sample["teacher"]).float()
        elif "teacher" in sample and self.cache.teacher_structures is not None:
            structures = self.cache.teacher_structures
            item["teacher"] = teacher_probabilities(_plain(sample["teacher"]), structures)
        return item


class SliceDataset(_SeededDataset):
    """Axial slices of cached volumes: items {"image": (1, H, W), "label": (1, H, W),
    "has_label": (), "subject": ()} and, with teacher maps, "teacher": (K + 1, H, W) (stored
    outputs) or (C, H, W) (precomputed logits)."""

    def __init__(self, cache: VolumeCache, case_ids: list[str], augment: AugmentConfig | None):
        self.cache = cache
        self.index = [
            (case_id, z) for case_id in case_ids for z in range(cache[case_id].image.shape[-1])
        ]
        with_teacher = cache.carries_teacher
        steps = augmentations(augment, (0, 1), with_teacher) if augment else []
        self.transforms = Compose(steps) if steps else None

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int) -> dict:
        case_id, z = self.index[item]
        case = self.cache[case_id]
        sample = {"image": case.image[..., z], "label": case.label[..., z]}
        if case.teacher is not None:
            sample["teacher"] = case.teacher[..., z]
        return self._item(self._augment(sample), case)


class PatchDataset(_SeededDataset):
    """Label-balanced 3-D patches: items {"image": (1, *patch), "label": (1, *patch),
    "has_label": (), "subject": ()} and, with teacher maps, "teacher": (K + 1, *patch)
    probabilities or (C, *patch) logits, cut at the same place.

    Each case yields ``patches_per_volume`` items per epoch; the patch centre is drawn with
    equal probability from every class present (background included), or, in an unlabelled
    case, uniformly over the volume.
    """

    def __init__(
        self,
        cache: VolumeCache,
        case_ids: list[str],
        patch_size: tuple[int, int, int],
        num_classes: int,
        patches_per_volume: int,
        augment: AugmentConfig | None,
    ):
        self.cache = cache
        self.case_ids = list(case_ids)
        self.patches_per_volume = patches_per_volume
        with_teacher = cache.carries_teacher
        keys = ["image", "label", "teacher"] if with_teacher else ["image", "label"]
        crop = RandCropByLabelClassesd(
            keys=keys,
            label_key="label",
            spatial_size=patch_size,
            num_classes=num_classes,
            num_samples=1,
            allow_smaller=False,
        )
        uniform = RandSpatialCropd(keys=keys, roi_size=patch_size, random_size=False)

        def steps() -> list:  # separate instances: each pipeline keeps its own random state
            return augmentations(augment, (0, 1, 2), with_teacher) if augment else []

        self.transforms = Compose([crop, *steps()])
        self.unlabelled_transforms = Compose([uniform, *steps()])

    def reseed(self, seed: int) -> None:
        super().reseed(seed)
        self.unlabelled_transforms.set_random_state(seed=(seed + 1) % (2**32))

    def __len__(self) -> int:
        return len(self.case_ids) * self.patches_per_volume

    def __getitem__(self, item: int) -> dict:
        case = self.cache[self.case_ids[item // self.patches_per_volume]]
        sample = {"image": case.image, "label": case.label}
        if case.teacher is not None:
            sample["teacher"] = case.teacher
        transforms = self.transforms if case.has_label else self.unlabelled_transforms
        sample = transforms(sample)
        if isinstance(sample, list):
            sample = sample[0]
        return self._item(sample, case)


def _plain(tensor: torch.Tensor | np.ndarray) -> torch.Tensor:
    """MONAI may return MetaTensors or arrays; batches hold plain tensors."""
    if isinstance(tensor, MetaTensor):
        return tensor.as_tensor()
    return torch.as_tensor(tensor)
