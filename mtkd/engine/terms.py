"""Turn a distillation config (a preset or explicit pairs) into the Distiller's terms.

Presets (``distill.preset``) pair taps of registered networks by scale:

- ``thesis``: E-E (encoder level 2), B-B (bottleneck), D-D (last decoder), as in the paper;
- ``all_scales``: every encoder level both networks have, matched from the shallowest
  (E1-E1 .. En-En, n the smaller encoder depth), plus B-B and D-D.

``distill.feature_loss`` replaces the presets' InfoNCE, ``distill.scale_weights`` their weights
by pair label (before ``distill.scale``; 0 drops the pair). A preset's pairs take the feature
loss's default temperature: 0.4 for InfoNCE (the paper), 0.1 for ``supcon`` (the supervised
voxel contrast); mse and cosine have none.
"""

from __future__ import annotations

import re
from typing import Any

from mtkd.config import DistillConfig
from mtkd.distill.losses import FEATURE_LOSSES
from mtkd.distill.spec import OutputTerm, TapPair
from mtkd.errors import MTKDError
from mtkd.models import network_info

# The paper's weights: 0.2 InfoNCE(B-B) + 0.1 InfoNCE(E-E) + 0.1 InfoNCE(D-D) + 0.2 PMD
# (tau 0.4, T 4); its 0.4 Dice is the recipe's seg_loss/seg_weight.
THESIS_PAIRS = (("E-E", 0.1), ("B-B", 0.2), ("D-D", 0.1))
THESIS_OUTPUT = OutputTerm(loss="pmd", weight=0.2, temperature=4.0)
# all_scales: 0.1 for each encoder level Ek-Ek, then these two.
ALL_SCALES_ENCODER_WEIGHT = 0.1
ALL_SCALES_PAIRS = (("B-B", 0.2), ("D-D", 0.1))
PRESET_FEATURE_LOSS = "infonce"
PRESET_TEMPERATURE = 0.4  # InfoNCE's; each loss's: mtkd.distill.losses.DEFAULT_TEMPERATURES
PRESETS = ("thesis", "all_scales")
# The label feature_weights gives the all_scales encoder levels that scale_weights does not
# name when it cannot know the networks' depth.
OTHER_ENCODER_LEVELS = "Ek-Ek"

_ENCODER_LABEL = re.compile(r"^E([1-9][0-9]*)-E\1$")


def scale_taps(network: str, params: dict[str, Any] | None = None) -> dict[str, str]:
    """The E (encoder level 2), B (bottleneck) and D (last decoder) taps of a registered net
    built with ``params`` (tap names of some networks depend on their depth)."""
    info = network_info(network, **(params or {}))
    encoder = info.encoder_taps[1] if len(info.encoder_taps) > 1 else info.encoder_taps[0]
    return {"E-E": encoder, "B-B": info.bottleneck_tap, "D-D": info.decoder_tap}


