"""Configuration: YAML round trip, validation errors that name the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtkd.config import RunConfig, dump_config, load_config
from mtkd.distill.spec import TapPair
from mtkd.engine.terms import resolve_terms
from mtkd.errors import MTKDError

EXAMPLES = Path(__file__).parents[1] / "examples"
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
    ],
)
def test_bad_configs_name_the_key_and_the_file(tmp_path, text, message):
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
