"""Turn a distillation config (a preset or explicit pairs) into the Distiller's terms."""

from __future__ import annotations

from mtkd.config import DistillConfig
from mtkd.distill.spec import OutputTerm, TapPair
from mtkd.errors import MTKDError
from mtkd.models import network_info

# The paper's weights: 0.2 InfoNCE(B-B) + 0.1 InfoNCE(E-E) + 0.1 InfoNCE(D-D) + 0.2 PMD
# (tau 0.4, T 4); its 0.4 Dice is the recipe's seg_loss/seg_weight.
THESIS_PAIRS = (("E-E", 0.1), ("B-B", 0.2), ("D-D", 0.1))
THESIS_OUTPUT = OutputTerm(loss="pmd", weight=0.2, temperature=4.0)
PRESETS = ("thesis",)


def scale_taps(network: str) -> dict[str, str]:
    """The E (encoder level 2), B (bottleneck) and D (last decoder) taps of a registered net."""
    info = network_info(network)
    encoder = info.encoder_taps[1] if len(info.encoder_taps) > 1 else info.encoder_taps[0]
    return {"E-E": encoder, "B-B": info.bottleneck_tap, "D-D": info.decoder_tap}


def resolve_terms(
    config: DistillConfig, student_network: str, teacher_network: str, teacher_prefix: str
) -> tuple[list[TapPair], OutputTerm | None]:
    """Pairs and output term of ``config``; ``teacher_prefix`` is "backbone." for a multi-task
    teacher (its backbone's taps live under that name)."""
    pairs, output = _unscaled_terms(config, student_network, teacher_network, teacher_prefix)
    for pair in pairs:
        pair.weight *= config.scale
    if output is not None:
        output.weight *= config.scale
    return pairs, output


def _unscaled_terms(
    config: DistillConfig, student_network: str, teacher_network: str, teacher_prefix: str
) -> tuple[list[TapPair], OutputTerm | None]:
    if config.preset is None:
        pairs = [
            TapPair(p.student, p.teacher, p.loss, p.weight, p.temperature, p.name)
            for p in config.pairs
        ]
        output = None
        if config.output is not None:
            output = OutputTerm(config.output.loss, config.output.weight, config.output.temperature)
        return pairs, output
    if config.preset not in PRESETS:
        raise MTKDError(
            f"unknown distillation preset '{config.preset}'; known: {', '.join(PRESETS)}"
        )
    if config.pairs:
        raise MTKDError("give either distill.preset or distill.pairs, not both")
    student, teacher = scale_taps(student_network), scale_taps(teacher_network)
    pairs = [
        TapPair(student[name], teacher_prefix + teacher[name], "infonce", weight, 0.4, name)
        for name, weight in THESIS_PAIRS
    ]
    output = OutputTerm(THESIS_OUTPUT.loss, THESIS_OUTPUT.weight, THESIS_OUTPUT.temperature)
    if config.output is not None:
        output = OutputTerm(config.output.loss, config.output.weight, config.output.temperature)
    return pairs, output
