"""The `rlhf` command (rlhf.cli): fast help without torch, argument order, and the one error boundary
(one-line `error:` exits, divergence, bugs, Ctrl-C). Each command's own checks: tests/test_commands.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf.cli import main

from cli_helpers import one_line_error

ROOT = Path(__file__).resolve().parents[1]
TINY = "tests/fixtures/tiny.yaml"
RLHF = shutil.which("rlhf")

needs_script = pytest.mark.skipif(RLHF is None, reason="the rlhf console script is not installed")


def rlhf(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([RLHF, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@needs_script
def test_help_is_fast_and_lists_commands() -> None:
    rlhf("--help")  # warm the file cache: the bound is for answering, not for a cold disk
    started = time.perf_counter()
    result = rlhf("--help")
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    for command in ("run", "convert", "demo-data"):
        assert command in result.stdout
    assert seconds < 3.0, f"rlhf --help took {seconds:.2f} s (should answer at once: no torch import)"


# The console script's argv[0] is 'rlhf': `import rlhf` then skips registering the model (torch).
PROBE = """
import json, sys
sys.argv[0] = "rlhf"
import rlhf.cli
codes = []
for argv in {argvs!r}:
    try:
        codes.append(rlhf.cli.main(argv))
    except SystemExit as exit:
        codes.append(exit.code)
