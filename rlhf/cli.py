"""The `rlhf` command: its argument parser and the one error boundary (`main`). The handlers are in
rlhf.commands; heavy imports (torch, transformers, trl) happen inside them, so `rlhf --help` answers
at once. Bad input exits 2 with a one-line `error: ...`."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from rlhf import commands


def package_version() -> str:
    """The installed distribution's version (importlib.metadata: no torch import)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rlhf")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description="Staged RLHF for an in-house GPT decoder.")
    parser.add_argument("--version", action="version", version=f"rlhf {package_version()}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = subparsers.add_parser(
        "run", help="run a pipeline's stages (tokenizer, pretrain, sft, ...) through one artifact directory",
        description="Run a pipeline. Stages whose config and inputs are unchanged are skipped; an interrupted "
        "stage resumes from its last checkpoint. Overrides: key.path=value, e.g. stages.sft.lr=3e-4. "
        "--dry-run prints the resolved config, what would run and why, and every check's verdict, writing nothing.",
    )  # fmt: skip
    run.add_argument("pipeline", nargs="?", help=f"pipeline YAML (default: {commands.DEFAULT_PIPELINE})")
    run.add_argument("overrides", nargs="*", help="key.path=value settings that replace the YAML's")
    run.add_argument("--run-dir", help="artifact directory (default: the YAML's run_dir)")
    order = run.add_mutually_exclusive_group()
    order.add_argument("--only", metavar="STAGE", help="run this stage only (its upstream stages must be complete)")
    order.add_argument("--from", dest="start", metavar="STAGE", help="re-run this stage and every later one")
    run.add_argument("--force", action="store_true", help="re-run the selected stages even if up to date")
    run.add_argument("--dry-run", action="store_true",
                     help="print the resolved config, the plan (skip or run, and why) and every check's verdict; "
                     "write nothing (exit 2 if the run would stop)")  # fmt: skip
    loudness = run.add_mutually_exclusive_group()
    loudness.add_argument("-q", "--quiet", action="store_true",
                          help="print each stage's start, end and results only (no step lines or progress bars)")
    loudness.add_argument("-v", "--verbose", action="store_true",
                          help="print every logged step, and the libraries' own logs, warnings and progress bars")
    run.set_defaults(handler=commands.cmd_run)

    convert = subparsers.add_parser("convert", help="convert a model to or from transformers (GPT-2, Llama, Qwen2, Mistral)")
    direction = convert.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-hf", metavar="SRC", help="transformers GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM "
                           "or MistralForCausalLM directory (sharded and bf16 alike) to convert to ours")
    direction.add_argument("--to-hf", metavar="SRC", help="our model directory to convert to the matching transformers class")
    direction.add_argument("--from-gpt2", metavar="SRC", help="GPT2LMHeadModel directory to convert to ours")
    direction.add_argument("--to-gpt2", metavar="SRC", help="our model directory to convert to GPT2LMHeadModel")
    convert.add_argument("--out", required=True, metavar="DST", help="output directory (save_pretrained layout)")
    convert.set_defaults(handler=commands.cmd_convert)

    def device_flag(command) -> None:
        command.add_argument("--device", default="auto",
                             help="where the model runs: auto (cuda if available, else cpu), cpu, cuda or cuda:N (default auto)")  # fmt: skip

    score = subparsers.add_parser("score", help="score a data file's responses (or preference pairs) with a reward model")
    score.add_argument("--reward", required=True, metavar="DIR", help="reward model directory (e.g. runs/demo/reward)")
    score.add_argument("--data", required=True, metavar="FILE", help="JSONL/JSON/Parquet/CSV: prompt + response, or chosen + rejected")
    score.add_argument("--out", metavar="FILE", help="write the rows with their scores (.jsonl or .csv)")
    score.add_argument("--batch-size", type=int, default=32, help="texts scored together (default 32)")
    device_flag(score)
    score.set_defaults(handler=commands.cmd_score)

    def sampling_flags(command, temperature: float, max_new_tokens: int = 64, top: bool = False):
        command.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"response length limit (default {max_new_tokens})")
        command.add_argument("--temperature", type=float, default=temperature, help=f"sampling temperature; 0 is greedy (default {temperature})")
        command.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
        if top:
            command.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (default 0: all)")
            command.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")

    compare = subparsers.add_parser(
        "compare", help="compare policies on the same held-out prompts (RM score, win rate and tests, KL, ...)",
        description="Every policy answers the same prompts with the same sampling seeds; the first policy is the "
        "baseline for win rates. A policy DIR@best-of-N is best-of-N sampling from DIR: N answers per prompt, the one "
        "the --reward model scores highest kept (its KL is analytic, log N - (N-1)/N). Writes a table, compare.json, "
        "compare.md and PNG plots to --out.",
    )  # fmt: skip
    compare.add_argument("policies", nargs="+", metavar="POLICY",
                         help="policy directories (e.g. runs/demo/sft runs/demo/ppo), or DIR@best-of-N (e.g. runs/demo/sft@best-of-16)")  # fmt: skip
    compare.add_argument("--reward", required=True, metavar="DIR", help="reward model directory (e.g. runs/demo/reward)")
    compare.add_argument("--prompts", required=True, metavar="FILE", help="held-out prompts; a 'reference' column adds BLEU and perplexity")
    compare.add_argument("--reference", metavar="DIR", help="policy to measure KL against (usually the SFT model)")
    compare.add_argument("--samples", type=int, default=0, metavar="N", help="use the first N prompts (default: all)")
    compare.add_argument("--judge", metavar="MODULE:FUNCTION", help="gold judge, e.g. rlhf.demo_task:gold_judge")
    compare.add_argument("--eval-data", metavar="FILE", help="held-out SFT data for perplexity (default: the prompts' references)")
    compare.add_argument("--batch-size", type=int, default=64, help="rows sampled together, part of the seeding (default 64)")
    compare.add_argument("--out", default="compare", metavar="DIR", help="output directory (default: compare)")
    sampling_flags(compare, temperature=1.0)
    device_flag(compare)
    compare.set_defaults(handler=commands.cmd_compare)

    evaluate = subparsers.add_parser(
        "eval", help="perplexity, next-token accuracy and BLEU of a model on a text or SFT dataset",
        description="Text (.txt, or rows with a 'text' column): perplexity over every token. SFT data (messages, "
        "prompt + completion, or prompt + reference): perplexity and next-token accuracy of the reference answers, "
        "and corpus BLEU (sacrebleu) of the model's own responses against them.",
    )  # fmt: skip
    evaluate.add_argument("model", metavar="MODEL", help="model directory (e.g. runs/demo/sft)")
    evaluate.add_argument("--data", required=True, metavar="FILE",
                          help="text (.txt, or a 'text' column) or SFT data with reference answers (JSONL/JSON/Parquet/CSV)")  # fmt: skip
    evaluate.add_argument("--samples", type=int, default=0, metavar="N", help="use the first N rows (default: all)")
    evaluate.add_argument("--batch-size", type=int, default=32, help="rows evaluated and sampled together (default 32)")
    evaluate.add_argument("--out", metavar="FILE", help="write the results as JSON")
    sampling_flags(evaluate, temperature=0.0)
    device_flag(evaluate)
    evaluate.set_defaults(handler=commands.cmd_eval)

    generate = subparsers.add_parser("generate", help="sample responses to a prompt or a prompt file")
    generate.add_argument("model", metavar="MODEL", help="model directory (e.g. runs/demo/ppo)")
    generate.add_argument("--prompt", metavar="TEXT", help="one user message")
    generate.add_argument("--prompts", metavar="FILE", help="a prompt file ('prompt' column)")
    generate.add_argument("--out", metavar="FILE",
                          help="write JSONL rows {prompt, sample, response} instead of printing them (sample: 0 to N-1)")  # fmt: skip
    generate.add_argument("--num-return-sequences", type=int, default=1, metavar="N",
                          help="answers sampled per prompt, each a different sample (default 1)")  # fmt: skip
    sampling_flags(generate, temperature=0.7, top=True)
    device_flag(generate)
    generate.set_defaults(handler=commands.cmd_generate)

    chat = subparsers.add_parser(
        "chat", help="talk with a model interactively",
        description="Replies stream as they are generated. Line editing and history (up arrow) where Python has "
        f"readline; history is kept in {commands.CHAT_HISTORY_FILE}. Commands: {commands.CHAT_COMMANDS_SUMMARY}.",
    )  # fmt: skip
    chat.add_argument("model", metavar="MODEL", help="model directory (e.g. runs/demo/ppo)")
    chat.add_argument("--system", metavar="TEXT", help="a system message to start the conversation with")
    sampling_flags(chat, temperature=0.7, top=True)
    device_flag(chat)
    chat.set_defaults(handler=commands.cmd_chat)

    status = subparsers.add_parser(
        "status", help="each stage's status (complete, partial, corrupted, stale), times, headline metrics and what `rlhf run` would do",
        description="A table of a run directory's stages: complete, partial (with its last complete checkpoint), corrupted "
        "(an output or manifest that no longer matches) or, against a pipeline file, stale, with the reason, times and "
        "headline metrics. With PIPELINE.yaml, every stage of it in run order and what `rlhf run PIPELINE.yaml --run-dir "
        "RUN_DIR` would do next. Reads only: no lock, no files written.",
    )  # fmt: skip
    status.add_argument("run_dir", metavar="RUN_DIR", help="the run's artifact directory (e.g. runs/demo); wins over the pipeline's run_dir")
    status.add_argument("pipeline", nargs="?", metavar="PIPELINE.yaml",
                        help="judge the stages against this pipeline: what is stale, and what `rlhf run` would do next")  # fmt: skip
    status.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    status.set_defaults(handler=commands.cmd_status)

    plot = subparsers.add_parser("plot", help="draw every stage's metrics into PNG curves (<run_dir>/plots/)")
    plot.add_argument("run_dir", metavar="RUN_DIR", help="a run's artifact directory (e.g. runs/demo)")
    plot.set_defaults(handler=commands.cmd_plot)

    demo = subparsers.add_parser("demo-data", help="regenerate the demo task's data files (data_samples/)")
    demo.add_argument("out", nargs="?", default="data_samples", metavar="OUT", help="output directory (default data_samples)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the generated data (default 0)")
    demo.set_defaults(handler=commands.cmd_demo_data)
    return parser


