"""``environment_report``, ``format_environment`` and ``mtkd env``."""

from __future__ import annotations

import json
import os
import platform

import pytest
import SimpleITK as sitk
import torch

import mtkd
from mtkd.cli import main
from mtkd.environment import environment_report, format_environment, package_version
from mtkd.errors import MTKDError


def test_report_keys_and_types():
    report = environment_report()
    assert json.loads(json.dumps(report)) == report  # JSON-ready
    assert report["python"] == platform.python_version()
    assert report["mtkd"] == mtkd.__version__
    assert report["torch"] == torch.__version__
    assert report["simpleitk"] == sitk.__version__
    assert isinstance(report["monai"], str) and report["monai"][0].isdigit()
    assert report["cuda_available"] is torch.cuda.is_available()
    assert report["cuda_version"] == torch.version.cuda
    assert len(report["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    for gpu in report["gpus"]:
        assert isinstance(gpu["name"], str) and gpu["total_memory_bytes"] > 0
        assert 0 <= gpu["free_memory_bytes"] <= gpu["total_memory_bytes"]
    assert report["cpu_count"] == os.cpu_count()
    assert 1 <= report["usable_cpus"] <= report["cpu_count"]
    assert isinstance(report["free_memory_bytes"], int) and report["free_memory_bytes"] > 0
    assert report["device"] == ("cuda" if torch.cuda.is_available() else "cpu")


def test_report_on_the_cpu_and_refusal_of_a_missing_gpu():
    report = environment_report("cpu")
    assert report["device"] == "cpu" and report["device_free_memory_bytes"] > 0
    if not torch.cuda.is_available():
        with pytest.raises(MTKDError, match="CUDA is not available"):
            environment_report("cuda")


def test_missing_package_has_no_version():
    assert package_version("mtkd-no-such-distribution", "mtkd_no_such_module") is None
    assert package_version("torch", "torch") in (torch.__version__, torch.__version__.split("+")[0])


def test_format_names_versions_and_memory():
    report = environment_report()
    text = format_environment(report)
    assert torch.__version__ in text and f"mtkd {mtkd.__version__}" in text
    assert f"SimpleITK {sitk.__version__}" in text
    assert "GiB free" in text
    assert ("CUDA" in text) and (("GPU 0" in text) == bool(report["gpus"]))
    text = format_environment({**report, "monai": None})
    assert "MONAI not installed" in text


def test_cli_env_json_and_text(capsys):
    assert main(["env", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["torch"] == torch.__version__ and "gpus" in report
    assert main(["env"]) == 0
    assert f"torch {torch.__version__}" in capsys.readouterr().out


def test_env_reports_a_missing_torch_instead_of_failing():
    """As in Slicer before the PyTorch extension is installed: torch cannot be imported."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # import torch now raises ImportError\n"
        "from mtkd.cli import main\n"
        "raise SystemExit(main(['env', '--json']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["torch"] is None and report["cuda_available"] is False
    assert report["monai"] is None or isinstance(report["monai"], str)
    assert "torch: not installed" in format_environment(report)


def test_report_lists_the_devices_to_offer():
    """ "auto", "cpu", every GPU by index and "mps" where PyTorch has it (the Slicer modules'
    device list comes from this report)."""
    report = environment_report()
    gpus = [f"cuda:{gpu['index']}" for gpu in report["gpus"]]
    mps = ["mps"] if torch.backends.mps.is_available() else []
    assert report["devices"] == ["auto", "cpu", *gpus, *mps]
    assert f"devices: {', '.join(report['devices'])}" in format_environment(report)
