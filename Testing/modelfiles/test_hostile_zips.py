"""Hostile zips for the bundle and library readers: members that would land outside the
target, damaged archives (hypothesis; shared pieces in Testing/hostile.py)."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

from hostile import HOSTILE, assert_clear, attempt, scratch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mtkd.errors import MTKDError
from mtkd.library import ModelLibrary
from mtkd.modelfiles.bundle import load_bundle
from mtkd.modelfiles.zips import safe_extract

# --- zips ----------------------------------------------------------------------------------------

SEGMENTS = st.one_of(
    st.sampled_from(["..", ".", "", "...", "..a", "a..", "~", "C:", " ", "-"]),
    st.text("ab._- ", min_size=1, max_size=4),
)
LEADS = ["", "", "/", "//", "\\", "C:/", "c:\\", "D:", "./", "../", "\\\\server\\share\\"]
TARGET_DEPTH = 8  # the target lies this deep in the sandbox: '..' cannot leave the sandbox


def _member_name(lead: str, parts: list[str], separator: str, box: Path) -> str:
    if lead in ("/", "//"):
        lead = f"{box}/outside/"  # an absolute path into the sandbox, never the real root
    return lead + separator.join(parts)


def _escapes(name: str, link: bool, directory: bool) -> bool:
    """Whether ``name`` must be refused: absolute, a drive, a '..' component, a link, or a
    file without a name (the rules a safe extractor needs, written out independently)."""
    unified = name.replace("\\", "/")
    parts = [p for p in unified.split("/") if p not in ("", ".")]
    return (
        link
        or unified.startswith("/")
        or re.match(r"^[A-Za-z]:", unified) is not None
        or ".." in unified.split("/")
        or (not directory and not parts)
    )


def _snapshot(box: Path, skip: Path | None = None) -> set[str]:
    return {
        str(p.relative_to(box))
        for p in box.rglob("*")
        if skip is None or (p != skip and skip not in p.parents)
    }


@settings(HOSTILE, max_examples=100)
@given(
    lead=st.sampled_from(LEADS),
    parts=st.lists(SEGMENTS, min_size=1, max_size=4),
    separator=st.sampled_from(["/", "\\"]),
    link=st.sampled_from([False, False, False, True]),
    directory=st.booleans(),
)
def test_zip_members_never_land_outside_the_target(base, lead, parts, separator, link, directory):
    """A zip member named with absolute paths, drives, '..', '.', empty parts or backslashes,
    or stored as a symbolic link: refused naming the zip with nothing written anywhere, or (a
    harmless name) extracted inside the target; never a file outside it."""
    with scratch(base) as folder:
        box = Path(folder)
        target = box.joinpath(*[f"d{i}" for i in range(TARGET_DEPTH)], "target")
        target.parent.mkdir(parents=True)
        name = _member_name(lead, parts, separator, box) + ("/" if directory else "")
        assume(name != "")  # zipfile cannot even write a member without a name
        archive = box / "model.zip"
        with zipfile.ZipFile(archive, "w") as zipped:
            zipped.writestr("ok/file.txt", "inside")
            info = zipfile.ZipInfo(name)
            if link:
                info.external_attr = (0o120777) << 16
            zipped.writestr(info, "" if directory else "payload")
        with zipfile.ZipFile(archive) as zipped:
            stored = zipped.infolist()[-1]
        before = _snapshot(box)
        outcome = attempt(lambda: safe_extract(archive, target))
        if _escapes(stored.filename, link, stored.is_dir()):
            assert_clear(outcome, archive, "refused to extract")
            assert _snapshot(box) == before  # nothing written, inside or out
            return
        assert not isinstance(outcome, MTKDError), outcome
        assert _snapshot(box, skip=target) == before
        assert (target / "ok" / "file.txt").read_text() == "inside"
        parts = [p for p in stored.filename.replace("\\", "/").split("/") if p not in ("", ".")]
        landed = target.joinpath(*parts)
        if stored.is_dir():
            assert landed.is_dir()
        else:
            assert landed.read_text() == "payload"


@settings(HOSTILE, max_examples=12)
@given(
    lead=st.sampled_from(["../", "/", "C:/", "model/../../", "\\..\\"]),
    rest=st.text("ab._", min_size=1, max_size=6),
    where=st.sampled_from(["library", "bundle"]),
)
def test_library_and_bundle_refuse_escaping_zips(
    teacher_run, written_bundle, base, lead, rest, where
):
    """The library import and the bundle loader refuse a model zip with one escaping member
    (besides the real model files), naming the zip; nothing is written outside, the library
    stays empty."""
    with scratch(base) as folder:
        box = Path(folder)
        source = teacher_run / "model" if where == "library" else written_bundle
        archive = box / "model.zip"
        name = (f"{box}/outside/" if lead == "/" else lead) + rest
        with zipfile.ZipFile(archive, "w") as zipped:
            for file in sorted(source.rglob("*")):
                if file.is_file():
                    zipped.write(file, file.relative_to(source).as_posix())
            zipped.writestr(name, "payload")
        library = ModelLibrary(box / "library")
        target = box / "extracted"
        before = _snapshot(box)
        if where == "library":
            outcome = attempt(lambda: library.import_model(archive))
        else:
            outcome = attempt(lambda: load_bundle(archive, extract_to=target))
        assert_clear(outcome, archive, "refused to extract")
        assert _snapshot(box, skip=box / "library") == before
        assert library.entries() == []


@settings(HOSTILE, max_examples=60)
@given(position=st.floats(0, 1, exclude_max=True), value=st.integers(0, 255))
def test_damaged_zips_are_refused_or_extracted_intact(base, position, value):
    """A zip with one byte changed anywhere (data, CRC, sizes, compression method, flags,
    names, central directory): MTKDError naming it with nothing left behind, or an extraction
    inside the target of files holding the original contents."""
    contents = {"ok/file.txt": b"inside " * 50, "ok/weights.bin": bytes(range(256)) * 4}
    with scratch(base) as folder:
        box = Path(folder)
        archive = box / "model.zip"
        with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zipped:
            for name, data in contents.items():
                zipped.writestr(name, data)
        data = bytearray(archive.read_bytes())
        data[int(position * len(data))] = value
        archive.write_bytes(bytes(data))
        target = box / "deep" / "target"
        target.parent.mkdir()
        before = _snapshot(box)
        outcome = attempt(lambda: safe_extract(archive, target))
        if isinstance(outcome, MTKDError):
            assert_clear(outcome, archive)
            assert _snapshot(box) == before
            return
        assert _snapshot(box, skip=target) == before
        for file in target.rglob("*"):
            if file.is_file():
                assert file.read_bytes() in contents.values()
