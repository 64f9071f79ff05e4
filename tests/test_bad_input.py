"""Bad input, one table: each case runs `rlhf run` with one thing wrong (a pipeline setting, a data
file, a command-line argument or the run directory itself) and asserts exit code 2, a single
`error:` line naming the file with the line, row or key and the problem, and an artifact
directory left exactly as it was (every file's path, sha256 and mtime, and every folder).

The run directory of every case is a copy of one finished tiny run (tokenizer and pretrain
complete; sft, reward, dpo and ppo not yet run), so a check that came too late would start training
and change it. Data cases replace one file of the pipeline, from subsets of data_samples/.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

from rlhf.artifacts import read_manifest, write_manifest

from pipeline_helpers import ROOT, clone, run, run_once, snapshot, write_checkpoint, write_subsets, write_yaml

SAMPLES = ROOT / "data_samples"
LINES = {"corpus.txt": 200, "sft.jsonl": 12, "preferences.jsonl": 12, "ppo_prompts.jsonl": 8, "eval.jsonl": 4}


def sample_lines(name: str) -> list[str]:
    return (SAMPLES / name).read_text(encoding="utf-8").splitlines()[: LINES[name]]


def pipeline_tree(folder: Path, stages: tuple[str, ...]) -> dict:
    """The demo stages and dpo, tiny, on the data subsets in `folder` (only `stages` of them)."""
    common = dict(max_steps=1, batch_size=4, eval_batch_size=4, save_every=100)
    stage_settings = {
        "tokenizer": {"data": [str(folder / "corpus.txt")], "vocab_size": 320},
        "pretrain": {"data": [str(folder / "corpus.txt")], "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 96}, **common},
        "sft": {"data": str(folder / "sft.jsonl"), "eval_prompts": str(folder / "eval.jsonl"), "judge": "rlhf.demo_task:gold_judge", **common},
        "reward": {"data": str(folder / "preferences.jsonl"), "eval_rows": 4, "norm_prompts": 4, **common},
        "dpo": {"data": str(folder / "preferences.jsonl"), "eval_rows": 4, **common},
        "ppo": {"prompts": str(folder / "ppo_prompts.jsonl"), "steps": 1, "rollout_batch_size": 4, "minibatch_size": 4, "max_new_tokens": 8},
    }  # fmt: skip
    return {"run_dir": str(folder / "run"), "seed": 0, "stages": {name: stage_settings[name] for name in stages}}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A finished run of tokenizer and pretrain; `pipeline` adds sft, reward, dpo and ppo on the same data."""
    folder = tmp_path_factory.mktemp("bad_input")
    write_subsets(folder, LINES)
    finished = run_once(write_yaml(folder / "finished.yaml", pipeline_tree(folder, ("tokenizer", "pretrain"))), folder)
    finished.tree = pipeline_tree(folder, ("tokenizer", "pretrain", "sft", "reward", "dpo", "ppo"))
    return finished


# ----------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    words: tuple[str, ...]
    """Substrings of the error line; {yaml}, {data} and {run} stand for the pipeline, the case's data file and the run dir."""
    settings: dict[str, Any] = field(default_factory=dict)
    """Pipeline keys ('stages.sft.lr') set to these values in the YAML file."""
    data: tuple[str, str, Any] | None = None
    """(pipeline key, file name, content): the file written (str, bytes, or a function of its path; None: not written)."""
    yaml_text: str | bytes | None = None
    """The whole pipeline file, replacing the generated one."""
    args: tuple[str, ...] = ()
    prepare: Callable[[Path], None] | None = None
    """Changes the copied run directory before the snapshot."""
    fresh_run_dir: bool = False
    """Run in a directory that does not exist (and must not be created)."""


