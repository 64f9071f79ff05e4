"""Reading and checking data files: every format gives the same rows; every problem is a one-line
DataError naming the file and the line or row."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from rlhf.data import check_prompt_rows, check_sft_rows, read_rows, read_text_documents, split_tail
from rlhf.errors import DataError, UserError

ROOT = Path(__file__).resolve().parents[1]

ROWS = [
    {"prompt": "What is 1 + 2?", "completion": "Sure! 1 + 2 = 3.", "score": 1},
    {"prompt": "Name 2 fruits.", "completion": "Sure! apple, pear.", "score": 0},
    {"prompt": "Say, \"hi\"", "completion": "hi, there", "score": 2},
]


def data_error(path, *words) -> str:
    with pytest.raises(DataError) as info:
        read_rows(path)
    message = str(info.value)
    assert "\n" not in message, f"errors are one line: {message!r}"
    assert str(path) in message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    return message


def jsonl(rows) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


# ----------------------------------------------------------------------------- formats


def test_jsonl_rows_and_blank_lines_skipped(tmp_path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + json.dumps(ROWS[0]) + "\n   \n" + jsonl(ROWS[1:]) + "\n\n", encoding="utf-8")
    assert read_rows(path) == ROWS


def test_jsonl_without_final_newline_and_crlf(tmp_path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl(ROWS).replace("\n", "\r\n").rstrip().encode())
    assert read_rows(path) == ROWS


def test_jsonl_invalid_json_names_line(tmp_path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + '{"prompt": "x", }\n' + json.dumps(ROWS[1]) + "\n", encoding="utf-8")
    data_error(path, "line 3", "invalid JSON")


@pytest.mark.parametrize("line, kind", [("[1, 2]", "list"), ('"text"', "str"), ("3", "int"), ("null", "NoneType")])
def test_jsonl_non_object_line_names_line(tmp_path, line, kind) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(jsonl(ROWS[:2]) + line + "\n", encoding="utf-8")
    data_error(path, "line 3", "expected a JSON object", kind)


def test_jsonl_gz(tmp_path) -> None:
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(gzip.compress(jsonl(ROWS).encode()))
    assert read_rows(path) == ROWS


def test_jsonl_gz_error_names_line_and_bad_gzip(tmp_path) -> None:
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(gzip.compress((jsonl(ROWS[:1]) + "{oops\n").encode()))
    data_error(path, "line 2")
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(b"not gzip at all")
    data_error(broken, "gzip")


def test_json_list(tmp_path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    assert read_rows(path) == ROWS


def test_json_errors(tmp_path) -> None:
    path = tmp_path / "d.json"
    path.write_text('[\n  {"a": 1},\n  {"a": 2,}\n]\n', encoding="utf-8")
    data_error(path, "line 3", "invalid JSON")
    path.write_text('{"a": 1}', encoding="utf-8")
    data_error(path, "list of objects")
    path.write_text('[{"a": 1}, 2]', encoding="utf-8")
    data_error(path, "row 2", "expected a JSON object, got int")


def test_csv(tmp_path) -> None:
    path = tmp_path / "d.csv"
    import csv

    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(ROWS[0]))
        writer.writeheader()
        writer.writerows(ROWS)
    assert read_rows(path) == ROWS


def test_parquet_written_with_datasets(tmp_path) -> None:
    from datasets import Dataset

    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 3
    path = tmp_path / "d.parquet"
    Dataset.from_list(rows).to_parquet(str(path))
    assert read_rows(path) == rows
    assert check_sft_rows(path, read_rows(path)) == "messages"


def test_saved_dataset_directory(tmp_path) -> None:
    from datasets import Dataset

    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    assert read_rows(tmp_path / "saved") == ROWS
    (tmp_path / "plain").mkdir()
    data_error(tmp_path / "plain", "saved dataset")


def test_unreadable_parquet(tmp_path) -> None:
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    data_error(path, "parquet")


def test_non_utf8_names_line(tmp_path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl(ROWS[:2]).encode() + b'{"prompt": "caf\xe9"}\n')
    data_error(path, "line 3", "UTF-8", "0xe9")


@pytest.mark.parametrize("name, content", [("e.jsonl", ""), ("e.jsonl", "\n  \n"), ("e.json", "[]"), ("e.json", "")])
def test_empty_file(tmp_path, name, content) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    data_error(path)


def test_empty_csv(tmp_path) -> None:
    path = tmp_path / "e.csv"
    path.write_text("prompt,completion\n", encoding="utf-8")
    data_error(path)


def test_missing_and_unsupported(tmp_path) -> None:
    data_error(tmp_path / "missing.jsonl", "not found")
    path = tmp_path / "d.xlsx"
    path.write_text("x", encoding="utf-8")
    data_error(path, "unsupported format")


def test_demo_samples_read_and_check() -> None:
    sft = ROOT / "data_samples" / "sft.jsonl"
    assert check_sft_rows(sft, read_rows(sft)) == "messages"
    pc = ROOT / "data_samples" / "sft_prompt_completion.jsonl"
    assert check_sft_rows(pc, read_rows(pc)) == "prompt_completion"
    check_prompt_rows(ROOT / "data_samples" / "eval.jsonl", read_rows(ROOT / "data_samples" / "eval.jsonl"))


def test_read_text_documents(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("one two\nthree\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(jsonl([{"text": "doc one"}, {"text": "  "}, {"text": "doc two"}]), encoding="utf-8")
    assert read_text_documents([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")]) == ["one two\nthree\n", "doc one", "doc two"]
    (tmp_path / "empty.txt").write_text(" \n", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        read_text_documents([str(tmp_path / "empty.txt")])
    (tmp_path / "c.jsonl").write_text(jsonl([{"text": "x"}, {"body": "y"}]), encoding="utf-8")
    with pytest.raises(DataError, match="row 2.*'text'"):
        read_text_documents([str(tmp_path / "c.jsonl")])


# ----------------------------------------------------------------------------- SFT rows


def conversation(*turns):
    return [{"role": role, "content": content} for role, content in turns]


GOOD_MESSAGES = {"messages": conversation(("system", "Be polite."), ("user", "Hi?"), ("assistant", "Hello."))}


def sft_error(rows, *words) -> str:
    with pytest.raises(DataError) as info:
        check_sft_rows("sft.jsonl", rows)
    message = str(info.value)
    assert message.startswith("sft.jsonl: ") and "\n" not in message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    return message


def test_sft_formats() -> None:
    assert check_sft_rows("f", [GOOD_MESSAGES, GOOD_MESSAGES]) == "messages"
    assert check_sft_rows("f", [{"prompt": "Hi?", "completion": "Hello."}]) == "prompt_completion"
    rows = [{"prompt": conversation(("user", "Hi?")), "completion": conversation(("assistant", "Hello."))}]
    assert check_sft_rows("f", rows) == "prompt_completion"


def test_sft_missing_column() -> None:
    sft_error([GOOD_MESSAGES, {"text": "x"}], "row 2", "missing column 'messages'")
    sft_error([{"prompt": "a", "completion": "b"}, {"prompt": "a"}], "row 2", "missing column 'completion'")
    sft_error([{"completion": "b"}], "row 1", "missing column 'prompt'")
    sft_error([{"text": "x"}], "row 1", "'messages'", "'prompt'", "'completion'")


@pytest.mark.parametrize(
    "messages, words",
    [
        (conversation(("user", "Hi?"), ("assistant", "")), ["messages[1]", "empty"]),
        (conversation(("user", "   "), ("assistant", "x")), ["messages[0]", "empty"]),
        ([{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}], ["messages[0].content", "expected a string, got int 3"]),
        (conversation(("user", "Hi?"), ("assistant", "a"), ("user", "more?")), ["last message", "assistant"]),
        (conversation(("user", "Hi?"), ("bot", "a")), ["messages[1]", "unknown role 'bot'"]),
        ([], ["non-empty list"]),
        ("Hi? Hello.", ["non-empty list"]),
        ([{"role": "user"}, {"role": "assistant", "content": "x"}], ["messages[0]", "'role'", "'content'"]),
        (["Hi?"], ["messages[0]"]),
    ],
    ids=["empty-content", "blank-content", "int-content", "last-role", "unknown-role", "empty-list", "string",
         "missing-content", "not-a-dict"],
)  # fmt: skip
def test_sft_bad_messages_name_row_and_message(messages, words) -> None:
    sft_error([GOOD_MESSAGES, {"messages": messages}], "row 2", *words)


@pytest.mark.parametrize(
    "message", [{"role": "user", "text": "Hi?"}, {"text": "Hi?"}, {"role": "user", "contents": "Hi?", "x": 1}]
)
def test_sft_message_with_other_keys_is_a_data_error(message) -> None:
    sft_error([{"messages": [message, {"role": "assistant", "content": "x"}]}], "row 1", "messages[0]")


def test_sft_message_with_extra_keys_is_accepted() -> None:
    messages = [{"role": "user", "content": "Hi?", "name": "a"}, {"role": "assistant", "content": "x", "weight": 1}]
    assert check_sft_rows("f", [{"messages": messages}]) == "messages"


@pytest.mark.parametrize(
    "row, words",
    [
        ({"prompt": "", "completion": "b"}, ["prompt", "empty"]),
        ({"prompt": "a", "completion": " "}, ["completion", "empty"]),
        ({"prompt": conversation(("assistant", "a")), "completion": "b"}, ["prompt", "last message", "user"]),
        ({"prompt": "a", "completion": conversation(("user", "b"))}, ["completion", "last message", "assistant"]),
        ({"prompt": "a", "completion": conversation(("robot", "b"))}, ["completion[0]", "unknown role"]),
    ],
)
def test_sft_prompt_completion_errors(row, words) -> None:
    sft_error([{"prompt": "a", "completion": "b"}, row], "row 2", *words)


# ----------------------------------------------------------------------------- prompt rows


def test_prompt_rows() -> None:
    check_prompt_rows("p", [{"prompt": "Hi?"}, {"prompt": conversation(("system", "s"), ("user", "Hi?")), "reference": "x"}])
    for rows, words in [
        ([{"prompt": "a"}, {"question": "b"}], ["row 2", "missing column 'prompt'", "question"]),
        ([{"prompt": " "}], ["row 1", "empty"]),
        ([{"prompt": conversation(("user", "a"), ("assistant", "b"))}], ["row 1", "last message", "user"]),
        ([{"prompt": []}], ["row 1", "non-empty list"]),
    ]:
        with pytest.raises(DataError) as info:
            check_prompt_rows("p.jsonl", rows)
        assert str(info.value).startswith("p.jsonl: ")
        for word in words:
            assert word in str(info.value)


# ----------------------------------------------------------------------------- split


@pytest.mark.parametrize(
    "n, fraction, held",
    [(2, 0.05, 1), (10, 0.05, 1), (10, 0.2, 2), (10, 0.99, 9), (100, 0.05, 5), (3000, 0.05, 150), (7, 0.5, 4)],
)
def test_split_tail(n, fraction, held) -> None:
    rows = list(range(n))
    train, evaluation = split_tail(rows, fraction)
    assert len(evaluation) == held
    assert train + evaluation == rows, "the held-out rows are the last ones, in order"
    assert train and evaluation


def test_split_tail_needs_two_rows() -> None:
    for rows in ([], [1]):
        with pytest.raises(DataError, match="at least 2 rows"):
            split_tail(rows, 0.1)


def test_data_error_is_a_user_error() -> None:
    assert issubclass(DataError, UserError)


def test_read_text_documents_by_line(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("one two\n\n  \nthree\r\nfour", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(jsonl([{"text": "doc one\nsame doc"}]), encoding="utf-8")
    paths = [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")]
    assert read_text_documents(paths, txt_lines=True) == ["one two", "three", "four", "doc one\nsame doc"]


@pytest.mark.parametrize(
    "messages, words",
    [
        ([("assistant", "Hi!"), ("user", "Hi?"), ("assistant", "Hello.")], "must start with the user (after any system message), not the assistant"),
        ([("system", "Be kind."), ("assistant", "Hi!")], "must start with the user"),
        ([("user", "Hi?"), ("user", "Hello?"), ("assistant", "Hello.")], "two user messages in a row (turns 1 and 2)"),
    ],
)
def test_sft_conversation_turn_order(messages, words) -> None:
    rows = [{"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]}] * 2
    rows.append({"messages": [{"role": role, "content": content} for role, content in messages]})
    with pytest.raises(DataError) as info:
        check_sft_rows("sft.jsonl", rows)
    assert str(info.value).startswith("sft.jsonl: row 3: messages: ") and words in str(info.value)


def test_rows_to_score_refuse_an_empty_response_naming_the_row() -> None:
    from rlhf.data import check_response_rows

    check_response_rows("s.jsonl", [{"prompt": "Hi?", "response": "Hello."}])
    with pytest.raises(DataError, match=r"^s.jsonl: row 2: response: empty text$"):
        check_response_rows("s.jsonl", [{"prompt": "Hi?", "response": "Hello."}, {"prompt": "Hi?", "response": " "}])
    with pytest.raises(DataError, match=r"^s.jsonl: row 1: missing column 'response'"):
        check_response_rows("s.jsonl", [{"prompt": "Hi?"}])
