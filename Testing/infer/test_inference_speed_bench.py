"""bench/inference_speed.py in a clone without the shared test volumes: it says which volumes
are missing and stops with a clear message, not a traceback."""

from __future__ import annotations

import pytest
from conftest import DATA
from helpers import load_bench_script


@pytest.fixture(scope="module")
def bench():
    return load_bench_script("inference_speed.py", "inference_speed_bench")


def test_too_few_training_cts_stop_with_the_missing_files_named(bench, tmp_path, capsys):
    missing = bench.SHARED / "nowhere" / "ct.nii.gz"
    with pytest.raises(SystemExit, match="at least 2 CTs and 1 of 2 exist; pass --training-cts"):
        bench.train_student(tmp_path, [DATA / "abdomen_ct.nii.gz", missing])
    printed = capsys.readouterr().err
    assert str(missing) in printed and "the shared test volumes" in printed
    assert not (tmp_path / "student").exists()  # nothing trained, nothing written


def test_named_volumes_must_exist(bench, tmp_path):
    args = bench.argparse.Namespace(
        device="cpu",
        work=str(tmp_path),
        student=str(tmp_path / "no-model"),
        training_cts=None,
        volumes=[str(tmp_path / "absent.nii.gz")],
        teachers=[],
        carry=None,
        repeats=1,
    )
    with pytest.raises(SystemExit, match="--volumes: no such file: .*absent.nii.gz"):
        bench.run(args)
