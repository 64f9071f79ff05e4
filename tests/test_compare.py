"""`rlhf compare` and the `report` stage on a tiny pipeline (tokenizer -> ... -> ppo -> report):
the report's figures (best-of-n baselines included) equal a fresh `rlhf compare` with the same seed,
a policy against itself wins half the time with p = 1, best-of-1 is the policy itself, best-of-n rows
carry the analytic KL and no perplexity, the files and plots are written, and bad input (a bad
`@best-of-N` suffix too) is refused with exit 2."""

from __future__ import annotations

import json
import math
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
    for row in ("| sft |", "| ppo |", "| pretrain |", "| sft@best-of-4 |", "| sft@best-of-16 |"):
        assert row in page
    assert f"| {math.log(4) - 0.75:.3f}* |" in page, "best-of-4's KL is the analytic one, marked"
    assert "**sft@best-of-16** against **sft**: win rate" in page and "by the reward model that picked its answers" in page
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
    assert report["baseline"] == "sft"
    assert [row["policy"] for row in report["policies"]] == ["sft", "ppo", "pretrain", "sft@best-of-4", "sft@best-of-16"]
    assert f"{base.run_dir / 'sft'}@best-of-16" in command


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
    from rlhf.evaluation import best_of_n_kl

    report = json.loads((base.run_dir / "report" / "compare.json").read_text(encoding="utf-8"))
    for row in report["policies"]:
        for key in ("rm_score", "rm_score_ci", "win_rate", "sign_test_p", "wilcoxon_p", "kl", "judge", "bleu", "length",
                    "distinct_1", "distinct_2", "stopped"):  # fmt: skip
            assert key in row, key
        low, high = row["rm_score_ci"]
        assert low <= row["rm_score"] <= high
        assert 0 <= row["judge"] <= 1 and 0 <= row["stopped"] <= 1
        if "best_of" in row:  # analytic KL to its base policy, the reference; no perplexity of its own
            assert row["kl"] == best_of_n_kl(row["best_of"]) and row["kl_analytic"] is True
            assert "perplexity" not in row and "accuracy" not in row
            assert row["path"] == str(base.run_dir / "sft")
        else:
            assert row["perplexity"] >= 1 and 0 <= row["accuracy"] <= 1
        assert len(report["samples"]["policy:" + row["policy"]]["responses"]) == report["prompts"] == 8
    assert [row.get("best_of") for row in report["policies"]] == [None, None, None, 4, 16]


def test_best_of_1_is_the_policy_itself(base, tmp_path, capsys) -> None:
    sft = base.run_dir / "sft"
    code, out, err = compare(capsys, sft, f"{sft}@best-of-1", "--reward", base.run_dir / "reward", "--prompts",
                             base.folder / "eval.jsonl", "--reference", sft, "--max-new-tokens", "8", "--batch-size", "4",
                             "--out", tmp_path / "one")  # fmt: skip
    assert code == 0, err
    result = json.loads((tmp_path / "one" / "compare.json").read_text(encoding="utf-8"))
    plain, best = result["samples"]["policy:sft"], result["samples"]["policy:sft@best-of-1"]
    assert best["responses"] == plain["responses"] and best["rm_scores"] == plain["rm_scores"]
    itself = result["policies"][1]
    assert itself["policy"] == "sft@best-of-1" and itself["ties"] == 8 and itself["win_rate"] == 0.5
    assert itself["kl"] == 0.0 and itself["kl_analytic"] is True
    assert "sft@best-of-1" in out and "0.000*" in out


def test_best_of_n_kl_needs_its_base_policy_as_the_reference(base, tmp_path, capsys) -> None:
    code, out, err = compare(capsys, base.run_dir / "sft", f"{base.run_dir / 'ppo'}@best-of-2", "--reward", base.run_dir / "reward",
                             "--prompts", base.folder / "eval.jsonl", "--reference", base.run_dir / "sft", "--samples", "2",
                             "--max-new-tokens", "4", "--out", tmp_path / "ppo")  # fmt: skip
    assert code == 0, err
    row = json.loads((tmp_path / "ppo" / "compare.json").read_text(encoding="utf-8"))["policies"][1]
    assert row["policy"] == "ppo@best-of-2" and row["kl"] is None, "log n - (n-1)/n is the KL to ppo, not to the reference sft"


