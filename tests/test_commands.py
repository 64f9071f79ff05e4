"""Every command's handler (rlhf.commands) refuses bad input before any work: one generated table of
bad model folders, data files, --out paths and sampling flags, each exiting 2 with one `error:` line
and changing nothing; and the --out a command writes (atomically, nothing left behind on failure)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from rlhf.cli import main

from cli_helpers import one_line_error
from pipeline_helpers import snapshot


# ----------------------------------------------------------------------------- every command's bad input
#
# One table, generated: each command that reads a model folder, a data file or a run directory,
# or writes an --out, meets each kind of bad input. Every case must exit 2 with exactly one
# `error:` line naming the thing, no traceback, and leave every file (the tiny run and the case's
# own folder) as it was. The cases fail before any model loads, so the table runs in seconds.


def _copy_stage(source: Path, target: Path, keep_manifest: bool = False) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("checkpoints", "metrics.jsonl"))
    if not keep_manifest:
        (target / "manifest.json").unlink(missing_ok=True)
    return target


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def _broken_folder(kind: str, good: Path, other: Path, tmp: Path) -> Path:
    """A model folder of one bad `kind`, made from the good one (or `other`, a model of the wrong kind)."""
    if kind == "missing":
        return tmp / "absent"
    if kind == "a-file":
        (tmp / "model-file").write_text("not a folder\n", encoding="utf-8")
        return tmp / "model-file"
    if kind == "wrong-kind":
        return other
    folder = _copy_stage(good, tmp / "model", keep_manifest=kind == "changed-since-manifest")
    change = {
        "no-config": lambda: (folder / "config.json").unlink(),
        "config-is-a-folder": lambda: ((folder / "config.json").unlink(), (folder / "config.json").mkdir()),
        "config-not-json": lambda: (folder / "config.json").write_text('{"architectures": [', encoding="utf-8"),
        "config-not-an-object": lambda: (folder / "config.json").write_text("[1, 2]\n", encoding="utf-8"),
        "config-not-utf8": lambda: (folder / "config.json").write_bytes(b'{"a": "\xff"}'),
        "weights-missing": lambda: (folder / "model.safetensors").unlink(),
        "weights-truncated": lambda: _truncate(folder / "model.safetensors"),
        "weights-not-safetensors": lambda: (folder / "model.safetensors").write_bytes(b"\x00" * 64),
        "tokenizer-not-json": lambda: (folder / "tokenizer.json").write_text("{", encoding="utf-8"),
        "tokenizer-not-a-tokenizer": lambda: (folder / "tokenizer.json").write_text('{"version": "1.0"}', encoding="utf-8"),
        "changed-since-manifest": lambda: _flip_last_byte(folder / "model.safetensors"),
    }[kind]
    change()
    return folder


FOLDER_KINDS = {  # kind: words of the error line ({model} the folder passed)
    "missing": ("{model}", "no such directory"),
    "a-file": ("{model}", "not a directory"),
    "wrong-kind": ("{model}", "expected"),
    "no-config": ("{model}", "no config.json"),
    "config-is-a-folder": ("{model}", "no config.json"),
    "config-not-json": ("config.json", "line 1", "invalid JSON"),
    "config-not-an-object": ("config.json", "expected a JSON object, got list"),
    "config-not-utf8": ("config.json", "not valid UTF-8"),
    "weights-missing": ("model.safetensors", "missing"),
    "weights-truncated": ("model.safetensors", "not a readable safetensors file"),
    "weights-not-safetensors": ("model.safetensors", "not a readable safetensors file"),
    "tokenizer-not-json": ("tokenizer.json", "invalid JSON"),
    "tokenizer-not-a-tokenizer": ("tokenizer.json", "not a tokenizer"),
    "changed-since-manifest": ("model.safetensors", "sha256 differs", "rlhf run --from"),
}

# Each model slot: (the arguments, with {model} in the slot; the good folder's stage; the wrong kind's stage).
MODEL_SLOTS = {
    "score": (["score", "--reward", "{model}", "--data", "{folder}/preferences.jsonl"], "reward", "sft"),
    "eval": (["eval", "{model}", "--data", "{folder}/eval.jsonl"], "sft", "reward"),
    "generate": (["generate", "{model}", "--prompt", "Hi?"], "ppo", "reward"),
    "chat": (["chat", "{model}"], "sft", "reward"),
    "compare-policy": (["compare", "{model}", "--reward", "{run}/reward", "--prompts", "{folder}/eval.jsonl", "--out", "{tmp}/cmp"],
                       "sft", "reward"),
    "compare-reward": (["compare", "{run}/sft", "--reward", "{model}", "--prompts", "{folder}/eval.jsonl", "--out", "{tmp}/cmp"],
                       "reward", "sft"),
    "convert-to-gpt2": (["convert", "--to-gpt2", "{model}", "--out", "{tmp}/gpt2"], "sft", "reward"),
}


@dataclass(frozen=True)
class BadInput:
    argv: tuple[str, ...]
    words: tuple[str, ...]
    folder_kind: str | None = None
    slot: str | None = None
    prepare: Callable[[Path], None] | None = None
    """Makes the bad file or folder under the case's tmp folder before the snapshot."""
    needs_non_root: bool = False


