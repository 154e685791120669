"""python -m pycsm.server: the same as `pycsm serve`."""

import sys

from .cli import main

sys.exit(main())
