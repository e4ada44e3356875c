"""`python -m megabranch.convert ...` == `megabranch-convert ...`."""

import sys

from .cli import main

sys.exit(main())