def test_parse_policy_reads_a_best_of_n_suffix() -> None:
    from rlhf.compare import PolicySpec, parse_policy

    assert parse_policy("runs/demo/sft") == PolicySpec("runs/demo/sft")
    assert parse_policy("runs/demo/sft@best-of-16") == PolicySpec("runs/demo/sft", 16)
    assert parse_policy("runs/demo/sft@best-of-16").label == "sft@best-of-16"
    assert parse_policy("runs/lr@3e-4/sft") == PolicySpec("runs/lr@3e-4/sft"), "an '@' inside a folder name is a path"
    assert parse_policy("runs/lr@3e-4/sft@best-of-2") == PolicySpec("runs/lr@3e-4/sft", 2)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda b, t: [b.run_dir / "reward", "--reward", b.run_dir / "reward"], "expected a policy"),
        (lambda b, t: [b.run_dir / "sft", "--reward", b.run_dir / "sft"], "expected a reward model"),
        (lambda b, t: [t / "nowhere", "--reward", b.run_dir / "reward"], "nowhere: no such directory"),
        (lambda b, t: [b.run_dir / "sft", "--reward", b.run_dir / "reward", "--judge", "rlhf.demo_task:nothing"], "cannot import"),
        (lambda b, t: [b.run_dir / "sft", "--reward", b.run_dir / "reward", "--max-new-tokens", "0"], "--max-new-tokens"),
        (lambda b, t: [f"{b.run_dir / 'sft'}@best-of-0", "--reward", b.run_dir / "reward"], "sft@best-of-0'"),
        (lambda b, t: [f"{b.run_dir / 'sft'}@best-of-x", "--reward", b.run_dir / "reward"], "sft@best-of-x'"),
        (lambda b, t: [b.run_dir / "sft", f"{b.run_dir / 'sft'}@worst-of-4", "--reward", b.run_dir / "reward"], "sft@worst-of-4'"),
        (lambda b, t: [f"{b.run_dir / 'sft'}@", "--reward", b.run_dir / "reward"], "sft@'"),
        (lambda b, t: ["@best-of-4", "--reward", b.run_dir / "reward"], "'@best-of-4'"),
        (lambda b, t: [f"{t / 'nowhere'}@best-of-4", "--reward", b.run_dir / "reward"], "nowhere: no such directory"),
    ],
    ids=["reward-as-policy", "policy-as-reward", "missing-dir", "bad-judge", "zero-tokens", "best-of-0", "best-of-x",
         "worst-of", "empty-suffix", "no-path", "best-of-missing-dir"],
)
def test_bad_input_exits_2_with_one_line(base, tmp_path, capsys, change, message) -> None:
    code, out, err = compare(capsys, *change(base, tmp_path), "--prompts", base.folder / "eval.jsonl", "--out", tmp_path / "out")
    assert code == 2
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_different_tokenizer_is_refused(base, tmp_path, capsys) -> None:
    other = tmp_path / "other"
    shutil.copytree(base.run_dir / "sft", other)
    (other / "manifest.json").unlink()  # a hand-made folder: no stage hashes to check first
    tokenizer = json.loads((other / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer["added_tokens"][0]["content"] = "<|other|>"
    (other / "tokenizer.json").write_text(json.dumps(tokenizer), encoding="utf-8")
    code, out, err = compare(capsys, base.run_dir / "sft", other, "--reward", base.run_dir / "reward",
                             "--prompts", base.folder / "eval.jsonl", "--out", tmp_path / "out")  # fmt: skip
    assert code == 2 and "tokenizer differs" in err and str(other) in err
