"""Distillation: feature and output losses, connectors, and the Distiller that owns them."""

from mtkd.distill.connectors import Connector, ContrastConnector, check_alignable
from mtkd.distill.distiller import Distiller, DistillOutput
from mtkd.distill.spec import OutputTerm, TapPair

__all__ = [
    "Connector",
    "ContrastConnector",
    "DistillOutput",
    "Distiller",
    "OutputTerm",
    "TapPair",
    "check_alignable",
]
