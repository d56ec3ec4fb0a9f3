"""The training recipe, losses, optimisers, health, checkpoints, distributed, telemetry."""
