"""Inference: exported models, the predictor, evaluation."""
