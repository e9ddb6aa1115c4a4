"""The model library: imports of run, model, TorchScript, bundle folders and zips with their
checks (metadata, SHA-256, zip escapes), listing, unique keys, delete, failed imports that
leave nothing, and the ``mtkd library`` commands."""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import DATA
from helpers import expect_error, slice_prep

from mtkd.cli import main
from mtkd.data.image_io import read_image
from mtkd.data.labels import LabelTable
from mtkd.errors import MTKDError
from mtkd.library import ENTRY_FILE, ModelLibrary, default_library_root, slugify
from mtkd.modelfiles.model_io import build_from_spec, export_model, load_model, sha256_of
from mtkd.modelfiles.sources import load_any_model

STRUCTURES = ["liver", "spleen", "kidney_right"]
STUDENT_SPEC = {
    "name": "thesis_unet",
    "params": {"in_channels": 1, "out_channels": 3, "channels": [4], "bottleneck": 8},
    "reconstruction": "none",
}


@pytest.fixture(scope="module")
def student_folder(tmp_path_factory) -> Path:
    """A tiny 2-D model folder whose lineage names a teacher and whose metrics hold a Dice."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("student") / "model"
    export_model(
        build_from_spec(STUDENT_SPEC),
        folder,
        spec=STUDENT_SPEC,
        labels=LabelTable({1: "liver", 2: "spleen"}),
        prep=slice_prep(),
        activation="softmax",
        lineage={
            "kind": "distill",
            "distilled": True,
            "teacher": {"path": "/models/teacher/model", "kind": "run", "network": "unet"},
        },
        metrics={"best_val_dice": 0.625, "best_epoch": 3},
        name="tiny student",
    )
    return folder


@pytest.fixture(scope="module")
def torchscript_export(teacher_run, tmp_path_factory) -> Path:
    from mtkd.export.formats import export_model_as

    out = tmp_path_factory.mktemp("ts") / "teacher-ts"
    export_model_as(teacher_run, "torchscript", out)
    return out


@pytest.fixture(scope="module")
def bundle_folder(teacher_run, tmp_path_factory) -> Path:
    from mtkd.export.bundle import write_bundle

    out = tmp_path_factory.mktemp("bundle") / "teacher-bundle"
    write_bundle(load_model(teacher_run), out, read_image(DATA / "abdomen_ct.nii.gz"))
    return out


@pytest.fixture
def library(tmp_path) -> ModelLibrary:
    return ModelLibrary(tmp_path / "library")


def _zip(folder: Path, target: Path, top: str | None = None, extra: dict | None = None) -> Path:
    with zipfile.ZipFile(target, "w") as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                name = path.relative_to(folder).as_posix()
                archive.write(path, f"{top}/{name}" if top else name)
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return target


def _assert_empty(library: ModelLibrary) -> None:
    """No entry and no staging or other leftovers in the library folder."""
    assert library.entries() == []
    leftovers = list(library.root.iterdir()) if library.root.exists() else []
    assert leftovers == [], leftovers


def _metadata(folder: Path) -> dict:
    return json.loads((folder / "mtkd_model.json").read_text())


# --- imports ---------------------------------------------------------------------------------


def test_import_run_folder_takes_its_model(library, teacher_run):
    metadata = _metadata(teacher_run / "model")
    entry = library.import_model(teacher_run)
    assert entry.key == "teacher" and entry.name == "teacher" and entry.problem is None
    assert entry.format == "pytorch"
    assert entry.labels == STRUCTURES
    assert entry.path == library.root / "teacher" == library.path_of("teacher")
    assert sorted(p.name for p in entry.path.iterdir()) == [
        ENTRY_FILE,
        "model.pt",
        "mtkd_model.json",
    ]
    assert entry.size_bytes == sum(p.stat().st_size for p in entry.path.iterdir()) > 0
    assert entry.sha256 == metadata["weights_sha256"] == sha256_of(entry.path / "model.pt")
    assert entry.parameters == metadata["parameters"] > 0
    assert entry.validation_dice == metadata["metrics"]["best_val_dice"]
    assert entry.created == metadata["created"]
    assert entry.teacher == ""  # trained directly
    assert entry.imported_from == str(teacher_run.resolve()) and entry.imported_at
    assert library.get("teacher") == entry
    assert [e.key for e in library.entries()] == ["teacher"]
    assert [p.name for p in library.root.iterdir()] == ["teacher"]  # no staging left
    assert load_any_model(entry.path).labels.names == STRUCTURES


def test_import_model_folder_lists_lineage_and_dice(library, student_folder):
    entry = library.import_model(student_folder, name="Liver student (v2)")
    assert entry.key == "liver-student-v2" and entry.name == "Liver student (v2)"
    assert entry.labels == ["liver", "spleen"]
    assert entry.validation_dice == 0.625
    assert entry.teacher == "unet from /models/teacher/model"
    assert entry.parameters == _metadata(student_folder)["parameters"]
    assert entry.imported_from == str(student_folder.resolve())


def test_import_torchscript_export(library, torchscript_export):
    entry = library.import_model(torchscript_export)
    metadata = _metadata(torchscript_export)
    assert entry.format == "torchscript" and entry.problem is None
    assert entry.labels == STRUCTURES
    assert entry.sha256 == metadata["weights_sha256"] == sha256_of(entry.path / "model.ts")
    assert (entry.path / "model.ts").is_file() and not (entry.path / "model.pt").exists()
    assert entry.validation_dice == metadata["metrics"]["best_val_dice"]
    assert load_any_model(entry.path).metadata["format"] == "torchscript"


@pytest.mark.parametrize("top", [None, "teacher-model"])
def test_import_zip_of_model_folder(library, teacher_run, tmp_path, top):
    archive = _zip(teacher_run / "model", tmp_path / "exported.zip", top)
    entry = library.import_model(archive)
    assert entry.format == "pytorch" and entry.labels == STRUCTURES
    assert entry.sha256 == _metadata(teacher_run / "model")["weights_sha256"]
    assert entry.imported_from == str(archive.resolve())
    assert [p.name for p in library.root.iterdir()] == [entry.key]


def test_import_bundle_and_third_party_bundle_records_its_sha(library, bundle_folder, tmp_path):
    ours = library.import_model(bundle_folder, name="bundle")
    weights = bundle_folder / "models" / "model.pt"
    assert ours.format == "bundle" and ours.labels == STRUCTURES
    assert ours.sha256 == sha256_of(weights)

    third = Path(shutil.copytree(bundle_folder, tmp_path / "third-party"))
    metadata_file = third / "configs" / "metadata.json"
    metadata = json.loads(metadata_file.read_text())
    del metadata["mtkd"]["weights_sha256"]  # no SHA of ours: recorded at import
    metadata_file.write_text(json.dumps(metadata))
    entry = library.import_model(_zip(third, tmp_path / "third.zip"), name="bundle")
    assert entry.key == "bundle-2" and entry.sha256 == sha256_of(weights)
    record = json.loads((entry.path / ENTRY_FILE).read_text())
    assert record["sha256"] == sha256_of(entry.path / "models" / "model.pt")


def test_repeated_imports_get_unique_keys(library, student_folder):
    keys = [library.import_model(student_folder).key for _ in range(3)]
    assert keys == ["tiny-student", "tiny-student-2", "tiny-student-3"]
    assert [e.key for e in library.entries()] == keys


# --- refusals --------------------------------------------------------------------------------


def test_zip_escaping_its_folder_is_refused_and_writes_nothing(library, teacher_run, tmp_path):
    archive = _zip(teacher_run / "model", tmp_path / "evil.zip", extra={"../evil": b"pwned"})
    with expect_error(archive, "'..'"):
        library.import_model(archive)
    assert not (tmp_path / "evil").exists() and not (library.root.parent / "evil").exists()
    _assert_empty(library)


def test_tampered_weights_are_refused(library, teacher_run, tmp_path):
    folder = Path(shutil.copytree(teacher_run / "model", tmp_path / "tampered"))
    with open(folder / "model.pt", "ab") as handle:
        handle.write(b"\0")
    with expect_error(folder / "model.pt", "SHA-256", "does not match"):
        library.import_model(folder)
    _assert_empty(library)
    archive = _zip(folder, tmp_path / "tampered.zip", "inside")
    with expect_error(archive / "inside" / "model.pt", "SHA-256"):
        library.import_model(archive)
    _assert_empty(library)


def test_folder_without_metadata_is_refused(library, teacher_run, tmp_path):
    folder = tmp_path / "weights-only"
    folder.mkdir()
    shutil.copy(teacher_run / "model" / "model.pt", folder)
    with expect_error(folder, "metadata is missing"):
        library.import_model(folder)
    _assert_empty(library)


def test_metadata_without_sha_or_unusable_is_refused(library, teacher_run, tmp_path):
    folder = Path(shutil.copytree(teacher_run / "model", tmp_path / "no-sha"))
    metadata = _metadata(folder)
    del metadata["weights_sha256"]
    (folder / "mtkd_model.json").write_text(json.dumps(metadata))
    with expect_error(folder / "mtkd_model.json", "no weights_sha256"):
        library.import_model(folder)
    metadata = {**_metadata(teacher_run / "model"), "labels": {}}
    metadata.pop("metadata_sha256", None)  # as an older mtkd wrote it: checked by the schema only
    (folder / "mtkd_model.json").write_text(json.dumps(metadata))
    with expect_error(folder / "mtkd_model.json", "labels"):
        library.import_model(folder)
    _assert_empty(library)


def _edited_copy(source: Path, target: Path, keep_checksum: bool, **changes) -> Path:
    """A copy of model folder ``source`` whose metadata (its checksum kept or dropped) holds
    ``changes``; ``preprocessing`` changes are merged into the preprocessing."""
    folder = Path(shutil.copytree(source, target))
    metadata = _metadata(folder)
    if not keep_checksum:
        metadata.pop("metadata_sha256", None)
    prep = changes.pop("preprocessing", {})
    metadata["preprocessing"].update(prep)
    metadata.update(changes)
    (folder / "mtkd_model.json").write_text(json.dumps(metadata))
    return folder


def test_edited_metadata_is_refused_by_its_checksum(library, teacher_run, tmp_path):
    """A valid-looking edit (another HU window) of metadata that records its checksum is
    refused by the loaders and by an import, naming the metadata file."""
    folder = _edited_copy(
        teacher_run / "model", tmp_path / "edited", True, preprocessing={"hu_window": [0, 80]}
    )
    for call in (lambda: load_model(folder), lambda: load_any_model(folder)):
        with expect_error(folder / "mtkd_model.json", "metadata_sha256", "changed"):
            call()
    with expect_error(folder / "mtkd_model.json", "changed"):
        library.import_model(folder)
    _assert_empty(library)


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"preprocessing": {"hu_window": [300, -200]}}, "hu_window"),  # reversed
        ({"preprocessing": {"hu_window": [40, 40]}}, "hu_window"),  # equal: no contrast left
        ({"preprocessing": {"hu_window": "abc"}}, "hu_window"),
        ({"preprocessing": {"slice_size": [0, 0]}}, "slice_size"),
        ({"labels": {"1": "liver", "2": "spleen"}}, "labels"),  # the network has 4 outputs
        ({"labels": {"1": "liver", "2": "spleen", "5": "kidney"}}, "labels"),  # not 1..K
    ],
)
def test_metadata_values_are_checked_on_load_and_import(
    library, teacher_run, tmp_path, changes, key
):
    """Metadata without a checksum (an older mtkd's) is checked by the schema: a reversed or
    empty HU window, sizes of 0, labels that do not name every output channel or values
    beyond them are refused (not a wrong segmentation, not a traceback), by load and import."""
    folder = _edited_copy(teacher_run / "model", tmp_path / "old", False, **changes)
    for call in (lambda: load_model(folder), lambda: load_any_model(folder)):
        with expect_error(folder / "mtkd_model.json", key, "invalid model metadata"):
            call()
    with expect_error(folder / "mtkd_model.json", key):
        library.import_model(folder)
    _assert_empty(library)


def test_old_metadata_without_checksum_still_loads(library, teacher_run, tmp_path):
    folder = _edited_copy(teacher_run / "model", tmp_path / "old", False)
    assert load_model(folder).labels.names == STRUCTURES
    assert library.import_model(folder).labels == STRUCTURES


# --- zips: sizes and the files kept ----------------------------------------------------------


def test_zip_bomb_member_is_refused_before_extracting(library, teacher_run, tmp_path):
    """A zipped model whose weights member unpacks to far more than it packs (64 MiB of zeros
    in about 64 KiB) is refused before anything is extracted."""
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        zipped.write(teacher_run / "model" / "mtkd_model.json", "mtkd_model.json")
        with zipped.open("model.pt", "w") as member:
            for _ in range(64):
                member.write(bytes(1 << 20))
    with expect_error(archive, "model.pt", "zip bomb"):
        library.import_model(archive)
    _assert_empty(library)


def test_imports_keep_only_the_files_the_model_needs(library, teacher_run, tmp_path):
    """Extra members of a zip (and extra files of a folder) are not copied into the entry."""
    folder = Path(shutil.copytree(teacher_run / "model", tmp_path / "with-extras"))
    (folder / "notes.txt").write_text("not part of the model")
    (folder / "cache").mkdir()
    (folder / "cache" / "big.bin").write_bytes(bytes(1 << 20))
    archive = _zip(folder, tmp_path / "extras.zip", "top", extra={"top/zeros.bin": bytes(8 << 20)})
    needed = [ENTRY_FILE, "model.pt", "mtkd_model.json"]
    for source in (folder, archive):
        entry = library.import_model(source)
        files = sorted(p.relative_to(entry.path).as_posix() for p in entry.path.rglob("*"))
        assert files == needed, files
        assert entry.size_bytes < (1 << 20) + (teacher_run / "model" / "model.pt").stat().st_size


def test_things_that_are_not_models_are_refused(library, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("not a model")
    with expect_error(notes, "not a model"):
        library.import_model(notes)
    with expect_error(notes / "readme.txt", "not a model"):
        library.import_model(notes / "readme.txt")
    with expect_error(tmp_path / "missing", "not found"):
        library.import_model(tmp_path / "missing")
    _assert_empty(library)


def test_failed_copy_leaves_no_entry_and_no_staging(library, teacher_run, monkeypatch):
    original, calls = shutil.copy2, []

    def copy_then_fail(source, target, **kwargs):
        calls.append(source)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return original(source, target, **kwargs)

    monkeypatch.setattr(shutil, "copy2", copy_then_fail)
    with expect_error(teacher_run, "import failed", "No space left"):
        library.import_model(teacher_run)
    assert len(calls) == 2  # the first file was copied, then the copy failed
    _assert_empty(library)


def test_only_entries_are_listed_and_an_unusable_entry_says_why(library, student_folder):
    library.import_model(student_folder)
    broken = library.root / "broken"
    broken.mkdir()
    (broken / ENTRY_FILE).write_text("{not json")
    (library.root / "photos").mkdir()
    assert [e.key for e in library.entries()] == ["tiny-student"]
    assert library.entries()[0].problem is None
    assert library.other_folders() == ["broken", "photos"]
    (library.path_of("tiny-student") / "model.pt").unlink()
    assert "missing" in library.get("tiny-student").problem
    assert [e.key for e in library.entries()] == ["tiny-student"]  # still an entry


# --- delete ----------------------------------------------------------------------------------


def test_delete_removes_only_that_entry(library, student_folder):
    first = library.import_model(student_folder)
    second = library.import_model(student_folder)
    library.delete(first.key)
    assert not first.path.exists()
    assert [e.key for e in library.entries()] == [second.key]
    assert [p.name for p in library.root.iterdir()] == [second.key]
    with expect_error(library.root, "no model"):
        library.get(first.key)
    with expect_error(library.root, "no model"):
        library.delete(first.key)


@pytest.mark.parametrize("entry_file", [None, "{not json", "[]", '{"format": "pytorch"}'])
def test_delete_refuses_folders_that_are_not_entries(library, student_folder, entry_file):
    """A folder of the library root without a valid library_entry.json (a user's folder under
    a mistaken $MTKD_LIBRARY) is never deleted, opened or listed."""
    library.import_model(student_folder)
    mine = library.root / "my-scans"
    (mine / "sub").mkdir(parents=True)
    (mine / "sub" / "scan.nii.gz").write_bytes(b"precious")
    if entry_file is not None:
        (mine / ENTRY_FILE).write_text(entry_file)
    for call in (
        lambda: library.delete("my-scans"),
        lambda: library.get("my-scans"),
        lambda: library.path_of("my-scans"),
    ):
        with expect_error(mine, "not a library entry"):
            call()
    assert (mine / "sub" / "scan.nii.gz").read_bytes() == b"precious"
    assert [e.key for e in library.entries()] == ["tiny-student"]


@pytest.mark.parametrize("key", ["..", "../outside", "/tmp", ".", "", "a/b", ".staging-x"])
def test_delete_refuses_keys_outside_the_library(library, student_folder, tmp_path, key):
    library.import_model(student_folder)
    (tmp_path / "outside").mkdir()
    with pytest.raises(MTKDError):
        library.delete(key)
    assert (tmp_path / "outside").is_dir() and library.root.is_dir()
    assert [e.key for e in library.entries()] == ["tiny-student"]


# --- names and roots -------------------------------------------------------------------------


def test_slugs_are_file_system_safe():
    assert slugify("Liver student (v2)") == "liver-student-v2"
    assert slugify("Größe/../Ärger") == "groe-arger"
    assert slugify("../..") == "model"
    assert slugify("v1.2 _final_") == "v1-2-final"
    assert slugify("CON") == "con-model"


def test_default_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MTKD_LIBRARY", str(tmp_path / "models"))
    assert default_library_root() == tmp_path / "models"
    monkeypatch.delenv("MTKD_LIBRARY")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_library_root() == tmp_path / ".mtkd" / "models"


# --- command line ----------------------------------------------------------------------------


def test_cli_import_list_delete_round_trip(student_folder, tmp_path, capsys, monkeypatch):
    root = str(tmp_path / "lib")
    assert main(["library", "import", str(student_folder), "--name", "Mine", "--root", root]) == 0
    assert "imported mine" in capsys.readouterr().out
    assert main(["library", "list", "--root", root]) == 0
    listed = capsys.readouterr().out
    assert "mine" in listed and "liver, spleen" in listed and "0.625" in listed
    assert "unet from /models/teacher/model" in listed

    monkeypatch.setattr("sys.stdin", io.StringIO("n\n"))
    assert main(["library", "delete", "mine", "--root", root]) == 1
    assert (tmp_path / "lib" / "mine").is_dir()
    assert main(["library", "delete", "mine", "--root", root, "--yes"]) == 0
    assert not (tmp_path / "lib" / "mine").exists()
    capsys.readouterr()
    assert main(["library", "list", "--root", root]) == 0
    assert "no models" in capsys.readouterr().out


def test_cli_delete_and_list_leave_other_folders_alone(student_folder, tmp_path, capsys):
    root = tmp_path / "lib"
    assert main(["library", "import", str(student_folder), "--root", str(root)]) == 0
    (root / "thesis").mkdir()
    (root / "thesis" / "chapter1.tex").write_text("mine")
    capsys.readouterr()
    assert main(["library", "delete", "thesis", "--root", str(root), "--yes"]) == 2
    error = capsys.readouterr().err
    assert str(root / "thesis") in error and "not a library entry" in error
    assert (root / "thesis" / "chapter1.tex").read_text() == "mine"
    assert main(["library", "list", "--root", str(root)]) == 0
    out, err = capsys.readouterr()
    assert "tiny-student" in out and "thesis" not in out
    assert "not library entries" in err and "1 folder(s)" in err and "thesis" in err


def test_cli_list_of_a_root_that_is_a_file_is_an_error(tmp_path, capsys):
    root = tmp_path / "models.txt"
    root.write_text("not a folder")
    assert main(["library", "list", "--root", str(root)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and str(root) in err and "is a file" in err
    assert main(["library", "list", "--root", str(tmp_path / "new")]) == 0
    assert "no models" in capsys.readouterr().out and not (tmp_path / "new").exists()


def test_cli_refusal_names_the_path(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MTKD_LIBRARY", str(tmp_path / "lib"))
    folder = tmp_path / "empty"
    folder.mkdir()
    assert main(["library", "import", str(folder)]) == 2
    error = capsys.readouterr().err
    assert str(folder) in error and "not a model" in error
    assert main(["library", "delete", "..", "--yes"]) == 2
    assert "not a model key" in capsys.readouterr().err
