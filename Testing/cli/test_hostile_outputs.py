"""Hostile and mistaken outputs of ``mtkd segment`` and ``mtkd compare``, property-based
(hypothesis) and by example: an output that would replace an input, however it is spelled
(relative or absolute, ``./`` and ``..`` segments, a symbolic link to the file or to its folder,
a hard link, a folder whose derived file names are the inputs), is refused with exit status 2
and one line naming both files, and nothing is written: every file under the working folder
keeps its bytes. Also: several inputs with a file as output, ``--format`` disagreeing with
the file's ending, an unknown ending, ``compare -o FILE``, no empty folder left by a failed
command, and the temporary files of a killed writer removed by the next write.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import write_dicom_series
from hostile import HOSTILE, assert_one_line_error, no_hang, scratch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtkd.cli import main
from mtkd.data.atomic import temporary_sibling
from mtkd.data.labels import LabelTable
from mtkd.data.segnrrd import write_seg_nrrd
from mtkd.infer.output_paths import SEGMENTATION_SUFFIXES

STUDENT_LABELS = LabelTable({1: "liver", 2: "spleen", 3: "kidney_right"})
CROP = ([100, 90, 20], [10, 5, 70])  # (size, index) of the bundled CT: a small real CT
INPUT_FORMATS = ["nii.gz", "nrrd", "mha", "nii"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hostile_outputs")


@pytest.fixture(scope="module")
def small_ct(data_dir) -> sitk.Image:
    return sitk.RegionOfInterest(sitk.ReadImage(str(data_dir / "abdomen_ct.nii.gz")), *CROP)


@pytest.fixture(scope="module")
def small_labels(data_dir) -> sitk.Image:
    """The TotalSegmentator map of ``small_ct`` with the student's values (liver 1, ...)."""
    total = sitk.ReadImage(str(data_dir / "abdomen_seg_total_fast.nii.gz"))
    array = sitk.GetArrayFromImage(sitk.RegionOfInterest(total, *CROP))
    table = LabelTable.from_json(data_dir / "labels_total_v2.json")
    labels = np.zeros(array.shape, np.uint8)
    for value, name in STUDENT_LABELS.items():
        labels[array == table.value_of(name)] = value
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(sitk.RegionOfInterest(total, *CROP))
    return image


@contextmanager
def working_directory(folder: Path) -> Iterator[None]:
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def snapshot(root: Path) -> dict[str, object]:
    """Every file, folder and link under ``root`` (hidden ones too): bytes, link targets."""
    state: dict[str, object] = {}
    for folder, folders, files in os.walk(root):
        for name in folders + files:
            path = Path(folder) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                state[key] = ("link", os.readlink(path))
            elif path.is_dir():
                state[key] = "folder"
            else:
                state[key] = path.read_bytes()
    return state


def run(argv: list[str], capsys) -> tuple[int, str]:
    """``mtkd`` in this process: its exit status and what it wrote to stderr."""
    capsys.readouterr()
    with no_hang():
        code = main([*argv, "--device", "cpu"])
    return code, capsys.readouterr().err


@st.composite
def spelled(draw, parts: list[str], root: Path, folder: bool = False) -> str:
    """The path ``root/parts...`` spelled another way: absolute or relative to ``root`` (the
    working folder), with ``./``, ``sub/../`` and ``data/inner/..`` detours, doubled
    slashes, and for a folder perhaps a final slash."""
    parts = list(parts)
    if parts[0] in ("data", "datalink", "res", "reslink") and draw(st.booleans()):
        parts[1:1] = ["inner", ".."]
    lead = draw(st.sampled_from(["", "./", "sub/../", "sub/./../", "./sub/.."]))
    if lead.endswith("..") and parts:
        lead += "/"
    text = lead + draw(st.sampled_from(["/", "//", "/./"])).join(parts)
    if folder and draw(st.booleans()):
        text += "/"
    return f"{root}/{text}" if draw(st.booleans()) else text


