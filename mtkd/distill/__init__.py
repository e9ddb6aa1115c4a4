"""Distillation: feature and output losses, connectors, and the Distiller that owns them."""

from mtkd.distill.connectors import Connector, check_alignable
from mtkd.distill.distiller import Distiller, DistillOutput
from mtkd.distill.spec import OutputTerm, TapPair

__all__ = ["Connector", "DistillOutput", "Distiller", "OutputTerm", "TapPair", "check_alignable"]
