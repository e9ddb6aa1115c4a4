"""Post-processing of label maps: the largest part per structure, parts below a volume, holes;
and `mtkd segment`/`evaluate` with it on the real CT."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from mtkd.cli import main
from mtkd.data.labels import LabelTable
from mtkd.errors import MTKDError
from mtkd.infer.postprocess import PostProcessing, StructureRule, postprocessing_for


def two_structures() -> np.ndarray:
    """Structure 1: a 4x4x4 block with a voxel touching it at a corner, a 2x2x2 island and a
    lone voxel; structure 2: a 5x5x5 cube with a 3x3x3 hole that holds that lone voxel."""
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[2:6, 2:6, 2:6] = 1  # 64 voxels
    labels[6, 6, 6] = 1  # touches the block's corner only: the same part (26-connectivity)
    labels[12:14, 2:4, 2:4] = 1  # an island of 8 voxels
    labels[10:15, 10:15, 10:15] = 2  # a shell of structure 2 ...
    labels[11:14, 11:14, 11:14] = 0  # ... around a background hole of 27 voxels
    labels[12, 12, 12] = 1  # with a voxel of structure 1 inside the hole
    return labels


def test_the_largest_part_is_kept_and_the_rest_becomes_background():
    labels = two_structures()
    cleaned = PostProcessing({1: StructureRule(largest_only=True)}).apply(labels, (1, 1, 1))
    assert (cleaned == 1).sum() == 65  # the block with its corner voxel
    assert cleaned[12, 2, 2] == 0 and cleaned[12, 12, 12] == 0  # the island, the lone voxel
    assert np.array_equal(cleaned == 2, labels == 2)  # another structure is left alone
    assert (labels == 1).sum() == 65 + 8 + 1  # the input is not changed


def test_parts_below_a_volume_go_whatever_their_count():
    labels = two_structures()
    # at 1 mm^3 a voxel is 0.001 ml: the island (8 voxels, 0.008 ml) stays at 0.005 ml
    kept = PostProcessing({1: StructureRule(min_volume_ml=0.005)}).apply(labels, (1, 1, 1))
    assert (kept == 1).sum() == 65 + 8
    # at 2 x 2 x 2 mm the same island is 0.064 ml: below 0.1 ml it goes, the block stays
    coarse = PostProcessing({1: StructureRule(min_volume_ml=0.1)}).apply(labels, (2, 2, 2))
    assert (coarse == 1).sum() == 65
    # every part below the volume: the structure is gone
    gone = PostProcessing({1: StructureRule(largest_only=True, min_volume_ml=1.0)})
    assert not (gone.apply(labels, (1, 1, 1)) == 1).any()


def reference_cleaning(labels, rule, voxel_ml):
    """The rule applied the plain way: every structure's parts labelled on the whole map."""
    cleaned = labels.copy()
    for value in (1, 2, 3):
        parts, count = ndimage.label(labels == value, structure=np.ones((3, 3, 3)))
        sizes = np.bincount(parts.ravel(), minlength=count + 1)
        keep = sizes * voxel_ml >= rule.min_volume_ml
        keep[0] = False
        if rule.largest_only and keep.any():
            best = np.argmax(np.where(keep, sizes, -1))
            keep[:] = False
            keep[best] = True
        elif rule.largest_only:
            keep[:] = False
        cleaned[(labels == value) & ~keep[parts]] = 0
    return cleaned