def set_key(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def with_row_3(name: str, line: str | bytes) -> str | bytes:
    """The subset of data_samples/`name` with its third row replaced by `line`."""
    lines = sample_lines(name)
    if isinstance(line, bytes):
        return ("\n".join(lines[:2]) + "\n").encode() + line + ("\n" + "\n".join(lines[3:]) + "\n").encode()
    return "\n".join(lines[:2] + [line] + lines[3:]) + "\n"


def sft_row(messages: list) -> str:
    return json.dumps({"messages": messages})


def chat(*turns) -> list[dict]:
    return [{"role": role, "content": content} for role, content in turns]


def prompt_completion(row_3: dict) -> str:
    rows = [{"prompt": "What is 1 + 2?", "completion": "Sure! 1 + 2 = 3."}] * 4
    return "".join(json.dumps(row) + "\n" for row in rows[:2] + [row_3] + rows[3:])


def pair(prompt: Any = "What is 2 + 2?", chosen: Any = "Sure! 2 + 2 = 4.", rejected: Any = "5", **extra) -> str:
    return json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected, **extra})


def write_parquet(rows: list[dict]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)

    return write


def swap_pretrain_tokenizer(run_dir: Path) -> None:
    """A hand-assembled run: pretrain's tokenizer replaced by a larger one, the manifest made to match."""
    from rlhf.tokenizer import save_tokenizer, train_tokenizer

    corpus = (SAMPLES / "corpus.txt").read_text(encoding="utf-8")
    save_tokenizer(train_tokenizer([corpus], vocab_size=400), run_dir / "pretrain")
    manifest = read_manifest(run_dir / "pretrain")
    write_manifest(run_dir / "pretrain", {k: v for k, v in manifest.items() if k not in ("outputs", "status", "finished")})


