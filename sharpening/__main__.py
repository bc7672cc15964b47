"""python -m sharpening -> the `sharpen` CLI."""

import sys

from sharpening.cli import console_main

sys.exit(console_main())
