"""``python -m skstego``: the command line (see :mod:`skstego.cli`)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