# --- mtkd segment: outputs that alias inputs, generated ------------------------------------------


def segment_tree(root: Path, ct: sitk.Image, fmt: str, ending: str) -> None:
    """``data/ct.<fmt>``, ``data/second.<fmt>``, ``data/inner/``, ``sub/``, ``datalink`` ->
    ``data``, ``ctlink<ending>`` -> ``data/ct.<fmt>`` and the hard link ``hard<ending>``."""
    (root / "data" / "inner").mkdir(parents=True)
    (root / "sub").mkdir()
    sitk.WriteImage(ct, str(root / "data" / f"ct.{fmt}"))
    sitk.WriteImage(ct[:, :, :10], str(root / "data" / f"second.{fmt}"))
    (root / "datalink").symlink_to("data", target_is_directory=True)
    (root / f"ctlink{ending}").symlink_to(Path("data") / f"ct.{fmt}")
    os.link(root / "data" / f"ct.{fmt}", root / f"hard{ending}")


@settings(HOSTILE, max_examples=40)
@given(
    fmt=st.sampled_from(INPUT_FORMATS),
    ending=st.sampled_from(SEGMENTATION_SUFFIXES),
    case=st.sampled_from(
        [
            ("file", ["data", "ct"]),
            ("file", ["datalink", "ct"]),
            ("file", ["ctlink"]),
            ("file", ["hard"]),
            ("file", ["data"]),  # a folder output: its derived name is the input's
            ("file", ["datalink"]),
            ("folder", ["data"]),
            ("folder", ["datalink"]),
            ("files", ["data"]),
            ("files", ["datalink"]),
        ]
    ),
    data=st.data(),
)
def test_segment_outputs_that_replace_an_input_are_refused(
    teacher_run, small_ct, base, capsys, fmt, ending, case, data
):
    """``mtkd segment`` whose output (a file, or a folder's derived names) is one of its
    inputs, however spelled: exit 2, one line naming the output and the input, nothing
    written or changed (no output, no temporary file, no folder)."""
    inputs_kind, target = case
    with scratch(base) as folder:
        root = Path(folder)
        segment_tree(root, small_ct, fmt, ending)
        source = data.draw(st.sampled_from(["data", "datalink"]), label="input folder")
        if inputs_kind == "folder":
            inputs = [data.draw(spelled([source], root, folder=True), label="input")]
        else:
            names = ["ct"] if inputs_kind == "file" else ["ct", "second"]
            inputs = [data.draw(spelled([source, f"{n}.{fmt}"], root)) for n in names]
        as_folder = target[-1] in ("data", "datalink")
        last = {"ct": f"ct.{fmt}", "ctlink": f"ctlink{ending}", "hard": f"hard{ending}"}
        parts = target if as_folder else [*target[:-1], last[target[-1]]]
        output = data.draw(spelled(parts, root, folder=as_folder), label="output")
        options = []
        if as_folder:
            options = ["--format", fmt]
        elif data.draw(st.booleans(), label="--format"):  # given, agreeing with the ending
            options = ["--format", (f".{fmt}" if target[-1] == "ct" else ending)[1:]]
        argv = ["segment", str(teacher_run), *inputs, "-o", output, *options]
        before = snapshot(root)
        with working_directory(root):
            code, error = run(argv, capsys)
        assert_one_line_error(code, error, Path(output), "replace the input", f"ct.{fmt}")
        assert snapshot(root) == before


# --- mtkd compare: outputs that alias inputs, generated ------------------------------------------


