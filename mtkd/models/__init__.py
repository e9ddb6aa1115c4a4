"""Networks: the thesis U-Nets, MONAI networks by name, the multi-task teacher, and taps."""

from __future__ import annotations

from mtkd.models.monai_nets import TapLayout
from mtkd.models.multitask import (
    RECONSTRUCTION_MODES,
    MultiTaskNet,
    ReconstructionDecoder,
    TapGeometry,
    mask_patches,
    probe_taps,
)
from mtkd.models.registry import (
    NetworkInfo,
    available_networks,
    build_network,
    build_teacher,
    count_parameters,
    network_info,
    register_network,
)
from mtkd.models.taps import FeatureRecorder, list_taps, resolve_module
from mtkd.models.thesis_unet import ThesisUNet, thesis_s1, thesis_s2, thesis_t1_backbone

__all__ = [
    "RECONSTRUCTION_MODES",
    "FeatureRecorder",
    "MultiTaskNet",
    "NetworkInfo",
    "ReconstructionDecoder",
    "TapGeometry",
    "TapLayout",
    "ThesisUNet",
    "available_networks",
    "build_network",
    "build_teacher",
    "count_parameters",
    "list_taps",
    "mask_patches",
    "network_info",
    "probe_taps",
    "register_network",
    "resolve_module",
    "thesis_s1",
    "thesis_s2",
    "thesis_t1_backbone",
]
