"""Configuration: YAML round trip, validation errors that name the key and the file."""

from __future__ import annotations

import pytest
import yaml
from conftest import ROOT

from mtkd.cli import main
from mtkd.config import RECOMMENDED_PRESET, RunConfig, dump_config, load_config
from mtkd.distill.presets import resolve_terms
from mtkd.distill.spec import TapPair
from mtkd.errors import MTKDError

EXAMPLES = ROOT / "examples"
S1 = {"name": "thesis_s1", "params": {}, "reconstruction": "none"}
T1 = {"name": "thesis_t1_backbone", "params": {}, "reconstruction": "masked"}


@pytest.mark.parametrize("name", ["teacher.yaml", "distill_thesis.yaml"])
def test_examples_load_and_round_trip(name, tmp_path):
    config = load_config(EXAMPLES / name)
    path = tmp_path / "again.yaml"
    path.write_text(dump_config(config))
    assert load_config(path) == config


def test_explicit_example_equals_the_thesis_preset():
    explicit = load_config(EXAMPLES / "distill_thesis.yaml").distill
    pairs, output = resolve_terms(explicit, S1, T1)
    explicit.pairs, explicit.output, explicit.preset = [], None, "thesis"
    preset_pairs, preset_output = resolve_terms(explicit, S1, T1)
    assert pairs == preset_pairs and output == preset_output
    assert [p.weight for p in pairs] == [0.1, 0.2, 0.1] and output.weight == 0.2
    assert pairs[2] == TapPair("dec2", "backbone.dec4", "infonce", 0.1, 0.4, "D-D")


def test_scale_zero_zeroes_every_weight():
    config = load_config(EXAMPLES / "distill_thesis.yaml").distill
    config.scale = 0.0
    pairs, output = resolve_terms(config, S1, T1)
    assert all(p.weight == 0 for p in pairs) and output.weight == 0


