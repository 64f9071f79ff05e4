"""Reading and checking data files: JSONL (optionally .gz), JSON, Parquet, CSV, saved datasets.

Every problem is a `DataError` whose one-line message names the file, the row (1-based line for
JSONL) and what is wrong, raised before any training starts.
"""

from __future__ import annotations

import gzip
import re
import json
import math
from pathlib import Path
from typing import Any

from rlhf.errors import DataError, UserError

TABULAR_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
ROLES = ("system", "user", "assistant")


def decode_utf8(raw: bytes, path: str | Path, error_class: type[UserError] = DataError) -> str:
    """`raw` as text; bytes that are not UTF-8 raise `error_class` naming the file, the line and the byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise error_class(f"{path}: line {line}: not valid UTF-8 (byte {raw[error.start]:#04x})") from None


def _open_text(path: Path) -> str:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except OSError as error:
            raise DataError(f"{path}: not a valid gzip file ({error})") from None
    return decode_utf8(raw, path)


def _format_of(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    return suffixes[-1] if suffixes else ""


def jsonl_objects(text: str, path: str | Path, error: type[UserError] = DataError) -> list[dict]:
    """The JSON objects of a JSON-lines text (blank lines skipped); `error` names the file and line of a bad one."""
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as problem:
            raise error(f"{path}: line {number}: invalid JSON ({problem.msg})") from None
        if not isinstance(row, dict):
            raise error(f"{path}: line {number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a tabular data file or saved dataset directory, as dicts."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        import datasets

        try:
            return list(datasets.load_from_disk(str(path)))
        except (FileNotFoundError, ValueError) as error:
            raise DataError(f"{path}: not a saved dataset directory ({error})") from None
    kind = _format_of(path)
    if kind == ".jsonl":
        rows = jsonl_objects(_open_text(path), path)
        if not rows:
            raise DataError(f"{path}: empty file (no rows)")
    elif kind == ".json":
        try:
            rows = json.loads(_open_text(path))
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: line {error.lineno}: invalid JSON ({error.msg})") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of objects, got {type(rows).__name__}")
        for number, row in enumerate(rows, start=1):
            if not isinstance(row, dict):
                raise DataError(f"{path}: row {number}: expected a JSON object, got {type(row).__name__}")
    elif kind in (".parquet", ".csv"):
        import datasets

        try:
            rows = list(datasets.Dataset.from_parquet(str(path)) if kind == ".parquet" else datasets.Dataset.from_csv(str(path)))
        except Exception as error:  # the readers raise many types; all mean "unreadable"
            raise DataError(f"{path}: cannot read {kind[1:]} ({str(error).splitlines()[0]})") from None
    else:
        raise DataError(f"{path}: unsupported format; use one of {', '.join(TABULAR_SUFFIXES)} or a saved dataset")
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def read_text_documents(paths: list[str], column: str = "text", exclude_last_rows: int = 0,
                        txt_lines: bool = False) -> list[str]:
    """Documents for language modelling: a .txt file is one document (each non-empty line one with
    `txt_lines`); tabular files give one column.

    hh-rlhf dialogue strings are kept as they are (their 'Human:'/'Assistant:' text is the corpus).
    """
    documents = []
    for name in paths:
        path = Path(name)
        if _format_of(path) == ".txt":
            if not path.is_file():
                raise DataError(f"{path}: file not found")
            text = _open_text(path)
            if not text.strip():
                raise DataError(f"{path}: empty file")
            documents += [line for line in text.splitlines() if line.strip()] if txt_lines else [text]
            continue
        rows = read_rows(path)
        texts = []
        for number, row in enumerate(rows[: len(rows) - exclude_last_rows], start=1):
            if column not in row:
                raise _missing_column(f"{path}: row {number}", column, row)
            if row[column] is not None and not isinstance(row[column], str):
                raise DataError(f"{path}: row {number}: {column}: expected a string, got {_describe(row[column])}")
            if row[column] and row[column].strip():
                texts.append(row[column])
        if not texts:
            raise DataError(f"{path}: no text in column '{column}'")
        documents += texts
    return documents


def all_strings(value: Any) -> list[str]:
    """Every string inside nested lists and dicts (for training a tokenizer on any data file)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in all_strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in all_strings(v)]
    return []


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"[:80]


def _check_text(value: Any, where: str) -> None:
    """A non-empty string (an empty CSV or Parquet cell reads as None)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{where}: empty text")
    if not isinstance(value, str):
        raise DataError(f"{where}: expected a string, got {_describe(value)}")


def check_messages(messages: Any, where: str, last_role: str | None = None) -> None:
    """A conversational list: [{'role': ..., 'content': non-empty string}, ...]."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: expected a non-empty list of messages, got {_describe(messages)}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not {"role", "content"} <= set(message):
            raise DataError(f"{where}[{i}]: expected {{'role': ..., 'content': ...}}, got {_describe(message)}")
        if message["role"] not in ROLES:
            raise DataError(f"{where}[{i}]: unknown role {message['role']!r} (use {', '.join(ROLES)})")
        _check_text(message["content"], f"{where}[{i}].content")
    if last_role is not None and messages[-1]["role"] != last_role:
        raise DataError(f"{where}: the last message must be from the {last_role}")


