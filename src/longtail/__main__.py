"""``python -m longtail`` (and ``torchrun -m longtail``) runs the CLI."""

from longtail.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