OUT_OF_RANGE = [
    ("train: {optimizer: {lr: .nan}}\n", "train.optimizer.lr"),
    ("train: {optimizer: {lr: .inf}}\n", "train.optimizer.lr"),
    ("train: {optimizer: {lr: -.inf}}\n", "train.optimizer.lr"),
    ("train: {optimizer: {weight_decay: .nan}}\n", "train.optimizer.weight_decay"),
    ("train: {optimizer: {weight_decay: -0.1}}\n", "train.optimizer.weight_decay"),
    ("train: {optimizer: {momentum: 1.5}}\n", "train.optimizer.momentum"),
    ("train: {seg_weight: .nan}\n", "train.seg_weight"),
    ("train: {seed: -1}\n", "train.seed"),
    ("train: {num_workers: -2}\n", "train.num_workers"),
    ("split: {seed: 100000000000000000000000}\n", "split.seed"),
    ("data: {hu_window: [.nan, 300]}\n", "data.hu_window[0]"),
    ("data: {spacing: [.inf, 1, 1]}\n", "data.spacing[0]"),
    ("data: {patches_per_volume: 0}\n", "data.patches_per_volume"),
    ("data: {augment: {prob: 2}}\n", "data.augment.prob"),
    ("data: {augment: {noise_std: -1}}\n", "data.augment.noise_std"),
    ("multitask: {mask_ratio: 1.0}\n", "multitask.mask_ratio"),
    ("multitask: {weight: .nan}\n", "multitask.weight"),
    ("distill: {teacher: t, output: {temperature: 0}}\n", "distill.output.temperature"),
    ("distill: {teacher: t, pairs: [{student: a, teacher: b, weight: .nan}]}\n", "weight"),
    ("split: {fixed: {train: 3}}\n", "split.fixed.train"),
    ("split: {fixed: {train: [1, 2]}}\n", "split.fixed.train[0]"),
    ("name: ../elsewhere\n", "name"),
    ("name: ''\n", "name"),
    ("data: null\n", "'data'"),
    ("data: {source: ~nobody9/ct}\n", "data.source"),
    ('distill: {teacher: "a\\0b"}\n', "distill.teacher"),
]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kind: train\ntrian: {}\n", "unknown config key(s) trian"),
        ("data: {dims: 4}\n", "data.dims"),
        ("train: {epochs: many}\n", "train.epochs"),
        ("train: {epochs: 0}\n", "train.epochs"),
        ("data: {hu_window: [300, -200]}\n", "data.hu_window"),
        ("kind: distill\n", "distill.teacher"),
        ("distill: {teacher: t, pairs: [{student: a}]}\n", "distill.pairs[0]"),
        ("- a list\n", "mapping"),
        ("data: {dims: [\n", "not valid YAML"),
    ]
    + OUT_OF_RANGE,
)
def test_bad_configs_name_the_key_and_the_file(tmp_path, text, message):
    """Wrong types and shapes, and (OUT_OF_RANGE) NaN, infinity, negative and out-of-range
    values, are refused when the file is read, naming the key and the file."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(MTKDError) as error:
        load_config(path)
    assert message in str(error.value) and str(path) in str(error.value)


def test_unknown_loss_and_preset_names_are_refused():
    config = RunConfig.from_dict(
        {
            "kind": "distill",
            "distill": {"teacher": "t", "pairs": [{"student": "a", "teacher": "b", "loss": "kl9"}]},
        }
    )
    with pytest.raises(MTKDError, match="kl9"):
        resolve_terms(config.distill, S1, S1)
    config = RunConfig.from_dict(
        {"kind": "distill", "distill": {"teacher": "t", "preset": "paper2"}}
    )
    with pytest.raises(MTKDError, match="paper2"):
        resolve_terms(config.distill, S1, S1)


def test_missing_config_file(tmp_path):
    with pytest.raises(MTKDError, match="not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("device", ["tpu:7", "cuda:-1", "cpu:0", "CUDA", "cuda:٣", ""])
def test_an_unknown_train_device_is_refused_when_the_config_is_read(tmp_path, device):
    path = tmp_path / "device.yaml"
    path.write_text(yaml.safe_dump({"train": {"device": device}}))
    with pytest.raises(MTKDError) as error:
        load_config(path)
    message = str(error.value)
    assert "train.device" in message and str(path) in message and "cuda:N" in message


# nine lines that YAML aliases expand to a billion values
ALIAS_BOMB = (
    "a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
    + "".join(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9))
    + "model: {params: {x: *a8}}\n"
).encode()


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (bytes(range(256)) * 8, "binary"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary"),
        (b"1: 2\n", "config key 1"),
        (b"data: {1: x}\n", "must be a name"),
        (b"train: {device: 3}\n", "train.device"),
        (b"data: {dims: 2, source: x}\nkind: [\n", "not valid YAML"),
        (b"[" * 5000, "not"),
        (b"0\n", "mapping"),
        (b"model: {params: &a {x: *a}}\n", "loop"),
        (b"model: {params: {x: &b [*b]}}\n", "loop"),
        (ALIAS_BOMB, "aliases are expanded"),
    ],
)
def test_a_file_that_is_not_a_config_is_refused_naming_it(tmp_path, content, words):
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    with pytest.raises(MTKDError) as error:
        load_config(path)
    message = str(error.value)
    assert str(path) in message and words in message and "\n" not in message


def test_a_folder_given_as_config_is_named_as_a_folder(tmp_path):
    with pytest.raises(MTKDError, match="is a folder") as error:
        load_config(tmp_path)
    assert str(tmp_path) in str(error.value)


@pytest.mark.parametrize(
    "text", ["", "# nothing\n", "train: {epochs: 1}\n", "data: {source: ''}\n"]
)
def test_a_config_without_a_dataset_is_refused_naming_the_file(tmp_path, monkeypatch, capsys, text):
    """An empty ``data.source`` was read as the working directory; now the command stops with
    one line naming the configuration file and the key."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").mkdir()  # the working directory looks a little like a dataset
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    assert main(["train", str(path), "--device", "cpu"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and error.startswith("mtkd: error:"), error
    assert str(path) in error and "config key 'data.source'" in error, error
    assert not (tmp_path / "runs").exists()  # a run refused at its start leaves no folder


def _distill_config(distill: dict, train_on: str = "student_train") -> RunConfig:
    return RunConfig.from_dict(
        {"kind": "distill", "train_on": train_on, "data": {"source": "d"}, "distill": distill}
    )


@pytest.mark.parametrize(
    ("distill", "preset"),
    [
        ({"teacher": "t"}, RECOMMENDED_PRESET),
        ({"teacher": "t", "preset": "recommended"}, RECOMMENDED_PRESET),
        ({"teacher": "t", "preset": "thesis"}, "thesis"),
        ({"teacher": "t", "output": {"loss": "cwd"}}, None),
    ],
)
def test_a_distillation_naming_no_terms_gets_the_recommended_preset(distill, preset, tmp_path):
    config = _distill_config(distill)
    assert config.distill.preset == preset
    # the stored config names the resolved preset, so a run keeps its recipe
    (tmp_path / "config.yaml").write_text(dump_config(config), encoding="utf-8")
    assert load_config(tmp_path / "config.yaml").distill.preset == preset


def test_the_recommended_preset_is_one_output_term_at_its_published_settings():
    pairs, output = resolve_terms(_distill_config({"teacher": "t"}).distill, S1, T1)
    assert pairs == []
    assert (output.loss, output.weight, output.temperature) == ("pmd", 1.0, 1.0)


@pytest.mark.parametrize(
    ("train_on", "unlabelled", "scale", "images"),
    [
        ("student_train", "auto", 1.0, "train"),  # the other training patients join
        ("student_train", "auto", 0.0, "none"),  # the no-KD baseline has no use for them
        ("train", "auto", 1.0, "none"),  # every training patient is labelled
        ("none", "auto", 1.0, "train"),  # label-free distillation
        ("student_train", "none", 1.0, "none"),
        ("student_train", "train", 1.0, "train"),
        ("student_train", "extra_cts", 1.0, "extra_cts"),
    ],
)
def test_unlabelled_auto_uses_the_training_images_that_have_no_labels(
    train_on, unlabelled, scale, images
):
    distill = {"teacher": "t", "unlabelled": unlabelled, "scale": scale}
    assert _distill_config(distill, train_on).unlabelled_images() == images
    assert _distill_config({"teacher": "t"}).distill.unlabelled == "auto"  # the default


def test_train_runs_have_no_unlabelled_images():
    config = RunConfig.from_dict({"kind": "train", "data": {"source": "d"}})
    assert config.distill is None and config.unlabelled_images() == "none"
