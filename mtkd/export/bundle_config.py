"""The ``configs/inference.json`` of a bundle we write: our network as a ``network_def`` and a
plain MONAI inference loop over the NIfTI files of a folder.

MONAI networks are written with their ``monai.networks.nets`` class; the thesis U-Nets have
none, so their configs name ``mtkd.models.thesis_unet.ThesisUNet`` and need the mtkd package.
A multi-task teacher is written as its segmentation network (the reconstruction decoder is a
training aid). The config needs no pytorch-ignite.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from mtkd.data.preprocess import Preprocessing
from mtkd.errors import MTKDError
from mtkd.modelfiles.bundle import MONAI_REGISTERED
from mtkd.modelfiles.bundle_config import THESIS_TARGET
from mtkd.modelfiles.model_io import LoadedModel
from mtkd.models import MultiTaskNet, network_info
from mtkd.models.monai_nets import dynunet_strides, segresnet_blocks_up, unet_strides
from mtkd.models.thesis_unet import ThesisUNet

# --- the network definition ------------------------------------------------------------------


def _unet(p: dict[str, Any]) -> dict[str, Any]:
    keys = ("kernel_size", "up_kernel_size", "num_res_units", "act", "norm", "dropout")
    return {
        "channels": list(p["channels"]),
        "strides": list(unet_strides(p["channels"], p["strides"])),
        **{k: p[k] for k in keys},
    }


def _basic_unet(p: dict[str, Any]) -> dict[str, Any]:
    return {k: p[k] for k in ("features", "dropout", "upsample")}


def _segresnet(p: dict[str, Any]) -> dict[str, Any]:
    return {
        "init_filters": p["init_filters"],
        "blocks_down": list(p["blocks_down"]),
        "blocks_up": list(segresnet_blocks_up(p["blocks_down"], p["blocks_up"])),
        "dropout_prob": p["dropout_prob"],
        "upsample_mode": p["upsample_mode"],
    }


def _swinunetr(p: dict[str, Any]) -> dict[str, Any]:
    keys = ("feature_size", "depths", "num_heads", "drop_rate", "attn_drop_rate")
    return {k: p[k] for k in (*keys, "dropout_path_rate", "use_checkpoint", "use_v2")}


def _dynunet(p: dict[str, Any]) -> dict[str, Any]:
    strides = dynunet_strides(p["depth"], p["strides"])
    return {
        "kernel_size": [3] * len(strides) if p["kernel_size"] is None else p["kernel_size"],
        "strides": strides,
        "upsample_kernel_size": strides[1:]
        if p["upsample_kernel_size"] is None
        else p["upsample_kernel_size"],
        "filters": p["filters"],
        "dropout": p["dropout"],
        "res_block": p["res_block"],
    }


# Registered MONAI-backed networks -> the arguments of their monai.networks.nets class.
_MONAI_ARGUMENTS = {
    "unet": _unet,
    "basic_unet": _basic_unet,
    "segresnet": _segresnet,
    "swinunetr": _swinunetr,
    "dynunet": _dynunet,
}


def _thesis_arguments(network: ThesisUNet) -> dict[str, Any]:
    encoders = [network.get_submodule(f"enc{i}")[0] for i in range(1, network.levels + 1)]
    return {
        "in_channels": encoders[0].in_channels,
        "out_channels": network.head.out_channels,
        "channels": [conv.out_channels for conv in encoders],
        "bottleneck": network.bottleneck[0].out_channels,
        "convs_per_block": network.convs_per_block,
        "spatial_dims": network.spatial_dims,
    }


def segmentation_network(model: LoadedModel) -> tuple[nn.Module, dict[str, Any]]:
    """The network a bundle holds (a multi-task teacher's backbone) and its ``network_def``."""
    network = model.network
    kind = model.metadata.get("format", "pytorch")
    if isinstance(network, torch.jit.ScriptModule) or kind in ("torchscript", "onnx"):
        raise MTKDError(
            f"a MONAI bundle is written from a PyTorch model, not a {kind} export", model.folder
        )
    if isinstance(network, MultiTaskNet):
        network = network.backbone
    if kind == "monai_bundle":
        return network, dict(model.metadata["bundle"]["network_def"])
    if isinstance(network, ThesisUNet):
        return network, {"_target_": THESIS_TARGET, **_thesis_arguments(network)}
    spec = model.metadata.get("network") or {}
    name = spec.get("name")
    if name not in _MONAI_ARGUMENTS:
        raise MTKDError(f"network '{name}' has no MONAI class to write in a bundle", model.folder)
    params = network_info(name, **spec.get("params", {})).params
    shared = {k: params[k] for k in ("spatial_dims", "in_channels", "out_channels")}
    classes = {registered: monai for monai, registered in MONAI_REGISTERED.items()}
    arguments = {**shared, **_MONAI_ARGUMENTS[name](params)}
    definition = {"_target_": f"monai.networks.nets.{classes[name]}", **arguments}
    return network, json.loads(json.dumps(definition))


def segmentation_spec(model: LoadedModel) -> dict[str, Any]:
    """The network spec of :func:`segmentation_network`: no reconstruction decoder."""
    spec = dict(model.metadata.get("network") or {})
    for key in ("mask_ratio", "mask_patch", "recon_convs"):
        spec.pop(key, None)
    spec["reconstruction"] = "none"
    return spec


# --- the inference config --------------------------------------------------------------------


def _preprocessing(prep: Preprocessing) -> list[dict[str, Any]]:
    low, high = prep.hu_window
    steps: list[dict[str, Any]] = [
        {"_target_": "LoadImaged", "keys": "image"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {
            "_target_": "Orientationd",
            "keys": "image",
            "axcodes": "RAS",
            "labels": [["L", "R"], ["P", "A"], ["I", "S"]],
        },
    ]
    if prep.spacing is not None:
        steps.append(
            {
                "_target_": "Spacingd",
                "keys": "image",
                "pixdim": list(prep.spacing),
                "mode": "bilinear",
            }
        )
    steps.append(
        {
            "_target_": "ScaleIntensityRanged",
            "keys": "image",
            "a_min": low,
            "a_max": high,
            "b_min": 0.0,
            "b_max": 1.0,
            "clip": True,
        }
    )
    if prep.crop_foreground:
        steps.append(
            {
                "_target_": "CropForegroundd",
                "keys": "image",
                "source_key": "image",
                "margin": 2,
                "allow_smaller": True,
            }
        )
    if prep.dims == 2:
        size = [*prep.slice_size, -1]
        steps.append(
            {"_target_": "Resized", "keys": "image", "spatial_size": size, "mode": "bilinear"}
        )
    else:
        steps.append(
            {"_target_": "SpatialPadd", "keys": "image", "spatial_size": list(prep.patch_size)}
        )
    if prep.in_channels > 1:
        steps.append({"_target_": "RepeatChanneld", "keys": "image", "repeats": prep.in_channels})
    return steps


def inference_config(
    definition: dict[str, Any], prep: Preprocessing, activation: str, labels: int
) -> dict[str, Any]:
    """A MONAI inference config: NIfTI files of ``dataset_dir`` -> ``output_dir/*_seg.nii.gz``."""
    if prep.dims == 2:
        inferer = {
            "_target_": "SliceInferer",
            "spatial_dim": 2,
            "roi_size": list(prep.slice_size),
            "sw_batch_size": 16,
        }
    else:
        inferer = {
            "_target_": "SlidingWindowInferer",
            "roi_size": list(prep.patch_size),
            "sw_batch_size": 4,
            "overlap": 0.25,
        }
    if activation == "sigmoid":
        activate = {"_target_": "Activationsd", "keys": "pred", "sigmoid": True}
        discrete = {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5}
    else:
        activate = {"_target_": "Activationsd", "keys": "pred", "softmax": True}
        discrete = {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}
    one_case = "@inferer(item['image'][None].to(@device), @network)[0]"
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$os.path.join(@bundle_root, 'eval')",
        "dataset_dir": "$os.path.join(@bundle_root, 'data')",
        "datalist": "$sorted(glob.glob(os.path.join(@dataset_dir, '*.nii.gz')) + "
        "glob.glob(os.path.join(@dataset_dir, '*.nii')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": definition,
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": _preprocessing(prep)},
        "dataset_data": "$[{'image': path} for path in @datalist]",
        "dataset": {"_target_": "Dataset", "data": "@dataset_data", "transform": "@preprocessing"},
        "inferer": inferer,
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                activate,
                {
                    "_target_": "Invertd",
                    "keys": "pred",
                    "transform": "@preprocessing",
                    "orig_keys": "image",
                    "nearest_interp": False,
                    "to_tensor": True,
                },
                discrete,
                {
                    "_target_": "SaveImaged",
                    "keys": "pred",
                    "output_dir": "@output_dir",
                    "output_postfix": "seg",
                    "output_dtype": "$numpy.uint8" if labels < 256 else "$numpy.int16",
                    "resample": False,
                    "separate_folder": False,
                },
            ],
        },
        "checkpoint": "$torch.load(os.path.join(@bundle_root, 'models', 'model.pt'), "
        "map_location=@device, weights_only=True)",
        "initialize": [
            "$torch.set_grad_enabled(False)",
            "$@network.load_state_dict(@checkpoint)",
            "$@network.eval()",
        ],
        "run": [f"$[@postprocessing({{**item, 'pred': {one_case}}}).clear() for item in @dataset]"],
    }
