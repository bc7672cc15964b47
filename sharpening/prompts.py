"""PromptDataModule: a dataset (hub or local file) -> templated prompt text -> prompt token ids; and the
epoch order in which training loaders visit their items (``epoch_sampler``). Reading and checking the
dataset's files and rows is data_files.py's.

The exact text built here (few-shot prefix, template, chat template, system text) is what the sampler
conditions on and what the verifier scores: both use the ids this module produces.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import lightning as L
import torch

from sharpening.data_files import (
    column_problems,
    dataset_utf8_problem,
    read_prompt_rows,
    rows_with_a_prompt,
    validate_dataset_source,
    value_problems,
)
from sharpening.engines.base import derive_seed
from sharpening.errors import ConfigError, raise_if_problems
from sharpening.types import PromptBatch

if TYPE_CHECKING:
    from sharpening.buffer import BufferExample


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
        """Read and check the rows, template them and encode them with ``tokenizer``. Each step raises one
        ConfigError with every problem it finds, the cheapest first: the file, its columns and values, empty
        prompts, the chat template, the prompt template, then characters the tokenizer cannot encode."""
        hp = self.hparams
        rows = self._read_rows()
        keep = rows_with_a_prompt(rows, hp.dataset, hp.prompt_column)
        if hp.use_chat_template and (problem := chat_template_problem(tokenizer)):
            raise_if_problems([problem])
        rows = [dict(rows[i], prompt=rows[i][hp.prompt_column]) for i in keep]
        self.prompt_texts = self._render_prompts(rows, tokenizer)
        add_special = not hp.use_chat_template  # a chat template already holds BOS
        source = f"--data.dataset={hp.dataset!r}"
        self.prompt_ids = encode_prompts(self.prompt_texts, tokenizer, add_special, source, keep)
        self.answers = [None if hp.answer_column is None else str(r[hp.answer_column]) for r in rows]
        self.tokenizer = tokenizer

    def _read_rows(self) -> list[dict]:
        """The dataset's first ``max_prompts`` rows, once the files are UTF-8, readable and hold the named
        columns, and every kept row a text value in them."""
        hp = self.hparams
        if problem := dataset_utf8_problem(hp.dataset):
            raise_if_problems([problem])
        table = read_prompt_rows(hp.dataset, hp.split, hp.subset)
        columns = {"prompt_column": hp.prompt_column, "answer_column": hp.answer_column}
        raise_if_problems(column_problems(table, hp.dataset, columns))
        if hp.max_prompts is not None:
            table = table.select(range(min(hp.max_prompts, len(table))))
        rows = list(table)
        raise_if_problems(value_problems(rows, hp.dataset, columns))
        return rows

    def _render_prompts(self, rows: list[dict], tokenizer) -> list[str]:
        """Each row's prompt text (``render_prompt``); a template that reads an attribute, names a missing
        column or does not parse is a ConfigError."""
        hp = self.hparams
        if field := attribute_field(hp.prompt_template):  # it renders e.g. "<built-in method upper of str ...>"
            raise_if_problems([
                f"--data.prompt_template={hp.prompt_template!r}: {{{field}}} reads an attribute of the column's value, "
                f"not text from the row; name columns only, e.g. '{{{field.split('.')[0]}}}'"
            ])  # fmt: skip
        try:
            return [
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
