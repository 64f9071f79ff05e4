"""The `rlhf` command. Heavy imports (torch, transformers, trl) happen inside the commands, so
`rlhf --help` answers at once. Bad input exits 2 with a one-line `error: ...`."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

DEFAULT_PIPELINE = "pipelines/demo.yaml"


def cmd_run(args: argparse.Namespace) -> None:
    from rlhf.config import load_pipeline
    from rlhf.errors import ConfigError

    pipeline = args.pipeline or DEFAULT_PIPELINE
    if args.pipeline is None and not Path(pipeline).is_file():
        raise ConfigError(f"{pipeline}: not found; run from the repository root or name a pipeline YAML")
    config = load_pipeline(pipeline, args.overrides, run_dir=args.run_dir)

    from rlhf.pipeline import run_pipeline  # torch and transformers load only if a stage runs

    run_pipeline(config, only=args.only, start=args.start, force=args.force)


def cmd_convert(args: argparse.Namespace) -> None:
    from rlhf.errors import UserError

    source = Path(args.from_gpt2 or args.to_gpt2)
    if not (source / "config.json").is_file():
        raise UserError(f"{source}: not a save_pretrained model directory (no config.json)")
    import rlhf.model  # noqa: F401
    from rlhf.convert import convert_directory

    try:
        convert_directory(source, args.out, to_gpt2=args.to_gpt2 is not None)
    except ValueError as error:
        raise UserError(f"{source}: {error}") from None
    print(f"wrote {args.out}")


def cmd_score(args: argparse.Namespace) -> None:
    from rlhf.errors import UserError

    config_file = Path(args.reward) / "config.json"
    if not config_file.is_file():
        raise UserError(f"{args.reward}: not a reward model directory (no config.json)")
    import json

    architectures = json.loads(config_file.read_text()).get("architectures") or []
    if "RlhfForSequenceClassification" not in architectures:
        raise UserError(f"{args.reward}: not a reward model ({', '.join(architectures) or 'unknown architecture'}); "
                        "use the reward stage's output, e.g. runs/demo/reward")  # fmt: skip
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    if args.out and Path(args.out).suffix not in (".jsonl", ".csv"):
        raise UserError(f"{args.out}: output must end in .jsonl or .csv")
    from rlhf.scoring import RewardScorer, score_file, write_rows

    scorer = RewardScorer(args.reward, batch_size=args.batch_size)
    rows, summary = score_file(scorer, args.data)
    if args.out:
        write_rows(rows, args.out)
        print(f"wrote {len(rows)} rows to {args.out}")
    print(f"{'':10}{'count':>7}{'mean':>9}{'std':>9}{'min':>9}{'p25':>9}{'median':>9}{'p75':>9}{'max':>9}")
    for name, stats in summary.items():
        if isinstance(stats, dict):
            print(f"{name:10}{stats['count']:7d}" + "".join(f"{stats[k]:9.3f}" for k in ("mean", "std", "min", "p25", "median", "p75", "max")))
    if "accuracy" in summary:
        print(f"pairwise accuracy: {summary['accuracy']:.4f}")
    print("(scores normalised to mean 0, std 1 under the SFT policy; raw scores in the *_raw columns)")


def cmd_plot(args: argparse.Namespace) -> None:
    from rlhf.errors import UserError

    if not Path(args.run_dir).is_dir():
        raise UserError(f"{args.run_dir}: no such run directory")
    from rlhf.plots import plot_run

    written = plot_run(args.run_dir)
    if not written:
        raise UserError(f"{args.run_dir}: no stage has logged metrics (metrics.jsonl) yet")
    for path in written:
        print(f"wrote {path}")


def cmd_demo_data(args: argparse.Namespace) -> None:
    from rlhf.demo_task import write_data_samples

    for name, path in write_data_samples(args.out, seed=args.seed).items():
        print(f"wrote {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description="Staged RLHF for an in-house GPT decoder.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run", help="run a pipeline's stages (tokenizer, pretrain, sft, ...) through one artifact directory",
        description="Run a pipeline. Stages whose config and inputs are unchanged are skipped; an interrupted "
        "stage resumes from its last checkpoint. Overrides: key.path=value, e.g. stages.sft.lr=3e-4.",
    )  # fmt: skip
    run.add_argument("pipeline", nargs="?", help=f"pipeline YAML (default: {DEFAULT_PIPELINE})")
    run.add_argument("overrides", nargs="*", help="key.path=value settings that replace the YAML's")
    run.add_argument("--run-dir", help="artifact directory (default: the YAML's run_dir)")
    order = run.add_mutually_exclusive_group()
    order.add_argument("--only", metavar="STAGE", help="run this stage only (its upstream stages must be complete)")
    order.add_argument("--from", dest="start", metavar="STAGE", help="re-run this stage and every later one")
    run.add_argument("--force", action="store_true", help="re-run the selected stages even if up to date")
    run.set_defaults(handler=cmd_run)

    convert = commands.add_parser("convert", help="convert a model to or from transformers' GPT-2")
    direction = convert.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-gpt2", metavar="SRC", help="GPT2LMHeadModel directory to convert to ours")
    direction.add_argument("--to-gpt2", metavar="SRC", help="our model directory to convert to GPT2LMHeadModel")
    convert.add_argument("--out", required=True, metavar="DST", help="output directory (save_pretrained layout)")
    convert.set_defaults(handler=cmd_convert)

    score = commands.add_parser("score", help="score a data file's responses (or preference pairs) with a reward model")
    score.add_argument("--reward", required=True, metavar="DIR", help="reward model directory (e.g. runs/demo/reward)")
    score.add_argument("--data", required=True, metavar="FILE", help="JSONL/JSON/Parquet/CSV: prompt + response, or chosen + rejected")
    score.add_argument("--out", metavar="FILE", help="write the rows with their scores (.jsonl or .csv)")
    score.add_argument("--batch-size", type=int, default=32)
    score.set_defaults(handler=cmd_score)

    plot = commands.add_parser("plot", help="draw every stage's metrics into PNG curves (<run_dir>/plots/)")
    plot.add_argument("run_dir", metavar="RUN_DIR")
    plot.set_defaults(handler=cmd_plot)

    demo = commands.add_parser("demo-data", help="regenerate the demo task's data files (data_samples/)")
    demo.add_argument("out", nargs="?", default="data_samples")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=cmd_demo_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "run":
        # Overrides may stand anywhere, even after flags; a lone `key=value` is not a pipeline file.
        if args.pipeline and "=" in args.pipeline and not args.pipeline.endswith((".yaml", ".yml")):
            args.overrides.insert(0, args.pipeline)
            args.pipeline = None
        args.overrides += [item for item in extra if "=" in item and not item.startswith("-")]
        extra = [item for item in extra if item not in args.overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from rlhf.errors import TrainingDiverged, UserError

    def terminated(signum, frame):  # SIGTERM ends a run like Ctrl-C: lock released, checkpoints kept
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)
    try:
        args.handler(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is kept and the same command resumes from it", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