def all_scale_taps(student: dict[str, Any], teacher: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Label -> (student tap, teacher tap) of preset ``all_scales``: E1-E1 .. En-En (encoder
    levels from the shallowest, n = the smaller depth), B-B and D-D."""
    s = network_info(student["name"], **(student.get("params") or {}))
    t = network_info(teacher["name"], **(teacher.get("params") or {}))
    depth = min(len(s.encoder_taps), len(t.encoder_taps))
    taps = {
        f"E{k}-E{k}": (s.encoder_taps[k - 1], t.encoder_taps[k - 1]) for k in range(1, depth + 1)
    }
    taps["B-B"] = (s.bottleneck_tap, t.bottleneck_tap)
    taps["D-D"] = (s.decoder_tap, t.decoder_tap)
    return taps


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


def feature_weights(
    config: DistillConfig,
    student: dict[str, Any] | None = None,
    teacher: dict[str, Any] | None = None,
) -> dict[str, float]:
    """The weight (times ``config.scale``) of each feature-level term by its label
    (``E-E``, ``pair0``, ...), without the pairs that ``scale_weights`` drops (weight 0).

    It needs no network, so it can vet a teacher without taps. Only preset ``all_scales``
    depends on the networks' depth: given the ``student`` and ``teacher`` specs its labels are
    exact (E1-E1 .. En-En, B-B, D-D); without them, the encoder levels that ``scale_weights``
    does not name are reported together as ``Ek-Ek`` with their preset weight.
    """
    _check_preset(config)
    if config.preset is None:
        named = [(p.name or f"pair{index}", p.weight) for index, p in enumerate(config.pairs)]
    elif config.preset == "all_scales" and (student is None or teacher is None):
        given = config.scale_weights or {}
        levels = sorted(
            (label for label in given if _ENCODER_LABEL.match(label)),
            key=lambda label: int(_ENCODER_LABEL.match(label).group(1)),
        )
        named = [(label, float(given[label])) for label in levels]
        named.append((OTHER_ENCODER_LEVELS, ALL_SCALES_ENCODER_WEIGHT))
        named += [(label, float(given.get(label, weight))) for label, weight in ALL_SCALES_PAIRS]
        named = [(label, weight) for label, weight in named if weight > 0]
    else:
        named = _with_overrides(config, _preset_weights(config.preset, student, teacher))
    return {label: weight * config.scale for label, weight in named}


def resolve_output_term(config: DistillConfig) -> OutputTerm | None:
    """The output term of ``config`` (weight times ``config.scale``), without any tap pair."""
    _check_preset(config)
    output = _unscaled_output(config)
    if output is not None:
        output.weight *= config.scale
    return output


def _check_preset(config: DistillConfig) -> None:
    """The preset's name and the overrides, as far as they need no network; errors name the
    key."""
    for key in ("feature_loss", "scale_weights"):
        if getattr(config, key) is not None and (config.preset is None or config.pairs):
            where = (
                "explicit distill.pairs carry their own loss and weight"
                if config.pairs
                else "set distill.preset"
            )
            raise MTKDError(f"distill.{key} changes a preset's pairs; {where}")
    if config.preset is None:
        return
    if config.preset not in PRESETS:
        raise MTKDError(
            f"unknown distillation preset '{config.preset}'; known: {', '.join(PRESETS)}"
        )
    if config.pairs:
        raise MTKDError("give either distill.preset or distill.pairs, not both")
    if config.feature_loss is not None and config.feature_loss not in FEATURE_LOSSES:
        raise MTKDError(
            f"distill.feature_loss: unknown feature loss {config.feature_loss!r}; valid: "
            f"{', '.join(sorted(FEATURE_LOSSES))}"
        )
    for label, weight in (config.scale_weights or {}).items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise MTKDError(f"distill.scale_weights.{label}: must be a number >= 0, got {weight!r}")
        if config.preset == "thesis":
            valid = [name for name, _ in THESIS_PAIRS]
            known = label in valid
        else:
            valid = ["E1-E1", "E2-E2", "... (one per encoder level)"]
            valid += [name for name, _ in ALL_SCALES_PAIRS]
            known = bool(_ENCODER_LABEL.match(label)) or label in dict(ALL_SCALES_PAIRS)
        if not known:
            raise MTKDError(
                f"distill.scale_weights: '{label}' is not a pair of preset '{config.preset}'; "
                f"its pairs: {', '.join(valid)}"
            )


def _preset_weights(
    preset: str, student: dict[str, Any] | None, teacher: dict[str, Any] | None
) -> list[tuple[str, float]]:
    """(label, weight) of each pair of ``preset`` before overrides (all_scales needs the
    student and teacher specs)."""
    if preset == "thesis":
        return list(THESIS_PAIRS)
    encoder = [label for label in all_scale_taps(student, teacher) if _ENCODER_LABEL.match(label)]
    return [(label, ALL_SCALES_ENCODER_WEIGHT) for label in encoder] + list(ALL_SCALES_PAIRS)


def _with_overrides(
    config: DistillConfig, named: list[tuple[str, float]]
) -> list[tuple[str, float]]:
    """``named`` with ``scale_weights`` applied: weights replaced, pairs set to 0 dropped; a
    label these networks lack (an encoder level too deep) is an error listing theirs."""
    given = config.scale_weights or {}
    labels = [label for label, _ in named]
    unknown = [label for label in given if label not in labels]
    if unknown:
        raise MTKDError(
            f"distill.scale_weights: {', '.join(repr(label) for label in unknown)} is not a "
            f"pair of preset '{config.preset}' for these networks; their pairs: "
            f"{', '.join(labels)}"
        )
    return [
        (label, float(given.get(label, weight)))
        for label, weight in named
        if label not in given or given[label] > 0
    ]


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
    if config.preset == "thesis":
        student_taps = scale_taps(student["name"], student.get("params"))
        teacher_taps = scale_taps(teacher["name"], teacher.get("params"))
        taps = {label: (student_taps[label], teacher_taps[label]) for label in student_taps}
    else:
        taps = all_scale_taps(student, teacher)
    loss = config.feature_loss or PRESET_FEATURE_LOSS
    named = _with_overrides(config, _preset_weights(config.preset, student, teacher))
    pairs = [  # temperature None: the loss's default (0.4 InfoNCE, 0.1 supcon)
        TapPair(taps[label][0], prefix + taps[label][1], loss, weight, None, label)
        for label, weight in named
    ]
    return pairs, _unscaled_output(config)