def hold_lock(run_dir: Path) -> None:
    """Another run, alive (this test process), holds the directory while sft is not complete."""
    import socket

    (run_dir / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": "now"}))


def model_config(*files: str, **config) -> Callable[[Path], None]:
    """A model folder holding nothing but config.json with `config` (and empty `files`)."""

    def write(path: Path) -> None:
        path.mkdir()
        (path / "config.json").write_text(json.dumps(config), encoding="utf-8")
        for name in files:
            (path / name).write_bytes(b"")

    return write


SFT, PREFS, DPO_PREFS, PROMPTS = "stages.sft.data", "stages.reward.data", "stages.dpo.data", "stages.ppo.prompts"
GOOD_CHAT = chat(("user", "What is 1 + 2?"), ("assistant", "Sure! 1 + 2 = 3."))

CASES: dict[str, Case] = {
    # The pipeline YAML, overrides and flags.
    "yaml-syntax": Case(("{yaml}", "line 3, column 1: not valid YAML"), yaml_text="seed: 0\nstages: {sft: [\n"),
    "yaml-not-utf8": Case(("{yaml}", "line 2", "not valid UTF-8 (byte 0xff)"), yaml_text=b"seed: 0\nrun_dir: \xff\n"),
    "yaml-not-a-mapping": Case(("{yaml}", "expected a mapping at the top level"), yaml_text="- tokenizer\n- sft\n"),
    "yaml-unknown-key": Case(("{yaml}", "stages.sft.lrr: unknown key (did you mean 'lr'?)"), {"stages.sft.lrr": 0.1}),
    "yaml-unknown-stage": Case(("{yaml}", "stages.sftt: unknown stage (did you mean 'sft'?)"), {"stages.sftt": {"data": "x"}}),
    "yaml-wrong-type": Case(("{yaml}", "stages.sft.batch_size: expected an integer, got str 'four'"), {"stages.sft.batch_size": "four"}),
    "yaml-negative-lr": Case(("{yaml}", "stages.sft", "lr: must be positive, got -0.001"), {"stages.sft.lr": -0.001}),
    "yaml-bad-model-shape": Case(("{yaml}", "stages.pretrain.model", "divisible by n_head (3)"), {"stages.pretrain.model.n_head": 3}),
    "yaml-list-expected": Case(("{yaml}", "stages.ppo.reward_functions: expected a list, got dict"), {"stages.ppo.reward_functions": {"a": 1}}),
    "yaml-batch-arithmetic": Case(("{yaml}", "stages.ppo", "multiple of minibatch_size"), {"stages.ppo.rollout_batch_size": 6}),
    "yaml-extends-missing": Case(("nowhere.yaml: pipeline file not found",), {"extends": "nowhere.yaml"}),
    "override-bad-yaml": Case(("override 'stages.sft.lr=['", "not valid YAML"), args=("stages.sft.lr=[",)),
    "override-into-a-value": Case(("override 'stages.sft.batch_size.x=1'", "batch_size is not a mapping"), args=("stages.sft.batch_size.x=1",)),
    "unknown-stage-flag": Case(("--only sftt: not a stage of {yaml}",), args=("--only", "sftt")),
    "unknown-judge": Case(("{yaml}: stages.sft: judge: 'rlhf.demo_task:nope': cannot import",), {"stages.sft.judge": "rlhf.demo_task:nope"}),
    "reward-function-not-module-function": Case(("{yaml}: stages.ppo: reward_functions[0]: 'len': expected 'module:function'",),
                                                {"stages.ppo.reward_functions": ["len"]}),  # fmt: skip
    "yaml-nonfinite-lr": Case(("{yaml}: stages.sft.lr: inf is out of range",), {"stages.sft.lr": float("inf")}),
    "yaml-negative-vf-coef": Case(("{yaml}: stages.ppo.vf_coef: must be >= 0, got -5.0",), {"stages.ppo.vf_coef": -5}),
    "yaml-lora-dropout": Case(("{yaml}: stages.sft.lora.dropout: must be in [0, 1), got 5.0",), {"stages.sft.lora": {"dropout": 5}}),
    "yaml-huge-vocab": Case(("{yaml}: stages.tokenizer.vocab_size: 1000000000000 is out of range",), {"stages.tokenizer.vocab_size": 10**12}),
    "yaml-duplicate-key": Case(("{yaml}: line 3: key 'seed' is given twice",), yaml_text="seed: 0\nstages: {sft: {data: x}}\nseed: 1\n"),
    "yaml-empty-file": Case(("{yaml}: the pipeline file is empty",), yaml_text=""),
    "yaml-no-stages": Case(("{yaml}: stages: no stage to run",), yaml_text="seed: 0\nstages: {}\n"),
    "yaml-empty-run-dir": Case(("{yaml}: run_dir: give a directory",), {"run_dir": ""}),
    "override-nonfinite": Case(("override 'stages.sft.lr=.nan': stages.sft.lr: nan is out of range",), args=("stages.sft.lr=.nan",)),
    "judge-wrong-signature": Case(("{yaml}: stages.sft: judge: 'builtins:len': failed when called with 2 prompts and 2 responses (TypeError",),
                                  {"stages.sft.judge": "builtins:len"}),  # fmt: skip
    "reward-function-not-numbers": Case(("{yaml}: stages.ppo: reward_functions[0]: 'builtins:max': must return a list of numbers",),
                                        {"stages.ppo.reward_functions": ["builtins:max"]}),  # fmt: skip
    # The run directory.
    "missing-upstream": Case(("{run}/pretrain: upstream stage 'pretrain' has not completed",), args=("--only", "sft"),
                             prepare=lambda run_dir: shutil.rmtree(run_dir / "pretrain")),  # fmt: skip
    "upstream-being-rebuilt-by-another-run": Case(("{run}: in use by pid",), args=("--only", "reward"), prepare=hold_lock),
    "missing-upstream-new-run-dir": Case(("upstream stage 'sft' has not completed",), args=("--only", "reward"), fresh_run_dir=True),
    "tokenizer-not-the-models": Case(("{run}/pretrain: the tokenizer has 400 tokens but the model's vocabulary is 320",),
                                     args=("--only", "sft"), prepare=swap_pretrain_tokenizer),  # fmt: skip
    "max-length-beyond-context": Case(("{yaml}: stages.sft.max_length: 128 exceeds the pretrained model's context (96)",),
                                      {"stages.sft.max_length": 128}),  # fmt: skip
    # A model folder to start from (stages.sft.init / stages.reward.init: DIR).
    "init-folder-missing": Case(("{yaml}: stages.sft: init: {data}: no such directory; expected a model folder",),
                                data=("stages.sft.init", "no_model", None)),  # fmt: skip
    "init-not-a-causal-lm": Case(("{yaml}: stages.sft: init: {data}: BertForMaskedLM is not a causal language model",),
                                 data=("stages.sft.init", "bert", model_config(architectures=["BertForMaskedLM"], model_type="bert"))),  # fmt: skip
    "init-unknown-architecture": Case(("{yaml}: stages.sft: init: {data}: unknown architecture MadeUpForCausalLM (supported: GPT2LMHeadModel",),
                                      data=("stages.sft.init", "made_up", model_config(architectures=["MadeUpForCausalLM"], model_type="made_up"))),  # fmt: skip
    "init-weights-not-safetensors": Case(("{yaml}: stages.sft: init: {data}: weights only as pytorch_model.bin",),
                                         data=("stages.sft.init", "bin", model_config("pytorch_model.bin", architectures=["GPT2LMHeadModel"], model_type="gpt2"))),  # fmt: skip
    "init-tokenizer-larger-than-model": Case(("{yaml}: stages.sft: init: {data}: the tokenizer has 300 tokens but the model's vocabulary is 200",),
                                             data=("stages.sft.init", "small", lambda path: write_checkpoint(path, vocab_size=200))),  # fmt: skip
    "init-another-stage": Case(("{yaml}", "stages.sft", "init: 'ppo' is a stage this one cannot start from ('pretrain', or a model folder"),
                               {"stages.sft.init": "ppo"}),  # fmt: skip
    "reward-init-folder-missing": Case(("{yaml}: stages.reward: init: {data}: no such directory",), data=("stages.reward.init", "no_model", None)),
    # SFT demonstrations.
    "missing-data-file": Case(("{data}: file not found",), data=(SFT, "missing.jsonl", None)),
    "invalid-json-line": Case(("{data}: line 3: invalid JSON",), data=(SFT, "sft.jsonl", with_row_3("sft.jsonl", '{"messages": ['))),
    "row-not-an-object": Case(("{data}: line 3: expected a JSON object, got list",), data=(SFT, "sft.jsonl", with_row_3("sft.jsonl", '["Hi", "Hello"]'))),
    "misspelt-column": Case(("{data}: row 3: missing column 'messages' (got 'mesages')",),
                            data=(SFT, "sft.jsonl", with_row_3("sft.jsonl", json.dumps({"mesages": GOOD_CHAT})))),  # fmt: skip
    "missing-column": Case(("{data}: row 3: missing column 'completion' (got 'prompt')",),
                           data=(SFT, "sft.jsonl", prompt_completion({"prompt": "What is 2 + 2?"}))),  # fmt: skip
    "content-not-a-string": Case(("{data}: row 3: messages[1].content: expected a string, got int 42",),
                                 data=(SFT, "sft.jsonl", with_row_3("sft.jsonl", sft_row(chat(("user", "Hi?"), ("assistant", 42)))))),  # fmt: skip
    "empty-prompt": Case(("{data}: row 3: prompt: empty text",), data=(SFT, "sft.jsonl", prompt_completion({"prompt": "", "completion": "4"}))),
    "empty-response": Case(("{data}: row 3: completion: empty text",), data=(SFT, "sft.jsonl", prompt_completion({"prompt": "2 + 2?", "completion": "  "}))),
    "unknown-role": Case(("{data}: row 3: messages[1]: unknown role 'bot'",),
                         data=(SFT, "sft.jsonl", with_row_3("sft.jsonl", sft_row(chat(("user", "Hi?"), ("bot", "Hello")))))),  # fmt: skip
    "conversation-ends-with-user": Case(("{data}: row 3: messages: the last message must be from the assistant",),
                                        data=(SFT, "sft.jsonl", with_row_3("sft.jsonl", sft_row(chat(("user", "Hi?"), ("assistant", "Hello"), ("user", "And?")))))),  # fmt: skip
    "not-utf8": Case(("{data}: line 3: not valid UTF-8 (byte 0xff)",), data=(SFT, "sft.jsonl", with_row_3("sft.jsonl", b'{"messages": "caf\xff"}'))),
    "empty-file": Case(("{data}: empty file",), data=(SFT, "sft.jsonl", "")),
    "unsupported-format": Case(("{data}: unsupported format",), data=(SFT, "sft.txt", "Hello.\n")),
    "not-gzip": Case(("{data}: not a valid gzip file",), data=(SFT, "sft.jsonl.gz", "\n".join(sample_lines("sft.jsonl")))),
    "longer-than-context": Case(("{data}: row 3:", "tokens, longer than max_length 96 (1 of 12 rows are)"),
                                data=(SFT, "sft.jsonl", with_row_3("sft.jsonl", sft_row(chat(("user", "Hi?"), ("assistant", "word " * 200)))))),  # fmt: skip
    "conversation-starts-with-assistant": Case(("{data}: row 3: messages: the conversation must start with the user",),
                                              data=(SFT, "sft.jsonl", with_row_3("sft.jsonl", sft_row(chat(("assistant", "Hi!"), ("user", "Hi?"), ("assistant", "Hello")))))),  # fmt: skip
    "two-user-turns": Case(("{data}: row 3: messages: two user messages in a row",),
                           data=(SFT, "sft.jsonl", with_row_3("sft.jsonl", sft_row(chat(("user", "Hi?"), ("user", "Hi?"), ("assistant", "Hello")))))),  # fmt: skip
    "judge-prompt-ends-with-assistant": Case(("{data}: row 3: prompt: the last message must be from the user",),
                                             data=("stages.sft.eval_prompts", "eval.jsonl", with_row_3("eval.jsonl", json.dumps({"prompt": GOOD_CHAT})))),  # fmt: skip
    # Preference pairs.
    "chosen-identical-to-rejected": Case(("{data}: row 3: chosen and rejected are identical",), data=(PREFS, "prefs.jsonl", with_row_3("preferences.jsonl", pair(rejected="Sure! 2 + 2 = 4.")))),
    "prefs-mixed-formats": Case(("{data}: row 3: prompt: text", "differs from the first pair's prompt: messages"),
                                data=(PREFS, "prefs.jsonl", with_row_3("preferences.jsonl", pair()))),
    "empty-chosen": Case(("{data}: row 3: chosen: empty text",), data=(PREFS, "prefs.jsonl", with_row_3("preferences.jsonl", pair(chosen="")))),
    "chosen-wrong-type": Case(("{data}: row 3: chosen: expected a string or a list of messages, got int 4",),
                              data=(PREFS, "prefs.jsonl", with_row_3("preferences.jsonl", pair(chosen=4)))),  # fmt: skip
    "missing-rejected": Case(("{data}: row 3: missing column 'rejected' (got 'chosen', 'prompt')",),
                             data=(PREFS, "prefs.jsonl", with_row_3("preferences.jsonl", json.dumps({"prompt": "2 + 2?", "chosen": "4"})))),  # fmt: skip
    "margin-not-a-number": Case(("{data}: row 3: margin must be a finite number, got 'big'",), data=(PREFS, "prefs.jsonl", with_row_3("preferences.jsonl", pair(margin="big")))),
    "margin-not-finite": Case(("{data}: row 3: margin must be a finite number, got nan",), data=(PREFS, "prefs.jsonl", with_row_3("preferences.jsonl", pair(margin=float("nan"))))),
    "csv-missing-column": Case(("{data}: row 1: missing column 'rejected' (got 'chosen', 'prompt')",),
                               data=(PREFS, "prefs.csv", "prompt,chosen\n" + "2 + 2?,4\n" * 8)),  # fmt: skip
    "parquet-wrong-type": Case(("{data}: row 1: prompt: expected a string or a list of messages, got int 7",),
                               data=(PREFS, "prefs.parquet", write_parquet([{"prompt": 7, "chosen": "a", "rejected": "b"}] * 8))),  # fmt: skip
    # DPO: the reward stage's preference files, checked by the same code; TRL's loss types.
    "dpo-missing-rejected": Case(("{data}: row 3: missing column 'rejected' (got 'chosen', 'prompt')",),
                                 data=(DPO_PREFS, "dpo_prefs.jsonl", with_row_3("preferences.jsonl", json.dumps({"prompt": "2 + 2?", "chosen": "4"})))),  # fmt: skip
    "dpo-unknown-loss-type": Case(("{yaml}: stages.dpo.loss_type: unknown 'sigmod' (one of sigmoid, hinge, ipo",), {"stages.dpo.loss_type": "sigmod"}),
    # PPO prompts and the pretraining corpus.
    "prompt-column-misspelt": Case(("{data}: row 3: missing column 'prompt' (got 'promt')",),
                                   data=(PROMPTS, "prompts.jsonl", with_row_3("ppo_prompts.jsonl", json.dumps({"promt": "Hi?"})))),  # fmt: skip
    "empty-ppo-prompt": Case(("{data}: row 3: prompt: empty text",), data=(PROMPTS, "prompts.jsonl", with_row_3("ppo_prompts.jsonl", json.dumps({"prompt": " "})))),
    "empty-corpus": Case(("{data}: empty file",), data=("stages.pretrain.data", "corpus.txt", " \n\n")),
    "corpus-without-text-column": Case(("{data}: row 1: missing column 'text' (got 'body')",),
                                       data=("stages.pretrain.data", "corpus.jsonl", json.dumps({"body": "Hello."}) + "\n")),  # fmt: skip
}


def prepare_case(case: Case, base, tmp_path: Path) -> tuple[list[str], Path, dict[str, str]]:
    """Write the case's pipeline, data and run directory; returns (the `rlhf run` arguments, run dir, placeholders)."""
    run_dir = tmp_path / "new-run" if case.fresh_run_dir else clone(base, tmp_path)
    tree = json.loads(json.dumps(base.tree))
    names = {"yaml": str(tmp_path / "pipeline.yaml"), "run": str(run_dir), "data": ""}
    if case.data:
        key, file_name, content = case.data
        path = tmp_path / file_name
        names["data"] = str(path)
        if callable(content):
            content(path)
        elif content is not None:
            path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        set_key(tree, key, [str(path)] if key == "stages.pretrain.data" else str(path))
    for key, value in case.settings.items():
        set_key(tree, key, value)
    pipeline = Path(names["yaml"])
    if case.yaml_text is not None:
        pipeline.write_bytes(case.yaml_text if isinstance(case.yaml_text, bytes) else case.yaml_text.encode())
    else:
        write_yaml(pipeline, tree)
    if case.prepare:
        case.prepare(run_dir)
    return [str(pipeline), "--run-dir", str(run_dir), *case.args], run_dir, names


def check_error(err: str, case: Case, names: dict[str, str]) -> None:
    """One `error:` line, the last one (progress bars of loading may come before it), naming what `case` says."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], f"expected one 'error:' line, last, got {err[-2000:]!r}"
    for word in case.words:
        word = word.format(**names)
        assert word in errors[0], f"{word!r} not in {errors[0]!r}"


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_input_exits_2_with_one_line_and_writes_nothing(base, tmp_path, capsys, case: Case) -> None:
    args, run_dir, names = prepare_case(case, base, tmp_path)
    before = snapshot(run_dir)
    code, out, err = run(capsys, *args)
    assert code == 2, err[-3000:]
    check_error(err, case, names)
    assert "] done" not in out, "no stage ran"
    assert snapshot(run_dir) == before, "the artifact directory is unchanged"


def test_the_table_covers_at_least_25_kinds() -> None:
    assert len(CASES) >= 25


CONSOLE_SCRIPT = "import sys\nfrom rlhf.cli import main\nsys.exit(main())\n"


@pytest.mark.parametrize("name", ["yaml-unknown-key", "invalid-json-line"])
def test_console_script_exits_2_with_one_line(base, tmp_path, name) -> None:
    """The installed `rlhf` entry point (a script named rlhf calling rlhf.cli:main), in its own process."""
    case = CASES[name]
    args, run_dir, names = prepare_case(case, base, tmp_path)
    script = tmp_path / "rlhf"
    script.write_text(CONSOLE_SCRIPT, encoding="utf-8")
    before = snapshot(run_dir)
    result = subprocess.run([sys.executable, str(script), "run", *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    check_error(result.stderr, case, names)
    assert snapshot(run_dir) == before