@pytest.mark.parametrize("seed", range(6))
def test_parts_found_coarse_first_are_exactly_the_parts(seed):
    """Random blobs of 3 structures on odd-sized maps: the result equals labelling each
    structure's parts on the whole map at once."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(9, 40, 3))
    labels = np.zeros(shape, np.uint8)
    for _ in range(int(rng.integers(5, 60))):
        corner = [int(rng.integers(0, n - 1)) for n in shape]
        extent = [int(rng.integers(1, 6)) for _ in shape]
        box = tuple(slice(c, c + e) for c, e in zip(corner, extent))
        labels[box] = rng.integers(0, 4)
    for rule in (StructureRule(largest_only=True), StructureRule(min_volume_ml=0.02),
                 StructureRule(largest_only=True, min_volume_ml=0.05)):  # fmt: skip
        postprocessing = PostProcessing({v: rule for v in (1, 2, 3)})
        expected = reference_cleaning(labels, rule, voxel_ml=0.001)
        assert np.array_equal(postprocessing.apply(labels, (1, 1, 1)), expected), rule


def test_holes_are_filled_with_background_only():
    labels = two_structures()
    filled = PostProcessing({2: StructureRule(fill_holes=True)}).apply(labels, (1, 1, 1))
    assert (filled == 2).sum() == 125 - 1  # the whole cube but structure 1's voxel
    assert filled[12, 12, 12] == 1
    parts, count = ndimage.label(filled == 0)
    assert count == 1  # no enclosed background is left


def test_no_rule_changes_nothing_and_bad_rules_are_refused():
    labels = two_structures()
    assert not PostProcessing({1: StructureRule(), 2: StructureRule()})
    assert np.array_equal(PostProcessing().apply(labels, (1, 1, 1)), labels)
    assert np.array_equal(
        PostProcessing({9: StructureRule(largest_only=True)}).apply(labels, (1, 1, 1)), labels
    )
    with pytest.raises(MTKDError, match="0 or more ml, got -1"):
        StructureRule(min_volume_ml=-1)
    with pytest.raises(MTKDError, match="3-D label map"):
        PostProcessing({1: StructureRule(largest_only=True)}).apply(labels[0], (1, 1))


def test_options_name_the_models_structures():
    table = LabelTable({1: "liver", 2: "spleen", 3: "aorta"})
    every = postprocessing_for(table, largest_only=[])
    assert all(rule.largest_only for rule in every.rules.values())
    some = postprocessing_for(table, largest_only=["spleen"], fill_holes=True)
    assert [some.rules[v].largest_only for v in (1, 2, 3)] == [False, True, False]
    assert all(rule.fill_holes for rule in some.rules.values())
    assert not postprocessing_for(table)  # no option: nothing to do
    with pytest.raises(MTKDError, match="no structure named 'kidney'.*liver, spleen, aorta"):
        postprocessing_for(table, largest_only=["kidney"])


def largest_parts(path) -> dict[int, int]:
    """The number of connected parts of each structure of a label map file."""
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    values = [int(v) for v in np.unique(array) if v]
    return {v: ndimage.label(array == v, structure=np.ones((3, 3, 3)))[1] for v in values}


def test_segment_and_evaluate_with_post_processing(
    teacher_run, data_dir, slab_dataset, tmp_path, capsys
):
    image = sitk.ReadImage(str(data_dir / "abdomen_ct.nii.gz"))
    ct = tmp_path / "ct.nii.gz"
    sitk.WriteImage(sitk.RegionOfInterest(image, [96, 80, 40], [20, 10, 30]), str(ct))
    plain, clean = tmp_path / "plain.nii.gz", tmp_path / "clean.nii.gz"
    assert (
        main(["segment", str(teacher_run), str(ct), "-o", str(plain), "--no-postprocessing"]) == 0
    )
    assert main(["segment", str(teacher_run), str(ct), "-o", str(clean), "--keep-largest"]) == 0
    before, after = largest_parts(plain), largest_parts(clean)
    assert set(after) <= set(before) and all(count == 1 for count in after.values())
    assert any(count > 1 for count in before.values())  # the tiny teacher leaves islands
    capsys.readouterr()
    code = main(["segment", str(teacher_run), str(ct), "-o", str(tmp_path / "x.nii.gz"),
                 "--keep-largest", "nonesuch"])  # fmt: skip
    assert code == 2 and "no structure named 'nonesuch'" in capsys.readouterr().err
    assert not (tmp_path / "x.nii.gz").exists()
    scores = tmp_path / "scores.csv"
    data = str(slab_dataset[0])
    names = str(data_dir / "labels_total_v2.json")
    argv = ["evaluate", str(teacher_run), data, "--labels-json", names, "--csv", str(scores)]
    assert main([*argv, "--keep-largest"]) == 0
    assert scores.is_file() and "mean" in capsys.readouterr().out


def test_a_trained_model_carries_the_choice_made_on_validation(teacher_run):
    from mtkd.modelfiles.model_io import load_model

    model = load_model(teacher_run)
    stored = model.metadata["postprocessing"]
    assert stored["chosen_on"] == "validation"
    per_structure = stored["val_dice_per_structure"]
    assert list(per_structure) == model.labels.names
    assert stored["largest_only"] == [  # exactly where keeping the largest part scored higher
        name for name, dice in per_structure.items()
        if dice["largest_part"] > dice["as_predicted"]
    ]  # fmt: skip


def with_stored_choice(run, folder, largest_only) -> str:
    """A copy of ``run``'s model whose stored choice keeps the largest part of
    ``largest_only`` (its metadata re-sealed)."""
    import json
    import shutil

    from mtkd.modelfiles.metadata import CHECKSUM_KEY, seal

    shutil.copytree(run / "model", folder)
    path = folder / "mtkd_model.json"
    metadata = json.loads(path.read_text(encoding="utf-8"))
    metadata.pop(CHECKSUM_KEY)
    metadata["postprocessing"] = {"largest_only": largest_only, "chosen_on": "validation"}
    path.write_text(json.dumps(seal(metadata)), encoding="utf-8")
    return str(folder)


def test_segment_applies_the_models_choice_unless_told_otherwise(
    teacher_run, data_dir, tmp_path, capsys
):
    from mtkd.modelfiles.model_io import load_model

    image = sitk.ReadImage(str(data_dir / "abdomen_ct.nii.gz"))
    ct = str(tmp_path / "ct.nii.gz")
    sitk.WriteImage(sitk.RegionOfInterest(image, [96, 80, 40], [20, 10, 30]), ct)
    names = load_model(teacher_run).labels.names
    model = with_stored_choice(teacher_run, tmp_path / "chosen", names)
    out = {key: tmp_path / f"{key}.nii.gz" for key in ("default", "explicit", "raw", "none")}
    assert main(["segment", model, ct, "-o", str(out["default"])]) == 0
    assert f"post-processing: largest part of {', '.join(names)}" in capsys.readouterr().out
    assert (
        main(["segment", str(teacher_run), ct, "-o", str(out["explicit"]), "--keep-largest"]) == 0
    )
    assert main(["segment", model, ct, "-o", str(out["raw"]), "--no-postprocessing"]) == 0
    assert (
        main(["segment", str(teacher_run), ct, "-o", str(out["none"]), "--no-postprocessing"]) == 0
    )
    arrays = {k: sitk.GetArrayFromImage(sitk.ReadImage(str(v))) for k, v in out.items()}
    assert np.array_equal(arrays["default"], arrays["explicit"])  # the stored choice applied
    assert np.array_equal(arrays["raw"], arrays["none"])  # and left out when asked
    assert not np.array_equal(arrays["default"], arrays["raw"])

    broken = with_stored_choice(teacher_run, tmp_path / "broken", ["pancreas"])
    capsys.readouterr()
    assert main(["segment", broken, ct, "-o", str(tmp_path / "b.nii.gz")]) == 2
    error = capsys.readouterr().err
    assert "postprocessing.largest_only names pancreas" in error and "broken" in error


def test_the_effect_benchmark_scores_every_variant_of_every_case(
    teacher_run, slab_dataset, data_dir, tmp_path, capsys
):
    import csv
    import gzip

    from helpers import load_bench_script

    bench = load_bench_script("postprocess_effect.py", "postprocess_effect_bench")
    out = tmp_path / "effect.csv"
    names = str(data_dir / "labels_total_v2.json")
    argv = [str(slab_dataset[0]), str(out), "--labels-json", names, "--runs", str(teacher_run)]
    assert bench.main(argv) == 0
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert list(rows[0]) == bench.FIELDS
    keys = {(r["subset"], r["case"], r["structure"]) for r in rows}
    split = slab_dataset[1]
    assert {case for subset, case, _ in keys if subset == "val"} == set(split["val"])
    assert {case for subset, case, _ in keys if subset == "test"} == set(split["test"])
    for key in keys:  # one row per variant, the post-processing timed apart from the network
        own = {r["variant"]: r for r in rows if (r["subset"], r["case"], r["structure"]) == key}
        assert sorted(own) == sorted(["none", *bench.VARIANTS])
        assert float(own["none"]["seconds"]) == 0 and float(own["largest"]["seconds"]) > 0
    printed = capsys.readouterr().out
    assert "chosen (higher validation Dice)" in printed and "| largest_fill |" in printed
    assert bench.main([str(slab_dataset[0]), str(out), "--summarise"]) == 0  # from the CSV
    assert capsys.readouterr().out == printed
    packed = tmp_path / "effect.csv.gz"  # a .gz name: written gzip-compressed, read back
    assert bench.main([str(slab_dataset[0]), str(packed), *argv[2:]]) == 0
    printed = capsys.readouterr().out
    with gzip.open(packed, "rt", encoding="utf-8") as handle:
        assert len(list(csv.DictReader(handle))) == len(rows)
    assert bench.main([str(slab_dataset[0]), str(packed), "--summarise"]) == 0
    assert capsys.readouterr().out == printed
    assert bench.main([str(slab_dataset[0]), str(out), "--runs", str(tmp_path)]) == 2
    assert bench.group_of("runs/s1/cells/no_kd/split1/seed7") == "no_kd"
    assert bench.group_of("runs/teachers/cohort/teacher2d-split0") == "teacher2d"
