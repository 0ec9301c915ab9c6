"""Evaluation: zero-shot attribute accuracy, FID with Inception, dVAE reconstruction metrics."""
