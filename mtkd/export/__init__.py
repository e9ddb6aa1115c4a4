"""Exports of a trained model (TorchScript, ONNX, MONAI bundle), each verified numerically."""
