"""``python -m sharpening.evaluate ...``: the same as ``sharpen evaluate ...``."""

from sharpening.evaluate import main

main()
