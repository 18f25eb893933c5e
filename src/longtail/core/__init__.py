"""Run-time and file plumbing shared by every stage: errors, atomic I/O, the run directory,
device and precision, torch.distributed helpers, progress bars and training checkpoints.

Besides itself it imports only :mod:`longtail.config` (``RunDir.config()`` reads a run's
``config.yaml``; config imports nothing but :mod:`longtail.core.errors`), so every package may
import it.
"""