def input_error_message(error: Exception) -> str | None:
    """One line for an error that bad input (a file, a folder, its format) causes; None for a bug.

    File-system errors, JSON and UTF-8 errors and safetensors' errors land here from any command.
    (tokenizers raises a bare Exception, so `check_model_dir` loads tokenizer.json first.)
    """
    import json

    if isinstance(error, OSError):
        where = error.filename2 if error.filename2 is not None else error.filename  # a rename or copy: name its target
        problem = error.strerror or str(error)
        if isinstance(error, FileExistsError) and where and Path(where).is_file():
            problem = "is a file where a folder is needed"
        return f"{where}: {problem}" if where is not None else problem
    if isinstance(error, json.JSONDecodeError):
        return f"invalid JSON: line {error.lineno}, column {error.colno}: {error.msg}"
    if isinstance(error, UnicodeDecodeError):
        return f"not valid UTF-8 (byte 0x{error.object[error.start]:02x} at offset {error.start})"
    if type(error).__name__ == "SafetensorError":  # by name: importing safetensors here would slow every command
        return f"not a readable safetensors file: {error}"
    return None


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
    # Loading a local checkpoint needs no "Loading weights" bar; our own bars show the long work.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from rlhf import console

    console.configure(console.VERBOSE if getattr(args, "verbose", False) else console.QUIET if getattr(args, "quiet", False) else console.NORMAL)
    from rlhf.distributed import is_main_process, leave
    from rlhf.errors import Terminated, TrainingDiverged, UserError

    def terminated(signum, frame):  # SIGTERM ends a run like Ctrl-C: lock released, checkpoints kept
        raise Terminated

    signal.signal(signal.SIGTERM, terminated)

    def report(error: Exception) -> None:  # once: not again by the processes the main one told
        if not getattr(error, "reported_by_main", False):
            print(f"error: {error}", file=sys.stderr)

    try:
        args.handler(args)
        leave(synchronise=True)
    except UserError as error:
        report(error)
        return 2
    except TrainingDiverged as error:
        report(error)
        return 1
    except Exception as error:  # the one boundary: a file or format problem is the user's to fix
        message = input_error_message(error)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if is_main_process():
            # a second Ctrl-C may stop a stage before or while it saves: say only what is certain
            resumes = "; checkpoints already saved are kept and the same command resumes from the last of them"
            print("interrupted" + (resumes if args.command == "run" else ""), file=sys.stderr)
        return 130
    finally:
        leave()
    return 0


if __name__ == "__main__":
    sys.exit(main())