def check_turn_order(messages: list[dict], where: str) -> None:
    """A demonstration conversation: after any system messages the user speaks first, and never twice in a row."""
    turns = [m["role"] for m in messages if m["role"] != "system"]
    if turns and turns[0] != "user":
        raise DataError(f"{where}: the conversation must start with the user (after any system message), not the {turns[0]}")
    for i, (before, after) in enumerate(zip(turns, turns[1:]), start=1):
        if before == after == "user":
            raise DataError(f"{where}: two user messages in a row (turns {i} and {i + 1}); join them or add the assistant's reply")


def _check_text_or_messages(value: Any, where: str, last_role: str) -> None:
    if isinstance(value, list):
        check_messages(value, where, last_role)
    elif value is None or isinstance(value, str):
        _check_text(value, where)
    else:
        raise DataError(f"{where}: expected a string or a list of messages, got {_describe(value)}")


def _missing_column(where: str, column: str, row: dict) -> DataError:
    return DataError(f"{where}: missing column '{column}' (got {', '.join(map(repr, sorted(row))) or 'none'})")


def check_sft_rows(path: str | Path, rows: list[dict]) -> str:
    """Validate SFT rows; returns the format: 'messages' or 'prompt_completion'."""
    first = rows[0]
    if "messages" in first:
        for number, row in enumerate(rows, start=1):
            if "messages" not in row:
                raise _missing_column(f"{path}: row {number}", "messages", row)
            check_messages(row["messages"], f"{path}: row {number}: messages", last_role="assistant")
            check_turn_order(row["messages"], f"{path}: row {number}: messages")
        return "messages"
    if "prompt" in first or "completion" in first:
        for number, row in enumerate(rows, start=1):
            for column, role in (("prompt", "user"), ("completion", "assistant")):
                if column not in row:
                    raise _missing_column(f"{path}: row {number}", column, row)
                _check_text_or_messages(row[column], f"{path}: row {number}: {column}", role)
        return "prompt_completion"
    raise DataError(f"{path}: row 1: expected a 'messages' column or 'prompt' and 'completion' columns, got {sorted(first)}")


def check_prompt_rows(path: str | Path, rows: list[dict]) -> None:
    """Prompt files (PPO, evaluation): a 'prompt' column, a string or a conversation ending with the user."""
    for number, row in enumerate(rows, start=1):
        if "prompt" not in row:
            raise _missing_column(f"{path}: row {number}", "prompt", row)
        _check_text_or_messages(row["prompt"], f"{path}: row {number}: prompt", "user")


def check_response_rows(path: str | Path, rows: list[dict]) -> None:
    """Rows to score: a 'prompt' (as in prompt files) and a non-empty 'response' (a string or assistant messages)."""
    for number, row in enumerate(rows, start=1):
        if "response" not in row:
            raise _missing_column(f"{path}: row {number}", "response", row)
        _check_text_or_messages(row["response"], f"{path}: row {number}: response", "assistant")
    check_prompt_rows(path, rows)


def prompt_messages(prompt: Any) -> list[dict]:
    """A prompt cell as chat messages: a string becomes one user message."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def prompts_and_references(path: str | Path, rows: list[dict]) -> list[tuple[list[dict], str | None]]:
    """(prompt messages, reference answer or None) per row, for evaluation.

    Accepts prompt files (`prompt`, optional `reference` string), prompt-completion rows and
    `messages` rows (the reference is the last assistant message; the prompt, what precedes it).
    """
    first = rows[0]
    if "messages" in first:
        check_sft_rows(path, rows)
        return [(list(row["messages"][:-1]), row["messages"][-1]["content"]) for row in rows]
    if "completion" in first:
        check_sft_rows(path, rows)
        pairs = []
        for row in rows:
            completion = row["completion"]
            answer = completion if isinstance(completion, str) else completion[-1]["content"]
            pairs.append((prompt_messages(row["prompt"]), answer))
        return pairs
    check_prompt_rows(path, rows)
    pairs = []
    for number, row in enumerate(rows, start=1):
        reference = row.get("reference")
        if reference is not None and (not isinstance(reference, str) or not reference.strip()):
            raise DataError(f"{path}: row {number}: reference: expected a non-empty string, got {reference!r}")
        pairs.append((prompt_messages(row["prompt"]), reference))
    return pairs


def split_tail(rows: list, fraction: float) -> tuple[list, list]:
    """(train, held-out): the last `fraction` of the rows is held out; at least one row each."""
    if len(rows) < 2:
        raise DataError(f"need at least 2 rows to hold some out for evaluation, got {len(rows)}")
    held = min(len(rows) - 1, max(1, round(len(rows) * fraction)))
    return rows[:-held], rows[-held:]


HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def is_hh_dialogue(value: Any) -> bool:
    """hh-rlhf's dialogue strings: '\\n\\nHuman: ...\\n\\nAssistant: ...'."""
    return isinstance(value, str) and value.startswith("\n\nHuman:")


