"""The Slicer extension's packaging files agree with each other and with the source tree.

No Slicer and no CMake needed: the CMakeLists.txt files are read with a small parser of
CMake's command syntax, the ExtensionsIndex entry (MTKD.json) as JSON, the icons as PNGs.
What is checked is what breaks an extension build or its catalog entry in ways a Python
test run would not notice: a module script or resource that the build does not install, a
listed file that does not exist, an engine file left out of the package, metadata that
disagrees between CMake and the catalog entry, requirements that drift from pyproject.toml.
"""

from __future__ import annotations

import fnmatch
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT

TOP_CMAKE = ROOT / "CMakeLists.txt"
CATALOG_ENTRY = ROOT / "MTKD.json"
REQUIREMENTS = ROOT / "MTKDLib" / "requirements.txt"
PYPROJECT = ROOT / "pyproject.toml"

# Fields of the ExtensionsIndex catalog entry, as the catalog-entry schema defines them.
CATALOG_REQUIRED = {"$schema", "category", "scm_url"}
CATALOG_ALLOWED = CATALOG_REQUIRED | {
    "scm_revision",
    "scm_type",
    "build_dependencies",
    "dicom_support_rule",
    "build_subdirectory",
    "enabled",
    "tier",
}
SCHEMA_URL = re.compile(
    r"^https://raw\.githubusercontent\.com/Slicer/Slicer/main/Schemas/"
    r"slicer-extension-catalog-entry-schema-v\d+\.\d+\.\d+\.json#?$"
)
# Set and non-empty in the top-level CMakeLists.txt.
EXTENSION_REQUIRED = [
    "EXTENSION_HOMEPAGE",
    "EXTENSION_CATEGORY",
    "EXTENSION_CONTRIBUTORS",
    "EXTENSION_DESCRIPTION",
    "EXTENSION_ICONURL",
    "EXTENSION_DEPENDS",
    "EXTENSION_SCREENSHOTURLS",  # the ExtensionsIndex refuses an extension without one
]
# Slicer's own, never installed by MTKD into Slicer's Python (torch is listed: the PyTorch
# extension installs it with that version requirement).
NOT_REQUIRED_IN_SLICER = {"simpleitk", "numpy"}
# optional extras the GUI installs on first use (requirement lines marked extra == "...")
GUI_EXTRAS = {"onnx", "bundle"}
MODULE_DIRS = ["MTKDLib", "MTKDSegment", "MTKDTrain"]
ICONS = [
    "Resources/Icons/MTKD.png",
    "MTKDSegment/Resources/Icons/MTKDSegment.png",
    "MTKDTrain/Resources/Icons/MTKDTrain.png",
]
BUILD_MACROS = {
    "slicermacrobuildscriptedmodule": {
        "NAME",
        "SCRIPTS",
        "RESOURCES",
        "WITH_GENERIC_TESTS",
        "WITH_SUBDIR",
        "VERBOSE",
    },
    "ctkmacrocompilepythonscript": {
        "TARGET_NAME",
        "SCRIPTS",
        "RESOURCES",
        "SOURCE_DIR",
        "DESTINATION_DIR",
        "INSTALL_DIR",
        "NO_INSTALL_SUBDIR",
        "GLOBAL_TARGET",
    },
}


# --------------------------------------------------------------------------------------
# A reader for the subset of CMake syntax these files use: commands, quoted and unquoted
# arguments, nested parentheses, line comments, ${VAR} references to set() variables.


@dataclass
class Command:
    name: str  # lower case, as CMake command names are case-insensitive
    args: list[str]
    line: int


def parse_cmake(text: str) -> list[Command]:
    commands: list[Command] = []
    i, n, line = 0, len(text), 1
    while True:
        i, line = _skip_blanks(text, i, line)
        if i >= n:
            return commands
        c = text[i]
        if c.isalpha() or c == "_":
            start = i
            while i < n and (text[i].isalnum() or text[i] == "_"):
                i += 1
            name = text[start:i]
            while i < n and text[i] in " \t":
                i += 1
            if i >= n or text[i] != "(":
                raise ValueError(f"line {line}: expected '(' after {name!r}")
            args, i, end_line = _parse_args(text, i + 1, line)
            commands.append(Command(name.lower(), args, line))
            line = end_line
        else:
            raise ValueError(f"line {line}: unexpected character {c!r}")