def _cases() -> dict[str, BadInput]:
    cases: dict[str, BadInput] = {}
    for slot, (argv, _, _) in MODEL_SLOTS.items():
        for kind, words in FOLDER_KINDS.items():
            cases[f"{slot}/{kind}"] = BadInput(tuple(argv), words, folder_kind=kind, slot=slot)
    cases["convert-from-gpt2/ours"] = BadInput(("convert", "--from-gpt2", "{run}/sft", "--out", "{tmp}/ours"),
                                               ("{run}/sft", "GPT2LMHeadModel", "found RlhfForCausalLM"))  # fmt: skip

    def make_dir(name):
        return lambda tmp: (tmp / name).mkdir(parents=True)

    def make_file(name, content=b"x\n"):
        return lambda tmp: (tmp / name).write_bytes(content)

    def unreadable(name):
        def make(tmp):
            (tmp / name).write_text('{"prompt": "Hi?"}\n', encoding="utf-8")
            (tmp / name).chmod(0)

        return make

    data_slots = {
        "score": ("score", "--reward", "{run}/reward", "--data", "{bad}"),
        "eval": ("eval", "{run}/sft", "--data", "{bad}"),
        "generate": ("generate", "{run}/sft", "--prompts", "{bad}"),
        "compare": ("compare", "{run}/sft", "--reward", "{run}/reward", "--prompts", "{bad}", "--out", "{tmp}/cmp"),
    }
    for command, argv in data_slots.items():
        cases[f"{command}/data-is-a-folder"] = BadInput(argv, ("{tmp}/data.jsonl",), prepare=make_dir("data.jsonl"))
        cases[f"{command}/data-missing"] = BadInput(argv, ("{tmp}/data.jsonl",))
        cases[f"{command}/data-unreadable"] = BadInput(argv, ("{tmp}/data.jsonl",), prepare=unreadable("data.jsonl"), needs_non_root=True)

    file_outs = {
        "score": ("score", "--reward", "{run}/reward", "--data", "{folder}/preferences.jsonl", "--out", "{out}"),
        "eval": ("eval", "{run}/sft", "--data", "{folder}/eval.jsonl", "--out", "{out}"),
        "generate": ("generate", "{run}/sft", "--prompt", "Hi?", "--out", "{out}"),
    }
    for command, argv in file_outs.items():
        cases[f"{command}/out-is-a-folder"] = BadInput(tuple(a.replace("{out}", "{tmp}/out.jsonl") for a in argv),
                                                       ("{tmp}/out.jsonl", "is a directory"), prepare=make_dir("out.jsonl"))  # fmt: skip
        cases[f"{command}/out-under-a-file"] = BadInput(tuple(a.replace("{out}", "{tmp}/file/out.jsonl") for a in argv),
                                                        ("{tmp}/file", "which is a file"), prepare=make_file("file"))  # fmt: skip
    dir_outs = {
        "compare": ("compare", "{run}/sft", "--reward", "{run}/reward", "--prompts", "{folder}/eval.jsonl", "--out", "{out}"),
        "convert": ("convert", "--to-gpt2", "{run}/sft", "--out", "{out}"),
        "demo-data": ("demo-data", "{out}"),
    }
    for command, argv in dir_outs.items():
        cases[f"{command}/out-is-a-file"] = BadInput(tuple(a.replace("{out}", "{tmp}/out") for a in argv), ("{tmp}/out", "is a file"),
                                                     prepare=make_file("out"))  # fmt: skip
    cases["demo-data/target-is-a-folder"] = BadInput(("demo-data", "{tmp}/out"), ("{tmp}/out/sft.jsonl", "is a directory"),
                                                     prepare=make_dir("out/sft.jsonl"))  # fmt: skip

    sampling = {
        "eval": ("eval", "{run}/sft", "--data", "{folder}/eval.jsonl"),
        "generate": ("generate", "{run}/sft", "--prompt", "Hi?"),
        "chat": ("chat", "{run}/sft"),
        "compare": ("compare", "{run}/sft", "--reward", "{run}/reward", "--prompts", "{folder}/eval.jsonl", "--out", "{tmp}/cmp"),
    }
    flags = {
        "temperature-nan": ("--temperature", "nan"), "temperature-inf": ("--temperature", "inf"),
        "temperature-negative": ("--temperature", "-1"), "max-new-tokens-zero": ("--max-new-tokens", "0"),
        "max-new-tokens-context": ("--max-new-tokens", "96"), "max-new-tokens-huge": ("--max-new-tokens", str(10**9)),
        "seed-negative": ("--seed", "-1"), "seed-huge": ("--seed", str(2**64)),
    }  # fmt: skip
    top_flags = {"top-p-zero": ("--top-p", "0"), "top-p-above-1": ("--top-p", "1.5"), "top-p-nan": ("--top-p", "nan"),
                 "top-k-negative": ("--top-k", "-3")}  # fmt: skip
    for command, argv in sampling.items():
        own = {**flags, **(top_flags if command in ("generate", "chat") else {})}
        if command in ("eval", "compare"):
            own["samples-negative"] = ("--samples", "-1")
        for name, (flag, value) in own.items():
            cases[f"{command}/{name}"] = BadInput((*argv, flag, value), (flag,))

    def metrics(content: bytes):
        def make(tmp):
            (tmp / "run" / "sft").mkdir(parents=True)
            (tmp / "run" / "sft" / "metrics.jsonl").write_bytes(b'{"step": 1, "loss": 2.0}\n' + content)

        return make

    cases["plot/run-dir-missing"] = BadInput(("plot", "{tmp}/run"), ("{tmp}/run", "no such run directory"))
    cases["plot/run-dir-a-file"] = BadInput(("plot", "{tmp}/run"), ("{tmp}/run",), prepare=make_file("run"))
    plot = ("plot", "{tmp}/run")
    cases["plot/metrics-not-json"] = BadInput(plot, ("metrics.jsonl", "line 2", "invalid JSON"), prepare=metrics(b'{"step": 2,\n'))
    cases["plot/metrics-not-an-object"] = BadInput(plot, ("metrics.jsonl", "line 2", "expected a JSON object"), prepare=metrics(b"[2]\n"))
    cases["plot/metrics-not-utf8"] = BadInput(plot, ("metrics.jsonl", "not valid UTF-8"), prepare=metrics(b'{"step": "\xff"}\n'))

    def plots_is_a_file(tmp):
        metrics(b'{"step": 2, "loss": 1.0}\n')(tmp)
        (tmp / "run" / "plots").write_text("x\n", encoding="utf-8")

    cases["plot/plots-is-a-file"] = BadInput(("plot", "{tmp}/run"), ("{tmp}/run/plots",), prepare=plots_is_a_file)
    cases["run/run-dir-a-file"] = BadInput(("run", "{pipeline}", "--run-dir", "{tmp}/run"), ("{tmp}/run",), prepare=make_file("run"))
    cases["run/pipeline-a-folder"] = BadInput(("run", "{tmp}/pipeline.yaml"), ("{tmp}/pipeline.yaml",), prepare=make_dir("pipeline.yaml"))
    return cases


