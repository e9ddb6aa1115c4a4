"""Installing what the modules need, decided without the application: the application's
dialogs and installers are injected (:class:`MTKDLib.dependencies.Installer`) as recording
functions, and each decision is checked: which installer is used (``slicer.packaging`` must be
imported explicitly), what a user who declines is told, the torch version requirement given to
PyTorchUtils (pyproject's), the version check without importing torch, the optional extras,
and the constraints that keep Slicer's own packages."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import ROOT

from MTKDLib.dependencies import (
    EXTRAS,
    PYTORCH_MISSING,
    Installer,
    ensure_engine_dependencies,
    ensure_model_extras,
    ensure_optional,
    extras_for_model,
    find_install_torch,
    find_pip_ensure,
    installed_version,
    optional_requirements,
    package_names,
    pip_requirements,
    protected_constraints,
    read_requirements,
    torch_requirement,
    torch_version_requirement,
)

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PYTHON = sys.executable
# what the recorded pip "installs"
PIP_INSTALLS = {
    "monai": "1.5.0",
    "einops": "0.8.0",
    "onnxruntime": "1.20.0",
    "jsonschema": "4.23.0",
}


class Application:
    """What the user sees and what gets installed, recorded; ``answers`` are the user's
    answers to the confirmation questions, in order; ``installed`` the packages present."""

    def __init__(self, installed: dict[str, str | None], answers=(), slicer_5_12=True):
        self.installed = dict(installed)
        self.answers = list(answers)
        self.questions: list[str] = []
        self.infos: list[str] = []
        self.errors: list[str] = []
        self.pip_calls: list[tuple] = []
        self.torch_calls: list[tuple[str, bool]] = []
        self.constraints: list[str] = []
        self.slicer_5_12 = slicer_5_12
        self.torch_answer = True  # PyTorchUtils' own question
        self.fail_with: Exception | None = None
        self.install_for_real = True  # pip "installs" what it is asked for

    def version_of(self, name: str) -> str | None:
        return self.installed.get(name, installed_version(name))

    def confirm(self, text: str) -> bool:
        self.questions.append(text)
        return self.answers.pop(0)

    def _pip(self, requirements: list[str], constraints: str) -> None:
        self.constraints.append(Path(constraints).read_text())
        if self.fail_with is not None:
            raise self.fail_with
        if self.install_for_real:
            for name in package_names(requirements):
                self.installed[name] = PIP_INSTALLS[name]

    def pip_ensure(self, requirements, constraints=None, requester=None, **_):
        """As slicer.packaging.pip_ensure: asks, raises RuntimeError when declined."""
        self.pip_calls.append(("pip_ensure", list(requirements), requester))
        if not self.confirm("install?"):
            raise RuntimeError("User declined package installation")
        self._pip(list(requirements), constraints)

    def pip_install(self, arguments: list[str]) -> None:
        """As slicer.util.pip_install with a list of ``pip install`` arguments."""
        self.pip_calls.append(("pip_install", list(arguments)))
        at = arguments.index("--constraint")
        self._pip(arguments[:at], arguments[at + 1])

    def install_torch(self, requirement: str, ask: bool):
        self.torch_calls.append((requirement, ask))
        if ask and not self.torch_answer:
            return None
        self.installed["torch"] = "2.5.1"
        return object()  # the torch module

    def installer(self, with_pytorch_extension: bool = True) -> Installer:
        return Installer(
            confirm=self.confirm,
            inform=self.infos.append,
            error=self.errors.append,
            pip_install=self.pip_install,
            pip_ensure=self.pip_ensure if self.slicer_5_12 else None,
            install_torch=self.install_torch if with_pytorch_extension else None,
            version_of=self.version_of,
            fresh_version_of=self.version_of,
        )


# ---------------------------------------------------------------- the requirements file


def test_the_torch_requirement_is_pyprojects():
    pinned = [d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch")]
    assert torch_requirement() == pinned[0]
    assert "torch" + torch_version_requirement() == pinned[0]  # as PyTorchUtils appends it
    assert torch_version_requirement() == ">=2.2,<3"
    assert not any(text.startswith("torch") for text in pip_requirements())
    assert pip_requirements() == [t for t in read_requirements() if t != pinned[0]]


def test_optional_extras_are_read_from_the_same_file():
    optional = PYPROJECT["project"]["optional-dependencies"]
    assert optional_requirements("onnx") == ["onnxruntime>=1.18,<2"]
    assert optional_requirements("bundle") == ["jsonschema>=4,<5"]
    for extra in EXTRAS:
        assert set(optional_requirements(extra)) <= set(optional[extra])
    assert not any("extra" in text for text in read_requirements())
    with pytest.raises(ValueError, match="tensorboard"):
        optional_requirements("tensorboard")


# ------------------------------------------------------ which installer is used


def test_slicer_packaging_is_imported_explicitly(tmp_path, monkeypatch):
    """A package whose ``__init__`` does not import its ``packaging`` submodule, as Slicer's
    ``slicer`` package: the submodule is no attribute until imported, and is found."""
    package = tmp_path / "appslicer"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "packaging.py").write_text(
        "def pip_ensure(requirements, constraints=None, skip_packages=None,\n"
        "               prompt_install=True, prompt_restart=True, requester=None,\n"
        "               skip_in_testing=True, show_progress=True):\n"
        "    return None\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import appslicer

    assert getattr(appslicer, "packaging", None) is None  # what the old check relied on
    found = find_pip_ensure("appslicer")
    assert found is not None and found is sys.modules["appslicer.packaging"].pip_ensure


def test_without_slicer_packaging_pip_install_is_the_fallback():
    """slicer-core's ``slicer`` has ``util.pip_install`` but no ``packaging`` (as Slicer
    5.10): no pip_ensure, so the installer asks first and uses pip_install."""
    pytest.importorskip("slicer.util")
    assert find_pip_ensure("slicer") is None
    app = Application({"monai": None}, answers=[True], slicer_5_12=False)
    assert ensure_engine_dependencies(app.installer())
    assert [call[0] for call in app.pip_calls] == ["pip_install"]
    assert app.pip_calls[0][1][0] == "monai>=1.4,<1.7"
    assert "monai>=1.4,<1.7" in app.questions[0]


def test_with_slicer_packaging_pip_ensure_installs_under_the_constraints():
    app = Application({"monai": None, "einops": "0.6.0"}, answers=[True])
    assert ensure_engine_dependencies(app.installer())
    assert app.pip_calls == [("pip_ensure", ["monai>=1.4,<1.7", "einops>=0.7,<1"], "MTKD")]
    pins = dict(line.split("==") for line in app.constraints[0].splitlines() if "==" in line)
    assert pins["numpy"] == installed_version("numpy")
    assert pins["SimpleITK"] == installed_version("SimpleITK")
    assert pins["torch"] == installed_version("torch")
    assert not app.errors and not app.infos


def test_nothing_is_asked_when_everything_is_installed():
    app = Application({})
    assert ensure_engine_dependencies(app.installer())
    assert not (app.questions or app.pip_calls or app.torch_calls or app.errors or app.infos)


# --------------------------------------------------------------- declining


@pytest.mark.parametrize("slicer_5_12", [True, False])
def test_declining_says_nothing_was_installed_and_how_to_install_later(slicer_5_12):
    app = Application({"monai": None}, answers=[False], slicer_5_12=slicer_5_12)
    assert not ensure_engine_dependencies(app.installer())
    assert not app.errors  # declining is no failure
    (text,) = app.infos
    assert text.startswith("Nothing was installed.") and "failed" not in text
    assert "monai>=1.4,<1.7" in text and "slicer.util.pip_install(" in text
    assert "PythonSlicer -m pip install" in text
    assert f"numpy=={installed_version('numpy')}" in text  # the hand command keeps numpy
    assert app.constraints == []  # pip never ran


def test_a_pip_failure_is_an_error_with_how_to_retry():
    app = Application({"monai": None}, answers=[True])
    app.fail_with = subprocess.CalledProcessError(1, ["pip"], "network unreachable")
    assert not ensure_engine_dependencies(app.installer())
    (text,) = app.errors
    assert "Installing monai failed" in text and "PythonSlicer -m pip install" in text


def test_still_missing_after_pip_is_an_error():
    app = Application({"monai": None}, answers=[True])
    app.install_for_real = False
    assert not ensure_engine_dependencies(app.installer())
    assert "still missing" in app.errors[0]


# ------------------------------------------------------------------ PyTorch


def test_missing_torch_is_installed_by_pytorchutils_with_pyprojects_requirement():
    app = Application({"torch": None})
    assert ensure_engine_dependencies(app.installer())
    assert app.torch_calls == [(">=2.2,<3", True)]  # PyTorchUtils asks the user itself


def test_declining_pytorch_says_nothing_was_installed():
    app = Application({"torch": None})
    app.torch_answer = False
    assert not ensure_engine_dependencies(app.installer())
    assert not app.errors
    assert app.infos[0].startswith("Nothing was installed.") and ">=2.2,<3" in app.infos[0]
    assert app.pip_calls == []  # nothing else is installed without torch


def test_an_installed_torch_of_another_version_is_replaced_after_asking():
    app = Application({"torch": "1.13.1"}, answers=[True])
    assert ensure_engine_dependencies(app.installer())
    assert "PyTorch 1.13.1 is installed" in app.questions[0] and ">=2.2,<3" in app.questions[0]
    assert app.torch_calls == [(">=2.2,<3", False)]  # asked once, by us
    declined = Application({"torch": "1.13.1"}, answers=[False])
    assert not ensure_engine_dependencies(declined.installer())
    assert declined.torch_calls == [] and declined.infos[0].startswith("Nothing was installed.")


def test_without_the_pytorch_extension_the_user_is_told_to_install_it():
    app = Application({"torch": None})
    assert not ensure_engine_dependencies(app.installer(with_pytorch_extension=False))
    assert app.errors == [PYTORCH_MISSING]
    assert find_install_torch() is None  # no PyTorchUtils here


def test_pytorchutils_is_called_with_its_own_keyword_names(tmp_path, monkeypatch):
    """installTorch(askConfirmation, forceComputationBackend, torchVersionRequirement,
    torchvisionVersionRequirement), the signature of SlicerPyTorch's PyTorchUtilsLogic."""
    (tmp_path / "PyTorchUtils.py").write_text(
        textwrap.dedent(
            """
            calls = []
            class PyTorchUtilsLogic:
                def installTorch(self, askConfirmation=False, forceComputationBackend=None,
                                 torchVersionRequirement=None,
                                 torchvisionVersionRequirement=None):
                    calls.append((askConfirmation, torchVersionRequirement))
                    return None
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    install = find_install_torch()
    assert install is not None and install(">=2.2,<3", True) is None
    assert sys.modules["PyTorchUtils"].calls == [(True, ">=2.2,<3")]
    monkeypatch.delitem(sys.modules, "PyTorchUtils")


def test_checking_reads_metadata_and_never_imports_torch():
    code = textwrap.dedent(
        """
        import sys
        from MTKDLib.dependencies import (Installer, ensure_engine_dependencies,
            installed_version, missing_requirements, read_requirements)
        assert installed_version("torch")
        assert missing_requirements(read_requirements()) == []
        def never(*_):
            raise AssertionError("nothing to install here")
        assert ensure_engine_dependencies(Installer(never, never, never, never, never, never))
        assert "torch" not in sys.modules, "torch was imported"
        print("ok")
        """
    )
    result = subprocess.run(
        [PYTHON, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# ------------------------------------------------------------------ optional extras


def test_an_optional_extra_is_installed_on_first_use_under_the_constraints():
    app = Application({"onnxruntime": None}, answers=[True])
    assert ensure_optional("onnx", app.installer())
    assert app.pip_calls == [("pip_ensure", ["onnxruntime>=1.18,<2"], "MTKD")]
    assert f"numpy=={installed_version('numpy')}" in app.constraints[0]
    assert ensure_optional("onnx", app.installer())  # second use: already there
    assert len(app.pip_calls) == 1


def test_an_optional_extra_declined_or_failing_says_what_it_is_for():
    app = Application({"jsonschema": None}, answers=[False], slicer_5_12=False)
    assert not ensure_optional("bundle", app.installer())
    assert "Checking MONAI bundles" in app.questions[0]
    assert app.infos[0].startswith("Nothing was installed. Checking MONAI bundles needs")
    app = Application({"jsonschema": None}, answers=[True])
    app.fail_with = subprocess.CalledProcessError(1, ["pip"])
    assert not ensure_optional("bundle", app.installer())
    assert "Installing jsonschema failed" in app.errors[0]
    with pytest.raises(ValueError, match="unknown optional extra"):
        ensure_optional("tensorboard", app.installer())


def test_an_onnx_model_asks_for_onnxruntime_before_it_runs(tmp_path):
    """ONNX models (a file, an export folder, its library entry) need the "onnx" extra;
    other models and an empty choice need nothing."""
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.onnx").write_bytes(b"")
    (tmp_path / "student.onnx").write_bytes(b"")
    assert extras_for_model(export) == ["onnx"]
    assert extras_for_model(tmp_path / "student.onnx") == ["onnx"]
    assert extras_for_model(tmp_path) == []
    assert extras_for_model(ROOT / "Testing" / "Data" / "abdomen_ct.nii.gz") == []

    app = Application({"onnxruntime": None}, answers=[True])
    assert ensure_model_extras(
        [str(tmp_path), export, "", tmp_path / "student.onnx"], app.installer()
    )
    assert app.pip_calls == [("pip_ensure", ["onnxruntime>=1.18,<2"], "MTKD")]
    app = Application({"onnxruntime": None}, answers=[False])
    assert not ensure_model_extras([export], app.installer())
    assert ensure_model_extras([tmp_path], app.installer())  # nothing needed: nothing asked
    assert len(app.questions) == 1


def test_pip_accepts_the_optional_extras_under_the_constraints(tmp_path):
    """Real pip, offline: each extra's requirements fit Slicer's pinned packages here."""
    constraints = tmp_path / "constraints.txt"
    constraints.write_text(protected_constraints())
    for extra in EXTRAS:
        result = subprocess.run(
            [PYTHON, "-m", "pip", "install", "--dry-run", "--no-index", "--quiet",
             *optional_requirements(extra), "--constraint", str(constraints)],
            capture_output=True, text=True,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