heavy = sorted(m for m in ("torch", "transformers", "trl", "datasets") if m in sys.modules)
print(json.dumps({{"codes": codes, "heavy": heavy}}))
"""


def test_help_and_config_errors_do_not_import_torch(tmp_path) -> None:
    argvs = [["--help"], ["run", "--help"], ["run", str(tmp_path / "nope.yaml")], ["run", TINY, "stages.sft.lr=-1"],
             ["run", TINY, "--only", "bogus", "--run-dir", str(tmp_path / "run")]]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(argvs=argvs)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["codes"] == [0, 0, 2, 2, 2], result.stderr
    assert report["heavy"] == [], f"imported by help or a config error: {report['heavy']}"
    assert not (tmp_path / "run").exists(), "a bad --only must not create the run directory"


@needs_script
def test_run_help_lists_flags() -> None:
    result = rlhf("run", "--help")
    assert result.returncode == 0
    for flag in ("--run-dir", "--only", "--from", "--force", "pipeline", "overrides", "stages.sft.lr"):
        assert flag in result.stdout, flag


def test_every_option_of_every_command_has_help() -> None:
    import argparse

    from rlhf.cli import build_parser

    def walk(parser: argparse.ArgumentParser, path: str):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:  # the command list `rlhf --help` prints
                    yield f"{path} {choice.dest}", choice.help
                for name, sub in action.choices.items():
                    yield from walk(sub, f"{path} {name}")
            elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                yield f"{path} {'/'.join(action.option_strings) or action.dest}", action.help

    found = list(walk(build_parser(), "rlhf"))
    assert len(found) > 60 and any(name == "rlhf chat --device" for name, _ in found)  # the walk reached every level
    assert [name for name, text in found if not (text and text.strip())] == []


@needs_script
def test_unknown_pipeline_file(tmp_path) -> None:
    missing = str(tmp_path / "missing.yaml")
    result = rlhf("run", missing)
    assert result.returncode == 2
    assert missing in one_line_error(result.stderr)
    assert result.stdout == ""


@needs_script
def test_bad_override_syntax_exits_2() -> None:
    result = rlhf("run", TINY, "stages.sft.lr")
    assert result.returncode == 2
    line = one_line_error(result.stderr)
    assert "stages.sft.lr" in line and "key.path=value" in line


def test_bad_override_value_names_the_override_and_key(capsys) -> None:
    assert main(["run", TINY, "stages.pretrain.model.n_layr=2"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "override 'stages.pretrain.model.n_layr=2': stages.pretrain.model.n_layr" in line and "n_layer" in line
    assert TINY not in line  # the pipeline file is not to blame


def test_flag_without_value_after_overrides_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["run", TINY, "stages.sft.lr=1e-3", "--bogus"])
    assert info.value.code == 2
    assert "--bogus" in capsys.readouterr().err


def test_only_and_from_are_exclusive(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["run", TINY, "--only", "sft", "--from", "pretrain"])
    assert info.value.code == 2


def test_only_unknown_stage(tmp_path, capsys) -> None:
    assert main(["run", TINY, "--only", "reward", "--run-dir", str(tmp_path / "r")]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "--only reward" in line and TINY in line


def test_lone_override_uses_default_pipeline(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.chdir(ROOT)
    assert main(["run", "stages.sft.lr=-1", "--run-dir", str(tmp_path / "r")]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "override 'stages.sft.lr=-1': stages.sft.lr: must be positive" in line  # demo.yaml's sft stage, overridden
    monkeypatch.chdir(tmp_path)  # no default pipeline here
    assert main(["run", "--run-dir", str(tmp_path / "r")]) == 2
    assert "pipelines/demo.yaml" in one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize(
    "order",
    [
        ["{yaml}", "stages.tokenizer.vocab_size=300", "--force", "--only", "tokenizer", "--run-dir", "{run}"],
        ["{yaml}", "--force", "stages.tokenizer.vocab_size=300", "--only", "tokenizer", "--run-dir", "{run}"],
        ["--only", "tokenizer", "{yaml}", "--run-dir", "{run}", "stages.tokenizer.vocab_size=300", "--force"],
        ["{yaml}", "--run-dir", "{run}", "--only", "tokenizer", "stages.tokenizer.vocab_size=300", "seed=5", "--force"],
    ],
    ids=["override-then-flags", "flag-between", "flags-first", "overrides-last"],
)
def test_overrides_and_flags_in_any_order(monkeypatch, tmp_path, capsys, order) -> None:
    monkeypatch.chdir(ROOT)
    (tmp_path / "corpus.txt").write_text((ROOT / "data_samples" / "corpus.txt").read_text(encoding="utf-8")[:4000], encoding="utf-8")
    argv = ["run"] + [a.format(yaml=TINY, run=str(tmp_path / "run")) for a in order]
    argv.insert(argv.index("--force"), f"stages.tokenizer.data=[{tmp_path / 'corpus.txt'}]")
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "[tokenizer] running" in out and "[pretrain]" not in out
    manifest = json.loads((tmp_path / "run" / "tokenizer" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["config"]["vocab_size"] == 300
    assert manifest["metrics"]["vocab_size"] == 300
    assert manifest["seed"] == (5 if "seed=5" in argv else 0)
    # --force took effect: a second identical command runs the stage again rather than skipping it.
    assert main(argv) == 0
    assert "[tokenizer] running" in capsys.readouterr().out


@needs_script
def test_console_script_runs_a_stage(tmp_path) -> None:
    """End to end through the installed script: overrides after flags, exit 0, then skipped."""
    (tmp_path / "corpus.txt").write_text((ROOT / "data_samples" / "corpus.txt").read_text(encoding="utf-8")[:4000], encoding="utf-8")
    args = [TINY, "--only", "tokenizer", "--run-dir", str(tmp_path / "run"), f"stages.tokenizer.data=[{tmp_path / 'corpus.txt'}]"]
    first = rlhf("run", *args)
    assert first.returncode == 0, first.stderr
    assert "[tokenizer] running" in first.stdout
    second = rlhf("run", *args)
    assert second.returncode == 0 and "[tokenizer] up to date" in second.stdout


def test_file_system_errors_from_any_command_are_one_line(monkeypatch, tmp_path, capsys) -> None:
    """The boundary in `main`: an OSError a check missed still exits 2 with the file named."""
    import rlhf.commands

    def fail(args):
        raise PermissionError(13, "Permission denied", str(tmp_path / "x"))

    monkeypatch.setattr(rlhf.commands, "cmd_plot", fail)
    assert main(["plot", str(tmp_path)]) == 2
    assert one_line_error(capsys.readouterr().err) == f"error: {tmp_path / 'x'}: Permission denied"


@pytest.mark.parametrize("error, code", [("diverged", 1), ("bug", None)])
def test_the_boundary_keeps_divergence_at_1_and_lets_bugs_through(monkeypatch, tmp_path, capsys, error, code) -> None:
    import rlhf.commands
    from rlhf.errors import TrainingDiverged

    def fail(args):
        raise TrainingDiverged("loss is NaN") if error == "diverged" else KeyError("a bug")

    monkeypatch.setattr(rlhf.commands, "cmd_plot", fail)
    if code is None:
        with pytest.raises(KeyError):
            main(["plot", str(tmp_path)])
    else:
        assert main(["plot", str(tmp_path)]) == code
        assert one_line_error(capsys.readouterr().err) == "error: loss is NaN"


def test_version_without_torch() -> None:
    probe = ("import sys; sys.argv[0] = 'rlhf'; import rlhf.cli\n"
             "try:\n    rlhf.cli.main(['--version'])\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    version, torch_loaded = result.stdout.split()[-2:]
    assert result.stdout.startswith("rlhf ") and torch_loaded == "False"


@pytest.mark.parametrize("command, words", [("run", "interrupted; checkpoints already saved are kept"), ("chat", "interrupted")])
def test_ctrl_c_promises_a_resume_only_for_run(monkeypatch, capsys, command, words) -> None:
    import rlhf.commands

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(rlhf.commands, f"cmd_{command}", interrupted)
    assert main(["run", TINY] if command == "run" else ["chat", "nowhere"]) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(words), err
    assert ("resume" in err) == (command == "run")
