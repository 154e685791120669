"""`python -m pycsm`: the same as the `pycsm` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
