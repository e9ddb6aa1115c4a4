"""MTKD: multi-task, multi-scale, contrastive knowledge distillation for CT segmentation."""

from mtkd.errors import MTKDError

__version__ = "0.1.0"
__all__ = ["MTKDError", "__version__"]
