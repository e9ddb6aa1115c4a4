"""The annotate-then-distill loop's fine-tuning recipe: how a run after the loop's first version
differs from a fresh run (no Qt, no torch).

A loop run starts from its parent version's weights (``model.init_from``). A recipe may scale
down its learning rate and its epochs (at least :attr:`FineTuneRecipe.min_epochs`) and stop it
early after :attr:`FineTuneRecipe.patience` validation checks without a better Dice. The loop's
own recipe, :data:`FINE_TUNE`, keeps the panel's learning rate and schedule. Over 10 turns of
``bench/loop_turns`` that beat a tenth of the learning rate and a quarter of the epochs with
patience 3 at every turn: pinned test Dice 0.756 against 0.735 after the tenth turn, and 0.633
against 0.260 after the first, in one run (one seed, one case order). Each turn took about 6
times as long (BENCHMARKS.md). The anchor
(``distill.anchor``: the parent as a second, output-level teacher, see
:mod:`mtkd.distill.anchor`) keeps the new version near its parent on every training case; it is
off: over 10 turns of ``bench/loop_turns`` it was level with or behind the plain recipe, which
forgot nothing since every version trains on the old cases too (BENCHMARKS.md).

The connectors of feature-level terms start anew in every run: a model folder (what a loop
version is) keeps the student's weights only, and the recommended recipe
(:data:`mtkd.config.RECOMMENDED_PRESET`) has no connectors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from MTKDLib.train_config import TrainingOptions


@dataclass(frozen=True)
class FineTuneRecipe:
    """What a loop run changes in the panel's options (see the module docstring)."""

    lr_factor: float = 0.1  # times the panel's learning rate
    epochs_factor: float = 0.25  # times the panel's epochs, at least min_epochs
    min_epochs: int = 3
    patience: int | None = 3  # validation checks without a better Dice (None: no early stop)
    # the parent as a second teacher: off, measured not to help (BENCHMARKS.md, "The
    # annotate-then-distill loop, turn by turn")
    anchor: bool = False
    anchor_weight: float = 1.0
    anchor_temperature: float = 1.0

    def __post_init__(self) -> None:
        if not (0 < self.lr_factor <= 1 and 0 < self.epochs_factor <= 1):
            raise ValueError("the fine-tuning factors of learning rate and epochs are in (0, 1]")
        if self.min_epochs < 1 or (self.patience is not None and self.patience < 1):
            raise ValueError("fine-tuning needs at least one epoch and a patience of one check")
        if self.anchor_weight < 0 or self.anchor_temperature <= 0:
            raise ValueError("the anchor's weight is >= 0 and its temperature > 0")

    def epochs(self, epochs: int) -> int:
        """The epochs of a fine-tuning run where a fresh run trains ``epochs``."""
        return min(epochs, max(self.min_epochs, round(epochs * self.epochs_factor)))

    def apply(
        self, options: TrainingOptions, parent: str | Path, validation: bool = True
    ) -> TrainingOptions:
        """``options`` for fine-tuning from the model folder ``parent``: its weights to start
        from, the lower learning rate, the shorter schedule, early stopping where there are
        ``validation`` cases, and the anchor to ``parent`` when the recipe has it."""
        anchored = self.anchor and self.anchor_weight > 0
        return dataclasses.replace(
            options,
            init_from=str(parent),
            learning_rate=options.learning_rate * self.lr_factor,
            epochs=self.epochs(options.epochs),
            patience=self.patience if validation else None,
            anchor=str(parent) if anchored else None,
            anchor_weight=self.anchor_weight,
            anchor_temperature=self.anchor_temperature,
        )


# the loop's recipe: the parent's weights at the panel's learning rate and schedule, measured
# best (the class defaults are the shorter recipe it beat; bench/loop_turns's "plain")
FINE_TUNE = FineTuneRecipe(lr_factor=1.0, epochs_factor=1.0, patience=None)
