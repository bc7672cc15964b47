"""Re-exports ``sharpening.engines.race`` at its former import path."""

from sharpening.engines.race import (  # noqa: F401 (re-export; removed in the final import pass)
    negative_exponentials,
    race,
    race_by_prompt,
    random_bits,
)
