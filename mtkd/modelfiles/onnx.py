"""Open an ONNX model: our export folder, or a lone ``.onnx`` file, run by onnxruntime.

The metadata comes from the export folder's ``mtkd_model.json`` (whose SHA-256 must match
the file), else from the file's metadata_props entry ``mtkd_model`` (our exporter writes it),
else from a sidecar ``<file>.json``. The network is an :class:`OnnxNetwork`, a callable that
predictor code can treat like a module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mtkd.errors import MTKDError, error_summary
from mtkd.modelfiles.model_io import LoadedModel, sha256_of
from mtkd.modelfiles.torchscript import (
    checked_export_files,
    export_folder,
    loaded_model,
    missing_metadata_error,
    parse_embedded,
    read_json_file,
    sidecar,
)

METADATA_PROP = "mtkd_model"


def providers_for(device: str | torch.device) -> list[str]:
    """onnxruntime execution providers for ``device``: CUDA first when asked and available."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    providers = ["CPUExecutionProvider"]
    if torch.device(device).type == "cuda" and "CUDAExecutionProvider" in available:
        providers.insert(0, "CUDAExecutionProvider")
    return providers


def open_session(path: Path, device: str | torch.device = "cpu") -> Any:
    """An onnxruntime InferenceSession of ``path``; MTKDError naming it if it cannot load."""
    import onnxruntime

    try:
        return onnxruntime.InferenceSession(str(path), providers=providers_for(device))
    except Exception as error:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise MTKDError(
            f"not a loadable ONNX model (corrupt or truncated?): {error_summary(error)}", path
        ) from None


class OnnxNetwork:
    """An onnxruntime session as a segmentation network.

    ``network(x)`` maps x (B, C_in, *S) to float32 logits (B, C_out, *S) on x's device;
    ``eval()``, ``train(False)`` and ``to()`` return the network unchanged (the session's
    providers are chosen when it is opened).
    """

    def __init__(self, session: Any, path: Path):
        self.session = session
        self.path = path
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1 or not outputs:
            raise MTKDError(
                f"an ONNX segmentation model needs one input and an output, this one has "
                f"{len(inputs)} inputs and {len(outputs)} outputs",
                path,
            )
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        (logits,) = self.session.run([self.output_name], {self.input_name: array})
        return torch.from_numpy(logits).float().to(x.device)

    forward = __call__

    def eval(self) -> OnnxNetwork:
        return self

    def train(self, mode: bool = True) -> OnnxNetwork:
        if mode:
            raise MTKDError("an ONNX model cannot be trained", self.path)
        return self

    def to(self, *args: Any, **kwargs: Any) -> OnnxNetwork:
        return self

    def parameters(self):
        return iter(())


def load_onnx(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Open our ONNX export folder, or a lone ``.onnx`` file, for inference on ``device``."""
    path = Path(path)
    if not path.exists():
        raise MTKDError("model not found", path)
    folder = export_folder(path)
    if folder is not None:
        metadata, weights = checked_export_files(folder, "onnx")
        session = open_session(weights, device)
    else:
        folder, weights = path.parent, path
        session = open_session(path, device)
        embedded = session.get_modelmeta().custom_metadata_map.get(METADATA_PROP)
        if embedded:
            metadata = parse_embedded(embedded, path)
        elif sidecar(path).is_file():
            metadata = read_json_file(sidecar(path))
        else:
            raise missing_metadata_error(path, "ONNX")
        metadata["weights_sha256"] = sha256_of(path)
    return loaded_model(OnnxNetwork(session, weights), metadata, folder, weights)
