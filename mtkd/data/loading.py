"""Cases read once, preprocessed once, cached in memory; 2-D slice and 3-D patch datasets.

Epochs after the first never re-read or re-resample a volume: :class:`VolumeCache` keeps
each preprocessed case as tensors; the datasets only index, crop and augment them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    RandCropByLabelClassesd,
    RandFlipd,
    RandGaussianNoised,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
)
from torch.utils.data import Dataset

from mtkd.config import AugmentConfig
from mtkd.data.datasets import Case
from mtkd.data.image_io import read_image, read_label
from mtkd.data.labels import LabelTable, check_label_map, remap_label_array
from mtkd.data.preprocess import Preprocessing, build_transforms, to_metatensor
from mtkd.errors import MTKDError


@dataclass
class PreparedCase:
    """One preprocessed case: image (1, X, Y, Z) float in 0..1, label (1, X, Y, Z) int64."""

    case_id: str
    image: torch.Tensor
    label: torch.Tensor


def read_case(case: Case, source_table: LabelTable, mapping: dict[int, int]) -> dict:
    """Read, check and remap one case -> {"image", "label"} MetaTensors (1, X, Y, Z)."""
    image = read_image(case.image)
    if case.label is None:
        raise MTKDError(f"case {case.case_id} has no label map", path=case.image)
    label = read_label(case.label, reference=image)
    check_label_map(label, source_table, case.label)
    label_meta = to_metatensor(label, dtype=torch.int64)
    remapped = remap_label_array(label_meta.as_tensor().numpy(), mapping)
    label_meta = MetaTensor(torch.as_tensor(remapped), affine=label_meta.affine)
    return {"image": to_metatensor(image), "label": label_meta}


class VolumeCache:
    """Preprocessed cases by id, each read and resampled exactly once."""

    def __init__(
        self,
        cases: list[Case],
        source_table: LabelTable,
        mapping: dict[int, int],
        prep: Preprocessing,
    ):
        self._cases = {case.case_id: case for case in cases}
        self._table = source_table
        self._mapping = mapping
        self._transforms = build_transforms(prep, with_label=True)
        self._prepared: dict[str, PreparedCase] = {}
        self.reads = 0  # how many volumes were read from disk (tests check it stays flat)

    def __getitem__(self, case_id: str) -> PreparedCase:
        if case_id not in self._prepared:
            data = self._transforms(read_case(self._cases[case_id], self._table, self._mapping))
            self.reads += 1
            self._prepared[case_id] = PreparedCase(
                case_id,
                data["image"].as_tensor().float().contiguous(),
                data["label"].as_tensor().round().long().contiguous(),
            )
        return self._prepared[case_id]

    def warm(self, case_ids: list[str]) -> None:
        for case_id in case_ids:
            self[case_id]


def augmentations(augment: AugmentConfig, spatial_axes: tuple[int, ...]) -> list:
    """Random dict transforms for {"image", "label"} samples (channel-first)."""
    keys = ["image", "label"]
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

    def reseed(self, seed: int) -> None:
        if self.transforms is not None:
            self.transforms.set_random_state(seed=seed % (2**32))

    def _augment(self, sample: dict) -> dict:
        return sample if self.transforms is None else self.transforms(sample)


class SliceDataset(_SeededDataset):
    """Axial slices of cached volumes: items {"image": (1, H, W), "label": (1, H, W)}."""

    def __init__(self, cache: VolumeCache, case_ids: list[str], augment: AugmentConfig | None):
        self.cache = cache
        self.index = [
            (case_id, z) for case_id in case_ids for z in range(cache[case_id].image.shape[-1])
        ]
        steps = augmentations(augment, (0, 1)) if augment else []
        self.transforms = Compose(steps) if steps else None

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int) -> dict:
        case_id, z = self.index[item]
        case = self.cache[case_id]
        sample = {"image": case.image[..., z], "label": case.label[..., z]}
        sample = self._augment(sample)
        return {"image": _plain(sample["image"]).float(), "label": _plain(sample["label"]).long()}


class PatchDataset(_SeededDataset):
    """Label-balanced 3-D patches: items {"image": (1, *patch), "label": (1, *patch)}.

    Each case yields ``patches_per_volume`` items per epoch; the patch centre is drawn with
    equal probability from every class present (background included).
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
        crop = RandCropByLabelClassesd(
            keys=["image", "label"],
            label_key="label",
            spatial_size=patch_size,
            num_classes=num_classes,
            num_samples=1,
            allow_smaller=False,
        )
        steps = [crop] + (augmentations(augment, (0, 1, 2)) if augment else [])
        self.transforms = Compose(steps)

    def __len__(self) -> int:
        return len(self.case_ids) * self.patches_per_volume

    def __getitem__(self, item: int) -> dict:
        case = self.cache[self.case_ids[item // self.patches_per_volume]]
        sample = self.transforms({"image": case.image, "label": case.label})
        if isinstance(sample, list):
            sample = sample[0]
        return {"image": _plain(sample["image"]).float(), "label": _plain(sample["label"]).long()}


def _plain(tensor: torch.Tensor | np.ndarray) -> torch.Tensor:
    """MONAI may return MetaTensors or arrays; batches hold plain tensors."""
    if isinstance(tensor, MetaTensor):
        return tensor.as_tensor()
    return torch.as_tensor(tensor)