def _skip_blanks(text: str, i: int, line: int) -> tuple[int, int]:
    """Past whitespace and line comments from ``i``; the new position and line number."""
    n = len(text)
    while i < n:
        if text[i] == "\n":
            line += 1
        elif text[i] == "#":
            while i < n and text[i] != "\n":
                i += 1
            continue
        elif not text[i].isspace():
            break
        i += 1
    return i, line


def _parse_args(text: str, i: int, line: int) -> tuple[list[str], int, int]:
    args: list[str] = []
    depth = 0
    n = len(text)
    while True:
        i, line = _skip_blanks(text, i, line)
        if i >= n:
            break
        c = text[i]
        if c == "(":
            depth += 1
            args.append("(")
            i += 1
        elif c == ")":
            if depth == 0:
                return args, i + 1, line
            depth -= 1
            args.append(")")
            i += 1
        elif c == '"':
            i += 1
            chars = []
            while i < n and text[i] != '"':
                if text[i] == "\\" and i + 1 < n:
                    chars.append(text[i : i + 2])
                    i += 2
                    continue
                if text[i] == "\n":
                    line += 1
                chars.append(text[i])
                i += 1
            if i >= n:
                raise ValueError(f"line {line}: unterminated quoted argument")
            args.append("".join(chars))
            i += 1
        else:
            start = i
            while i < n and not text[i].isspace() and text[i] not in '()#"':
                i += 1
            args.append(text[start:i])
    raise ValueError(f"line {line}: unterminated command")


def expand(value: str, variables: dict[str, list[str]]) -> str:
    """Replace ${NAME} by the value set() gave NAME; leave unknown references as they are."""

    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        return ";".join(variables[name]) if name in variables else match.group(0)

    return re.sub(r"\$\{([A-Za-z0-9_]+)\}", one, value)


@dataclass
class CMakeFile:
    path: Path
    commands: list[Command]
    variables: dict[str, list[str]]  # every set(NAME ...), in order, later ones winning

    @classmethod
    def read(cls, path: Path) -> CMakeFile:
        commands = parse_cmake(path.read_text(encoding="utf-8"))
        variables: dict[str, list[str]] = {}
        for command in commands:
            if command.name == "set" and command.args:
                values = [expand(a, variables) for a in command.args[1:]]
                variables[command.args[0]] = [
                    item for v in values for item in (v.split(";") if v else [""])
                ]
        return cls(path, commands, variables)

    def calls(self, name: str) -> list[Command]:
        return [c for c in self.commands if c.name == name.lower()]

    def keyword_args(self, command: Command) -> dict[str, list[str]]:
        """Group the arguments of a build macro call by keyword, with variables expanded."""
        keywords = BUILD_MACROS[command.name]
        groups: dict[str, list[str]] = {}
        current = None
        for arg in command.args:
            if arg in keywords:
                current = arg
                groups.setdefault(arg, [])
                continue
            assert current is not None, f"{self.path}: {command.name} argument {arg!r} first"
            groups[current] += [item for item in expand(arg, self.variables).split(";") if item]
        return groups


def top() -> CMakeFile:
    return CMakeFile.read(TOP_CMAKE)


def one_value(cmake: CMakeFile, name: str) -> str:
    assert name in cmake.variables, f"{name} is not set in {cmake.path.name}"
    return " ".join(cmake.variables[name]).strip()


def github_repo(url: str) -> str:
    """owner/name of a GitHub repository URL (homepage, clone URL)."""
    match = re.fullmatch(r"https://github\.com/([^/]+)/([^/]+?)(?:\.git)?/?", url)
    assert match, f"not a GitHub repository URL: {url!r}"
    return f"{match.group(1)}/{match.group(2)}".lower()


def raw_file_in_repo(url: str, repo: str) -> Path:
    """The file of this repository that a raw.githubusercontent.com URL points to."""
    match = re.fullmatch(r"https://raw\.githubusercontent\.com/([^/]+)/([^/]+)/[^/]+/(.+)", url)
    assert match, f"not a raw.githubusercontent.com URL: {url!r}"
    assert f"{match.group(1)}/{match.group(2)}".lower() == repo, f"{url} is not in {repo}"
    return ROOT / match.group(3)


def is_test_file(path: Path, base: Path) -> bool:
    parts = path.relative_to(base).parts
    return (
        any(p in {"Testing", "tests", "__pycache__"} for p in parts[:-1])
        or path.name.startswith("test_")
        or path.name == "conftest.py"
    )


def read_pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        pytest.fail("reading pyproject.toml needs Python 3.11 or newer (tomllib)")
    return tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))


def requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, f"not a requirement: {requirement!r}"
    return match.group(1).lower()


def png_header(path: Path) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) from a PNG's IHDR chunk."""
    data = path.read_bytes()[:33]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR", f"{path}: first chunk is not IHDR"
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    return width, height, depth, colour


# --------------------------------------------------------------------------------------
# The reader itself


def test_cmake_reader_handles_quotes_comments_nesting_and_variables(tmp_path):
    text = (
        'set(A "x y")  # comment (with a paren\n'
        "set(L\n  one.py  # first\n  ${A}\n  ${UNKNOWN}\n  )\n"
        "if((B) AND EXISTS ${X}/c)\n"
        'set(E "")\nendif()\n'
    )
    commands = parse_cmake(text)
    assert [c.name for c in commands] == ["set", "set", "if", "set", "endif"]
    assert commands[2].args == ["(", "B", ")", "AND", "EXISTS", "${X}/c"]
    assert commands[2].line == 7
    path = tmp_path / "CMakeLists.txt"
    path.write_text(text, encoding="utf-8")
    variables = CMakeFile.read(path).variables
    assert variables["L"] == ["one.py", "x y", "${UNKNOWN}"]
    assert variables["E"] == [""]
    for broken in ("set(A", 'set(A "b)', "set A)"):
        with pytest.raises(ValueError):
            parse_cmake(broken)


# --------------------------------------------------------------------------------------
# Top-level CMakeLists.txt


def test_extension_metadata_is_complete():
    cmake = top()
    projects = cmake.calls("project")
    assert projects and projects[0].args[0] == "MTKD"
    for name in EXTENSION_REQUIRED:
        assert one_value(cmake, name), f"{name} is empty"
    depends = re.split(r"[\s;]+", one_value(cmake, "EXTENSION_DEPENDS"))
    assert "PyTorch" in depends


def test_extension_urls_point_into_this_repository():
    cmake = top()
    repo = github_repo(one_value(cmake, "EXTENSION_HOMEPAGE"))
    icon = raw_file_in_repo(one_value(cmake, "EXTENSION_ICONURL"), repo)
    assert icon.is_file(), f"the icon URL names {icon.relative_to(ROOT)}, which does not exist"
    # Each listed screenshot is a PNG of this repository (Resources/Screenshots/).
    urls = one_value(cmake, "EXTENSION_SCREENSHOTURLS").split()
    assert urls, "the ExtensionsIndex refuses an extension without a screenshot"
    for url in urls:
        shot = raw_file_in_repo(url, repo)
        assert shot.is_file(), f"screenshot {url} is not a file in this repository"
        assert shot.suffix == ".png", f"{url}: the index accepts PNG, JPEG or GIF; we use PNG"


def test_screenshots_are_valid_small_pngs():
    from PIL import Image

    cmake = top()
    repo = github_repo(one_value(cmake, "EXTENSION_HOMEPAGE"))
    urls = one_value(cmake, "EXTENSION_SCREENSHOTURLS").split()
    assert urls, "no screenshot listed"
    for url in urls:
        shot = raw_file_in_repo(url, repo)
        width, height, _, _ = png_header(shot)
        assert width >= 800 and height >= 400, f"{shot.name} is too small to show: {width}x{height}"
        assert shot.stat().st_size < 300 * 1024, f"{shot.name} is over 300 KiB"
        with Image.open(shot) as image:
            image.verify()  # every chunk's CRC and the image data are read
        with Image.open(shot) as image:
            pixels = image.convert("L")
            assert pixels.getextrema()[1] - pixels.getextrema()[0] > 100, "a blank picture"


def test_the_index_finds_the_metadata_as_its_check_reads_it():
    """ExtensionsIndex scripts/check_description_files.py reads the top-level CMakeLists.txt
    with regular expressions, not CMake: project(NAME) must equal the entry's file name, the
    icon and screenshot set() calls must match its patterns (screenshots: the closing quote
    right before the parenthesis)."""
    text = TOP_CMAKE.read_text(encoding="utf-8")
    project = re.findall(r"project\s*\(\s*([^\s\)\n\r]+)", text, re.IGNORECASE)
    assert project and project[0].strip("\"'") == CATALOG_ENTRY.stem
    icon = re.findall(r'set\s*\(EXTENSION_ICONURL\s*"([^"]+)"[ ]*\)', text, re.IGNORECASE)
    assert icon == [one_value(top(), "EXTENSION_ICONURL")]
    shots = re.findall(r'set\s*\(EXTENSION_SCREENSHOTURLS\s*"([^"]+)"\)', text, re.IGNORECASE)
    assert shots, 'the index finds no set(EXTENSION_SCREENSHOTURLS "...") with a URL'
    assert shots[0].split() == one_value(top(), "EXTENSION_SCREENSHOTURLS").split()
    assert github_repo(one_value(top(), "EXTENSION_HOMEPAGE")).split("/")[1].startswith("slicer")


