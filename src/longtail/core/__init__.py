"""Run-time and file plumbing shared by every stage: errors, atomic I/O, the run directory,
device and precision, torch.distributed helpers, progress bars and training checkpoints.

Nothing here imports any other part of longtail, so every package may import it.
"""
