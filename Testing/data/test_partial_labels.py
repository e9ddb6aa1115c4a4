"""nnU-Net v2 datasets read as nnU-Net writes them, and what dataset.json's "mtkd" key says:
structures a case does not annotate, and other names of the structures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import NNUNET_STRUCTURES as STRUCTURES
from helpers import expect_error, slice_prep, write_nnunet_v2

from mtkd.data.datasets import load_dataset, load_unlabelled
from mtkd.data.loading import SliceDataset, VolumeCache
from mtkd.data.partial_labels import with_not_annotated
from mtkd.engine.fingerprint import data_fingerprint, fingerprint_differences


def test_nnunet_v2_dataset_is_read(tmp_path):
    root = write_nnunet_v2(tmp_path / "Dataset017_Abd")
    dataset = load_dataset(root)
    assert dataset.layout == "nnunet"
    assert dataset.labels.names == STRUCTURES and dataset.labels.label_values == [1, 2, 3]
    assert [case.case_id for case in dataset.cases] == ["abd_000", "abd_001", "abd_002"]
    assert all(case.not_annotated == () for case in dataset.cases)
    assert [case.case_id for case in load_unlabelled(root)] == ["abd_000", "abd_001", "abd_002"]
    cache = VolumeCache(dataset.cases, dataset.labels, {1: 1, 2: 2, 3: 3}, slice_prep())
    assert sorted(np.unique(cache["abd_001"].label.numpy()).tolist()) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("labels", "words"),
    [
        ({"background": 0, "liver": [1, 2], "spleen": 2}, ["'liver'", "region-based"]),
        ({"background": 0, "liver": 1, "spleen": 2, "ignore": 3}, ["'ignore'", "not_annotated"]),
    ],
)
def test_nnunet_labels_mtkd_cannot_train_are_refused(tmp_path, labels, words):
    root = write_nnunet_v2(tmp_path / "d", labels=labels)
    with expect_error(root / "dataset.json", *words):
        load_dataset(root)


def test_not_annotated_structures_are_read_per_case(tmp_path):
    root = write_nnunet_v2(tmp_path / "d", not_annotated={"abd_001": ["spleen"]})
    dataset = load_dataset(root)
    assert [case.not_annotated for case in dataset.cases] == [(), ("spleen",), ()]
    cache = VolumeCache(dataset.cases, dataset.labels, {1: 1, 2: 2, 3: 3}, slice_prep())
    assert cache["abd_000"].annotated.tolist() == [True, True, True, True]
    assert cache["abd_001"].annotated.tolist() == [True, True, False, True]
    # a run that trains spleen and liver only: the spleen is channel 1 there
    selected = VolumeCache(dataset.cases, dataset.labels, {2: 1, 1: 2}, slice_prep())
    assert selected["abd_001"].annotated.tolist() == [True, False, True]
    items = SliceDataset(cache, ["abd_000", "abd_001"], None)
    batch = torch.utils.data.default_collate([items[0], items[len(items) - 1]])
    assert batch["annotated"].tolist() == [[True] * 4, [True, True, False, True]]


def test_a_not_annotated_structure_drawn_in_the_label_map_is_refused(tmp_path):
    root = write_nnunet_v2(tmp_path / "d")  # the spleen is drawn in every case
    data = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    (root / "dataset.json").write_text(json.dumps(with_not_annotated(data, "abd_002", ["spleen"])))
    dataset = load_dataset(root)
    cache = VolumeCache(dataset.cases, dataset.labels, {1: 1, 2: 2, 3: 3}, slice_prep())
    with expect_error(root / "labelsTr" / "abd_002.nii.gz", "spleen", "not annotated", "abd_002"):
        cache["abd_002"]


@pytest.mark.parametrize(
    ("section", "words"),
    [
        ({"not_annotated": {"abd_001": ["pancreas"]}}, ["mtkd.not_annotated.abd_001", "pancreas"]),
        ({"not_annotated": {"abd_009": ["spleen"]}}, ["mtkd.not_annotated.abd_009", "no case"]),
        ({"not_annotated": {"abd_001": "spleen"}}, ["mtkd.not_annotated.abd_001", "list"]),
        ({"aliases": {"pancreas": ["pankreas"]}}, ["mtkd.aliases.pancreas", "not a structure"]),
        ({"aliases": []}, ["mtkd.aliases", "JSON object"]),
    ],
)
def test_bad_mtkd_sections_name_the_file_and_key(tmp_path, section, words):
    root = write_nnunet_v2(tmp_path / "d")
    data = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    (root / "dataset.json").write_text(json.dumps({**data, "mtkd": section}), encoding="utf-8")
    with expect_error(root / "dataset.json", *words):
        load_dataset(root)


def test_aliases_and_msd_labels_are_read(tmp_path):
    root = write_nnunet_v2(tmp_path / "d", labels={"0": "background", "1": "liver", "2": "spleen",
                                            "3": "kidney_right"})  # fmt: skip
    data = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    data["mtkd"] = {"aliases": {"kidney_right": ["Niere rechts", "right kidney"]}}
    (root / "dataset.json").write_text(json.dumps(data), encoding="utf-8")
    dataset = load_dataset(root)
    assert dataset.labels.names == STRUCTURES
    assert dataset.aliases == {"kidney_right": ("Niere rechts", "right kidney")}


def test_marking_a_structure_not_annotated_changes_the_fingerprint(tmp_path):
    root = write_nnunet_v2(tmp_path / "d", not_annotated={"abd_001": ["spleen"]})
    marked = {"data": data_fingerprint(load_dataset(root))}
    data = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    (root / "dataset.json").write_text(json.dumps(with_not_annotated(data, "abd_001", [])))
    assert load_dataset(root).case("abd_001").not_annotated == ()
    unmarked = {"data": data_fingerprint(load_dataset(root))}
    assert fingerprint_differences(marked, unmarked) == ["case(s) changed: abd_001 (not_annotated)"]