def compare_tree(root: Path, ct: sitk.Image, labels: sitk.Image) -> None:
    """``ct.nii.gz``; ``res/`` holding a stored teacher map ``teacher.seg.nrrd`` and a
    reference ``disagreement.seg.nrrd`` (names compare writes), ``res/inner/``; ``masks/``
    of ``liver.nii.gz`` and ``spleen.nii.gz``; ``sub/``; links ``reslink`` and ``maskslink``."""
    for name in ("res/inner", "masks", "sub"):
        (root / name).mkdir(parents=True)
    sitk.WriteImage(ct, str(root / "ct.nii.gz"))
    write_seg_nrrd(labels, STUDENT_LABELS, root / "res" / "teacher.seg.nrrd")
    write_seg_nrrd(labels, STUDENT_LABELS, root / "res" / "disagreement.seg.nrrd")
    for value, name in ((1, "liver"), (2, "spleen")):
        mask = sitk.Cast(labels == value, sitk.sitkUInt8)
        sitk.WriteImage(mask, str(root / "masks" / f"{name}.nii.gz"))
    (root / "reslink").symlink_to("res", target_is_directory=True)
    (root / "maskslink").symlink_to("masks", target_is_directory=True)


@settings(HOSTILE, max_examples=30)
@given(
    case=st.sampled_from(["saved teacher", "reference", "masks", "inside masks", "image"]),
    data=st.data(),
)
def test_compare_outputs_that_replace_an_input_are_refused(
    teacher_run, small_ct, small_labels, base, capsys, case, data
):
    """``mtkd compare`` whose output folder is an input, holds an input under a name compare
    writes, or lies in a folder of masks given as teacher: exit 2, one line naming the
    output and the input, nothing written."""
    with scratch(base) as folder:
        root = Path(folder)
        compare_tree(root, small_ct, small_labels)
        res = data.draw(st.sampled_from(["res", "reslink"]), label="results folder")
        masks = data.draw(st.sampled_from(["masks", "maskslink"]), label="masks folder")
        teacher, options = str(teacher_run), []
        if case == "saved teacher":
            teacher = data.draw(spelled([res, "teacher.seg.nrrd"], root), label="teacher")
            options = ["--save-segmentations"]
            output = data.draw(spelled([res], root, folder=True), label="output")
        elif case == "reference":
            reference = data.draw(spelled([res, "disagreement.seg.nrrd"], root))
            options = ["--reference", reference]
            output = data.draw(spelled([res], root, folder=True), label="output")
        elif case in ("masks", "inside masks"):
            teacher = data.draw(spelled([masks], root, folder=True), label="teacher")
            inside = [masks, "cmp"] if case == "inside masks" else [masks]
            output = data.draw(spelled(inside, root, folder=True), label="output")
        else:
            output = data.draw(spelled(["ct.nii.gz"], root), label="output")
        image = data.draw(spelled(["ct.nii.gz"], root), label="image")
        argv = ["compare", image, "--teacher", teacher, "--student", str(teacher_run)]
        before = snapshot(root)
        with working_directory(root):
            code, error = run([*argv, *options, "-o", output], capsys)
        assert_one_line_error(code, error, Path(output), "input")
        assert snapshot(root) == before


# --- examples: the defects as they were found ----------------------------------------------------


@pytest.fixture
def ct_file(small_ct, tmp_path) -> Path:
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(small_ct, str(path))
    return path


def test_segment_onto_its_own_input_is_refused(teacher_run, ct_file, capsys):
    """``mtkd segment MODEL ct.nii.gz -o ct.nii.gz`` once replaced the CT by a label map."""
    before = ct_file.read_bytes()
    code, error = run(["segment", str(teacher_run), str(ct_file), "-o", str(ct_file)], capsys)
    assert_one_line_error(code, error, ct_file, "replace the input")
    assert ct_file.read_bytes() == before


def test_segment_folder_into_itself_with_the_input_format_is_refused(teacher_run, ct_file, capsys):
    """``mtkd segment MODEL FOLDER -o FOLDER --format nii.gz`` once replaced every CT."""
    folder = ct_file.parent
    before = snapshot(folder)
    argv = ["segment", str(teacher_run), str(folder), "-o", str(folder), "--format", "nii.gz"]
    code, error = run(argv, capsys)
    assert_one_line_error(code, error, ct_file, "replace the input")
    assert snapshot(folder) == before


