"""PromptDataModule: a dataset (hub or local file) -> templated prompt text -> prompt token ids; and the
epoch order in which training loaders visit their items (``epoch_sampler``).

The exact text built here (few-shot prefix, template, chat template, system text) is what the sampler
conditions on and what the verifier scores: both use the ids this module produces.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from sharpening.engines.base import derive_seed
from sharpening.errors import ConfigError, raise_if_problems
from sharpening.types import PromptBatch

if TYPE_CHECKING:
    from sharpening.buffer import BufferExample

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


def _data_files_in(directory: str) -> list[str]:
    """Data files ``datasets`` would read from a local dataset directory (its top level or one folder down)."""
    import glob

    candidates = glob.glob(os.path.join(directory, "*")) + glob.glob(os.path.join(directory, "*", "*"))
    return [f for f in candidates if os.path.isfile(f) and _local_format(f)]


def load_prompt_rows(dataset: str, split: str = "train", subset: str | None = None):
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
    datasets uses), so a byte-order mark, an unnamed or a repeated column reads as it did before."""
    import datasets
    import pandas as pd

    header = list(pd.read_csv(path, nrows=0, encoding="utf-8").columns)
    features = datasets.Features({column: datasets.Value("string") for column in header}) if header else None
    return {"features": features, "keep_default_na": False, "na_values": [""]}


def render_prompt(
    row: dict,
    template: str,
    few_shot_prefix: str = "",
    tokenizer=None,
    use_chat_template: bool = False,
    system_prompt: str | None = None,
) -> str:
    """The exact prompt text for one row: few-shot prefix + template filled from the row's columns,
    optionally wrapped in the tokenizer's chat template (with a generation prompt)."""
    text = few_shot_prefix + template.format(**row)
    if not use_chat_template:
        return text
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": text}
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def attribute_field(template: str) -> str | None:
    """The first field of ``template`` that reads an attribute (``{prompt.upper}``), or None (also for a
    template that does not parse: rendering reports it).

    >>> attribute_field("Q: {question.strip} A:"), attribute_field("{prompt}="), attribute_field("{")
    ('question.strip', None, None)
    """
    import string

    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    except ValueError:
        return None
    return next((name for name in fields if "." in name.split("[")[0]), None)


def empty_prompt_rows(rows: list[dict], column: str) -> list[int]:
    """Numbers of the rows whose ``column`` is text that is empty or only whitespace.

    >>> empty_prompt_rows([{"p": "ab="}, {"p": "  "}, {"p": ""}, {"p": 7}], "p")
    [1, 2]
    """
    return [i for i, row in enumerate(rows) if isinstance(row[column], str) and not row[column].strip()]


def chat_template_problem(tokenizer, option: str = "--data.use_chat_template") -> str | None:
    """Why prompts cannot be wrapped in ``tokenizer``'s chat template (it has none), or None."""
    if getattr(tokenizer, "chat_template", None):
        return None
    return (
        f"{option}=true: the tokenizer of {tokenizer.name_or_path!r} has no chat template (base models often ship "
        f"none); set {option} false and write the prompt format in --data.prompt_template, or use a model whose "
        "tokenizer has one (an instruct or chat model)"
    )


def encode_prompts(
    texts: list[str], tokenizer, add_special_tokens: bool, source: str, row_numbers: list[int] | None = None
) -> list[list[int]]:
    """Token ids of each prompt text. A tokenizer without an unknown token fails on a character outside its
    vocabulary (the demo's character tokenizer does): the ConfigError names ``source``, each such prompt, its
    row (``row_numbers[i]``, counting from 0) and the characters."""
    ids, failed = [], []
    for i, text in enumerate(texts):
        try:
            ids.append(tokenizer(text, add_special_tokens=add_special_tokens).input_ids)
        except Exception:  # tokenizers raises a bare Exception, e.g. "WordLevel error: Missing [UNK] token"
            failed.append(i)
    if not failed:
        return ids
    rows = row_numbers or list(range(len(texts)))
    listed = "; ".join(f"prompt {i} (row {rows[i]}): {unencodable_characters(tokenizer, texts[i])}" for i in failed[:5])
    raise ConfigError([
        f"{source}: {len(failed)} prompt(s) hold characters the tokenizer of {tokenizer.name_or_path!r} cannot encode "
        f"(it has no unknown token to stand in for them): {listed}{' ...' if len(failed) > 5 else ''}; remove or "
        "replace them in the data (or the template and few-shot prefix), or use a model whose tokenizer covers them"
    ])  # fmt: skip


def unencodable_characters(tokenizer, text: str) -> list[str]:
    """The distinct characters of ``text`` that ``tokenizer`` fails to encode on their own, in order of appearance."""
    failing = []
    for char in dict.fromkeys(text):
        try:
            tokenizer(char, add_special_tokens=False)
        except Exception:  # as in encode_prompts
            failing.append(char)
    return failing


