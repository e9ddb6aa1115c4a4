"""Turn a distillation config (a preset or explicit pairs) into the Distiller's terms.

Presets (``distill.preset``) pair taps of registered networks by scale:

- ``thesis``: E-E (encoder level 2), B-B (bottleneck), D-D (last decoder), as in the paper;
- ``all_scales``: every encoder level both networks have, matched from the shallowest
  (E1-E1 .. En-En, n the smaller encoder depth), plus B-B and D-D.

``distill.feature_loss`` replaces the presets' InfoNCE, ``distill.scale_weights`` their weights
by pair label (before ``distill.scale``; 0 drops the pair). A preset's pairs take the feature
loss's default temperature: 0.4 for InfoNCE (the paper), 0.1 for ``supcon`` (the supervised
voxel contrast); mse and cosine have none. ``distill.negatives`` sets the negatives of every
InfoNCE pair, a preset's or explicit.

Output presets (``OUTPUT_PRESETS``) are one output term, without tap pairs, at the settings its
authors published, so that a baseline can be named rather than re-typed:

- ``cwd_published``: channel-wise distillation (CWD) of the logits, T 4, weight 3;
- ``dist_published``: DIST, T 1, beta = gamma = 1, weight 1;
- ``hinton_published``: Hinton's KD per voxel (our ``pmd``: KL of softened outputs times T^2),
  T 1, weight 1.

The sources of each number are given beside ``OUTPUT_PRESETS``.
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
PAIR_PRESETS = ("thesis", "all_scales")
# One output term at its authors' published settings (no tap pairs); weights before
# distill.scale, next to the recipe's seg_weight.
OUTPUT_PRESETS: dict[str, OutputTerm] = {
    # CWD, Shu et al., "Channel-wise Knowledge Distillation for Dense Prediction", ICCV 2021:
    # on segmentation logits, temperature 4 and loss weight 3 (the authors' Cityscapes command,
    # irfanICMLL/TorchDistiller SemSeg-distill README: `exp_cwd.sh channel kl 3 4`, i.e. weight
    # 3, temperature 4). The loss: softmax over the spatial positions of each channel of z / T,
    # KL summed over positions, averaged over channels and images, times T^2 (their
    # CriterionCWD); ours is the same (mtkd.distill.losses.cwd).
    "cwd_published": OutputTerm(loss="cwd", weight=3.0, temperature=4.0),
    # DIST, Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022:
    # tau 1, beta = gamma = 1 (inter- and intra-class relation weights; the paper's setting,
    # and the defaults of DIST() in the authors' segmentation code, hunto/DIST_KD
    # segmentation/losses/dist_kd.py, with loss weight --lambda-kd 1). beta and gamma are
    # dist_loss's defaults (mtkd.distill.losses.dist.DIST_BETA / DIST_GAMMA).
    "dist_published": OutputTerm(loss="dist", weight=1.0, temperature=1.0),
    # Hinton et al., "Distilling the Knowledge in a Neural Network", 2015, applied per pixel as
    # the segmentation-KD benchmarks run it: CIRKD (Yang et al., CVPR 2022; winycg/CIRKD, whose
    # code DIST's segmentation code builds on) uses CriterionKD at temperature 1 with
    # --lambda-kd 1.0 in every published script. Hinton's paper fixes no single T for this
    # task; T 4 (the classification benchmarks', e.g. CRD, Tian et al. 2020) is what the
    # thesis' PMD already uses. Our ``pmd`` is this loss: per-voxel KL(teacher || student) of
    # softmax(z / T) over classes (sigmoid: the two-class case), averaged, times T^2.
    "hinton_published": OutputTerm(loss="pmd", weight=1.0, temperature=1.0),
}
PRESETS = PAIR_PRESETS + tuple(OUTPUT_PRESETS)
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
    if config.preset in OUTPUT_PRESETS:
        named = []
    elif config.preset is None:
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
    if config.preset in OUTPUT_PRESETS:
        _check_output_preset(config)
        return
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


def _check_output_preset(config: DistillConfig) -> None:
    """An output preset is its output term alone: no pairs to change, no output to replace."""
    term = OUTPUT_PRESETS[config.preset]
    for key in ("feature_loss", "scale_weights"):
        if getattr(config, key) is not None:
            raise MTKDError(
                f"distill.{key} changes a preset's tap pairs; preset '{config.preset}' has none "
                f"(it is the {term.loss} output term alone)"
            )
    if config.output is not None:
        raise MTKDError(
            f"distill.output replaces a preset's output term; preset '{config.preset}' is that "
            f"term at its published settings ({term.loss}, weight {term.weight}, temperature "
            f"{term.temperature}): give either the preset or distill.output"
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
    if config.preset in OUTPUT_PRESETS:
        term = OUTPUT_PRESETS[config.preset]
        return OutputTerm(term.loss, term.weight, term.temperature)
    if config.preset is not None:
        return OutputTerm(THESIS_OUTPUT.loss, THESIS_OUTPUT.weight, THESIS_OUTPUT.temperature)
    return None


def _unscaled_terms(
    config: DistillConfig, student: dict[str, Any], teacher: dict[str, Any]
) -> tuple[list[TapPair], OutputTerm | None]:
    _check_preset(config)
    if config.preset is None:
        pairs = [
            TapPair(
                p.student,
                p.teacher,
                p.loss,
                p.weight,
                p.temperature,
                p.name,
                _negatives(config, p.loss),
            )
            for p in config.pairs
        ]
        return pairs, _unscaled_output(config)
    if config.preset in OUTPUT_PRESETS:
        return [], _unscaled_output(config)
    prefix = "backbone." if teacher.get("reconstruction", "none") != "none" else ""
    if config.preset == "thesis":
        student_taps = scale_taps(student["name"], student.get("params"))
        teacher_taps = scale_taps(teacher["name"], teacher.get("params"))
        taps = {label: (student_taps[label], teacher_taps[label]) for label in student_taps}
    else:
        taps = all_scale_taps(student, teacher)
    loss = config.feature_loss or PRESET_FEATURE_LOSS
    named = _with_overrides(config, _preset_weights(config.preset, student, teacher))
    negatives = _negatives(config, loss)
    pairs = [  # temperature None: the loss's default (0.4 InfoNCE, 0.1 supcon)
        TapPair(taps[label][0], prefix + taps[label][1], loss, weight, None, label, negatives)
        for label, weight in named
    ]
    return pairs, _unscaled_output(config)


def _negatives(config: DistillConfig, loss: str) -> str:
    """``distill.negatives`` for an InfoNCE pair; the other losses have no negatives to pick."""
    return config.negatives if loss == "infonce" else "batch"
