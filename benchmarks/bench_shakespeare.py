"""Tiny Shakespeare wall time against the reference minimal-GPT trainer, run back to back.

Runs the reference trainer's `train.py` (nanoGPT, `config/train_shakespeare_char.py` with the CPU
overrides of its README) and `rlhf run pipelines/shakespeare.yaml` in turn, alternating, `--rounds`
times each, and prints the wall seconds of every run, their ratio and each side's final validation
loss. The two losses are defined differently: the reference's is the mean over `eval_iters` (20)
random validation batches; ours is over the whole held-out 10% of the text. Both use the same
environment (threads included), so run it on an otherwise idle machine or compare the ratio only.
The last line is machine-readable:

    RESULT ours_s=<median> reference_s=<median> ratio=<ours/reference> ours_loss=<x> reference_loss=<y>

Run: python benchmarks/bench_shakespeare.py --reference PATH/TO/nanoGPT [--rounds 2]
(the checkout needs data/shakespeare_char/{train,val}.bin: copy the corpus to
data/shakespeare_char/input.txt and run data/shakespeare_char/prepare.py there first)
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PIPELINE = "pipelines/shakespeare.yaml"
CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"

REFERENCE_SETTINGS = (
    "config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1",
    "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000",
    "--lr_decay_iters=2000", "--dropout=0.0",
)  # fmt: skip
"""The CPU run of the reference trainer's README, the configuration `pipelines/shakespeare.yaml` copies."""

FINAL_LOSS = re.compile(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)")


def timed(command: list[str], cwd: Path) -> tuple[float, str]:
    """(wall seconds, stdout) of `command`; a failure prints its output's tail and exits."""
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    return seconds, done.stdout


def run_reference(checkout: Path, out_dir: Path) -> tuple[float, float]:
    """(wall seconds, validation loss at the last step) of the reference trainer."""
    seconds, out = timed([sys.executable, "train.py", *REFERENCE_SETTINGS, f"--out_dir={out_dir}"], checkout)
    losses = FINAL_LOSS.findall(out)
    if not losses:
        sys.exit(f"no 'step N: train loss X, val loss Y' line in the reference's output:\n{out[-2000:]}")
    return seconds, float(losses[-1][2])


def run_ours(run_dir: Path) -> tuple[float, float]:
    """(wall seconds, held-out loss from the pretrain manifest) of `rlhf run pipelines/shakespeare.yaml`."""
    data = f"[{CORPUS}]"
    command = [sys.executable, "-m", "rlhf.cli", "run", PIPELINE, "--run-dir", str(run_dir),
               f"stages.pretrain.data={data}", f"stages.tokenizer.data={data}"]  # fmt: skip
    seconds, _ = timed(command, REPO)
    manifest = json.loads((run_dir / "pretrain" / "manifest.json").read_text())
    return seconds, manifest["metrics"]["eval_loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, help="a nanoGPT checkout with data/shakespeare_char prepared")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each side, alternating (reference first)")
    args = parser.parse_args()
    if args.reference is None:
        sys.exit("needs --reference PATH: a checkout of github.com/karpathy/nanoGPT with data/shakespeare_char/prepare.py run on this corpus")
    if not (args.reference / "data" / "shakespeare_char" / "val.bin").is_file():
        sys.exit(f"{args.reference}/data/shakespeare_char/val.bin missing: copy {CORPUS} to input.txt there and run prepare.py")

    runs: dict[str, list[tuple[float, float]]] = {"reference": [], "ours": []}
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(1, args.rounds + 1):
            runs["reference"].append(run_reference(args.reference.resolve(), Path(scratch) / f"reference{round_}"))
            runs["ours"].append(run_ours(Path(scratch) / f"ours{round_}"))
            (ref_s, ref_loss), (our_s, our_loss) = runs["reference"][-1], runs["ours"][-1]
            print(f"round {round_}: reference {ref_s:.1f} s (val loss {ref_loss:.4f}), ours {our_s:.1f} s "
                  f"(held-out loss {our_loss:.4f}), ours/reference {our_s / ref_s:.3f}", flush=True)  # fmt: skip

    median = {side: statistics.median(s for s, _ in results) for side, results in runs.items()}
    loss = {side: statistics.median(l for _, l in results) for side, results in runs.items()}
    print("losses: reference = mean over 20 random validation batches; ours = the whole held-out 10%")
    print(f"RESULT ours_s={median['ours']:.1f} reference_s={median['reference']:.1f} "
          f"ratio={median['ours'] / median['reference']:.3f} ours_loss={loss['ours']:.4f} reference_loss={loss['reference']:.4f}")


if __name__ == "__main__":
    main()
