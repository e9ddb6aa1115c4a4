"""Taps: intermediate features of an unmodified network, reached by module name.

A tap is the output of a named submodule (``model.get_submodule(name)``),
recorded by a forward hook while the network runs. Networks stay unmodified,
so any ``torch.nn.Module`` (MONAI networks included) can be a teacher or a student.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

import torch
from torch import nn

from mtkd.errors import MTKDError


def resolve_module(model: nn.Module, name: str) -> nn.Module:
    """Return the submodule called ``name``; unknown names raise MTKDError with suggestions."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(name, names, n=5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise MTKDError(
            f"unknown tap '{name}' in {type(model).__name__}{hint} (`mtkd taps` lists them)"
        ) from None


def first_tensor(output: object) -> torch.Tensor | None:
    """The tensor a module produced: the output itself, or the first tensor of a tuple/list."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    return None


class FeatureRecorder:
    """Record the outputs of named submodules while the model runs.

    Use as a context manager; ``features[name]`` holds the latest output of each
    tap, a tensor of shape (B, C, *spatial)::

        with FeatureRecorder(model, ["enc2", "bottleneck"]) as rec:
            logits = model(x)
        rec.features["bottleneck"]  # (B, C, H', W')
    """

    def __init__(self, model: nn.Module, names: Iterable[str]):
        self.model = model
        self.names = list(dict.fromkeys(names))
        self.modules = {name: resolve_module(model, name) for name in self.names}
        self.features: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, name: str):
        def record(_module: nn.Module, _inputs: tuple, output: object) -> None:
            tensor = first_tensor(output)
            if tensor is None:
                raise MTKDError(f"tap '{name}' does not output a tensor ({type(output).__name__})")
            self.features[name] = tensor

        return record

    def __enter__(self) -> FeatureRecorder:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def clear(self) -> None:
        self.features.clear()

    def missing(self) -> list[str]:
        """Taps that did not fire during the last forward pass."""
        return [name for name in self.names if name not in self.features]


@torch.no_grad()
def list_taps(model: nn.Module, example: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    """Run ``example`` (B, C, *spatial) through ``model``; return (name, output shape) of every
    named submodule whose output is a tensor, in the order they ran."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []

    def hook(name: str):
        def record(_module: nn.Module, _inputs: tuple, output: object) -> None:
            tensor = first_tensor(output)
            if tensor is not None and name not in shapes:
                shapes[name] = tuple(tensor.shape)

        return record

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        model(example)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return list(shapes.items())
