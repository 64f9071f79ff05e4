"""Preference pairs (`rlhf.data.preference_pairs`): explicit, implicit and conversational rows pass
through in TRL's formats; hh-rlhf dialogue strings become conversational explicit pairs (shared
turns as the prompt, the last assistant turn as chosen / rejected); hh pairs with an empty final
answer are skipped and reported; every bad row is a one-line DataError naming file and row."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf.data import check_one_format, hh_to_messages, is_hh_dialogue, preference_pairs, read_rows
from rlhf.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
HH_TEST = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
FILE = "prefs.jsonl"


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def data_error(rows: list[dict], *words: str) -> str:
    with pytest.raises(DataError) as info:
        preference_pairs(FILE, rows)
    message = str(info.value)
    assert "\n" not in message, f"errors are one line: {message!r}"
    assert FILE in message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    return message


# ----------------------------------------------------------------------------- accepted formats


def test_explicit_implicit_and_conversational_rows_pass_through() -> None:
    rows = [
        {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"},  # explicit, strings
        {"chosen": "the cat sat on the mat", "rejected": "mat the on sat cat the"},  # implicit text
        {"prompt": [user("Hi")], "chosen": [assistant("Hello!")], "rejected": [assistant("Go away.")]},  # explicit messages
        {"chosen": [user("Hi"), assistant("Hello!")], "rejected": [user("Hi"), assistant("Bye.")]},  # implicit messages
        {"prompt": "Say yes.", "chosen": "yes", "rejected": "no", "margin": 2},  # int margin
        {"prompt": "Say no.", "chosen": "no", "rejected": "yes", "margin": 0.5, "source": "extra columns dropped"},
    ]
    pairs, skipped = preference_pairs(FILE, rows)
    assert skipped == []
    expected = [{k: v for k, v in row.items() if k in ("prompt", "chosen", "rejected", "margin")} for row in rows]
    assert pairs == expected


def test_system_message_in_prompt_is_accepted() -> None:
    row = {"prompt": [{"role": "system", "content": "Be polite."}, user("Hi")], "chosen": [assistant("Hello!")],
           "rejected": [assistant("What.")]}  # fmt: skip
    pairs, _ = preference_pairs(FILE, [row])
    assert pairs == [row]


HH_CHOSEN = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit.\n\nAssistant: A pear."
HH_REJECTED = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit.\n\nAssistant: No."


def test_hh_to_messages_splits_turns_and_strips() -> None:
    assert is_hh_dialogue(HH_CHOSEN) and not is_hh_dialogue("Human: hi") and not is_hh_dialogue([user("x")])
    assert hh_to_messages(HH_CHOSEN) == [
        user("Hi there"), assistant("Hello! How can I help?"), user("Name a fruit."), assistant("A pear."),
    ]  # fmt: skip
    assert hh_to_messages("\n\nHuman:  spaced  \n\nAssistant:") == [user("spaced"), assistant("")]


def test_hh_pair_becomes_conversational_explicit_pair() -> None:
    pairs, skipped = preference_pairs(FILE, [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}])
    assert skipped == []
    assert pairs == [{
        "prompt": [user("Hi there"), assistant("Hello! How can I help?"), user("Name a fruit.")],
        "chosen": [assistant("A pear.")],
        "rejected": [assistant("No.")],
    }]  # fmt: skip


def test_hh_single_turn_and_same_speaker_twice() -> None:
    one_turn = {"chosen": "\n\nHuman: 2 + 2?\n\nAssistant: 4", "rejected": "\n\nHuman: 2 + 2?\n\nAssistant: 5"}
    # Real dialogues sometimes hold two turns of one speaker in a row: kept, not an error.
    twice = {"chosen": "\n\nHuman: a\n\nAssistant: b\n\nAssistant: c\n\nHuman: d\n\nHuman: e\n\nAssistant: f",
             "rejected": "\n\nHuman: a\n\nAssistant: b\n\nAssistant: c\n\nHuman: d\n\nHuman: e\n\nAssistant: g"}  # fmt: skip
    pairs, skipped = preference_pairs(FILE, [one_turn, twice])
    assert skipped == []
    assert pairs[0] == {"prompt": [user("2 + 2?")], "chosen": [assistant("4")], "rejected": [assistant("5")]}
    assert pairs[1]["prompt"] == [user("a"), assistant("b"), assistant("c"), user("d"), user("e")]
    assert (pairs[1]["chosen"], pairs[1]["rejected"]) == ([assistant("f")], [assistant("g")])


def test_hh_pair_with_empty_final_answer_is_skipped_and_its_index_returned() -> None:
    rows = [
        {"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
        {"chosen": "\n\nHuman: list bad words\n\nAssistant: ", "rejected": "\n\nHuman: list bad words\n\nAssistant: Ok"},
        {"chosen": "\n\nHuman: x\n\nAssistant: y", "rejected": "\n\nHuman: x\n\nAssistant:"},  # rejected side empty
        {"chosen": "\n\nHuman: p\n\nAssistant: q", "rejected": "\n\nHuman: p\n\nAssistant: r"},
    ]
    pairs, skipped = preference_pairs(FILE, rows)
    assert skipped == [1, 2], "0-based row indices"
    assert [p["chosen"] for p in pairs] == [[assistant("A pear.")], [assistant("q")]]


def test_all_pairs_skipped_is_an_error() -> None:
    data_error([{"chosen": "\n\nHuman: a\n\nAssistant:", "rejected": "\n\nHuman: a\n\nAssistant: b"}], "no usable")


# ----------------------------------------------------------------------------- errors


def test_chosen_identical_to_rejected() -> None:
    good = {"prompt": "Hi", "chosen": "Hello", "rejected": "Bye"}
    data_error([good, {"prompt": "Hi", "chosen": "Hello", "rejected": "Hello"}], "row 2", "identical")
    data_error([{"chosen": [user("Hi"), assistant("Yo")], "rejected": [user("Hi"), assistant("Yo")]}], "row 1", "identical")
    # hh: the final answers are compared (the prompt is shared)
    data_error([good, good, {"chosen": "\n\nHuman: a\n\nAssistant: same", "rejected": "\n\nHuman: a\n\nAssistant: same"}],
               "row 3", "identical")  # fmt: skip


@pytest.mark.parametrize("row, column", [
    ({"prompt": "Hi", "chosen": "Hello"}, "'rejected'"),
    ({"prompt": "Hi", "rejected": "Hello"}, "'chosen'"),
    ({"prompt": "Hi", "response": "Hello"}, "'chosen'"),
])  # fmt: skip
def test_missing_column(row, column) -> None:
    message = data_error([{"prompt": "a", "chosen": "b", "rejected": "c"}, row], "row 2", "missing column", column)
    assert "got" in message and "'prompt'" in message, "the row's columns are listed"


@pytest.mark.parametrize("margin", ["1.0", True, None, [1], {"v": 1}])
def test_non_numeric_margin(margin) -> None:
    data_error([{"prompt": "Hi", "chosen": "Hello", "rejected": "Bye", "margin": margin}], "row 1", "margin", "number")


@pytest.mark.parametrize("row, words", [
    ({"prompt": "Hi", "chosen": "", "rejected": "Bye"}, ("chosen", "empty")),
    ({"prompt": "Hi", "chosen": "Hello", "rejected": "   "}, ("rejected", "empty")),
    ({"prompt": [user("Hi")], "chosen": [assistant("")], "rejected": [assistant("Bye")]}, ("chosen", "empty")),
    ({"prompt": [user("Hi")], "chosen": [assistant("Hi")], "rejected": []}, ("rejected", "non-empty list")),
    ({"prompt": "", "chosen": "Hello", "rejected": "Bye"}, ("prompt", "empty")),
    ({"prompt": [user("Hi"), assistant("Yo")], "chosen": [assistant("a")], "rejected": [assistant("b")]}, ("prompt", "user")),
    ({"prompt": [user("Hi")], "chosen": [user("a")], "rejected": [assistant("b")]}, ("chosen", "assistant")),
])  # fmt: skip
def test_empty_or_misplaced_response(row, words) -> None:
    data_error([row], "row 1", *words)


def test_empty_response_outside_hh_is_an_error_not_a_skip() -> None:
    """Only hh-rlhf dialogue strings are skipped when empty; a plain text row with an empty answer is an error."""
    data_error([{"prompt": "Human: hi", "chosen": " ", "rejected": "ok"}], "row 1", "chosen", "empty")


# ----------------------------------------------------------------------------- the real hh-rlhf test file


@pytest.mark.skipif(not HH_TEST.is_file(), reason=f"{HH_TEST} not present (shared data not mounted)")
def test_hh_rlhf_harmless_base_test_file() -> None:
    rows = read_rows(HH_TEST)
    assert len(rows) == 2312
    pairs, skipped = preference_pairs(HH_TEST, rows)
    assert (len(pairs), len(skipped)) == (2308, 4)
    for index in skipped:
        ends = [hh_to_messages(rows[index][side])[-1]["content"] for side in ("chosen", "rejected")]
        assert "" in ends, f"row {index} was skipped but both final answers are non-empty"
    for pair in pairs:
        assert set(pair) == {"prompt", "chosen", "rejected"}
        assert len(pair["chosen"]) == len(pair["rejected"]) == 1
        assert pair["chosen"][0]["role"] == pair["rejected"][0]["role"] == "assistant"
        assert pair["prompt"] and pair["prompt"][0]["role"] == "user"


@pytest.mark.parametrize("other", [
    {"prompt": "What is 2 + 2?", "chosen": "Sure! 2 + 2 = 4.", "rejected": "5"},
    {"prompt": [user("What is 2 + 2?")], "chosen": [assistant("4")], "rejected": [assistant("5")], "margin": 1.0},
    {"chosen": [user("Hi"), assistant("Hello")], "rejected": [user("Hi"), assistant("Ugh")]},
])
def test_one_format_names_the_first_row_that_differs(other) -> None:
    first = {"prompt": [user("What is 1 + 1?")], "chosen": [assistant("2")], "rejected": [assistant("3")]}
    check_one_format(FILE, [first, first])
    with pytest.raises(DataError, match=r"row 3: .* differs from the first pair's .*one format"):
        check_one_format(FILE, [first, first, other])
