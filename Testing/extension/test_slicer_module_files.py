"""What can be checked of the Slicer modules' widget layer without Qt: the ``.ui`` parses and
holds every widget the code names, parameter names match the parameter node, and the shared
logic imports without Qt or torch (the GUI process must open before torch is installed)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import ROOT

MODULES = ["MTKDSegment", "MTKDTrain"]
# importable in the GUI process before any engine dependency is installed
HEADLESS = [
    "compare_logic",
    "dependencies",
    "devices",
    "distill_loop",
    "library_table",
    "loop_recipe",
    "loop_scores",
    "loop_split",
    "mrml_io",
    "process",
    "run_monitor",
    "run_plots",
    "segment_labels",
    "segment_logic",
    "train_config",
    "train_logic",
    "training_set",
    "worker",
]
APPLICATION_ONLY = {"gui", "slicer_setup"}  # dialogs, QSettings, QTimer: need the app


def ui_widgets(module: str) -> dict[str, str]:
    tree = ET.parse(ROOT / module / "Resources" / "UI" / f"{module}.ui")
    return {w.get("name"): w.get("class") for w in tree.iter("widget")}


def ui_parameter_names(module: str) -> set[str]:
    tree = ET.parse(ROOT / module / "Resources" / "UI" / f"{module}.ui")
    return {
        p.findtext("string")
        for p in tree.iter("property")
        if p.get("name") == "SlicerParameterName"
    }


def module_source(module: str) -> str:
    return (ROOT / module / f"{module}.py").read_text()


def parameter_fields(module: str) -> dict[str, str]:
    """{field: its annotation as source text} of the module's parameter node wrapper."""
    tree = ast.parse(module_source(module))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == f"{module}ParameterNode":
            return {
                item.target.id: ast.unparse(item.annotation)
                for item in node.body
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
            }
    raise AssertionError(f"{module}.py has no {module}ParameterNode")


def ui_bindings(module: str) -> dict[str, str]:
    """{parameter name: class of the widget bound to it} from the .ui file."""
    tree = ET.parse(ROOT / module / "Resources" / "UI" / f"{module}.ui")
    bindings = {}
    for widget in tree.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bindings[prop.findtext("string")] = widget.get("class")
    return bindings


# which annotation each bound widget class can show (Slicer's parameterNodeWrapper connectors)
CONNECTABLE = {
    "qMRMLNodeComboBox": lambda annotation: annotation.startswith("vtkMRML"),
    "QComboBox": lambda annotation: "Choice" in annotation,
    "QCheckBox": lambda annotation: annotation == "bool",
    "ctkPathLineEdit": lambda annotation: "Path" in annotation,
    "QSpinBox": lambda annotation: annotation == "int",
    "QDoubleSpinBox": lambda annotation: annotation == "float",
    "QLineEdit": lambda annotation: annotation == "str",
}


def setup_module_buttons(module: str) -> list[str]:
    """The widget names given to ``self.setupModule(ui, {name: slot})`` (the buttons it
    connects by name)."""
    names = []
    for node in ast.walk(ast.parse(module_source(module))):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "setupModule"
        ):
            assert node.args[0].value == module  # loads its own .ui
            names += [key.value for key in node.args[1].keys]
    assert names, f"{module}.py does not connect its buttons through setupModule"
    return names


@pytest.mark.parametrize("module", MODULES)
def test_every_widget_the_code_names_is_in_the_ui(module):
    widgets = ui_widgets(module)
    assert widgets[module] == "qMRMLWidget"
    used = set(re.findall(r"self\.ui\.([A-Za-z_]\w*)", module_source(module)))
    assert used, "the widget uses no ui element?"
    used |= set(setup_module_buttons(module))
    missing = sorted(used - set(widgets))
    assert not missing, f"{module}.py uses widgets missing from {module}.ui: {missing}"


@pytest.mark.parametrize("module", MODULES)
def test_ui_parameter_names_are_parameter_node_fields(module):
    names = ui_parameter_names(module)
    assert names
    fields = parameter_fields(module)
    unknown = sorted(names - set(fields))
    assert not unknown, f"{module}.ui binds unknown parameters: {unknown}"
    for name, widget_class in ui_bindings(module).items():
        assert CONNECTABLE[widget_class](fields[name]), f"{widget_class} cannot show {name}"


@pytest.mark.parametrize("module", MODULES)
def test_module_file_follows_the_slicer_template(module):
    tree = ast.parse(module_source(module))
    classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    for suffix in ("", "Widget", "Logic", "Test", "ParameterNode"):
        assert f"{module}{suffix}" in classes
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module)])
    }
    assert "torch" not in imported and "monai" not in imported  # never in the GUI process


def test_shared_logic_imports_without_qt_or_torch():
    names = ", ".join(f"MTKDLib.{name}" for name in HEADLESS)
    code = (
        f"import sys, {names}\n"
        "heavy = sorted({'qt', 'torch', 'monai', 'ctk'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_every_shared_module_is_classified():
    files = {p.stem for p in (ROOT / "MTKDLib").glob("*.py")} - {"__init__"}
    assert files == set(HEADLESS) | APPLICATION_ONLY


@pytest.mark.parametrize("module", MODULES)
def test_device_is_any_device_this_machine_has(module):
    """The device list differs between machines (cuda:0, cuda:1, mps, ...): the parameter is a
    plain string, and the combo box is not bound to it by the parameterNodeWrapper (whose
    QComboBox connector needs a fixed Choice and replaces the items with it)."""
    assert parameter_fields(module)["device"] == "str"
    assert "device" not in ui_parameter_names(module)
    assert ui_widgets(module)["deviceComboBox"] == "QComboBox"
    assert "DeviceChoice(self.ui.deviceComboBox" in module_source(module)


@pytest.mark.parametrize("module", MODULES)
def test_plot_widgets_get_a_plot_view_node(module):
    """A qMRMLPlotWidget creates no plot view node (Slicer's qMRMLPlotWidget.cxx): the code
    must give it one (``setMRMLPlotViewNode``) and never use the one it assumes is there."""
    plots = [name for name, kind in ui_widgets(module).items() if kind == "qMRMLPlotWidget"]
    source = module_source(module)
    assert not re.search(r"mrmlPlotViewNode\(\)\s*\.\s*Set", source)
    if plots:
        assert "setMRMLPlotViewNode(plot_view_node(" in source


BLOCKING_CALLS = {"wait", "join", "communicate", "sleep", "run", "segment", "compare"}


def blocking_calls(path: Path) -> list[str]:
    """Calls in ``path`` that block until a process or thread ends (``x.wait()``, ``join``,
    ``subprocess.run``, ``time.sleep``, the logic's blocking ``segment``/``compare``), as
    "function:line", except in :func:`MTKDLib.gui.process_events_until`, which keeps Slicer's
    events going while it waits."""
    tree = ast.parse(path.read_text())
    found = []
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if function.name == "process_events_until":
            continue
        for node in ast.walk(function):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in BLOCKING_CALLS
                and not isinstance(node.func.value, ast.Constant)  # "...".join(...)
            ):
                found.append(f"{function.name}:{node.lineno}: .{node.func.attr}()")
    return sorted(set(found))


@pytest.mark.parametrize(
    "path", ["MTKDSegment/MTKDSegment.py", "MTKDTrain/MTKDTrain.py", "MTKDLib/gui.py"]
)
def test_nothing_waits_on_slicers_gui_thread(path):
    """Cancel, Stop, closing the scene and the self-tests never block Slicer's main thread:
    the widgets (and their self-tests) only start processes and poll them from timers."""
    assert blocking_calls(ROOT / path) == []
