"""`rlhf compare` and the `report` stage on a tiny pipeline (tokenizer -> ... -> ppo -> report):
the report's figures equal a fresh `rlhf compare` with the same seed, a policy against itself wins
half the time with p = 1, the files and plots are written, and bad input is refused with exit 2."""

from __future__ import annotations

import json
import shutil

import pytest

from rlhf.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:ppo iteration .* negative mean KL:UserWarning")


@pytest.fixture(scope="module")
def base(tiny_rlhf):
    return tiny_rlhf


def compare(capsys, *args) -> tuple[int, str, str]:
    code = main(["compare", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_report_is_written_with_table_plots_and_samples(base) -> None:
    page = (base.run_dir / "report.md").read_text(encoding="utf-8")
    for heading in ("## Policies on held-out prompts", "## Stages", "## Training curves", "## Sample responses"):
        assert heading in page
    assert "| policy | RM score | 95% CI | win rate | sign p | Wilcoxon p | KL | gold judge |" in page
    for row in ("| sft |", "| ppo |", "| pretrain |"):
        assert row in page
    images = [line[line.index("(") + 1 : -1] for line in page.splitlines() if line.startswith("![")]
    assert {"report/score_distribution.png", "report/kl_vs_score.png", "report/curves_ppo.png"} <= set(images)
    for image in images:
        assert (base.run_dir / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_equals_a_fresh_compare_with_the_same_seed(base, tmp_path, capsys) -> None:
    report = json.loads((base.run_dir / "report" / "compare.json").read_text(encoding="utf-8"))
    page = (base.run_dir / "report.md").read_text(encoding="utf-8")
    assert f"`{report['command']}`" in page
    command = report["command"].split()
    assert command[:2] == ["rlhf", "compare"]
    code, out, err = compare(capsys, *command[2:], "--out", tmp_path / "again")
    assert code == 0, err
    fresh = json.loads((tmp_path / "again" / "compare.json").read_text(encoding="utf-8"))
    assert fresh == report
    assert report["baseline"] == "sft" and [row["policy"] for row in report["policies"]] == ["sft", "ppo", "pretrain"]


def test_a_policy_against_itself_wins_half_with_p_one(base, tmp_path, capsys) -> None:
    sft = base.run_dir / "sft"
    code, out, err = compare(capsys, sft, sft, "--reward", base.run_dir / "reward", "--prompts", base.folder / "eval.jsonl",
                             "--reference", sft, "--max-new-tokens", "8", "--out", tmp_path / "self")  # fmt: skip
    assert code == 0, err
    result = json.loads((tmp_path / "self" / "compare.json").read_text(encoding="utf-8"))
    itself = result["policies"][1]
    assert itself["policy"] == "sft#2"
    assert itself["win_rate"] == 0.5 and itself["sign_test_p"] == 1.0 and itself["wilcoxon_p"] == 1.0
    assert itself["ties"] == result["prompts"] == 8
    assert abs(itself["kl"]) < 1e-4  # the reference is the policy itself
    assert "sft#2" in out and (tmp_path / "self" / "compare.md").is_file()


def test_compare_measures_every_column(base) -> None:
    report = json.loads((base.run_dir / "report" / "compare.json").read_text(encoding="utf-8"))
    for row in report["policies"]:
        for key in ("rm_score", "rm_score_ci", "win_rate", "sign_test_p", "wilcoxon_p", "kl", "judge", "perplexity",
                    "accuracy", "bleu", "length", "distinct_1", "distinct_2", "stopped"):  # fmt: skip
            assert key in row, key
        low, high = row["rm_score_ci"]
        assert low <= row["rm_score"] <= high
        assert 0 <= row["judge"] <= 1 and 0 <= row["stopped"] <= 1 and row["perplexity"] >= 1
    assert len(report["samples"]["policy:ppo"]["responses"]) == report["prompts"] == 8


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda b, t: [b.run_dir / "reward", "--reward", b.run_dir / "reward"], "expected a policy"),
        (lambda b, t: [b.run_dir / "sft", "--reward", b.run_dir / "sft"], "expected a reward model"),
        (lambda b, t: [t / "nowhere", "--reward", b.run_dir / "reward"], "no config.json"),
        (lambda b, t: [b.run_dir / "sft", "--reward", b.run_dir / "reward", "--judge", "rlhf.demo_task:nothing"], "cannot import"),
        (lambda b, t: [b.run_dir / "sft", "--reward", b.run_dir / "reward", "--max-new-tokens", "0"], "--max-new-tokens"),
    ],
    ids=["reward-as-policy", "policy-as-reward", "missing-dir", "bad-judge", "zero-tokens"],
)
def test_bad_input_exits_2_with_one_line(base, tmp_path, capsys, change, message) -> None:
    code, out, err = compare(capsys, *change(base, tmp_path), "--prompts", base.folder / "eval.jsonl", "--out", tmp_path / "out")
    assert code == 2
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_different_tokenizer_is_refused(base, tmp_path, capsys) -> None:
    other = tmp_path / "other"
    shutil.copytree(base.run_dir / "sft", other)
    tokenizer = json.loads((other / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer["added_tokens"][0]["content"] = "<|other|>"
    (other / "tokenizer.json").write_text(json.dumps(tokenizer), encoding="utf-8")
    code, out, err = compare(capsys, base.run_dir / "sft", other, "--reward", base.run_dir / "reward",
                             "--prompts", base.folder / "eval.jsonl", "--out", tmp_path / "out")  # fmt: skip
    assert code == 2 and "tokenizer differs" in err and str(other) in err
