"""Stage 1: representation learning (loop, schedules, losses, SWA, SWAG, checkpoints)."""