def test_segment_into_a_dicom_series_folder_is_refused(teacher_run, small_ct, tmp_path, capsys):
    """An output inside an input DICOM series folder (the folder would stop being a series)."""
    series = tmp_path / "series"
    write_dicom_series(small_ct[:, :, :6], series, "1.2.826.0.1.3680043.8.498.4242")
    before = snapshot(tmp_path)
    for output in (series / "seg.nii.gz", series):
        code, error = run(["segment", str(teacher_run), str(series), "-o", str(output)], capsys)
        assert_one_line_error(code, error, output, "input folder", str(series))
    assert snapshot(tmp_path) == before


def test_inputs_whose_names_differ_only_in_case_are_refused(
    teacher_run, small_ct, tmp_path, capsys
):
    """``A.nii.gz`` and ``a.nrrd`` would both become ``a.seg.nrrd`` on a case-insensitive
    disk (macOS, Windows): refused everywhere, naming both."""
    folder = tmp_path / "in"
    folder.mkdir()
    sitk.WriteImage(small_ct, str(folder / "A.nii.gz"))
    sitk.WriteImage(small_ct, str(folder / "a.nrrd"))
    out = tmp_path / "out"
    code, error = run(["segment", str(teacher_run), str(folder), "-o", f"{out}/"], capsys)
    assert_one_line_error(code, error, folder / "a.nrrd", str(folder / "A.nii.gz"))
    assert not out.exists()


def test_several_inputs_and_a_file_output_are_refused(teacher_run, ct_file, tmp_path, capsys):
    """Two inputs with ``-o x.seg.nrrd`` once became a folder ``x.seg.nrrd/``."""
    second = tmp_path / "second.nii.gz"
    second.write_bytes(ct_file.read_bytes())
    output = tmp_path / "x.seg.nrrd"
    code, error = run(
        ["segment", str(teacher_run), str(ct_file), str(second), "-o", str(output)], capsys
    )
    assert_one_line_error(code, error, output, "2 inputs need a folder")
    assert not output.exists()


def test_format_that_disagrees_with_the_file_is_refused(teacher_run, ct_file, tmp_path, capsys):
    """``--format`` was ignored when ``-o`` names a file: now it must agree with the ending
    (both named when they differ); agreeing, the file is written in that format."""
    output = tmp_path / "x.seg.nrrd"
    argv = ["segment", str(teacher_run), str(ct_file), "-o", str(output), "--format", "nii.gz"]
    code, error = run(argv, capsys)
    assert_one_line_error(code, error, output, "--format nii.gz", ".seg.nrrd")
    assert not output.exists()
    output = tmp_path / "x.nii.gz"
    argv = ["segment", str(teacher_run), str(ct_file), "-o", str(output), "--format", "nii.gz"]
    assert run(argv, capsys)[0] == 0
    assert sitk.ReadImage(str(output)).GetSize() == sitk.ReadImage(str(ct_file)).GetSize()


def test_an_unknown_ending_lists_every_output_ending_before_any_work(ct_file, tmp_path, capsys):
    """The message once left out ``.seg.nrrd``, and came after the model ran: now it lists
    every ending ``segment`` writes, before the model is even looked at."""
    output = tmp_path / "x.txt"
    missing_model = tmp_path / "no-such-model"
    code, error = run(["segment", str(missing_model), str(ct_file), "-o", str(output)], capsys)
    assert_one_line_error(code, error, output, *SEGMENTATION_SUFFIXES)
    assert str(missing_model) not in error
    assert not output.exists()


def test_compare_refuses_a_file_as_output_before_running(teacher_run, ct_file, tmp_path, capsys):
    """``compare -o FILE`` once failed with "File exists" after both models ran."""
    output = tmp_path / "results.txt"
    output.write_text("keep me")
    missing = tmp_path / "no-such-model"
    argv = ["compare", str(ct_file), "--teacher", str(teacher_run), "--student", str(missing)]
    code, error = run([*argv, "-o", str(output)], capsys)
    assert_one_line_error(code, error, output, "is a file")  # not the student's error
    assert output.read_text() == "keep me"


