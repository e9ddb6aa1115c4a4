"""Segment CT images with a loaded model, on the input's exact grid.

Preprocessing and its inverse run as plain torch ops on the predictor's device
(:mod:`mtkd.infer.model_input`, :mod:`mtkd.infer.grid_mapping`); the network runs on the whole
volume, in sliding windows or in slice batches as the free memory allows
(:mod:`mtkd.infer.memory`). All three run in slabs along z, one after the other: the network
input of a slab is made from the image when the network needs it, and its probabilities are
mapped onto the input grid and turned into labels as soon as they are complete, so a very
large volume is segmented within the memory bound stated in :mod:`mtkd.infer.memory`, with the
same result as in one piece.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from mtkd.data.preprocess import build_transforms, invert_to_original, to_metatensor, to_sitk
from mtkd.errors import MTKDError
from mtkd.infer.fallback import (
    FallbackStep,
    InferenceFallbackWarning,
    fallback_steps,
    is_out_of_memory,
)
from mtkd.infer.inference import predict_in_slabs, predict_planned, probabilities_to_labels
from mtkd.infer.memory import (
    CPU_SLICE_BATCH_BYTES,
    InferencePlan,
    PeakMemory,
    activation_bytes_per_voxel,
    configure_cpu_threads,
    free_memory_bytes,
    has_extent_dependent_norm,
    plan_inference,
    slab_bytes_for,
)
from mtkd.infer.model_grid import NotSeparableError
from mtkd.infer.model_input import ModelInput
from mtkd.infer.postprocess import PostProcessing
from mtkd.infer.stages import stage
from mtkd.infer.transfers import to_host
from mtkd.modelfiles.model_io import LoadedModel

Result = TypeVar("Result")


def describe_step(step: FallbackStep) -> str:
    """The plan in words, with the out-of-memory fallback that led to it, if any."""
    text = step.plan.describe()
    if step.device.type == "cpu" and step.reason:
        return f"{text} on the CPU (after running out of memory)"
    if step.reason:
        where = ", output in CPU memory" if step.out_device else ""
        return f"{text} (after running out of memory{where})"
    return text


@dataclass
class Prediction:
    """A label map on the input image's grid (values 1..K as in ``model.labels``), the
    seconds it took, the peak memory above the starting level (bytes; GPU memory on CUDA,
    resident memory on the CPU) and the inference plan in words."""

    labelmap: sitk.Image
    seconds: float
    peak_memory_bytes: int = 0
    plan: str = ""


def check_network_input(model: LoadedModel) -> None:
    """MTKDError naming the model folder when the network's first convolution does not take
    ``prep.in_channels`` channels or is not ``prep.dims``-D (for ``nn.Module`` networks)."""
    network = model.network
    if not isinstance(network, nn.Module) or isinstance(network, torch.jit.ScriptModule):
        return
    conv = next((m for m in network.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if conv is None:
        return
    prep = model.prep
    if conv.in_channels != prep.in_channels:
        raise MTKDError(
            f"the network's first convolution takes {conv.in_channels} input channels, but "
            f"the model's preprocessing gives {prep.in_channels}",
            path=model.folder,
        )
    dims = len(conv.kernel_size)
    if dims != prep.dims:
        raise MTKDError(
            f"the network is {dims}-D (its first convolution) but the model's preprocessing "
            f"is for a {prep.dims}-D network",
            path=model.folder,
        )


class Predictor:
    """Keeps one model loaded and segments any number of images with it.

    ``amp``: bf16 (or fp16) autocast on CUDA. The memory budget is ``memory_budget_bytes``
    when given, else ``memory_fraction`` of the device's free memory at each prediction.
    Images are preprocessed, predicted and mapped back in slabs of ``slab_bytes`` of float32
    (default from the budget: :func:`mtkd.infer.memory.slab_bytes_for`); the labels do not
    depend on it. The memory one prediction holds is bounded as :mod:`mtkd.infer.memory`
    states (:func:`mtkd.infer.memory.segmentation_memory_bound`). ``postprocessing``
    (:class:`mtkd.infer.postprocess.PostProcessing`) cleans each label map, within the
    prediction's time.
    """

    def __init__(
        self,
        model: LoadedModel,
        device: torch.device | str = "cpu",
        *,
        amp: bool = True,
        memory_fraction: float = 0.5,
        memory_budget_bytes: int | None = None,
        slab_bytes: int | None = None,
        postprocessing: PostProcessing | None = None,
    ):
        self.model = model
        self.postprocessing = postprocessing
        self.device = torch.device(device)
        self.amp = amp
        self.memory_fraction = memory_fraction
        self.memory_budget_bytes = memory_budget_bytes
        self.slab_bytes = slab_bytes
        network = model.network
        if hasattr(network, "to"):
            network.to(self.device)
        if hasattr(network, "eval"):
            network.eval()
        check_network_input(model)
        # instance/group norm: whole-volume passes would change the output, so windows only
        self.extent_dependent = has_extent_dependent_norm(network, model.metadata.get("network"))
        if self.device.type == "cpu":
            configure_cpu_threads()
        self._transforms = None  # MONAI transforms, only for sheared voxel grids

    def budget_bytes(self) -> int:
        """Memory the next prediction may use."""
        if self.memory_budget_bytes is not None:
            return int(self.memory_budget_bytes)
        return int(self.memory_fraction * free_memory_bytes(self.device))

    def plan(self, volume_shape: tuple[int, ...], budget: int | None = None) -> InferencePlan:
        """The plan for a preprocessed volume of spatial shape (X, Y, Z)."""
        model = self.model
        per_voxel = activation_bytes_per_voxel(
            model.network,
            model.prep.in_channels,
            model.prep.dims,
            model.size_multiple,
            self.device,
            self.amp,
        )
        budget = self.budget_bytes() if budget is None else budget
        cache = CPU_SLICE_BATCH_BYTES if self.device.type == "cpu" else None
        plan = plan_inference(
            volume_shape,
            model.prep,
            per_voxel,
            budget,
            model.size_multiple,
            cache,
            extent_dependent=self.extent_dependent,
        )
        return dataclasses.replace(plan, slab_bytes=self._slab_bytes(budget))

    def _slab_bytes(self, budget: int) -> int:
        """Bytes of float32 per slab: ``slab_bytes``, else from the budget."""
        return slab_bytes_for(budget) if self.slab_bytes is None else int(self.slab_bytes)

    def predict(self, image: sitk.Image) -> Prediction:
        """Segment a CT (any size, spacing and orientation) -> label map on its grid."""
        started = time.perf_counter()
        with PeakMemory(self.device) as peak, torch.inference_mode():
            labels, plan = self._segment(image)
        if self.postprocessing:  # on the input's grid: volumes in the image's millimetres
            with stage("post-processing"):
                spacing = image.GetSpacing()
                labels = self.postprocessing.apply_within(labels, spacing, self.budget_bytes)
        with stage("device to host"):
            labels = to_host(labels)
        with stage("to SimpleITK"):
            labelmap = to_sitk(labels, image)
        return Prediction(labelmap, time.perf_counter() - started, peak.peak_bytes, plan)

    def _segment(self, image: sitk.Image) -> tuple[np.ndarray | torch.Tensor, str]:
        """Label array (X, Y, Z) on ``image``'s grid (a tensor on a GPU that made it, so that
        post-processing runs there too), and the plan in words."""
        budget = self.budget_bytes()
        try:
            inputs = ModelInput(image, self.model.prep, self.device, self._slab_bytes(budget))
        except NotSeparableError:
            return self._segment_with_monai(image, budget)
        plan = self.plan(inputs.mapping.model_size, budget)
        labels, used = self._with_fallback(plan, lambda step: self._labels_in_slabs(inputs, step))
        return labels, describe_step(used)

    @property
    def out_channels(self) -> int:
        """Channels of the network's probabilities: one for sigmoid, else labels + 1."""
        model = self.model
        return 1 if model.activation == "sigmoid" else len(model.labels) + 1

    def _with_fallback(
        self, plan: InferencePlan, attempt: Callable[[FallbackStep], Result]
    ) -> tuple[Result, FallbackStep]:
        """``attempt(step)``'s result and the step that gave it: ``plan``, or a fallback after
        running out of memory (:mod:`mtkd.infer.fallback`, each announced by an
        ``InferenceFallbackWarning``)."""
        model = self.model
        error: BaseException | None = None
        for step in fallback_steps(plan, model.prep, self.device):
            if step.reason:
                warnings.warn(step.reason, InferenceFallbackWarning, stacklevel=4)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
            moved = step.device != self.device and hasattr(model.network, "to")
            try:
                if moved:
                    model.network.to(step.device)
                return attempt(step), step
            except Exception as caught:  # noqa: BLE001 - only out-of-memory is retried
                if not is_out_of_memory(caught):
                    raise
                error = caught
            finally:
                if moved:
                    model.network.to(self.device)
        raise MTKDError(
            f"out of memory even with one window or slice per batch on the CPU ({error})"
        )

    def _labels_in_slabs(self, inputs: ModelInput, step: FallbackStep) -> np.ndarray | torch.Tensor:
        """Label array (X, Y, Z) on the input grid: network input, probabilities and labels
        slab by slab along z (:func:`predict_in_slabs` feeding ``GridMapping.to_original``),
        the probabilities on ``step.out_device`` (default: where the network runs), the labels
        there too where that is a GPU, else a NumPy array."""
        model = self.model
        mapping = inputs.mapping
        slabs = predict_in_slabs(
            model.network,
            inputs.slab,
            mapping.model_size,
            model.prep,
            model.activation,
            step.device,
            step.plan,
            amp=self.amp,
            size_multiple=model.size_multiple,
            out_device=step.out_device,
            channels=self.out_channels,
        )
        where = step.out_device or step.device  # where the probabilities, hence labels, are
        return mapping.to_original(
            slabs,
            model.activation,
            len(model.labels),
            chunk_bytes=step.plan.slab_bytes,
            device=where if where.type != "cpu" else None,
        )

    def _segment_with_monai(self, image: sitk.Image, budget: int) -> tuple[np.ndarray, str]:
        """The MONAI transforms and their inverse, for images the torch path cannot map."""
        model = self.model
        if self._transforms is None:
            self._transforms = build_transforms(model.prep, with_label=False)
        preprocessed = self._transforms({"image": to_metatensor(image)})["image"]
        plan = self.plan(tuple(preprocessed.shape[1:]), budget)
        volume = preprocessed.as_tensor().to(self.device)
        out_bytes = 4 * self.out_channels * volume[0].numel()
        default_out = self.device if out_bytes <= budget // 2 else torch.device("cpu")

        def attempt(step: FallbackStep) -> torch.Tensor:
            return predict_planned(
                model.network,
                volume.to(step.device),
                model.prep,
                model.activation,
                step.device,
                step.plan,
                amp=self.amp,
                size_multiple=model.size_multiple,
                out_device=step.out_device or default_out,
            )

        probabilities, used = self._with_fallback(plan, attempt)
        back = invert_to_original(
            probabilities.cpu(), preprocessed, self._transforms, nearest=False
        )
        labels = probabilities_to_labels(back, model.activation)
        dtype = torch.uint8 if len(model.labels) < 256 else torch.int16
        return labels.to(dtype).numpy(), f"{describe_step(used)} (MONAI resampling)"