def hh_to_messages(dialogue: str) -> list[dict]:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> [{'role': 'user', 'content': 'a'}, {'role': 'assistant', 'content': 'b'}]."""
    parts = HH_TURN.split(dialogue)[1:]  # [speaker, text, speaker, text, ...]
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[speaker], "content": text.strip()} for speaker, text in zip(parts[::2], parts[1::2])]


def _pair_shape(pair: dict) -> str:
    """'prompt: messages, chosen: text, ...': a pair's columns and whether each holds text or messages."""
    kinds = {list: "messages", str: "text"}
    return ", ".join(f"{key}: {kinds.get(type(pair[key]), 'number')}" for key in ("prompt", "chosen", "rejected", "margin")
                     if key in pair)  # fmt: skip


def preference_pairs(path: str | Path, rows: list[dict]) -> tuple[list[dict], list[int]]:
    """Check preference rows and bring them to TRL's formats; returns (pairs, indices of skipped rows).

    Accepted: explicit prompt + chosen + rejected, implicit chosen + rejected (strings or message
    lists), optional numeric 'margin'; hh-rlhf dialogue strings become conversational explicit
    pairs (shared turns as the prompt). hh-rlhf pairs whose final answer is empty are skipped
    and counted; anywhere else an empty response is an error.
    """
    pairs, skipped = [], []
    for number, row in enumerate(rows, start=1):
        where = f"{path}: row {number}"
        for column in ("chosen", "rejected"):
            if column not in row:
                raise _missing_column(where, column, row)
        pair = {key: row[key] for key in ("prompt", "chosen", "rejected", "margin") if key in row}
        prompt_last_role: str | None = "user"
        if is_hh_dialogue(row["chosen"]) and is_hh_dialogue(row["rejected"]):
            chosen, rejected = hh_to_messages(row["chosen"]), hh_to_messages(row["rejected"])
            if not chosen[-1]["content"] or not rejected[-1]["content"] or chosen[-1]["role"] != "assistant":
                skipped.append(number - 1)
                continue
            pair.update(prompt=chosen[:-1], chosen=chosen[-1:], rejected=rejected[-1:])
            prompt_last_role = None  # real dialogues sometimes hold two turns of one speaker in a row
        if "margin" in pair and (isinstance(pair["margin"], bool) or not isinstance(pair["margin"], (int, float))
                                 or not math.isfinite(pair["margin"])):  # fmt: skip
            raise DataError(f"{where}: margin must be a finite number, got {pair['margin']!r}")
        if "prompt" in pair:
            if isinstance(pair["prompt"], list):
                check_messages(pair["prompt"], f"{where}: prompt", prompt_last_role)
            else:
                _check_text_or_messages(pair["prompt"], f"{where}: prompt", "user")
        for column in ("chosen", "rejected"):
            _check_text_or_messages(pair[column], f"{where}: {column}", "assistant")
        if pair["chosen"] == pair["rejected"]:
            raise DataError(f"{where}: chosen and rejected are identical")
        pairs.append(pair)
    if not pairs:
        raise DataError(f"{path}: no usable preference pairs")
    return pairs, skipped


def read_preference_split(path: str | Path, eval_rows: int, eval_fraction: float) -> tuple[list[dict], list[dict], int]:
    """A preference file's (training pairs, held-out pairs, hh-rlhf rows skipped for an empty final answer),
    checked, as the reward and DPO stages read it: the last `eval_rows` rows held out (0: the last
    `eval_fraction` of them). The split comes before conversion, so the held-out rows are fixed."""
    rows = read_rows(path)
    check_one_format(path, rows)
    train_rows, held_out_rows = split_preference_rows(rows, eval_rows, eval_fraction)
    train_pairs, skipped_train = preference_pairs(path, train_rows)
    eval_pairs, skipped_eval = preference_pairs(path, held_out_rows)
    return train_pairs, eval_pairs, len(skipped_train) + len(skipped_eval)


def split_preference_rows(rows: list, eval_rows: int, eval_fraction: float) -> tuple[list, list]:
    """(training rows, held-out rows): exactly the last `eval_rows` rows held out, or with 0 the tail `eval_fraction`."""
    if eval_rows:
        return rows[:-eval_rows], rows[-eval_rows:]
    return split_tail(rows, eval_fraction)


def check_one_format(path: str | Path, rows: list[dict]) -> None:
    """Training takes the pairs as one table: every usable row must have the same columns, each holding
    text or messages throughout (the first row that differs from the first pair is named)."""
    pairs, skipped = preference_pairs(path, rows)
    numbers = [number for number in range(1, len(rows) + 1) if number - 1 not in set(skipped)]
    first = _pair_shape(pairs[0])
    for number, pair in zip(numbers, pairs):
        if _pair_shape(pair) != first:
            raise DataError(f"{path}: row {number}: {_pair_shape(pair)} differs from the first pair's {first}; "
                            "use one format for every row")  # fmt: skip
