"""Prompt rendering, padding, dataset validation and PromptDataModule on local files."""

from __future__ import annotations

import json

import pytest
import torch

from sharpening.data_files import validate_dataset_source
from sharpening.errors import ConfigError
from sharpening.prompts import PromptDataModule, pad_prompts, render_prompt


def test_render_prompt_template_and_few_shot():
    row = {"question": "abc", "other": 3}
    assert render_prompt(row, "{question}=") == "abc="
    assert render_prompt(row, "Q: {question} ({other})\nA:", few_shot_prefix="Q: x\nA: y\n\n") == (
        "Q: x\nA: y\n\nQ: abc (3)\nA:"
    )


def test_render_prompt_missing_column_raises_key_error():
    with pytest.raises(KeyError):
        render_prompt({"q": "a"}, "{question}")


class _ChatTokenizer:
    def __init__(self):
        self.calls = []

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        self.calls.append((messages, tokenize, add_generation_prompt))
        return "|".join(f"{m['role']}:{m['content']}" for m in messages) + "|assistant:"


def test_render_prompt_chat_template_with_system():
    tok = _ChatTokenizer()
    text = render_prompt({"p": "hi"}, "say {p}", "ex ", tok, use_chat_template=True, system_prompt="be brief")
    assert text == "system:be brief|user:ex say hi|assistant:"
    assert tok.calls[0][1:] == (False, True)
    text = render_prompt({"p": "hi"}, "say {p}", "", tok, use_chat_template=True)
    assert text == "user:say hi|assistant:"


def test_pad_prompts_layout():
    batch = pad_prompts([[1, 5, 6], [1], [1, 7]], [4, 9, 2], ["a", None, "c"], pad_token_id=0)
    assert batch.prompt_ids.tolist() == [[1, 5, 6], [0, 0, 1], [0, 1, 7]]
    assert batch.prompt_mask.tolist() == [[True, True, True], [False, False, True], [False, True, True]]
    assert batch.prompt_indices.tolist() == [4, 9, 2]
    assert batch.answers == ["a", None, "c"]
    assert batch.prompt_ids.dtype == torch.long and batch.prompt_mask.dtype == torch.bool
    assert len(batch) == 3


def test_validate_dataset_source_missing_file(tmp_path):
    (tmp_path / "other.jsonl").write_text("")
    missing = str(tmp_path / "prompts.jsonl")
    problems = validate_dataset_source(missing)
    assert len(problems) == 1
    assert problems[0].startswith(f"--data.dataset={missing!r}: file not found")
    assert "other.jsonl" in problems[0] and str(tmp_path) in problems[0]


def test_validate_dataset_source_other_cases(tmp_path, prompts_file):
    assert validate_dataset_source(prompts_file) == []
    assert validate_dataset_source("gsm8k") == []  # a hub name: checked when loading
    assert validate_dataset_source("")[0].startswith("--data.dataset is empty")
    bad = tmp_path / "prompts.txt"
    bad.write_text("x")
    assert "unknown file type" in validate_dataset_source(str(bad))[0]
    assert "no such directory" in validate_dataset_source(str(tmp_path / "nodir" / "p.csv"), "--d")[0]
    assert validate_dataset_source(str(tmp_path / "x.csv"), "--d")[0].startswith("--d=")


def test_constructor_collects_problems(tmp_path):
    with pytest.raises(ConfigError) as info:
        PromptDataModule(dataset=str(tmp_path / "none.jsonl"), max_prompts=0, system_prompt="sys")
    assert len(info.value.problems) == 3


ROWS = [
    {"question": "abcd", "answer": "dcba", "id": 0},
    {"question": "bc", "answer": "cb", "id": 1},
    {"question": "efg", "answer": "gfe", "id": 2},
    {"question": "h", "answer": "h", "id": 3},
    {"question": "ab cd", "answer": "dc ba", "id": 4},
]


def _write(tmp_path, fmt: str, rows=ROWS):
    import pandas as pd

    path = tmp_path / f"prompts.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    return str(path)


def _module(path, tokenizer, **kwargs):
    dm = PromptDataModule(dataset=path, **kwargs)
    dm.tokenizer = tokenizer
    dm.load_prompts(tokenizer)
    return dm


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_load_prompts_from_local_files(tmp_path, tiny_tokenizer, fmt):
    path = _write(tmp_path, fmt)
    dm = _module(
        path,
        tiny_tokenizer,
        prompt_column="question",
        answer_column="answer",
        prompt_template="{prompt}=",
        few_shot_prefix="ab=ba ",
    )
    assert len(dm) == len(ROWS)
    assert dm.prompt_texts == [f"ab=ba {r['question']}=" for r in ROWS]
    assert dm.prompt_ids == [tiny_tokenizer(f"ab=ba {r['question']}=").input_ids for r in ROWS]
    assert all(ids[0] == tiny_tokenizer.bos_token_id for ids in dm.prompt_ids)
    assert dm.answers == [r["answer"] for r in ROWS]


