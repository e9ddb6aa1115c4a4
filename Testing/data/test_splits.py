"""Patient-level splits: no patient in two splits, reproducible, student subset inside train."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from mtkd.cli import main
from mtkd.data.datasets import Case
from mtkd.data.splits import Split, read_split, split_cases
from mtkd.errors import MTKDError


def make_cases(n_patients: int, rng: random.Random, max_per_patient: int = 4) -> list[Case]:
    cases = []
    for p in range(n_patients):
        for k in range(rng.randint(1, max_per_patient)):
            cases.append(Case(f"p{p:03d}_s{k}", Path(f"p{p}_{k}.nii.gz"), None, f"patient{p:03d}"))
    return cases


def expected_count(fraction: float, total: int) -> int:
    return 0 if fraction == 0 else max(1, math.floor(fraction * total + 0.5))


def patient_of(cases: list[Case]) -> dict[str, str]:
    return {c.case_id: c.patient_id for c in cases}


def test_patients_never_cross_splits_property() -> None:
    rng = random.Random(1234)
    checked = 0
    for _ in range(300):
        n_patients = rng.randint(3, 40)
        cases = make_cases(n_patients, rng)
        val_f, test_f = rng.choice([0.0, 0.1, 0.2, 0.3]), rng.choice([0.0, 0.1, 0.2, 0.25])
        student_f = rng.choice([0.1, 0.25, 0.5, 1.0])
        seed = rng.randint(0, 10_000)
        n_val, n_test = expected_count(val_f, n_patients), expected_count(test_f, n_patients)
        if n_patients - n_val - n_test < 1:
            with pytest.raises(MTKDError, match=f"{n_patients} patient"):
                split_cases(cases, val_f, test_f, seed, student_f)
            continue
        split = split_cases(cases, val_f, test_f, seed, student_f)
        owner = patient_of(cases)
        parts = {"train": split.train, "val": split.val, "test": split.test}
        # a partition of all cases
        all_ids = sorted(i for ids in parts.values() for i in ids)
        assert all_ids == sorted(c.case_id for c in cases)
        # each patient in exactly one split
        patients = {name: {owner[i] for i in ids} for name, ids in parts.items()}
        assert not patients["train"] & patients["val"]
        assert not patients["train"] & patients["test"]
        assert not patients["val"] & patients["test"]
        assert len(patients["test"]) == n_test and len(patients["val"]) == n_val
        assert len(patients["train"]) == n_patients - n_val - n_test >= 1
        # student subset: whole patients, inside train, requested fraction
        assert set(split.student_train) <= set(split.train)
        student_patients = {owner[i] for i in split.student_train}
        assert len(student_patients) == expected_count(student_f, len(patients["train"]))
        whole = [c.case_id for c in cases if c.patient_id in student_patients]
        assert sorted(whole) == split.student_train
        checked += 1
    assert checked > 200


def test_same_seed_same_split_regardless_of_order() -> None:
    cases = make_cases(25, random.Random(5))
    first = split_cases(cases, seed=7, student_fraction=0.5)
    shuffled = list(cases)
    random.Random(9).shuffle(shuffled)
    assert split_cases(shuffled, seed=7, student_fraction=0.5) == first
    others = {tuple(split_cases(cases, seed=s).test) for s in range(10)}
    assert len(others) > 5  # the seed matters


def test_student_subsets_are_nested() -> None:
    cases = make_cases(30, random.Random(2))
    subsets = [
        set(split_cases(cases, seed=3, student_fraction=f).student_train)
        for f in (0.1, 0.3, 0.6, 1.0)
    ]
    assert all(a <= b for a, b in zip(subsets, subsets[1:]))
    assert subsets[-1] == set(split_cases(cases, seed=3).train)


def test_one_patient_many_cases() -> None:
    cases = [Case(f"scan{k}", Path(f"{k}.nii.gz"), None, "only") for k in range(5)]
    split = split_cases(cases, val_fraction=0, test_fraction=0, student_fraction=0.1)
    assert split.train == split.student_train == [f"scan{k}" for k in range(5)]
    with pytest.raises(MTKDError, match="1 patient.*5 cases"):
        split_cases(cases)


def test_patient_defaults_to_case_id() -> None:
    cases = [Case(f"c{k}", Path(f"{k}.nii.gz")) for k in range(10)]
    split = split_cases(cases, 0.2, 0.2)
    assert (len(split.train), len(split.val), len(split.test)) == (6, 2, 2)


@pytest.mark.parametrize(
    "kwargs", [{"val_fraction": -0.1}, {"test_fraction": 1.0}, {"student_fraction": 0.0}]
)
def test_bad_fractions(kwargs) -> None:
    with pytest.raises(MTKDError, match="fraction"):
        split_cases(make_cases(10, random.Random(0)), **kwargs)


def test_fixed_split() -> None:
    cases = [Case(f"c{k}", Path(f"{k}.nii.gz"), None, f"p{k // 2}") for k in range(8)]
    fixed = {"train": ["c0", "c1", "c2", "c3"], "val": ["c4", "c5"], "test": ["c6", "c7"]}
    split = split_cases(cases, fixed=fixed, student_fraction=0.5, seed=1)
    assert (split.train, split.val, split.test) == (fixed["train"], fixed["val"], fixed["test"])
    assert len(split.student_train) == 2 and set(split.student_train) <= set(split.train)
    assert split.student_train in (["c0", "c1"], ["c2", "c3"])  # one whole patient


@pytest.mark.parametrize(
    "fixed, message",
    [
        ({"train": ["c0", "c1", "c9"]}, "unknown case.*c9"),
        ({"train": ["c0", "c1"], "test": ["c1"]}, "c1.*both 'train' and 'test'"),
        ({"train": ["c0"], "val": ["c1"]}, "patient 'p0'.*'train'.*'val'"),
        ({"val": ["c0", "c1"]}, "no training cases"),
        ({"train": ["c0"], "tset": ["c2"]}, "unknown key"),
        ({"train": ["c0", "c0"]}, "twice"),
    ],
)
def test_bad_fixed_split(fixed, message) -> None:
    cases = [Case(f"c{k}", Path(f"{k}.nii.gz"), None, f"p{k // 2}") for k in range(4)]
    with pytest.raises(MTKDError, match=message):
        split_cases(cases, fixed=fixed)


def test_duplicate_case_ids() -> None:
    cases = [Case("a", Path("a.nii.gz")), Case("a", Path("b.nii.gz")), Case("c", Path("c.nii.gz"))]
    with pytest.raises(MTKDError, match="duplicate case id 'a'"):
        split_cases(cases, 0, 0)


def test_split_dict_round_trip() -> None:
    split = split_cases(make_cases(12, random.Random(4)), seed=2, student_fraction=0.5)
    data = json.loads(json.dumps(split.to_dict()))
    assert Split.from_dict(data) == split
    assert Split.from_dict({"train": ["a", "b"], "val": [], "test": []}).student_train == ["a", "b"]
    with pytest.raises(MTKDError, match="not in train"):
        Split.from_dict({"train": ["a"], "val": ["b"], "test": [], "student_train": ["b"]})


# ---------------------------------------------------------------- split files (read_split)
VALID_SPLIT = {"train": ["a", "b"], "val": ["c"], "test": ["d"], "student_train": ["a"]}
HOSTILE_SPLITS = {
    "binary": (bytes(range(256)) * 4, "binary"),
    "truncated": (json.dumps(VALID_SPLIT).encode()[:25], "not valid JSON"),
    "strings": (b'{"train": "slab_a", "test": "slab_b"}', "split 'train' must be a list"),
    "a list": (b'["a", "b"]', "JSON object"),
    "numbers": (b'{"train": ["a"], "test": [1, 2]}', "split 'test'[0] must be a case id"),
    "nested": (b'{"test": [["a"]]}', "split 'test'[0]"),
    "null": (b"null", "JSON object"),
    "unknown key": (b'{"train": ["a"], "tset": ["b"]}', "unknown split key(s) tset"),
    "in two lists": (b'{"train": ["a"], "test": ["a"]}', "both 'train' and 'test'"),
    "deep": (b"[" * 100000, "nested too deeply"),
    "student outside": (b'{"train": ["a"], "student_train": ["b"]}', "not in train"),
}


@pytest.mark.parametrize("name", HOSTILE_SPLITS)
def test_a_bad_split_file_is_refused_naming_it(tmp_path, name):
    content, words = HOSTILE_SPLITS[name]
    path = tmp_path / "split.json"
    path.write_bytes(content)
    with pytest.raises(MTKDError) as error:
        read_split(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and words in message and "\n" not in message


def test_read_split_reads_a_run_s_split_and_requires_what_is_asked(tmp_path):
    path = tmp_path / "split.json"
    path.write_text(json.dumps(VALID_SPLIT))
    assert read_split(path, require=["test"]) == Split(["a", "b"], ["c"], ["d"], ["a"])
    path.write_text('{"train": ["a", "b"]}')
    assert read_split(path, require=["student_train"]).student_train == ["a", "b"]
    with pytest.raises(MTKDError, match="split has no 'test' list"):
        read_split(path, require=["test"])
    with pytest.raises(MTKDError, match="is a folder"):
        read_split(tmp_path)
    with pytest.raises(MTKDError, match="not found"):
        read_split(tmp_path / "missing.json")


# ------------------------------------------------- mtkd evaluate: its split and score files
@pytest.fixture
def evaluate_args(teacher_run, slab_dataset, data_dir):
    labels = ["--labels-json", str(data_dir / "labels_total_v2.json"), "--device", "cpu"]
    return ["evaluate", str(teacher_run), str(slab_dataset[0]), *labels]


def one_error_line(capsys) -> str:
    error = capsys.readouterr().err.strip()
    assert error.startswith("mtkd: error:") and "\n" not in error, error
    return error


@pytest.mark.parametrize("name", ["binary", "truncated", "strings", "a list", "numbers"])
def test_evaluate_refuses_a_bad_split_file_in_one_line(evaluate_args, tmp_path, capsys, name):
    path = tmp_path / "split.json"
    path.write_bytes(HOSTILE_SPLITS[name][0])
    out = tmp_path / "scores.csv"
    assert main([*evaluate_args, "--split", str(path), "--csv", str(out)]) == 2
    error = one_error_line(capsys)
    assert f"{path}: " in error and HOSTILE_SPLITS[name][1] in error, error
    assert not out.exists()


def test_evaluate_refuses_a_folder_as_split(evaluate_args, tmp_path, capsys):
    assert main([*evaluate_args, "--split", str(tmp_path), "--csv", str(tmp_path / "s.csv")]) == 2
    assert f"{tmp_path}: is a folder" in one_error_line(capsys)


def test_evaluate_refuses_a_csv_that_is_a_folder_or_under_a_file(evaluate_args, tmp_path, capsys):
    folder = tmp_path / "scores"
    folder.mkdir()
    assert main([*evaluate_args, "--csv", str(folder)]) == 2
    assert f"{folder}: is a folder" in one_error_line(capsys)
    assert list(folder.iterdir()) == []
    afile = tmp_path / "afile"
    afile.write_text("keep")
    assert main([*evaluate_args, "--csv", str(afile / "sub" / "scores.csv")]) == 2
    assert f"{afile} is a file" in one_error_line(capsys)
    assert afile.read_text() == "keep"


def test_evaluate_never_writes_its_scores_over_its_split(
    evaluate_args, teacher_run, tmp_path, capsys
):
    split = tmp_path / "split.json"
    split.write_bytes((teacher_run / "split.json").read_bytes())
    before = split.read_bytes()
    assert main([*evaluate_args, "--split", str(split), "--csv", str(split)]) == 2
    assert "inputs" in one_error_line(capsys)
    assert split.read_bytes() == before