def test_extension_uses_slicer_and_packages_after_the_modules():
    cmake = top()
    names = [c.name for c in cmake.commands]
    find = [c for c in cmake.calls("find_package") if c.args[:1] == ["Slicer"]]
    assert find and "REQUIRED" in find[0].args
    includes = [c.args[0] for c in cmake.calls("include")]
    for needed in ("${Slicer_USE_FILE}", "${Slicer_EXTENSION_GENERATE_CONFIG}"):
        assert needed in includes
    assert includes[-1] == "${Slicer_EXTENSION_CPACK}", "CPack must be the last include"
    last_subdir = max(i for i, n in enumerate(names) if n == "add_subdirectory")
    cpack = max(i for i, c in enumerate(cmake.commands) if c.args == ["${Slicer_EXTENSION_CPACK}"])
    assert last_subdir < cpack


def _subdirectories() -> list[tuple[str, bool]]:
    """(folder, optional) for each add_subdirectory; optional when guarded by EXISTS."""
    result = []
    conditions: list[list[str]] = []
    for command in top().commands:
        if command.name == "if":
            conditions.append(command.args)
        elif command.name == "endif":
            conditions.pop()
        elif command.name == "add_subdirectory":
            folder = command.args[0]
            guard = f"${{CMAKE_CURRENT_SOURCE_DIR}}/{folder}/CMakeLists.txt"
            optional = any("EXISTS" in c and guard in c for c in conditions)
            result.append((folder, optional))
    return result


def test_every_added_subdirectory_exists_with_a_cmakelists():
    subdirs = _subdirectories()
    assert {"MTKDLib", "MTKDSegment"} <= {folder for folder, _ in subdirs}
    for folder, optional in subdirs:
        cmakelists = ROOT / folder / "CMakeLists.txt"
        if optional and not cmakelists.exists():
            continue
        assert cmakelists.is_file(), f"add_subdirectory({folder}) but {cmakelists} is missing"


def test_every_module_folder_is_added():
    added = {folder for folder, _ in _subdirectories()}
    for cmakelists in ROOT.glob("*/CMakeLists.txt"):
        assert cmakelists.parent.name in added, f"{cmakelists.parent.name} is never built"


def _glob_files(kind: str, args: list[str]) -> tuple[str, set[str]]:
    """Evaluate a file(GLOB ...) or file(GLOB_RECURSE ...) call of the top-level file."""
    variable, rest = args[0], args[1:]
    patterns, skip = [], False
    for arg in rest:
        if skip:
            skip = False
        elif arg in {"RELATIVE", "LIST_DIRECTORIES"}:
            skip = True
        elif arg not in {"CONFIGURE_DEPENDS", "FOLLOW_SYMLINKS"}:
            patterns.append(arg.replace("${CMAKE_CURRENT_SOURCE_DIR}/", ""))
    files = {p.relative_to(ROOT).as_posix() for p in (ROOT / "mtkd").rglob("*") if p.is_file()}
    matched = set()
    for pattern in patterns:
        for f in files:
            if kind == "GLOB_RECURSE":
                hit = fnmatch.fnmatchcase(f, pattern)  # '*' may cross folders
            else:
                hit = f.count("/") == pattern.count("/") and fnmatch.fnmatchcase(f, pattern)
            if hit:
                matched.add(f)
    return variable, matched


