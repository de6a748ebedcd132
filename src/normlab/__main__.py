"""``python -m normlab``: the command line (see :mod:`normlab.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
