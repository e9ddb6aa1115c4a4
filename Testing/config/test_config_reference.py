"""README.md's configuration reference is what the code produces (`mtkd config`): the defaults
block equals the dataclasses' defaults, and the thesis table equals the thesis preset file."""

from __future__ import annotations

import dataclasses
import re
import typing

import pytest
import yaml
from conftest import ROOT

from mtkd import config_reference
from mtkd.cli import main
from mtkd.config import DistillConfig, OptimizerConfig, RunConfig, TrainConfig
from mtkd.config_reference import annotated_defaults, preset_differences

README = ROOT / "README.md"
THESIS = "thesis-2d-spleen"


def _configuration_section() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("\n## Configuration\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def readme_defaults_block() -> str:
    """The first ```yaml block of README's "Configuration" section."""
    match = re.search(r"\n```yaml\n(.*?)```\n", _configuration_section(), re.DOTALL)
    assert match, "README's Configuration section has no ```yaml block"
    return match.group(1)


def readme_table(first_line: str) -> str:
    """The Markdown table of README's "Configuration" section that starts with first_line."""
    lines = _configuration_section().splitlines()
    assert first_line in lines, f"README's Configuration section has no table {first_line!r}"
    table = []
    for line in lines[lines.index(first_line) :]:
        if not line.startswith("|"):
            break
        table.append(line + "\n")
    return "".join(table)


def table_rows(table: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split(" | ") for line in table.splitlines()[2:]]
    return {row[0].strip(" `"): [cell.strip(" `") for cell in row[1:]] for row in rows}


def test_readme_defaults_block_is_what_the_code_produces():
    assert readme_defaults_block() == annotated_defaults()


def test_defaults_block_reads_back_as_the_defaults():
    data = yaml.safe_load(annotated_defaults())
    expected = RunConfig().to_dict()
    # distill is null by default; the block shows the keys it takes once given
    assert expected.pop("distill") is None
    assert data.pop("distill") == dataclasses.asdict(DistillConfig())
    assert data == expected
    assert RunConfig.from_dict(data) == RunConfig()


def test_required_keys_are_shown_without_a_default():
    lines = {line.split(":")[0].strip(): line for line in annotated_defaults().splitlines()}
    for key in ("source", "teacher"):
        assert re.fullmatch(rf"\s*{key}: '' +# REQUIRED.*, no default: .+", lines[key]), lines[key]
    assert "REQUIRED" not in lines["name"]


def test_comments_list_each_choice_field_s_choices_and_follow_the_keys(monkeypatch):
    text = annotated_defaults()
    assert re.search(r"^kind: train +# train \| distill ", text, re.MULTILINE)
    assert re.search(r"\n  dims: 2 +# 2 \| 3 ", text)
    schedulers = " | ".join(typing.get_args(typing.get_type_hints(TrainConfig)["scheduler"]))
    assert f"  scheduler: cosine           # {schedulers}\n" in text
    optimizers = " | ".join(typing.get_args(typing.get_type_hints(OptimizerConfig)["name"]))
    assert re.search(rf"optimizer: {{name: adamw, .*  # name: {re.escape(optimizers)}\n", text)
    assert re.search(r"preset: null +# thesis \| all_scales: ", text)
    assert "output: null                # output-level term {loss: pmd, weight: 0.2," in text
    # a comment whose key is renamed or removed is an error, not a stale line
    monkeypatch.setitem(config_reference.COMMENTS, "train.no_such_key", "a stale comment")
    with pytest.raises(KeyError, match="train.no_such_key"):
        annotated_defaults()


def test_readme_thesis_table_is_the_preset_file():
    table = preset_differences(THESIS)
    assert readme_table(table.splitlines()[0]) == table


def test_thesis_table_holds_the_papers_recipe_and_only_what_differs():
    rows = table_rows(preset_differences(THESIS))
    #                                default, teacher, s1_kd, s2_kd
    assert rows["train.optimizer.name"] == ["adamw", "adamw", "rmsprop", "rmsprop"]
    assert rows["train.optimizer.lr"] == ["0.001", "0.0001", "0.01", "0.01"]
    assert rows["train.seg_weight"] == ["1.0", "1.0", "0.4", "0.4"]
    assert rows["train.epochs"] == ["20", "200", "120", "120"]
    assert rows["train.scheduler"] == ["cosine", "none", "none", "none"]
    assert rows["model.name"] == ["thesis_s1", "thesis_t1_backbone", "thesis_s1", "thesis_s2"]
    assert rows["distill.preset"] == ["null", "", "thesis", "thesis"]  # the teacher has none
    for same in ("train.amp", "train.grad_accum", "data.dims", "name", "distill.scale"):
        assert same not in rows  # equal to the default in every stage


def test_mtkd_config_prints_both(capsys):
    assert main(["config"]) == 0
    assert capsys.readouterr().out == annotated_defaults()
    assert main(["config", "--preset", THESIS]) == 0
    assert capsys.readouterr().out == preset_differences(THESIS)
    assert main(["config", "--preset", "no-such-protocol"]) == 2
    assert "no-such-protocol" in capsys.readouterr().err
