"""Training: the dVAE, prior and CLIP trainers, optimizers and schedules, checkpoints, DeepSpeed."""
