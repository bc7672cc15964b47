"""Prompt data files: where a dataset lives (a local file or folder, or the hub), reading its rows, and the
checks of the rows themselves (UTF-8, readable, the named columns present and holding text, non-empty
prompts). Every problem is a ConfigError that names ``--data.*`` as typed, raised before weights load.

The module is named for data files rather than ``datasets``, the third-party package it reads them with.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from lightning.pytorch.utilities import rank_zero_warn

from sharpening.errors import ConfigError, raise_if_problems

if TYPE_CHECKING:
    import datasets

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _local_format(path: str) -> str | None:
    return LOCAL_FORMATS.get(os.path.splitext(path)[1].lower())


def validate_dataset_source(dataset: str, option: str = "--data.dataset") -> list[str]:
    """Problems with a dataset name/path that can be seen without reading it."""
    if not dataset:
        return [f"{option} is empty: give a local .jsonl/.json/.csv/.parquet file or a hub dataset name"]
    if _local_format(dataset) or dataset.startswith((".", "/", "~")):
        path = os.path.expanduser(dataset)
        if not os.path.exists(path):
            parent = os.path.dirname(path) or "."
            near = sorted(os.listdir(parent))[:8] if os.path.isdir(parent) else "no such directory"
            return [f"{option}={dataset!r}: file not found (in {parent!r}: {near})"]
        if os.path.isfile(path) and not _local_format(path):
            return [f"{option}={dataset!r}: unknown file type; use .jsonl, .json, .csv or .parquet"]
    directory = os.path.expanduser(dataset)
    if os.path.isdir(directory) and not _data_files_in(directory):
        found = sorted(os.listdir(directory))[:8]
        return [
            f"{option}={dataset!r} is a directory with no .jsonl/.json/.csv/.parquet file in it or one folder down "
            f"(found: {found}); name the prompt file itself, e.g. {option}={os.path.join(dataset, 'train.jsonl')}"
        ]
    return []


def not_utf8_problem(path: str) -> str | None:
    """Where a local text data file stops being UTF-8 (the line and the byte), or None. ``datasets`` reads it
    as UTF-8 and fails on the first such row with a bare UnicodeDecodeError. Parquet is binary: not read."""
    import codecs

    if _local_format(path) not in ("json", "csv"):
        return None
    decoder, line = codecs.getincrementaldecoder("utf-8")(), 1
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                at = line + chunk[: max(err.start, 0)].count(b"\n")
                return f"is not UTF-8 text (byte {chunk[err.start : err.start + 1].hex() or '?'} on line {at})"
            line += chunk.count(b"\n")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return f"is not UTF-8 text (it ends inside a character, on line {line})"
    return None


def dataset_utf8_problem(dataset: str) -> str | None:
    """The first of the dataset's local text files (the file, or those of its folder) that is not UTF-8, as a
    problem with the fix; None for UTF-8 files and for hub names."""
    path = os.path.expanduser(dataset)
    for file in [path] if os.path.isfile(path) else _data_files_in(path) if os.path.isdir(path) else []:
        if problem := not_utf8_problem(file):
            where = f"--data.dataset={dataset!r}" + ("" if file == path else f": {file!r}")
            return f"{where} {problem}; save it as UTF-8 (e.g. iconv -f ITS_ENCODING -t utf-8 FILE > NEW)"
    return None


def _data_files_in(directory: str) -> list[str]:
    """Data files ``datasets`` would read from a local dataset directory (its top level or one folder down)."""
    import glob

    candidates = glob.glob(os.path.join(directory, "*")) + glob.glob(os.path.join(directory, "*", "*"))
    return [f for f in candidates if os.path.isfile(f) and _local_format(f)]


def load_prompt_rows(dataset: str, split: str = "train", subset: str | None = None) -> datasets.Dataset:
    """A ``datasets.Dataset`` from a local file (json/jsonl/csv/parquet) or a hub dataset."""
    import datasets

    path = os.path.expanduser(dataset)
    if os.path.isfile(path) and _local_format(path) == "csv":
        return datasets.load_dataset("csv", data_files=path, split="train", **_csv_as_text(path))
    if os.path.isfile(path):
        return datasets.load_dataset(_local_format(path), data_files=path, split="train")
    return datasets.load_dataset(dataset, subset, split=split)


def _csv_as_text(path: str) -> dict:
    """CSV cells read as the text they are: an answer ``0012`` stays ``"0012"`` (not the number 12) and
    ``None`` / ``NA`` stay words; only an empty cell is missing. The column names are pandas' own (the parser
    datasets uses), so a byte-order mark, an unnamed or a repeated column reads as pandas names it."""
    import datasets
    import pandas as pd

    header = list(pd.read_csv(path, nrows=0, encoding="utf-8").columns)
    features = datasets.Features({column: datasets.Value("string") for column in header}) if header else None
    return {"features": features, "keep_default_na": False, "na_values": [""]}


def read_prompt_rows(dataset: str, split: str, subset: str | None) -> datasets.Dataset:
    """``load_prompt_rows``, with what ``datasets`` raises for an empty, malformed, missing or unreachable
    dataset turned into a ConfigError that names ``--data.dataset`` and the parser's own message."""
    from datasets.exceptions import DatasetGenerationError

    try:
        return load_prompt_rows(dataset, split, subset)
    except (StopIteration, ValueError, DatasetGenerationError) as err:  # "no rows" / unreadable / malformed
        cause = err
        while isinstance(cause, DatasetGenerationError) and cause.__cause__ is not None:
            cause = cause.__cause__  # the parser's own message (e.g. a bad JSON line), not the wrapper's
        detail = f"{type(cause).__name__}: {str(cause).strip()[:300]}" if str(cause).strip() else type(cause).__name__
        raise ConfigError(
            [
                f"--data.dataset={dataset!r}: no rows could be read ({detail}); "
                "the file must hold one row per prompt with a prompt column (JSON Lines: one JSON object a line)"
            ]
        ) from err
    except OSError as err:  # datasets' "not found" and "couldn't reach the hub" (offline, not cached)
        raise ConfigError([
            f"--data.dataset={dataset!r}: cannot be read ({type(err).__name__}: {str(err)[:200]}); "
            "give a local .jsonl/.json/.csv/.parquet file, or a hub dataset name that exists (with "
            "HF_HUB_OFFLINE set: one already in the local cache)"
        ]) from err  # fmt: skip