def test_the_whole_engine_is_installed_with_the_extension():
    cmake = top()
    globbed: dict[str, set[str]] = {}
    for command in cmake.calls("file"):
        if command.args[0] in {"GLOB", "GLOB_RECURSE"}:
            variable, files = _glob_files(command.args[0], command.args[1:])
            globbed[variable] = files
    engine = [
        c
        for c in cmake.calls("ctkMacroCompilePythonScript")
        if cmake.keyword_args(c).get("TARGET_NAME") == ["MTKDEngine"]
    ]
    assert len(engine) == 1, "one ctkMacroCompilePythonScript(TARGET_NAME MTKDEngine ...)"
    kwargs = cmake.keyword_args(engine[0])
    assert kwargs["DESTINATION_DIR"] == ["${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}"]
    assert kwargs["INSTALL_DIR"] == ["${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}"]
    assert "NO_INSTALL_SUBDIR" in kwargs, "paths are kept: mtkd/... under the scripted dir"

    def listed(keyword: str) -> set[str]:
        refs = [re.fullmatch(r"\$\{(\w+)\}", v) for v in kwargs.get(keyword, [])]
        assert all(refs), f"{keyword} must name the glob variables"
        return set().union(*(globbed[r.group(1)] for r in refs))

    scripts, resources = listed("SCRIPTS"), listed("RESOURCES")
    assert all(s.endswith(".py") for s in scripts)
    # What the wheel ships: every module, and the package data pyproject.toml declares.
    pyproject = read_pyproject()
    wheel_scripts = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "mtkd").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    wheel_data = {
        p.relative_to(ROOT).as_posix()
        for pattern in pyproject["tool"]["setuptools"]["package-data"]["mtkd"]
        for p in (ROOT / "mtkd").glob(pattern)
        if p.is_file()
    }
    assert wheel_scripts, "no engine sources found"
    assert wheel_scripts - scripts == set(), "engine modules the extension would not install"
    assert wheel_data - resources == set(), "engine data files the extension would not install"


# --------------------------------------------------------------------------------------
# The ExtensionsIndex entry


def test_catalog_entry_matches_the_cmake_metadata():
    entry = json.loads(CATALOG_ENTRY.read_text(encoding="utf-8"))
    cmake = top()
    assert entry.keys() >= CATALOG_REQUIRED, f"missing {CATALOG_REQUIRED - entry.keys()}"
    assert entry.keys() <= CATALOG_ALLOWED, f"not in the schema: {entry.keys() - CATALOG_ALLOWED}"
    assert SCHEMA_URL.match(entry["$schema"]), entry["$schema"]
    assert entry["category"] == "Segmentation" == one_value(cmake, "EXTENSION_CATEGORY")
    depends = re.split(r"[\s;]+", one_value(cmake, "EXTENSION_DEPENDS"))
    assert entry["build_dependencies"] == ["PyTorch"] == depends
    assert github_repo(entry["scm_url"]) == github_repo(one_value(cmake, "EXTENSION_HOMEPAGE"))
    assert entry["scm_url"].endswith(".git")
    assert isinstance(entry.get("scm_revision"), str) and entry["scm_revision"]
    tier = entry.get("tier", 1)
    assert isinstance(tier, int) and not isinstance(tier, bool) and 1 <= tier <= 5
    assert entry.get("scm_type", "git") in {"git", "local"}
    assert entry.get("build_subdirectory") == ".", "a plain (not superbuild) extension: '.'"


def test_catalog_entry_is_formatted_as_the_index_leaves_it():
    """The ExtensionsIndex formats its entries with prettier and prettier-plugin-multiline-arrays
    (.pre-commit-config.yaml; .prettierrc.js: multilineArraysWrapThreshold 0, so every
    non-empty array is one item per line): two-space indent, LF, a final newline, keys in the
    order written. All 255 entries of the index (checked at commit 07f1d1b) equal Python's
    json.dumps(entry, indent=2) plus a newline; its key order is alphabetical."""
    raw = CATALOG_ENTRY.read_bytes()
    assert b"\r" not in raw, "the index's check refuses CR or CRLF line endings"
    entry = json.loads(raw.decode("utf-8"))
    assert raw.decode("utf-8") == json.dumps(entry, indent=2, ensure_ascii=False) + "\n"
    assert list(entry) == sorted(entry)
    assert '"build_dependencies": [\n    "PyTorch"\n  ],' in raw.decode("utf-8")


# --------------------------------------------------------------------------------------
# Each module's CMakeLists.txt lists exactly what the module folder holds