def test_csv_cells_are_read_as_text(tmp_path, tiny_tokenizer):
    """Answers are compared as text: 0012 is not 12, 7.50 not 7.5, and None / NA are words; only an empty
    cell is missing (and refused)."""
    path = tmp_path / "p.csv"
    path.write_text("question,answer\nab,0012\ncd,7.50\nef,None\ngh,NA\n")
    dm = _module(str(path), tiny_tokenizer, prompt_column="question", answer_column="answer")
    assert dm.answers == ["0012", "7.50", "None", "NA"]
    path.write_text("\ufeffquestion,answer,\nab,0012,x\n", encoding="utf-8")  # a BOM (Excel), an unnamed column
    assert _module(str(path), tiny_tokenizer, prompt_column="question", answer_column="answer").answers == ["0012"]
    path.write_text("question,answer\nab,0012\ncd,\n")
    with pytest.raises(ConfigError, match="answer"):
        _module(str(path), tiny_tokenizer, prompt_column="question", answer_column="answer")


def test_template_can_use_any_column(tmp_path, tiny_tokenizer):
    dm = _module(
        _write(tmp_path, "jsonl"), tiny_tokenizer, prompt_column="question", prompt_template="{id} {question}="
    )
    assert dm.prompt_texts[1] == "1 bc="
    assert dm.answers == [None] * len(ROWS)


def test_max_prompts(tmp_path, tiny_tokenizer):
    dm = _module(_write(tmp_path, "jsonl"), tiny_tokenizer, prompt_column="question", max_prompts=2)
    assert dm.prompt_texts == ["abcd", "bc"]


def test_missing_prompt_column_lists_columns_found(tmp_path, tiny_tokenizer):
    path = _write(tmp_path, "jsonl")
    with pytest.raises(ConfigError) as info:
        _module(path, tiny_tokenizer, prompt_column="text", answer_column="label")
    problems = info.value.problems
    assert len(problems) == 2
    assert problems[0].startswith("--data.prompt_column='text'")
    assert problems[1].startswith("--data.answer_column='label'")
    for column in ("question", "answer", "id"):
        assert column in problems[0]


def test_template_with_unknown_column(tmp_path, tiny_tokenizer):
    with pytest.raises(ConfigError, match="--data.prompt_template"):
        _module(_write(tmp_path, "jsonl"), tiny_tokenizer, prompt_column="question", prompt_template="{nope}")


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_empty_file_raises(tmp_path, tiny_tokenizer, fmt):
    path = tmp_path / f"empty.{fmt}"
    path.write_text("question,answer\n" if fmt == "csv" else "")
    with pytest.raises(Exception) as info:
        _module(str(path), tiny_tokenizer, prompt_column="question")
    assert not isinstance(info.value, (AssertionError, KeyError, IndexError))


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_empty_file_is_a_config_error(tmp_path, tiny_tokenizer, fmt):
    path = tmp_path / f"empty.{fmt}"
    path.write_text("question,answer\n" if fmt == "csv" else "")
    with pytest.raises(ConfigError, match="no rows") as info:
        _module(str(path), tiny_tokenizer, prompt_column="question")
    assert info.value.problems[0].startswith(f"--data.dataset={str(path)!r}")


def test_prompts_file_fixture(prompts_file, tiny_tokenizer):
    dm = _module(prompts_file, tiny_tokenizer, answer_column="answer")
    assert dm.prompt_texts[0] == "abcd=" and dm.answers[0] == "dcba"


@pytest.mark.parametrize("world_size, batch_size", [(1, 2), (2, 2), (3, 1), (4, 3)])
def test_prompt_batches_shard_disjointly_and_cover_all(tmp_path, tiny_tokenizer, world_size, batch_size):
    dm = _module(_write(tmp_path, "jsonl"), tiny_tokenizer, prompt_column="question", answer_column="answer")
    seen = []
    for rank in range(world_size):
        for batch in dm.prompt_batches(batch_size, rank=rank, world_size=world_size):
            assert len(batch) <= batch_size
            indices = batch.prompt_indices.tolist()
            assert all(i % world_size == rank for i in indices)
            for row, i in enumerate(indices):
                assert batch.prompt_ids[row][batch.prompt_mask[row]].tolist() == dm.prompt_ids[i]
                assert batch.answers[row] == ROWS[i]["answer"]
            assert (batch.prompt_ids[~batch.prompt_mask] == tiny_tokenizer.pad_token_id).all()
            assert batch.prompt_mask[:, -1].all()  # left padding: every row ends with a real token
            seen.extend(indices)
    assert sorted(seen) == list(range(len(ROWS)))
    assert len(seen) == len(set(seen))


