"""Stage 2: SAE architectures (one registry), the trainer, checkpoints, export and load."""