@pytest.mark.parametrize("folder", MODULE_DIRS)
def test_module_files_and_cmake_lists_agree(folder):
    base = ROOT / folder
    cmakelists = base / "CMakeLists.txt"
    python_files = [p for p in base.rglob("*.py") if p.is_file() and not is_test_file(p, base)]
    assert cmakelists.is_file(), f"{cmakelists} is missing"
    cmake = CMakeFile.read(cmakelists)
    builds = [c for c in cmake.commands if c.name in BUILD_MACROS]
    assert builds, f"{cmakelists} builds nothing"
    scripts: set[str] = set()
    resources: set[str] = set()
    for command in builds:
        kwargs = cmake.keyword_args(command)
        for script in kwargs.get("SCRIPTS", []):
            scripts.add(script if script.endswith(".py") else f"{script}.py")
        resources.update(kwargs.get("RESOURCES", []))
    listed = scripts | resources
    missing = sorted(f for f in listed if not (base / f).is_file())
    assert not missing, f"{folder}/CMakeLists.txt lists files that do not exist: {missing}"
    on_disk = {p.relative_to(base).as_posix() for p in python_files}
    unlisted = sorted(on_disk - scripts)
    assert not unlisted, f"{folder}: Python files its CMakeLists.txt does not install: {unlisted}"
    resource_files = {
        p.relative_to(base).as_posix()
        for sub in ("Resources/Icons", "Resources/UI")
        for p in (base / sub).glob("*")
        if p.is_file()
    }
    unlisted = sorted(resource_files - resources)
    assert not unlisted, f"{folder}: resources its CMakeLists.txt does not install: {unlisted}"


@pytest.mark.parametrize("folder", ["MTKDSegment", "MTKDTrain"])
def test_scripted_module_follows_the_slicer_template(folder):
    cmakelists = ROOT / folder / "CMakeLists.txt"
    cmake = CMakeFile.read(cmakelists)
    builds = cmake.calls("slicerMacroBuildScriptedModule")
    assert len(builds) == 1
    kwargs = cmake.keyword_args(builds[0])
    assert kwargs["NAME"] == [folder]
    assert f"{folder}.py" in kwargs["SCRIPTS"]
    assert f"Resources/Icons/{folder}.png" in kwargs["RESOURCES"]
    assert f"Resources/UI/{folder}.ui" in kwargs["RESOURCES"]
    assert "WITH_GENERIC_TESTS" in kwargs
    unittests = cmake.calls("slicer_add_python_unittest")
    assert any(
        expand(" ".join(c.args), cmake.variables) == f"SCRIPT {folder}.py" for c in unittests
    )


def test_shared_library_installs_as_a_package_with_its_requirements():
    cmake = CMakeFile.read(ROOT / "MTKDLib" / "CMakeLists.txt")
    builds = cmake.calls("ctkMacroCompilePythonScript")
    assert len(builds) == 1
    kwargs = cmake.keyword_args(builds[0])
    assert "__init__.py" in kwargs["SCRIPTS"]
    assert "requirements.txt" in kwargs["RESOURCES"]
    destination = kwargs["DESTINATION_DIR"]
    assert destination == ["${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}/MTKDLib"]
    assert kwargs["INSTALL_DIR"] == ["${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}"]
    assert "NO_INSTALL_SUBDIR" not in kwargs, "the package must keep its MTKDLib/ folder"


# --------------------------------------------------------------------------------------
# Icons and requirements


@pytest.mark.parametrize("icon", ICONS)
def test_icons_are_128_pixel_pngs(icon):
    from PIL import Image

    path = ROOT / icon
    assert path.is_file(), f"{icon} is missing"
    width, height, depth, colour = png_header(path)
    assert (width, height) == (128, 128)
    assert colour == 6 and depth == 8, "8-bit RGBA expected"
    with Image.open(path) as image:
        image.load()
        assert image.size == (128, 128) and image.mode == "RGBA"
        alpha = image.getchannel("A")
        assert alpha.getextrema()[1] == 255, "the icon is fully transparent"


def test_requirements_are_the_engine_dependencies_slicer_lacks():
    pyproject = read_pyproject()
    dependencies = pyproject["project"]["dependencies"]
    expected = [d for d in dependencies if requirement_name(d) not in NOT_REQUIRED_IN_SLICER]
    lines = REQUIREMENTS.read_text(encoding="utf-8").splitlines()
    actual = [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]
    extra = re.compile(r"""^(.*?);\s*extra\s*==\s*"([a-z]+)"$""")
    assert [line for line in actual if not extra.match(line)] == expected
    assert len(expected) == len(dependencies) - len(NOT_REQUIRED_IN_SLICER), (
        "SimpleITK and numpy are expected among the engine dependencies"
    )
    optional = pyproject["project"]["optional-dependencies"]
    extras = [extra.match(line).groups() for line in actual if extra.match(line)]
    assert {name for _, name in extras} == GUI_EXTRAS
    for requirement, name in extras:
        assert requirement in optional[name], f"{requirement} is not in pyproject's [{name}]"