BAD_INPUTS = _cases()


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_every_command_refuses_bad_input_in_one_line_and_changes_nothing(tiny_rlhf, tmp_path, capsys, case: BadInput) -> None:
    import os

    if case.needs_non_root and os.geteuid() == 0:
        pytest.skip("root reads a chmod-000 file")
    names = {"run": str(tiny_rlhf.run_dir), "folder": str(tiny_rlhf.folder), "tmp": str(tmp_path), "pipeline": tiny_rlhf.pipeline,
             "bad": str(tmp_path / "data.jsonl")}  # fmt: skip
    if case.folder_kind:
        _, good, other = MODEL_SLOTS[case.slot]
        names["model"] = str(_broken_folder(case.folder_kind, tiny_rlhf.run_dir / good, tiny_rlhf.run_dir / other, tmp_path))
    if case.prepare:
        case.prepare(tmp_path)
    argv = [a.format(**names) for a in case.argv]
    before = snapshot(tmp_path), snapshot(tiny_rlhf.folder)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert "Traceback" not in err
    line = one_line_error(err)
    for word in case.words:
        assert word.format(**names) in line, f"{word.format(**names)!r} not in {line!r}"
    assert (snapshot(tmp_path), snapshot(tiny_rlhf.folder)) == before, "nothing was written or changed"


def test_generate_prompt_with_out_writes_the_row(tiny_rlhf, tmp_path, capsys) -> None:
    out = tmp_path / "one.jsonl"
    code = main(["generate", str(tiny_rlhf.run_dir / "sft"), "--prompt", "Hi?", "--max-new-tokens", "4", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 1 and rows[0]["prompt"] == "Hi?" and isinstance(rows[0]["response"], str)


def test_atomic_write_leaves_no_temporary_file_on_failure(tmp_path) -> None:
    from rlhf.artifacts import atomic_write_text

    (tmp_path / "out.json").mkdir()
    with pytest.raises(IsADirectoryError):
        atomic_write_text(tmp_path / "out.json", "{}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_convert_failing_at_its_out_leaves_no_staging_folder(tiny_rlhf, tmp_path, capsys) -> None:
    out = tmp_path / "gpt2"
    (out / "config.json").mkdir(parents=True)  # the converted config cannot be moved in
    assert main(["convert", "--to-gpt2", str(tiny_rlhf.run_dir / "sft"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == f"error: {out / 'config.json'}: Is a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2"] and [p.name for p in out.iterdir()] == ["config.json"]