def _shown_rows(numbers: list[int]) -> str:
    """The first row numbers of a problem, for its message.

    >>> _shown_rows([0, 3]), _shown_rows(list(range(10)))
    ('rows [0, 3], counting from 0', 'rows [0, 1, 2, 3, 4, 5, 6, 7] ..., counting from 0')
    """
    return f"rows {numbers[:8]}{' ...' if len(numbers) > 8 else ''}, counting from 0"


def column_problems(rows: datasets.Dataset, dataset: str, columns: dict[str, str | None]) -> list[str]:
    """The named columns (``{option: column}``, e.g. ``{"prompt_column": "prompt"}``; None: unused) missing
    from ``rows``, and a dataset without rows."""
    problems = [
        f"--data.{option}={column!r}: no such column in {dataset!r}; found {rows.column_names}"
        for option, column in columns.items()
        if column is not None and column not in rows.column_names
    ]
    if len(rows) == 0:
        problems.append(f"--data.dataset={dataset!r}: the dataset has no rows")
    return problems


def value_problems(rows: list[dict], dataset: str, columns: dict[str, str | None]) -> list[str]:
    """Rows whose named column (``{option: column}``) holds no value, or a list or dict instead of text."""
    problems = []
    for option, column in columns.items():
        empty = [i for i, r in enumerate(rows) if column is not None and r[column] is None]  # "" is a value
        if empty:
            problems.append(
                f"--data.{option}={column!r}: {len(empty)} row(s) of {dataset!r} have no value there "
                f"({_shown_rows(empty)}); fill or drop them"
                + (", or set --data.answer_column null to go without answers" if option == "answer_column" else "")
            )
        nested = [i for i, r in enumerate(rows) if column is not None and isinstance(r[column], (list, dict))]
        if nested:  # the template would write its Python repr ("['a', 'b']") into the prompt, or the answer
            problems.append(
                f"--data.{option}={column!r}: {len(nested)} row(s) of {dataset!r} hold a "
                f"{type(rows[nested[0]][column]).__name__}, not text ({_shown_rows(nested)}); name a column of "
                "text, or give one value per row (a JSON file of columns is read as one row: write JSON Lines, one "
                "object per row)"
            )
    return problems


def empty_prompt_rows(rows: list[dict], column: str) -> list[int]:
    """Numbers of the rows whose ``column`` is text that is empty or only whitespace.

    >>> empty_prompt_rows([{"p": "ab="}, {"p": "  "}, {"p": ""}, {"p": 7}], "p")
    [1, 2]
    """
    return [i for i, row in enumerate(rows) if isinstance(row[column], str) and not row[column].strip()]


def rows_with_a_prompt(rows: list[dict], dataset: str, prompt_column: str) -> list[int]:
    """Numbers of the rows whose prompt is not empty or whitespace (the others are skipped with a warning);
    none at all is an error, as no sample could be drawn."""
    empty = empty_prompt_rows(rows, prompt_column)
    if len(empty) == len(rows):
        raise_if_problems([
            f"--data.dataset={dataset!r}: all {len(rows)} prompt(s) in column {prompt_column!r} are empty or "
            f"whitespace ({_shown_rows(empty)}), so there is nothing to sample from; fill them, or set "
            "--data.prompt_column to the column that holds the prompts"
        ])  # fmt: skip
    elif empty:
        rank_zero_warn(
            f"--data.dataset={dataset!r}: skipped {len(empty)} of {len(rows)} row(s) whose prompt (column "
            f"{prompt_column!r}) is empty or whitespace ({_shown_rows(empty)})"
        )
    skipped = set(empty)
    return [i for i in range(len(rows)) if i not in skipped]
