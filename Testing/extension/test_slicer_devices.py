"""The device list the modules offer: every GPU (``cuda:0``, ``cuda:1``, ...) and ``mps``
where PyTorch has them, found by the engine's interpreter in a child process (torch never
imported into Slicer's), ``["auto", "cpu"]`` without torch; and the engine accepting those
names."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ROOT

from mtkd.cli import main
from mtkd.devices import resolve_device
from mtkd.environment import device_names
from mtkd.errors import MTKDError
from MTKDLib import devices
from MTKDLib.devices import (
    DEFAULT_DEVICES,
    available_devices,
    check_device,
    device_items,
    devices_from_report,
)
from MTKDLib.train_config import TrainingOptions, build_config

PYTHON = sys.executable


def expected_devices() -> list[str]:
    names = ["auto", "cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        names.append("mps")
    return names


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:0", "cuda:1", "cuda:12", "mps"])
def test_device_names_the_engine_accepts(name):
    assert check_device(name) == name


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:-1", "CUDA", "cuda:one", "", "mps:0"])
def test_other_device_names_are_refused_clearly(name):
    with pytest.raises(ValueError, match=r"auto, cpu, cuda, cuda:N .* or mps"):
        check_device(name)


def test_the_training_panel_refuses_an_unknown_device():
    options = TrainingOptions(dataset="x", teacher="y", device="gpu")
    with pytest.raises(ValueError, match="cuda:N"):
        build_config(options)


def test_devices_from_a_report():
    report = {"devices": ["auto", "cpu", "cuda:0", "cuda:1", "mps"]}
    assert devices_from_report(report) == ["auto", "cpu", "cuda:0", "cuda:1", "mps"]
    assert devices_from_report({}) == list(DEFAULT_DEVICES)
    assert devices_from_report({"devices": ["cuda:0", 3, "tpu", "cpu"]}) == [
        "auto",
        "cpu",
        "cuda:0",
    ]


def test_the_engine_reports_its_devices():
    assert device_names() == expected_devices()


def test_available_devices_asks_the_engine_without_importing_torch_here():
    code = textwrap.dedent(
        f"""
        import sys
        from MTKDLib.devices import available_devices, _cache
        names = available_devices({PYTHON!r})
        assert "torch" not in sys.modules, "torch was imported"
        assert _cache[{PYTHON!r}] == names  # asked once, then cached
        print(",".join(names))
        """
    )
    result = subprocess.run(
        [PYTHON, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().split(",") == expected_devices()


def test_without_torch_only_auto_and_cpu_are_offered(tmp_path):
    """An interpreter without torch (a bare virtual environment): the engine still answers,
    and the list is the default one, without an error."""
    bare = tmp_path / "bare"
    subprocess.run([PYTHON, "-m", "venv", "--without-pip", str(bare)], check=True)
    python = bare / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    assert available_devices(str(python)) == ["auto", "cpu"]
    assert devices._cache[str(python)] == ["auto", "cpu"]  # the engine answered


def test_an_engine_that_cannot_answer_gives_the_default_list_uncached(tmp_path):
    missing = str(tmp_path / "no-such-python")
    assert available_devices(missing) == list(DEFAULT_DEVICES)
    assert missing not in devices._cache


def test_the_engine_accepts_a_second_gpu_and_mps_by_name():
    """ "cuda:1" and "mps" are device names the engine resolves (or refuses with the reason
    when this machine lacks them); an unknown name is refused naming the accepted ones."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus >= 2:
        assert resolve_device("cuda:1") == torch.device("cuda", 1)
    else:
        with pytest.raises(MTKDError, match="cuda:1"):
            resolve_device("cuda:1")
    if torch.backends.mps.is_available():
        assert resolve_device("mps").type == "mps"
    else:
        with pytest.raises(MTKDError, match="MPS"):
            resolve_device("mps")
    with pytest.raises(MTKDError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    if gpus:
        with pytest.raises(MTKDError, match=f"has {gpus} GPU"):
            resolve_device(f"cuda:{gpus}")


def test_the_device_box_lists_every_device_and_keeps_one_this_computer_lacks():
    """A scene made on another computer may name ``cuda:1``: the box still shows it, marked,
    so that what will be used is what is shown."""
    found = ["auto", "cpu", "cuda:0"]
    assert device_items(found, "cuda:0") == [(name, name) for name in found]
    items = device_items(found, "cuda:1")
    assert items[:3] == [(name, name) for name in found]
    assert items[3] == ("cuda:1 (not found on this computer)", "cuda:1")
    assert device_items(found, "") == [(name, name) for name in found]


# Names torch.device parses (or that look like device names) outside the rule: one rule refuses
# them on both sides (the Slicer panels and the engine), naming the accepted forms.
OUTSIDE_THE_RULE = ["tpu:7", "cpu:0", "cpu:7", "mps:0", "cuda:٣", "cuda:1\n", " cpu", "meta", "xla"]


@pytest.mark.parametrize("name", OUTSIDE_THE_RULE)
def test_the_engine_and_the_modules_share_one_device_rule(name):
    with pytest.raises(ValueError, match=r"auto, cpu, cuda, cuda:N .* or mps"):
        check_device(name)
    with pytest.raises(MTKDError, match=r"auto, cpu, cuda, cuda:N .* or mps"):
        resolve_device(name)


def test_a_gpu_number_past_any_machine_is_refused_clearly():
    name = "cuda:99999999999999999999"
    assert check_device(name) == name  # a device name; no machine has that GPU
    with pytest.raises(MTKDError, match="CUDA is not available|GPU"):
        resolve_device(name)


@pytest.mark.parametrize("command", ["segment", "compare"])
@pytest.mark.parametrize("name", ["tpu:7", "cpu:7"])
def test_segment_and_compare_refuse_an_unknown_device_in_one_line(tmp_path, capsys, command, name):
    model, image = tmp_path / "model", tmp_path / "ct.nii.gz"
    if command == "segment":
        argv = ["segment", str(model), str(image), "-o", str(tmp_path / "out.nii.gz")]
    else:
        argv = ["compare", str(image), "--teacher", str(model), "--student", str(model)]
        argv += ["-o", str(tmp_path / "comparison")]
    assert main([*argv, "--device", name]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("mtkd: error:") and "\n" not in error, error
    assert f"unknown device '{name}'" in error and "cuda:N" in error, error
    assert sorted(path.name for path in tmp_path.iterdir()) == []