def pad_prompts(prompt_ids: list[list[int]], indices: list[int], answers: list, pad_token_id: int) -> PromptBatch:
    """Left-pad variable-length prompts into a PromptBatch."""
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(prompt_ids), width, dtype=torch.bool)
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = True
    return PromptBatch(ids, mask, torch.tensor(indices, dtype=torch.long), list(answers))


class PromptDataModule(L.LightningDataModule):
    """Prompts for sharpening, from a hub dataset or a local file.

    It serves prompts to the self-verification callback (``prompt_batches``) and to modules that draw their
    own samples (``batch``). Lightning takes the training loader from an attached data module only, so
    ``train_dataloader`` hands over to the module's own (over the round's kept samples, or prompt indices).
    """

    def __init__(
        self,
        dataset: str = "",
        split: str = "train",
        subset: str | None = None,
        prompt_column: str = "prompt",
        answer_column: str | None = None,
        prompt_template: str = "{prompt}",
        few_shot_prefix: str = "",
        use_chat_template: bool = False,
        system_prompt: str | None = None,
        max_prompts: int | None = None,
    ) -> None:
        """
        Args:
            dataset: Local .jsonl/.json/.csv/.parquet file, or a Hugging Face hub dataset name.
            split: Split to read from a hub dataset (local files have one split).
            subset: Hub dataset configuration name (e.g. ``main`` for gsm8k).
            prompt_column: Column holding the question/prompt text.
            answer_column: Column holding the reference answer (used only for accuracy metrics).
            prompt_template: Python format string over the row's columns, e.g. ``"Q: {question}\\nA:"``.
            few_shot_prefix: Text put before every templated prompt (few-shot examples).
            use_chat_template: Wrap the prompt in the tokenizer's chat template as a user turn.
            system_prompt: System message when ``use_chat_template`` is on.
            max_prompts: Use only the first this-many prompts (None = all).
        """
        super().__init__()
        self.save_hyperparameters()
        problems = validate_dataset_source(dataset)
        if max_prompts is not None and max_prompts < 1:
            problems.append(f"--data.max_prompts={max_prompts}: must be >= 1, or null for all prompts")
        if system_prompt and not use_chat_template:
            problems.append("--data.system_prompt is set but --data.use_chat_template is false; turn it on")
        raise_if_problems(problems)
        self.tokenizer = None
        self.prompt_texts: list[str] = []
        self.prompt_ids: list[list[int]] = []
        self.answers: list[str | None] = []

    def setup(self, stage: str | None = None) -> None:
        """Read, check and tokenize the prompts (before any model weights load)."""
        if self.prompt_ids:
            return
        if self.tokenizer is None:
            self.tokenizer = self.trainer.lightning_module.tokenizer
        self.load_prompts(self.tokenizer)

    def load_prompts(self, tokenizer) -> None:
        """Read the rows and build prompt texts and ids with ``tokenizer``."""
        hp = self.hparams
        from datasets.exceptions import DatasetGenerationError

        path = os.path.expanduser(hp.dataset)
        for file in [path] if os.path.isfile(path) else _data_files_in(path) if os.path.isdir(path) else []:
            if problem := not_utf8_problem(file):
                where = f"--data.dataset={hp.dataset!r}" + ("" if file == path else f": {file!r}")
                raise_if_problems(
                    [f"{where} {problem}; save it as UTF-8 (e.g. iconv -f ITS_ENCODING -t utf-8 FILE > NEW)"]
                )
        try:
            rows = load_prompt_rows(hp.dataset, hp.split, hp.subset)
        except (StopIteration, ValueError, DatasetGenerationError) as err:  # "no rows" / unreadable / malformed
            cause = err
            while isinstance(cause, DatasetGenerationError) and cause.__cause__ is not None:
                cause = cause.__cause__  # the parser's own message (e.g. a bad JSON line), not the wrapper's
            detail = (
                f"{type(cause).__name__}: {str(cause).strip()[:300]}" if str(cause).strip() else type(cause).__name__
            )
            raise ConfigError(
                [
                    f"--data.dataset={hp.dataset!r}: no rows could be read ({detail}); "
                    "the file must hold one row per prompt with a prompt column (JSON Lines: one JSON object a line)"
                ]
            ) from err
        except OSError as err:  # datasets' "not found" and "couldn't reach the hub" (offline, not cached)
            raise ConfigError([
                f"--data.dataset={hp.dataset!r}: cannot be read ({type(err).__name__}: {str(err)[:200]}); "
                "give a local .jsonl/.json/.csv/.parquet file, or a hub dataset name that exists (with "
                "HF_HUB_OFFLINE set: one already in the local cache)"
            ]) from err  # fmt: skip
        problems = []
        for column, option in ((hp.prompt_column, "prompt_column"), (hp.answer_column, "answer_column")):
            if column is not None and column not in rows.column_names:
                problems.append(
                    f"--data.{option}={column!r}: no such column in {hp.dataset!r}; found {rows.column_names}"
                )
        if len(rows) == 0:
            problems.append(f"--data.dataset={hp.dataset!r}: the dataset has no rows")
        raise_if_problems(problems)
        if hp.max_prompts is not None:
            rows = rows.select(range(min(hp.max_prompts, len(rows))))
        rows = list(rows)
        for column, option in ((hp.prompt_column, "prompt_column"), (hp.answer_column, "answer_column")):
            empty = [i for i, r in enumerate(rows) if column is not None and r[column] is None]  # "" is a value
            if empty:
                problems.append(
                    f"--data.{option}={column!r}: {len(empty)} row(s) of {hp.dataset!r} have no value there "
                    f"(rows {empty[:8]}{' ...' if len(empty) > 8 else ''}, counting from 0); fill or drop them"
                    + (", or set --data.answer_column null to go without answers" if option == "answer_column" else "")
                )
            nested = [i for i, r in enumerate(rows) if column is not None and isinstance(r[column], (list, dict))]
            if nested:  # the template would write its Python repr ("['a', 'b']") into the prompt, or the answer
                problems.append(
                    f"--data.{option}={column!r}: {len(nested)} row(s) of {hp.dataset!r} hold a "
                    f"{type(rows[nested[0]][column]).__name__}, not text (rows {nested[:8]}{' ...' if len(nested) > 8 else ''}"
                    ", counting from 0); name a column of text, or give one value per row (a JSON file of columns is "
                    "read as one row: write JSON Lines, one object per row)"
                )
        raise_if_problems(problems)
        keep = self._rows_with_a_prompt(rows)
        if hp.use_chat_template and (problem := chat_template_problem(tokenizer)):
            raise_if_problems([problem])
        rows = [dict(rows[i], prompt=rows[i][hp.prompt_column]) for i in keep]
        if field := attribute_field(hp.prompt_template):  # it renders e.g. "<built-in method upper of str ...>"
            raise_if_problems([
                f"--data.prompt_template={hp.prompt_template!r}: {{{field}}} reads an attribute of the column's value, "
                f"not text from the row; name columns only, e.g. '{{{field.split('.')[0]}}}'"
            ])  # fmt: skip
        try:
            self.prompt_texts = [
                render_prompt(
                    r, hp.prompt_template, hp.few_shot_prefix, tokenizer, hp.use_chat_template, hp.system_prompt
                )
                for r in rows
            ]
        except KeyError as err:
            raise ConfigError(
                [f"--data.prompt_template={hp.prompt_template!r}: column {err} not found; columns: {sorted(rows[0])}"]
            ) from err
        except (IndexError, ValueError) as err:  # "{0}" (positional), "{" or "}" alone, a bad format spec
            raise ConfigError([
                f"--data.prompt_template={hp.prompt_template!r}: not a valid template ({err}); name the row's columns "
                f"in braces, e.g. '{{{hp.prompt_column}}}', and write a literal brace as '{{{{' or '}}}}'"
            ]) from err  # fmt: skip
        add_special = not hp.use_chat_template  # a chat template already holds BOS
        source = f"--data.dataset={hp.dataset!r}"
        self.prompt_ids = encode_prompts(self.prompt_texts, tokenizer, add_special, source, keep)
        self.answers = [None if hp.answer_column is None else str(r[hp.answer_column]) for r in rows]
        self.tokenizer = tokenizer

    def _rows_with_a_prompt(self, rows: list[dict]) -> list[int]:
        """Numbers of the rows whose prompt is not empty or whitespace (the others are skipped with a warning);
        none at all is an error, as no sample could be drawn."""
        hp = self.hparams
        empty = empty_prompt_rows(rows, hp.prompt_column)
        shown = f"rows {empty[:8]}{' ...' if len(empty) > 8 else ''}, counting from 0"
        if len(empty) == len(rows):
            raise_if_problems([
                f"--data.dataset={hp.dataset!r}: all {len(rows)} prompt(s) in column {hp.prompt_column!r} are empty or "
                f"whitespace ({shown}), so there is nothing to sample from; fill them, or set --data.prompt_column to "
                "the column that holds the prompts"
            ])  # fmt: skip
        elif empty:
            rank_zero_warn(
                f"--data.dataset={hp.dataset!r}: skipped {len(empty)} of {len(rows)} row(s) whose prompt (column "
                f"{hp.prompt_column!r}) is empty or whitespace ({shown})"
            )
        skipped = set(empty)
        return [i for i in range(len(rows)) if i not in skipped]

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def train_dataloader(self):
        """The module's own training loader (Lightning asks the data module when one is attached)."""
        return self.trainer.lightning_module.train_dataloader()

    def prompt_batches(
        self, batch_size: int, rank: int = 0, world_size: int = 1, device: torch.device | None = None
    ) -> Iterator[PromptBatch]:
        """This rank's shard of the prompts (indices rank, rank + world_size, ...), left-padded batches."""
        mine = list(range(rank, len(self.prompt_ids), world_size))
        for start in range(0, len(mine), batch_size):
            yield self.batch(mine[start : start + batch_size], device)

    def batch(self, indices, device: torch.device | None = None) -> PromptBatch:
        """The prompts at ``indices``, left-padded, on ``device`` if given (also a DataLoader's collate_fn)."""
        indices = list(indices)
        batch = pad_prompts(
            [self.prompt_ids[i] for i in indices],
            indices,
            [self.answers[i] for i in indices],
            self.tokenizer.pad_token_id,
        )
        if device is not None:
            batch.prompt_ids, batch.prompt_mask = batch.prompt_ids.to(device), batch.prompt_mask.to(device)
            batch.prompt_indices = batch.prompt_indices.to(device)
        return batch


