"""One training loop for teachers, plain students and distillation.

The loop is the same for all three; only the per-batch loss differs:

- teacher (``kind: train`` with ``multitask.reconstruction`` masked/unmasked): segmentation
  loss + weight x MSE of the reconstruction of the (masked) input;
- plain network (``kind: train``, reconstruction none): segmentation loss;
- distillation (``kind: distill``): segmentation loss + the Distiller's weighted terms (all
  weights at zero: exactly the plain recipe, the no-KD baseline). The teacher is a network or
  stored outputs (:mod:`mtkd.engine.teacher_source`), which travel with the batches.

What the loop trains is set up apart from it: the data (cases, split, unlabelled images,
fingerprint; :mod:`mtkd.engine.setup_data`), the teacher (:mod:`mtkd.engine.setup_teacher`) and
the networks (student, ``model.init_from``, distiller; :mod:`mtkd.engine.setup_models`).

Every epoch is reseeded from (seed, epoch), so a resumed run continues as if it had never
stopped; a stop mid-epoch replays the epoch's data order up to the step it had reached.

``model.init_from`` weights are validated once before the first epoch (``initial_val_dice`` in
the "initial_validation" event, the final metrics and ``lineage.previous``); a resumed run
takes its weights, that Dice and the lineage from its checkpoint.

Under ``torchrun`` (:mod:`mtkd.engine.distributed`) every process runs this loop on its shard
of each epoch's samples, the per-batch loss in DistributedDataParallel (student and connector
gradients all-reduced, the frozen teacher replicated); epoch terms and validation Dice are
reduced over the processes; only rank 0 writes the run folder. Batch sizes are per process.

Early stopping (``train.patience``): after that many validation checks without a better Dice
the run stops and exports its best model ("stopped_early" event); the count is checkpointed, and
resuming a run that stopped early trains no more.

One process writes a run folder at a time: it holds ``RUN/.mtkd.lock`` (:mod:`mtkd.folder_lock`).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from mtkd.config import PATH_KEYS, RunConfig
from mtkd.data.atomic import missing_folders, remove_if_empty
from mtkd.devices import autocast_for, resolve_device, seed_everything
from mtkd.engine.distributed import Distributed, shard_indices
from mtkd.engine.setup_data import build_run_data, raise_on_every_rank
from mtkd.engine.setup_models import build_run_models, model_metadata, run_lineage
from mtkd.engine.setup_optim import build_optimisation
from mtkd.engine.signals import StopRequest, stop_file
from mtkd.engine.validation import largest_part_choice, validation_scores
from mtkd.errors import MTKDError
from mtkd.folder_lock import FolderLock, FolderLocked
from mtkd.infer.inference import repeat_channels
from mtkd.modelfiles.checkpoint import load_checkpoint, save_checkpoint
from mtkd.modelfiles.model_io import export_model
from mtkd.run_folder import EventLog, RunDir

CHECKPOINT_FORMAT = 1
RANK_SEED_STRIDE = 1_000_003  # per-rank offset of the augmentation, dropout and mask seeds


class TrainingInterrupted(Exception):
    """Raised after a stop request once the checkpoint is saved."""


@dataclass
class RunResult:
    run_dir: Path
    epochs: int  # the epochs trained: train.epochs, or fewer when it stopped early
    best_metric: float
    best_epoch: int
    model_dir: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    # validation Dice of the model.init_from weights before the first epoch (None without)
    initial_val_dice: float | None = None


class Trainer:
    """Runs one configured training or distillation in a run folder."""

    def __init__(
        self,
        config: RunConfig,
        run_dir: str | Path,
        *,
        resume: bool = False,
        progress: bool | None = None,
        log=print,
    ):
        self.config = config.with_absolute_paths()  # the run no longer needs the working dir
        self.run_dir = RunDir(run_dir)
        self.resume = resume
        self.dist = Distributed.from_environment()
        main = self.dist.is_main
        self.progress = main and (sys.stderr.isatty() if progress is None else progress)
        self.log = log if main else _silent
        # SIGINT/SIGTERM or the file RUN/STOP ask to stop at the next safe point; rank 0
        # removes a stop file left from before
        self.stop = StopRequest(stop_file(self.run_dir.root), clear=main)
        self.device = self.dist.device(resolve_device(config.train.device))
        self.events = EventLog(self.run_dir.events, enabled=main)

    # ----------------------------------------------------------------- set-up
    def _prepare_data(self) -> None:
        """The run's data: cases, split, structures and training samples (``self.data``)."""
        self.data = build_run_data(
            self.config,
            self.run_dir,
            resume=self.resume,
            dist=self.dist,
            device=self.device,
            log=self.log,
            events=self.events,
        )

    def _prepare_model(self) -> None:
        """The run's networks (``self.models``), then the optimiser and the training step."""
        self.models = build_run_models(
            self.config, self.data, resume=self.resume, device=self.device, log=self.log
        )
        # a resumed run has the lineage and initial Dice of model.init_from in its checkpoint
        self.previous: dict[str, Any] | None = self.models.previous
        self.initial_val_dice: float | None = None
        self.optimizer, self.scheduler, self.scaler, self.step = build_optimisation(
            self.config, self.models, self.data.activation, self.device, self.dist.enabled
        )

    def _initial_validation(self) -> None:
        """Validate the previous model's weights once before the first epoch of a new run."""
        if self.previous is None or not self.data.split.val:
            return
        scores = self.validate()
        self.initial_val_dice = scores["val_dice"]
        self.previous["val_dice_on_this_run"] = self.initial_val_dice
        self.events.emit("status", state="initial_validation", **scores)
        self.log(
            f"[{self.config.name}] initial val_dice={self.initial_val_dice:.4f} "
            "(model.init_from, before training)"
        )

    # ------------------------------------------------------------- checkpoint
    def _state(self, epoch: int, step_in_epoch: int) -> dict[str, Any]:
        """What ``last.pt`` and ``best.pt`` hold: the weights, the optimiser and the loop's
        progress, and the model's metadata (a checkpoint opens as a model)."""
        distiller = self.models.distiller
        return {
            "format": CHECKPOINT_FORMAT,
            "kind": self.config.kind,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "model": self.models.network.state_dict(),
            "connectors": distiller.connectors.state_dict() if distiller else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "scaler": self.scaler.state_dict(),
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "stale_checks": self.stale_checks,
            "stopped_early": self.stopped_early,
            "history": self.history,
            "previous": self.previous,
            "initial_val_dice": self.initial_val_dice,
            "model_metadata": model_metadata(self.config, self.data, self.models, self._lineage()),
            "world_size": self.dist.world_size,
        }

    def _lineage(self) -> dict[str, Any]:
        return run_lineage(self.config, self.run_dir.root, self.models, self.previous)

    def _restore(self) -> tuple[int, int]:
        path = self.run_dir.last_checkpoint
        if not path.is_file():
            raise MTKDError(
                "cannot resume: no checkpoint (checkpoints/last.pt) in this run", self.run_dir.root
            )
        state = load_checkpoint(path)
        if state.get("kind") != self.config.kind:
            raise MTKDError("checkpoint belongs to a different kind of run", path=path)
        try:
            self.models.network.load_state_dict(state["model"])
            if self.models.distiller is not None:
                self.models.distiller.connectors.load_state_dict(state["connectors"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as error:
            raise MTKDError(
                f"checkpoint does not match this run's configuration ({error})", path
            ) from None
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.best_metric = float(state["best_metric"])
        self.best_epoch = int(state["best_epoch"])
        self.stale_checks = int(state.get("stale_checks", 0))
        self.stopped_early = state.get("stopped_early")
        self.history = list(state.get("history", []))
        self.previous = state.get("previous")
        self.initial_val_dice = state.get("initial_val_dice")
        epoch, step = int(state["epoch"]), int(state["step_in_epoch"])
        saved_by = int(state.get("world_size", 1))
        if step and saved_by != self.dist.world_size:
            self.log(
                f"warning: the checkpoint was saved in the middle of epoch {epoch + 1} by "
                f"{saved_by} process(es), this run has {self.dist.world_size}: that epoch's "
                "sample order differs, so it starts again from its beginning"
            )
            step = 0
        return epoch, step

    # ------------------------------------------------------------------ steps
    def _batch_loss(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator,
        teacher: torch.Tensor | None = None,
        *per_sample: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss and unweighted terms of one batch (see :class:`TrainingStep`; ``per_sample``:
        its has_label, subject and annotated), through DDP under torchrun."""
        return self.step(images, labels, generator, teacher, *per_sample)

    def _epoch_seed(self, epoch: int) -> int:
        """The seed of an epoch's sample order: the same on every rank."""
        return self.config.train.seed * 100_003 + epoch

    def _rank_seed(self, base: int) -> int:
        """A seed of this rank's own draws (augmentation, dropout, masks); ``base`` alone."""
        return base + RANK_SEED_STRIDE * self.dist.rank

    def _loader(self, epoch: int) -> tuple[DataLoader, list[int]]:
        """The epoch's loader over this rank's shard of the samples, and that shard."""
        seed = self._epoch_seed(epoch)
        self.data.train_set.reseed(self._rank_seed(seed))
        shard = shard_indices(len(self.data.train_set), seed, self.dist.rank, self.dist.world_size)
        batch = self.config.train.batch_size
        drop_last = self.config.train.drop_last and len(shard) >= batch
        loader = DataLoader(
            self.data.train_set,
            batch_size=min(batch, len(shard)),
            sampler=shard,
            drop_last=drop_last,
            generator=torch.Generator().manual_seed(self._rank_seed(seed)),
            num_workers=self.config.train.num_workers,
        )
        return loader, shard

    def _stop_agreed(self) -> bool:
        """Whether any process was asked to stop; called by every rank at the same step."""
        return self.dist.any(self.stop.requested, self.device)

    def _train_epoch(self, epoch: int, skip_steps: int) -> dict[str, float] | None:
        """One epoch; returns the mean terms over all processes and the number of samples
        seen ("samples"), or None when stopped (after saving a checkpoint)."""
        cfg = self.config.train
        seed_everything(self._rank_seed(self._epoch_seed(epoch)))
        mask_generator = torch.Generator(device=self.device).manual_seed(
            self._rank_seed(cfg.seed * 7919 + epoch)
        )
        loader, shard = self._loader(epoch)
        if self.dist.enabled:
            self.events.emit("shards", epoch=epoch + 1, samples=self.dist.gather(shard))
        self.step.train()
        sums: dict[str, float] = {}
        count = samples = 0
        batches = tqdm(
            loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=not self.progress
        )
        self.optimizer.zero_grad(set_to_none=True)
        for step, batch in enumerate(batches):
            if step < skip_steps:  # replaying the data order of an interrupted epoch
                if self.models.distiller is None and self.models.spec["reconstruction"] == "masked":
                    # and the mask draws of its steps, so that later masks are the same
                    self.models.network.mask_patches(batch["image"], generator=mask_generator)
                continue
            images = repeat_channels(batch["image"], self.data.prep.in_channels).to(self.device)
            labels = batch["label"].to(self.device)
            teacher = batch["teacher"].to(self.device) if "teacher" in batch else None
            per_sample = [batch[k].to(self.device) for k in ("has_label", "subject", "annotated")]
            boundary = (step + 1) % cfg.grad_accum == 0 or step + 1 == len(loader)
            with self._gradient_sync(boundary):
                with autocast_for(self.device, cfg.amp):
                    loss, terms = self._batch_loss(
                        images, labels, mask_generator, teacher, *per_sample
                    )
                if not torch.isfinite(loss):
                    raise MTKDError(
                        f"training diverged: loss is {loss.item()} at epoch {epoch + 1}"
                    )
                self.scaler.scale(loss / cfg.grad_accum).backward()
            if boundary:
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
            for key, value in {"loss": loss.detach(), **terms}.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            count += 1
            samples += len(images)
            if self.progress:
                batches.set_postfix(loss=f"{float(loss):.4f}")
            if boundary and step + 1 < len(loader) and self._stop_agreed():
                self._save_last(epoch, step + 1)
                return None
        totals = self.dist.sum({**sums, "_batches": count, "_samples": samples}, self.device)
        batches_total = max(totals.pop("_batches"), 1)
        samples_total = int(totals.pop("_samples"))
        return {
            **{key: value / batches_total for key, value in totals.items()},
            "samples": samples_total,
        }

    def _gradient_sync(self, boundary: bool):
        """DDP all-reduces the gradients at the accumulation boundary only."""
        if isinstance(self.step, DistributedDataParallel) and not boundary:
            return self.step.no_sync()
        return contextlib.nullcontext()

    def validate(self) -> dict[str, Any]:
        """Per-volume Dice on the validation cases (see :func:`validation_scores`)."""
        network, amp = self.models.network, self.config.train.amp
        return validation_scores(network, self.data, self.device, amp=amp, dist=self.dist)

    def _save_last(self, epoch: int, step_in_epoch: int) -> None:
        """Rank 0 writes ``last.pt``; the others wait until it is complete."""
        if self.dist.is_main:
            save_checkpoint(self._state(epoch, step_in_epoch), self.run_dir.last_checkpoint)
        self.dist.barrier()

    # -------------------------------------------------------------------- run
    def run(self) -> RunResult:
        """Train to the configured number of epochs; export the model; return the result.

        The run folder is locked for the whole run (rank 0 holds the lock; every rank stops if
        it cannot be taken): a second process on the same folder gets FolderLocked naming
        the holder, and writes nothing there."""
        created = missing_folders(self.run_dir.root)
        lock = FolderLock(self.run_dir.root, self._purpose()) if self.dist.is_main else None
        refused: FolderLocked | None = None
        if lock is not None:
            try:
                lock.acquire()
            except FolderLocked as error:
                if not self.dist.enabled:
                    raise
                refused = error
        try:
            return self._locked_run(refused)
        finally:
            if lock is not None:
                lock.release()
            remove_if_empty(created)  # the folders of a run refused at its start

    def _locked_run(self, refused: FolderLocked | None) -> RunResult:
        try:
            self.dist.start(self.device)
            others = "rank 0 could not lock the run folder"
            raise_on_every_rank(self.dist, self.device, refused, others, self.run_dir.root)
            with self.stop:
                return self._run()
        except (TrainingInterrupted, FolderLocked):
            raise
        except Exception as error:
            if self.run_dir.config.exists():  # a run that never started has no events file
                message = str(error) if isinstance(error, MTKDError) else repr_error(error)
                self.events.emit("error", message=message)
            raise
        finally:
            self.dist.stop()

    def _purpose(self) -> str:
        return f"mtkd {self.config.kind}{' --resume' if self.resume else ''}"

    def _run(self) -> RunResult:
        """Open the run folder, set the run up, train epoch by epoch (until the last, early
        stopping or a stop request) and export the model."""
        self._open_run_folder()
        start_epoch, skip_steps = self._prepare()
        epochs = self.config.train.epochs
        for epoch in range(start_epoch, start_epoch if self.stopped_early else epochs):
            self._train_and_validate(epoch, skip_steps if epoch == start_epoch else 0)
            if self.stopped_early:
                message = _stopped_message(self.stopped_early)
                self.events.emit(
                    "status", state="stopped_early", message=message, **self.stopped_early
                )
                self.log(f"[{self.config.name}] {message}")
                break
            if epoch + 1 < epochs and self._stop_agreed():
                self._interrupted(epoch + 1)
        return self._finish()

    def _open_run_folder(self) -> None:
        """Check a resumed run's configuration and the paths the run reads, create a new
        run's folder, and say the run is preparing."""
        cfg = self.config
        if self.resume:
            stored = self.run_dir.load_config()
            if stored.to_dict() != cfg.to_dict():
                raise MTKDError(
                    "the run's config.yaml differs from the configuration given", self.run_dir.root
                )
            if self.dist.is_main:
                for path in self.run_dir.remove_stale_temporaries():
                    self.log(f"removed {path.name}, left by a process that was killed")
        # a resumed run has the init_from weights in its checkpoint; only distillation uses
        # a teacher
        skip = {"model.init_from"} if self.resume else set()
        skip |= {key for key in PATH_KEYS if key.startswith("distill.") and cfg.kind != "distill"}
        needed = [key for key in PATH_KEYS if key not in skip]
        cfg.check_paths(needed, run_dir=self.run_dir.root)  # before a new run writes anything
        if not self.resume and self.dist.is_main:
            self.run_dir.create(cfg)
        self.dist.barrier()  # the folder exists before any other process uses it
        self.events.emit(
            "status",
            state="preparing",
            kind=cfg.kind,
            resume=self.resume,
            pid=os.getpid(),
            host=socket.gethostname(),
            argv=list(sys.argv),
        )

    def _prepare(self) -> tuple[int, int]:
        """Data, networks and optimiser; the loop's state (a resumed run's from its checkpoint);
        the initial validation of init_from weights. Returns the epoch and step to start at."""
        cfg = self.config
        seed_everything(cfg.train.seed)
        self._prepare_data()
        self.data.cache.warm(self.data.train_ids + self.data.unlabelled_ids + self.data.split.val)
        self._prepare_model()
        self.best_metric, self.best_epoch, self.history = -math.inf, 0, []
        # early stopping: validation checks since the best one; where and why the run stopped
        self.stale_checks, self.stopped_early = 0, None
        start_epoch, skip_steps = self._restore() if self.resume else (0, 0)
        if cfg.train.patience is not None and not self.data.split.val:
            raise MTKDError(
                "config key 'train.patience': early stopping needs validation cases, and this "
                "run's split has none",
                cfg.origin.file if cfg.origin else None,
            )
        if self.stopped_early:
            self.log(f"[{cfg.name}] {_stopped_message(self.stopped_early)}: nothing to train")
        if not self.resume:
            self._initial_validation()
        self.events.emit(
            "status",
            state="training",
            start_epoch=start_epoch,
            epochs=cfg.train.epochs,
            train_cases=len(self.data.train_ids),
            unlabelled_cases=len(self.data.unlabelled_ids),
            train_samples=len(self.data.train_set),
            val_cases=len(self.data.split.val),
            device=str(self.device),
            world_size=self.dist.world_size,
        )
        return start_epoch, skip_steps

    def _train_and_validate(self, epoch: int, skip_steps: int) -> None:
        """One epoch, its validation when due and its records (history, metrics event, log,
        ``last.pt``); sets ``stopped_early`` when the patience ran out."""
        cfg = self.config.train
        started = time.perf_counter()
        means = self._train_epoch(epoch, skip_steps)
        if means is None:
            self._interrupted(epoch)
        if self.scheduler is not None:
            self.scheduler.step()
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "epochs": cfg.epochs,
            "lr": self.optimizer.param_groups[0]["lr"],
            "seconds": round(time.perf_counter() - started, 3),
            **{key: round(value, 6) for key, value in means.items()},
        }
        last = epoch + 1 == cfg.epochs
        if self.data.split.val and ((epoch + 1) % cfg.val_every == 0 or last):
            record.update(self.validate())
            self._track_best(record["val_dice"], epoch + 1)
        if not last and cfg.patience is not None and self.stale_checks >= cfg.patience:
            self.stopped_early = {
                "epoch": epoch + 1,
                "best_epoch": self.best_epoch,
                "patience": cfg.patience,
            }
        self.history.append(record)
        self.events.emit("metrics", **record)
        self._print_epoch(record)
        self._save_last(epoch + 1, 0)

    def _track_best(self, val_dice: float, epoch: int) -> None:
        """Keep the best validation Dice (``best.pt``) and count the checks since it."""
        if val_dice > self.best_metric:
            self.best_metric, self.best_epoch = val_dice, epoch
            self.stale_checks = 0
            if self.dist.is_main:
                save_checkpoint(self._state(epoch, 0), self.run_dir.best_checkpoint)
        else:
            self.stale_checks += 1

    def _interrupted(self, epoch: int) -> NoReturn:
        """Record a stop request (after its checkpoint) and end the run."""
        self.events.emit("status", state="interrupted", epoch=epoch, signal=self.stop.signal_name)
        raise TrainingInterrupted(f"stopped by {self.stop.signal_name}; resume with --resume")

    def _print_epoch(self, record: dict[str, Any]) -> None:
        terms = " ".join(
            f"{k}={v:.4f}"
            for k, v in record.items()
            if k not in {"epoch", "epochs", "lr", "seconds"} and isinstance(v, float)
        )
        self.log(
            f"[{self.config.name}] epoch {record['epoch']}/{record['epochs']} {terms}"
            f" ({record['seconds']:.1f}s)"
        )

    def _finish(self) -> RunResult:
        if self.dist.is_main:
            self._export()
        self.dist.barrier()  # the model is complete before any process reports success
        stopped = self.stopped_early
        return RunResult(
            self.run_dir.root,
            stopped["epoch"] if stopped else self.config.train.epochs,
            self.best_metric,
            self.best_epoch,
            self.run_dir.model,
            self.history,
            self.initial_val_dice,
        )

    def _export(self) -> None:
        """Export the best (else the last) weights, the report and the chosen post-processing."""
        self.events.emit("status", state="exporting")
        best = self.run_dir.best_checkpoint
        if best.is_file() and self.best_epoch > 0:
            self.models.network.load_state_dict(load_checkpoint(best)["model"])
        metrics = {
            "best_val_dice": self.best_metric if self.best_epoch else None,
            "best_epoch": self.best_epoch,
            "initial_val_dice": self.initial_val_dice,
        }
        network, amp = self.models.network, self.config.train.amp
        export_model(
            network,
            self.run_dir.model,
            spec=self.models.spec,
            labels=self.data.labels,
            prep=self.data.prep,
            activation=self.data.activation,
            lineage=self._lineage(),
            metrics=metrics,
            name=self.config.name,
            postprocessing=largest_part_choice(network, self.data, self.device, amp=amp),
        )
        self.run_dir.write_json(self.run_dir.report / "history.json", self.history)
        self.events.emit(
            "done", model=str(self.run_dir.model), stopped_early=self.stopped_early, **metrics
        )


def _stopped_message(stopped: dict[str, Any]) -> str:
    """Why a run ended before its last epoch, in words (events and logs)."""
    return (
        f"stopped early at epoch {stopped['epoch']}, best epoch {stopped['best_epoch']} (no "
        f"better validation Dice in {stopped['patience']} validation checks: train.patience)"
    )


def repr_error(error: BaseException) -> str:
    """``Type: message`` for an unexpected error (events and logs)."""
    return f"{type(error).__name__}: {error}"


def _silent(*_args: Any, **_kwargs: Any) -> None:
    """The log of processes other than rank 0."""


def train_run(config: RunConfig, run_dir: str | Path, **options: Any) -> RunResult:
    """Run a configured training or distillation in ``run_dir`` (see :class:`Trainer`)."""
    return Trainer(config, run_dir, **options).run()


def resume_run(run_dir: str | Path, **options: Any) -> RunResult:
    """Continue the run in ``run_dir`` exactly where it stopped."""
    config = RunDir(run_dir).load_config()
    return Trainer(config, run_dir, resume=True, **options).run()


__all__ = ["RunResult", "Trainer", "TrainingInterrupted", "resume_run", "train_run"]