def test_prompt_batches_to_device(tmp_path, tiny_tokenizer):
    dm = _module(_write(tmp_path, "jsonl"), tiny_tokenizer, prompt_column="question")
    batch = next(dm.prompt_batches(8, device=torch.device("cpu")))
    assert len(batch) == len(ROWS) and batch.prompt_ids.device.type == "cpu"


def test_rows_without_a_prompt_or_answer_are_refused_not_read_as_none(tmp_path, tiny_tokenizer):
    path = tmp_path / "gaps.jsonl"
    rows = [
        {"prompt": "ab", "answer": "ba"},
        {"prompt": "bc", "answer": None},
        {"prompt": None, "answer": "x"},
        {"prompt": "cd"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ConfigError) as info:
        _module(str(path), tiny_tokenizer, prompt_column="prompt", answer_column="answer")
    problems = info.value.problems
    assert len(problems) == 2
    assert problems[0].startswith("--data.prompt_column='prompt': 1 row(s)") and "rows [2]" in problems[0]
    assert problems[1].startswith("--data.answer_column='answer': 2 row(s)") and "rows [1, 3]" in problems[1]
    assert "--data.answer_column null" in problems[1]
    assert len(_module(str(path), tiny_tokenizer, prompt_column="prompt", max_prompts=2)) == 2  # no answers asked for


def test_a_malformed_jsonl_line_is_a_config_error_naming_the_parser_message(tmp_path, tiny_tokenizer):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "ab"}\n{"prompt": "bc"\n')
    with pytest.raises(ConfigError) as info:
        _module(str(path), tiny_tokenizer, prompt_column="prompt")
    text = info.value.problems[0]
    assert (
        text.startswith(f"--data.dataset={str(path)!r}: no rows could be read") and "DatasetGenerationError" not in text
    )


def test_empty_prompts_are_skipped_with_a_warning_and_all_empty_is_refused(tmp_path, tiny_tokenizer):
    rows = [{"q": "ab"}, {"q": "  "}, {"q": "cd"}, {"q": ""}]
    path = _write(tmp_path, "jsonl", rows)
    skipped = r"skipped 2 of 4 row\(s\) whose prompt \(column 'q'\) is empty.*rows \[1, 3\]"
    with pytest.warns(UserWarning, match=skipped):
        dm = _module(path, tiny_tokenizer, prompt_column="q")
    assert dm.prompt_texts == ["ab", "cd"]
    with pytest.raises(ConfigError, match=r"all 2 prompt\(s\) in column 'q' are empty or whitespace"):
        _module(_write(tmp_path, "jsonl", [{"q": " \n"}, {"q": ""}]), tiny_tokenizer, prompt_column="q")


def test_characters_the_tokenizer_cannot_encode_are_named_with_their_prompt_and_row(tmp_path, tiny_tokenizer):
    rows = [{"q": ""}, {"q": "ab"}, {"q": "aZbZ\u00e9"}, {"q": "cd"}, {"q": "?"}]
    with pytest.warns(UserWarning, match="skipped 1"), pytest.raises(ConfigError) as info:
        _module(_write(tmp_path, "jsonl", rows), tiny_tokenizer, prompt_column="q")
    text = info.value.problems[0]
    assert text.startswith("--data.dataset=") and "2 prompt(s) hold characters" in text
    assert "prompt 1 (row 2): ['Z', '\u00e9']" in text and "prompt 3 (row 4): ['?']" in text


def test_chat_template_asked_for_where_the_tokenizer_has_none(tmp_path, tiny_tokenizer):
    path = _write(tmp_path, "jsonl")
    with pytest.raises(ConfigError, match="--data.use_chat_template=true: the tokenizer of .* has no chat template"):
        _module(path, tiny_tokenizer, prompt_column="question", use_chat_template=True)
    chat = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    chat.chat_template = "{% for m in messages %}{{ m['content'] }}={% endfor %}"
    assert _module(path, chat, prompt_column="question", use_chat_template=True).prompt_texts[1] == "bc="


def test_a_directory_as_dataset_needs_data_files(tmp_path, tiny_tokenizer):
    (tmp_path / "notes.txt").write_text("mine")
    problem = validate_dataset_source(str(tmp_path))[0]
    assert problem.startswith(f"--data.dataset={str(tmp_path)!r} is a directory with no .jsonl")
    assert "notes.txt" in problem
    (tmp_path / "data").mkdir()
    _write(tmp_path / "data", "jsonl")  # a hub dataset's layout: data files one folder down
    assert validate_dataset_source(str(tmp_path)) == []
    assert len(_module(str(tmp_path), tiny_tokenizer, prompt_column="question")) == len(ROWS)
