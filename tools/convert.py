#!/usr/bin/env python
"""Thin wrapper: `python tools/convert.py ...` == `megabranch-convert ...` (the logic is megabranch/convert/)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megabranch.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
