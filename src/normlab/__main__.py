"""``python -m normlab``: the command line (see :mod:`normlab.cli`)."""

import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while torch is still importing: no traceback
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(main())
