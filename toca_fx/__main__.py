"""``python -m toca_fx``: the same command line as the ``toca-fx`` script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
