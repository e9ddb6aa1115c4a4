"""The Slicer module files load in a fresh Slicer: everything they import at module level,
followed through every helper they import, needs only what Slicer bundles.

Slicer bundles its Python standard library, ``qt``, ``ctk``, ``vtk``, ``slicer``, ``numpy``,
``SimpleITK`` and ``sitkUtils``; the extension adds its own packages (``MTKDLib``, ``mtkd``).
torch, MONAI, PyYAML and the rest are installed by the modules' dependency check, after the
module has loaded, so they may only be imported inside functions. A module file that imports
one of them at module level (itself or through a helper) does not load in a fresh Slicer and
disappears from the module list.

Each module file is imported for real in a child process whose import system refuses every
top-level package outside that list. Slicer's MRML classes come from the real ``slicer-core``
package; only what it lacks (``qt``, ``ctk``, ``slicer.ScriptedLoadableModule``,
``slicer.parameterNodeWrapper``, ``slicer.i18n``: the application's parts) is replaced by
minimal stand-ins that define classes and decorators and import nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

MODULES = ["MTKDSegment", "MTKDTrain"]

# What a fresh Slicer has besides its standard library (plus the extension's own packages).
BUNDLED = ("qt", "ctk", "vtk", "slicer", "numpy", "SimpleITK", "sitkUtils")
OURS = ("MTKDLib", "mtkd", *MODULES)
# The packages behind BUNDLED: vtk's and slicer-core's implementation packages, and the
# SWIG type table that SimpleITK and VTK register as a module.
BUNDLED_INTERNALS = ("vtkmodules", "slicer_core", "swig_runtime_data4", "swig_runtime_data5")
# Named in the report when one of them is reached; everything not allowed is refused anyway.
NOT_BUNDLED = (
    "torch",
    "monai",
    "yaml",
    "nibabel",
    "scipy",
    "tqdm",
    "einops",
    "onnx",
    "onnxruntime",
    "matplotlib",
    "jsonschema",
    "tensorboard",
    "slicerio",
    "nrrd",
    "pynrrd",
    "hypothesis",
    "PIL",
    "skimage",
    "pydantic",
)

# Runs in the child: refuse every import outside the allowed set, provide the application's
# parts that slicer-core lacks, import the module file, report what was refused.
CHILD = r"""
import importlib, importlib.abc, importlib.util, json, sys, types

module_name, allowed = sys.argv[1], set(json.loads(sys.argv[2])) | set(sys.stdlib_module_names)
sys.path[:0] = sys.argv[3:]
refused = []


class RefuseNotBundled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in allowed:
            return None
        refused.append(name)
        raise ModuleNotFoundError(f"No module named {name!r} (not bundled with Slicer)", name=name)


sys.meta_path.insert(0, RefuseNotBundled())


class _Stand:
    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Stand()

    def __getattr__(self, name):
        return _Stand()


def stand_in(name, **attributes):
    # a module whose every attribute is a class (subclassable, callable)
    module = types.ModuleType(name)
    module.__getattr__ = lambda attr: type(attr, (_Stand,), {})
    module.__dict__.update(attributes)
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)
    return module


import slicer  # the real slicer-core

for name in ("qt", "ctk"):
    if importlib.util.find_spec(name) is None:
        stand_in(name)
missing = {
    "slicer.ScriptedLoadableModule": {},
    "slicer.parameterNodeWrapper": {"parameterNodeWrapper": lambda cls: cls},
    "slicer.i18n": {"tr": lambda text: text, "translate": lambda context, text: text},
}
for name, attributes in missing.items():
    try:
        importlib.import_module(name)
    except ImportError:
        stand_in(name, **attributes)

error = None
try:
    importlib.import_module(module_name)
except Exception as exc:
    error = f"{type(exc).__name__}: {exc}"
print(json.dumps({"error": error, "refused": refused, "loaded": sorted(sys.modules)}))
"""


def import_in_fresh_slicer(module: str, allowed: set[str], paths: list[Path], cwd: Path) -> dict:
    """Import ``module`` in a child process that refuses every top-level package outside
    ``allowed`` (and the standard library), with ``paths`` first on ``sys.path``; the child's
    report: {"error", "refused", "loaded"}."""
    arguments = [module, json.dumps(sorted(allowed)), *map(str, paths)]
    result = subprocess.run(
        [sys.executable, "-c", CHILD, *arguments],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", MODULES)
def test_module_file_imports_with_only_what_slicer_bundles(module):
    allowed = {*BUNDLED, *BUNDLED_INTERNALS, *OURS}
    report = import_in_fresh_slicer(module, allowed, [ROOT, ROOT / module], ROOT)
    refused = sorted(set(report["refused"]))
    assert report["error"] is None, (
        f"{module}.py does not load in a fresh Slicer: {report['error']} "
        f"(refused at module level: {', '.join(refused)})"
    )
    loaded = {name.partition(".")[0] for name in report["loaded"]}
    assert not loaded & set(NOT_BUNDLED), sorted(loaded & set(NOT_BUNDLED))
    # the closure was really imported: the module file and the helpers it names
    assert module in report["loaded"] and "MTKDLib.gui" in report["loaded"]


def test_the_rule_catches_an_import_hidden_in_a_helper(tmp_path):
    """The check itself: a module file importing a helper that imports yaml at module level
    fails, with yaml named (so a pass above means the whole closure is clean)."""
    helper = tmp_path / "HiddenLib"
    helper.mkdir()
    (helper / "__init__.py").write_text("")
    (helper / "inner.py").write_text("import json\nimport yaml  # the defect\n")
    (helper / "outer.py").write_text("from HiddenLib.inner import json\n")
    folder = tmp_path / "Hidden"
    folder.mkdir()
    (folder / "Hidden.py").write_text("import slicer\nimport qt\nfrom HiddenLib import outer\n")
    allowed = {*BUNDLED, *BUNDLED_INTERNALS, "HiddenLib", "Hidden"}
    report = import_in_fresh_slicer("Hidden", allowed, [tmp_path, folder], tmp_path)
    assert report["error"] is not None and "yaml" in report["error"]
    assert "yaml" in report["refused"]
