"""A structure a case does not annotate, end to end: a run trains and validates on an nnU-Net
v2 dataset that says so, and scoring leaves the structure out of that case (neither missed nor
spurious), while every other score stays what it is."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import tiny_config
from helpers import write_nnunet_v2

from mtkd.config import RunConfig
from mtkd.data.datasets import load_dataset
from mtkd.engine.trainer import Trainer
from mtkd.infer.evaluate import score_arrays, summarise
from mtkd.infer.scoring import score_model
from mtkd.metrics import MISSED, NOT_ANNOTATED, SPURIOUS
from mtkd.modelfiles.model_io import load_model
from mtkd.run_folder import read_events

CASES = ["abd_000", "abd_001", "abd_002"]


def train(folder, run):
    split = {"train": ["abd_000", "abd_002"], "val": ["abd_001"], "test": []}
    config = tiny_config((folder, split), "train", name="partial")
    config["data"].pop("labels_json")
    config["train"]["epochs"] = 1
    Trainer(RunConfig.from_dict(config), run, progress=False, log=lambda _: None).run()
    return [e for e in read_events(run / "events.jsonl") if e["type"] == "metrics"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Tiny runs on the nnU-Net v2 slabs whose spleen is erased in abd_001 (validation) and
    abd_002 (training): marked not annotated there, and the same files unmarked."""
    base = tmp_path_factory.mktemp("partial")
    erased = ["abd_001", "abd_002"]
    marked = write_nnunet_v2(base / "marked", not_annotated={c: ["spleen"] for c in erased})
    unmarked = write_nnunet_v2(base / "unmarked", not_annotated={c: [] for c in erased})
    runs = {"marked": train(marked, base / "run"), "unmarked": train(unmarked, base / "plain")}
    return marked, unmarked, base / "run", runs


def test_a_run_trains_and_validates_with_a_structure_not_annotated(trained):
    marked, _, _, runs = trained
    assert json.loads((marked / "dataset.json").read_text())["mtkd"]["not_annotated"] == {
        "abd_001": ["spleen"], "abd_002": ["spleen"]
    }  # fmt: skip
    # the same files and seeds: only the mask differs, and it reaches the loss
    assert runs["marked"][0]["seg"] != runs["unmarked"][0]["seg"]
    per_structure = runs["marked"][-1]["val_dice_per_structure"]
    assert math.isnan(per_structure["spleen"])  # abd_001, the only val case, has no spleen drawn
    assert not math.isnan(per_structure["liver"])


def test_scoring_skips_what_a_case_does_not_annotate(trained):
    marked_folder, unmarked_folder, run, _ = trained
    model = load_model(run)
    marked = score_model(model, load_dataset(marked_folder), CASES, "cpu").scores
    plain = score_model(model, load_dataset(unmarked_folder), CASES, "cpu").scores
    skipped = [(s.case_id, s.structure) for s in marked if s.outcome == NOT_ANNOTATED]
    assert skipped == [("abd_001", "spleen"), ("abd_002", "spleen")]
    for own, other in zip(marked, plain, strict=True):
        if (own.case_id, own.structure) in skipped:
            assert math.isnan(own.dice) and math.isnan(own.hd95_mm)
            assert other.outcome in (SPURIOUS, "absent")  # the erased spleen read as "none"
        else:
            assert (own.dice, own.hd95_mm, own.outcome) == (other.dice, other.hd95_mm,
                                                            other.outcome)  # fmt: skip


def test_a_not_annotated_structure_is_neither_missed_nor_spurious():
    reference = np.zeros((4, 6, 6), np.uint8)
    reference[1:3, 1:3, 1:3] = 1  # liver drawn; spleen not annotated, so 0 everywhere
    prediction = reference.copy()
    prediction[1:3, 4:6, 4:6] = 2  # the model finds a spleen there
    names = ["liver", "spleen"]
    plain = score_arrays("c", prediction, reference, names, (1.0, 1.0, 1.0))
    skipped = score_arrays("c", prediction, reference, names, (1.0, 1.0, 1.0), 0.0, ["spleen"])
    assert plain[1].outcome == SPURIOUS and skipped[1].outcome == NOT_ANNOTATED
    assert plain[0] == skipped[0]
    assert summarise(plain)["mean"][SPURIOUS] == 1 and summarise(skipped)["mean"][SPURIOUS] == 0
    assert summarise(skipped)["mean"][MISSED] == 0
    assert summarise(skipped)["mean"]["dice"] == 1.0 and summarise(plain)["mean"]["dice"] == 0.5
