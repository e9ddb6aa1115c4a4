"""Preprocessed volumes are cached; 2-D slices and label-balanced 3-D patches."""

from __future__ import annotations

import torch

from mtkd.config import AugmentConfig, DataConfig
from mtkd.data.datasets import load_dataset
from mtkd.data.loading import PatchDataset, SliceDataset, VolumeCache
from mtkd.data.preprocess import Preprocessing
from mtkd.demo import SLAB


def cache_for(slab_dataset, data_dir, **fields):
    folder, split = slab_dataset
    dataset = load_dataset(folder, labels_json=data_dir / "labels_total_v2.json")
    table, mapping = dataset.labels.select(["liver", "kidney_right"])
    prep = Preprocessing.from_config(DataConfig(**fields))
    return VolumeCache(dataset.cases, dataset.labels, mapping, prep), split, table


def test_epochs_after_the_first_do_not_reread_volumes(slab_dataset, data_dir):
    cache, split, _ = cache_for(slab_dataset, data_dir, dims=2, slice_size=[32, 32])
    dataset = SliceDataset(cache, split["train"], AugmentConfig(flip_prob=0.5))
    for epoch in range(3):
        dataset.reseed(epoch)
        for item in range(len(dataset)):
            sample = dataset[item]
            assert sample["image"].shape == (1, 32, 32) and sample["label"].shape == (1, 32, 32)
    assert cache.reads == len(split["train"])
    assert len(dataset) == SLAB * len(split["train"])


def test_labels_are_remapped_to_the_selected_structures(slab_dataset, data_dir):
    cache, split, table = cache_for(slab_dataset, data_dir, dims=2, slice_size=[32, 32])
    values = torch.cat([cache[c].label.flatten() for c in split["train"]]).unique().tolist()
    assert table.names == ["liver", "kidney_right"]
    assert set(values) == {0, 1, 2}


def test_patches_are_label_balanced(slab_dataset, data_dir):
    cache, split, _ = cache_for(slab_dataset, data_dir, dims=3, patch_size=[16, 16, 8])
    dataset = PatchDataset(cache, split["train"], (16, 16, 8), 3, 6, augment=None)
    dataset.reseed(0)
    samples = [dataset[i] for i in range(len(dataset))]
    assert all(s["image"].shape == (1, 16, 16, 8) for s in samples)
    with_foreground = sum(int((s["label"] > 0).any()) for s in samples)
    # whole-volume foreground is a few percent; centres drawn per class hit it far more often
    assert with_foreground >= len(samples) // 2
    dataset.reseed(0)
    again = [dataset[i] for i in range(len(dataset))]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(samples, again, strict=True))
