"""python -m sharpening -> the `sharpen` CLI."""

from sharpening.cli import main

main()