# ---- the epoch order of a training loader: (seed, epoch) -> this rank's indices -------------------------
class EpochSampler(torch.utils.data.DistributedSampler):
    """Epoch ``e``'s shuffled order depends only on ``(seed, e)``, however often it is iterated; split over ranks.

    Lightning calls ``set_epoch(e)`` at every epoch start, also on a loader it keeps from epoch to epoch,
    so each epoch gets its own order (``derive_seed(seed, e)``) whether or not the loader is rebuilt.
    (Lightning calls ``iter()`` twice at a normal epoch start but once after a resume, and a RandomSampler
    draws a new permutation each time, so a resumed epoch would see another order.)
    Each rank takes its shard of the order as Lightning's distributed sampler would (padded by wrapping
    round to equal shards, then every ``num_replicas``-th index), and Lightning keeps a DistributedSampler
    as it is. ``skip`` leaves out the first indices of this rank's shard already consumed before a
    mid-epoch restart in epoch ``skip_epoch``, and only in that epoch: skipping must follow the split, or
    the shards shift. The length stays the full shard's, as Lightning counts the consumed batches itself.
    """

    def __init__(
        self,
        size: int,
        seed: int,
        shuffle: bool = True,
        skip: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        skip_epoch: int = 0,
    ) -> None:
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.size, self.order_seed, self.order_shuffled = size, seed, shuffle
        self.skip, self.skip_epoch = skip, skip_epoch

    def __iter__(self):
        if self.order_shuffled:
            generator = torch.Generator().manual_seed(derive_seed(self.order_seed, self.epoch))
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        shard = [order[i] for i in super().__iter__()]  # this rank's positions of the order
        return iter(shard[self.skip :] if self.epoch == self.skip_epoch else shard)


