"""Turn a distillation config (a preset or explicit pairs) into the Distiller's terms."""

from __future__ import annotations

from typing import Any

from mtkd.config import DistillConfig
from mtkd.distill.spec import OutputTerm, TapPair
from mtkd.errors import MTKDError
from mtkd.models import network_info

# The paper's weights: 0.2 InfoNCE(B-B) + 0.1 InfoNCE(E-E) + 0.1 InfoNCE(D-D) + 0.2 PMD
# (tau 0.4, T 4); its 0.4 Dice is the recipe's seg_loss/seg_weight.
THESIS_PAIRS = (("E-E", 0.1), ("B-B", 0.2), ("D-D", 0.1))
THESIS_OUTPUT = OutputTerm(loss="pmd", weight=0.2, temperature=4.0)
PRESETS = ("thesis",)


def scale_taps(network: str, params: dict[str, Any] | None = None) -> dict[str, str]:
    """The E (encoder level 2), B (bottleneck) and D (last decoder) taps of a registered net
    built with ``params`` (tap names of some networks depend on their depth)."""
    info = network_info(network, **(params or {}))
    encoder = info.encoder_taps[1] if len(info.encoder_taps) > 1 else info.encoder_taps[0]
    return {"E-E": encoder, "B-B": info.bottleneck_tap, "D-D": info.decoder_tap}


def resolve_terms(
    config: DistillConfig, student: dict[str, Any], teacher: dict[str, Any]
) -> tuple[list[TapPair], OutputTerm | None]:
    """Pairs and output term of ``config``, weights times ``config.scale``.

    ``student`` and ``teacher`` are network specs {"name", "params", "reconstruction"}; a
    multi-task teacher's taps live under "backbone.".
    """
    pairs, output = _unscaled_terms(config, student, teacher)
    for pair in pairs:
        pair.weight *= config.scale
    if output is not None:
        output.weight *= config.scale
    return pairs, output


def feature_weights(config: DistillConfig) -> dict[str, float]:
    """The weight (times ``config.scale``) of each feature-level term by its label
    (``E-E``, ``pair0``, ...); needs no network, so it can vet a teacher without taps."""
    _check_preset(config)
    if config.preset is None:
        named = [(p.name or f"pair{index}", p.weight) for index, p in enumerate(config.pairs)]
    else:
        named = list(THESIS_PAIRS)
    return {label: weight * config.scale for label, weight in named}


def resolve_output_term(config: DistillConfig) -> OutputTerm | None:
    """The output term of ``config`` (weight times ``config.scale``), without any tap pair."""
    _check_preset(config)
    output = _unscaled_output(config)
    if output is not None:
        output.weight *= config.scale
    return output


def _check_preset(config: DistillConfig) -> None:
    if config.preset is None:
        return
    if config.preset not in PRESETS:
        raise MTKDError(
            f"unknown distillation preset '{config.preset}'; known: {', '.join(PRESETS)}"
        )
    if config.pairs:
        raise MTKDError("give either distill.preset or distill.pairs, not both")


def _unscaled_output(config: DistillConfig) -> OutputTerm | None:
    if config.output is not None:
        return OutputTerm(config.output.loss, config.output.weight, config.output.temperature)
    if config.preset is not None:
        return OutputTerm(THESIS_OUTPUT.loss, THESIS_OUTPUT.weight, THESIS_OUTPUT.temperature)
    return None


def _unscaled_terms(
    config: DistillConfig, student: dict[str, Any], teacher: dict[str, Any]
) -> tuple[list[TapPair], OutputTerm | None]:
    _check_preset(config)
    if config.preset is None:
        pairs = [
            TapPair(p.student, p.teacher, p.loss, p.weight, p.temperature, p.name)
            for p in config.pairs
        ]
        return pairs, _unscaled_output(config)
    prefix = "backbone." if teacher.get("reconstruction", "none") != "none" else ""
    student_taps = scale_taps(student["name"], student.get("params"))
    teacher_taps = scale_taps(teacher["name"], teacher.get("params"))
    pairs = [
        TapPair(student_taps[name], prefix + teacher_taps[name], "infonce", weight, 0.4, name)
        for name, weight in THESIS_PAIRS
    ]
    return pairs, _unscaled_output(config)