def test_failed_commands_leave_no_output_folder(teacher_run, ct_file, tmp_path, capsys):
    """A compare or segment that fails (here: on its model) once left an empty output folder."""
    missing = tmp_path / "no-such-model"
    output = tmp_path / "cmp"
    argv = ["compare", str(ct_file), "--teacher", str(teacher_run), "--student", str(missing)]
    code, error = run([*argv, "-o", str(output)], capsys)
    assert_one_line_error(code, error, missing)
    output = tmp_path / "segmentations" / "new"
    code, error = run(["segment", str(missing), str(ct_file), "-o", f"{output}/"], capsys)
    assert_one_line_error(code, error, missing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"]


# --- temporary files of killed writers ------------------------------------------------------------

WRITER = """
import os, signal, sys
from mtkd.data.atomic import atomic_path
with atomic_path(sys.argv[1]) as temporary, open(temporary, "wb") as stream:
    stream.write(b"half a segmentation")
    stream.flush()
    os.fsync(stream.fileno())
    print(temporary, flush=True)
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdin.read()  # alive until its standard input closes
"""


def _writer(target: Path, mode: str) -> tuple[subprocess.Popen, Path]:
    """A process writing ``target`` atomically, SIGKILLed half-way or kept waiting."""
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(target), mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    temporary = Path(process.stdout.readline().strip())
    return process, temporary


@pytest.mark.skipif(os.name != "posix", reason="process ids are checked with POSIX signals")
def test_temporary_files_of_killed_writers_are_removed_by_the_next_write(
    teacher_run, ct_file, tmp_path, capsys
):
    """A SIGKILLed writer leaves its ``.tmp-*`` file; the next write into that folder (here
    ``mtkd segment``) removes it, and leaves a running writer's temporary file, another
    host's, and files or folders that only look like one."""
    out = tmp_path / "out"
    killed, stale = _writer(out / "a.seg.nrrd", "kill")
    assert killed.wait(timeout=120) == -signal.SIGKILL
    assert stale.is_file() and f"-{killed.pid}-" in stale.name
    live, running = _writer(out / "b.seg.nrrd", "wait")
    try:
        other_host = out / f".tmp-00000000-{killed.pid}-0123456789ab-c.seg.nrrd"
        lookalikes = [out / ".tmp-notes.txt", other_host, out / "keep.seg.nrrd"]
        for path in lookalikes:
            path.write_text("not ours to remove")
        folder = temporary_sibling(out / "d")  # a staging folder: not removed
        folder = folder.with_name(folder.name.replace(f"-{os.getpid()}-", f"-{killed.pid}-"))
        folder.mkdir()
        code, error = run(
            ["segment", str(teacher_run), str(ct_file), "-o", str(out / "ct.seg.nrrd")], capsys
        )
        assert code == 0, error
        assert not stale.exists()
        assert running.is_file() and all(path.is_file() for path in lookalikes)
        assert folder.is_dir()
    finally:
        live.communicate("", timeout=120)
    assert live.returncode == 0 and not running.exists()  # it finished its own write


def test_segment_skips_temporary_files_in_an_input_folder(teacher_run, ct_file, tmp_path, capsys):
    """A killed writer's partial ``.tmp-*.nii.gz`` next to the CTs is not taken for a CT."""
    partial = temporary_sibling(ct_file)
    partial.write_bytes(ct_file.read_bytes()[:100])
    out = tmp_path / "out"
    code, error = run(["segment", str(teacher_run), str(tmp_path), "-o", f"{out}/"], capsys)
    assert code == 0, error
    assert [p.name for p in out.iterdir()] == ["ct.seg.nrrd"]