def epoch_sampler(trainer, size: int, seed: int, batch_size: int) -> EpochSampler:
    """The sampler of a training loader (this rank's shard), set to the trainer's current epoch. After a
    mid-epoch restart it skips, in that epoch only, the batches already trained on (those whose update the
    checkpoint holds: Lightning's ``processed`` count, which a checkpoint written at batch end already
    includes; every rank steps the same number of batches)."""
    skip, replicas, rank, epoch = 0, 1, 0, 0
    if trainer is not None:
        replicas, rank, epoch = trainer.world_size, trainer.global_rank, trainer.current_epoch
        if trainer.fit_loop.restarting:
            progress = trainer.fit_loop.epoch_progress.current
            if progress.started > progress.processed:  # the restored epoch was under way
                skip = trainer.fit_loop.epoch_loop.batch_progress.current.processed * batch_size
    sampler = EpochSampler(size, seed, shuffle=size > 0, skip=skip, num_replicas=replicas, rank=rank, skip_epoch=epoch)
    sampler.set_epoch(epoch)  # Lightning sets it again at each epoch start
    return sampler


def batch_response_tokens(
    examples: list[BufferExample], seed: int, epoch: int, batch_size: int, world_size: int
) -> list[list[int]]:
    """Response tokens of each batch of epoch ``epoch`` on each rank, ``[rank][batch]``, in the order the
    loaders of ``epoch_sampler`` deal them (batch b is the epoch's b-th, also after a mid-epoch restart).

    Every rank holds the whole buffer, so each can count every rank's batches before they run.
    """
    lengths = [len(e.response_ids) for e in examples]
    counts = []
    for rank in range(world_size):
        sampler = EpochSampler(len(lengths), seed, shuffle=len(lengths) > 0, num_replicas=world_size, rank=rank)
        sampler.set_epoch(epoch)
        shard = list(sampler)
        counts.append([sum(lengths[i] for i in shard[b : b + batch_size]) for b in range(0, len(shard), batch_size)])
    return counts
