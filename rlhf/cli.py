"""The `rlhf` command. Heavy imports (torch, transformers, trl) happen inside the commands, so
`rlhf --help` answers at once. Bad input exits 2 with a one-line `error: ...`."""

from __future__ import annotations

import argparse
import os
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

    from rlhf.distributed import quiet_unless_main
    from rlhf.pipeline import describe_plan, run_pipeline  # torch and transformers load only if a stage runs

    with quiet_unless_main():  # under torchrun, rank 0 alone prints
        if not args.dry_run:
            run_pipeline(config, only=args.only, start=args.start, force=args.force)
            return
        lines, error = describe_plan(config, only=args.only, start=args.start, force=args.force)
        print("\n".join(lines))
        if error:
            raise error


def cmd_convert(args: argparse.Namespace) -> None:
    from rlhf.artifacts import CAUSAL_LM, GPT2, check_model_dir
    from rlhf.errors import UserError

    to_gpt2 = args.to_gpt2 is not None
    source = Path(args.to_gpt2 if to_gpt2 else args.from_gpt2)
    if to_gpt2:
        check_model_dir(source, CAUSAL_LM, "one of our causal LMs (e.g. runs/demo/sft)")
    else:
        check_model_dir(source, GPT2, "a transformers GPT-2 model")
    _check_out(args.out, directory=True)
    import rlhf.model  # noqa: F401
    from rlhf.convert import convert_directory

    try:
        convert_directory(source, args.out, to_gpt2=to_gpt2)
    except ValueError as error:
        raise UserError(f"{source}: {error}") from None
    print(f"wrote {args.out}")


def cmd_score(args: argparse.Namespace) -> None:
    from rlhf.artifacts import REWARD_MODEL, check_model_dir
    from rlhf.errors import UserError

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    if args.out and Path(args.out).suffix not in (".jsonl", ".csv"):
        raise UserError(f"{args.out}: output must end in .jsonl or .csv")
    if args.out:
        _check_out(args.out)
    check_model_dir(args.reward, REWARD_MODEL, "a reward model (the reward stage's output, e.g. runs/demo/reward)")
    from rlhf.data import read_rows
    from rlhf.scoring import RewardScorer, check_score_rows, score_file, write_rows

    rows = read_rows(args.data)  # a bad data file is refused before the model loads
    check_score_rows(args.data, rows)
    scorer = RewardScorer(args.reward, batch_size=args.batch_size)
    rows, summary = score_file(scorer, args.data, rows=rows)
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


def _check_out(out: str, directory: bool = False) -> None:
    """Refuse an `--out` that cannot be written, before any work: a folder where a file goes, or the reverse."""
    from rlhf.errors import UserError

    path = Path(out)
    if directory and path.exists() and not path.is_dir():
        raise UserError(f"{out}: --out names an output directory, but this is a file")
    if not directory and path.is_dir():
        raise UserError(f"{out}: --out names an output file, but this is a directory")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{out}: --out lies under {parent}, which is a file")
            break


def _sampling(args: argparse.Namespace) -> None:
    """Check the sampling flags a command has, before any model is read."""
    import math

    from rlhf.errors import UserError

    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UserError(f"--temperature must be a finite number >= 0 (0 is greedy), got {args.temperature}")
    if getattr(args, "batch_size", 1) < 1:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    if getattr(args, "samples", 0) < 0:
        raise UserError(f"--samples must be >= 0 (0: all), got {args.samples}")
    if getattr(args, "top_k", 0) < 0:
        raise UserError(f"--top-k must be >= 0 (0: off), got {args.top_k}")
    top_p = getattr(args, "top_p", 1.0)
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise UserError(f"--top-p must be in (0, 1] (1: off), got {top_p}")
    from rlhf.config import MAX_INT

    if not 0 <= args.seed <= MAX_INT:  # as a pipeline's seed
        raise UserError(f"--seed must be in [0, {MAX_INT}], got {args.seed}")


def _check_policy(args: argparse.Namespace, path: str) -> None:
    """Check a policy folder (the one place: `check_model_dir`) and that --max-new-tokens fits its context."""
    from rlhf.artifacts import CAUSAL_LM, check_model_dir
    from rlhf.errors import ArtifactError, UserError

    config = check_model_dir(path, CAUSAL_LM, "a policy (the pretrain, sft or ppo stage's output)")
    context = config.get("n_positions")
    if not isinstance(context, int) or isinstance(context, bool) or context < 2:
        raise ArtifactError(f"{Path(path) / 'config.json'}: n_positions must be an integer >= 2, got {context!r}")
    if args.max_new_tokens >= context:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: must be less than the context of {path} ({context} tokens)")


def cmd_compare(args: argparse.Namespace) -> None:
    from rlhf.compare import CompareSettings, compare_policies, format_table, write_comparison

    _sampling(args)
    _check_out(args.out, directory=True)
    settings = CompareSettings(
        prompts=args.prompts, reward=args.reward, reference=args.reference, samples=args.samples, seed=args.seed,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, judge=args.judge,
        eval_data=args.eval_data, batch_size=args.batch_size,
    )  # fmt: skip
    result = compare_policies(args.policies, settings)
    print(format_table(result))
    for path in write_comparison(result, args.out):
        print(f"wrote {path}")


def cmd_eval(args: argparse.Namespace) -> None:
    from rlhf.evaluation import evaluate_model, format_evaluation

    _sampling(args)
    if args.out:
        _check_out(args.out)
    _check_policy(args, args.model)
    result = evaluate_model(args.model, args.data, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            seed=args.seed, batch_size=args.batch_size, samples=args.samples)  # fmt: skip
    print(format_evaluation(result))
    if args.out:
        import json

        from rlhf.artifacts import atomic_write_text
        from rlhf.compare import finite

        atomic_write_text(args.out, json.dumps(finite(result), indent=1) + "\n")
        print(f"wrote {args.out}")


def cmd_generate(args: argparse.Namespace) -> None:
    import json

    from rlhf.errors import UserError

    _sampling(args)
    if (args.prompt is None) == (args.prompts is None):
        raise UserError("give --prompt TEXT or --prompts FILE")
    if args.out:
        _check_out(args.out)
    from rlhf.data import check_prompt_rows, read_rows

    rows = [{"prompt": args.prompt}] if args.prompt is not None else read_rows(args.prompts)
    check_prompt_rows(args.prompts or "--prompt", rows)
    _check_policy(args, args.model)
    from rlhf.evaluation import load_policy
    from rlhf.responses import prompt_text, sample_responses

    model, tokenizer = load_policy(args.model)
    prompts = [row["prompt"] for row in rows]
    responses = sample_responses(model, tokenizer, prompts, args.max_new_tokens, args.temperature, args.seed,
                                 top_k=args.top_k, top_p=args.top_p)  # fmt: skip
    if args.out:
        from rlhf.artifacts import atomic_write_text

        lines = [json.dumps({"prompt": p, "response": r}, ensure_ascii=False) for p, r in zip(prompts, responses)]
        atomic_write_text(args.out, "\n".join(lines) + "\n")
        print(f"wrote {len(lines)} responses to {args.out}")
    elif args.prompt is not None:
        print(responses[0])
    else:
        for prompt, response in zip(prompts, responses):
            print(f"> {prompt_text(prompt)}\n{response}\n")


def cmd_chat(args: argparse.Namespace) -> None:
    _sampling(args)
    _check_policy(args, args.model)
    from rlhf.evaluation import load_policy
    from rlhf.responses import encode_prompts, sample_responses

    model, tokenizer = load_policy(args.model)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    print(f"chatting with {args.model} (context {model.config.n_positions} tokens); /reset starts over, /quit or Ctrl-D ends")
    turn = 0
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            print()
            return
        if text in ("/quit", "/exit"):
            return
        if text == "/reset":
            history = []
            print("(history cleared)")
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        conversation = system + history
        if len(encode_prompts(tokenizer, [conversation])[0]) > model.config.n_positions - args.max_new_tokens:
            print("(the conversation is longer than the context: the model sees only its end)")
        reply = sample_responses(model, tokenizer, [conversation], args.max_new_tokens, args.temperature,
                                 args.seed + turn, top_k=args.top_k, top_p=args.top_p)[0]  # fmt: skip
        turn += 1
        print(f"assistant> {reply}")
        history.append({"role": "assistant", "content": reply or " "})


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
    from rlhf.demo_task import DATA_FILES, write_data_samples

    _check_out(args.out, directory=True)
    for name in DATA_FILES:
        _check_out(str(Path(args.out) / name))
    for name, path in write_data_samples(args.out, seed=args.seed).items():
        print(f"wrote {path}")


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
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run", help="run a pipeline's stages (tokenizer, pretrain, sft, ...) through one artifact directory",
        description="Run a pipeline. Stages whose config and inputs are unchanged are skipped; an interrupted "
        "stage resumes from its last checkpoint. Overrides: key.path=value, e.g. stages.sft.lr=3e-4. "
        "--dry-run prints the resolved config, what would run and why, and every check's verdict, writing nothing.",
    )  # fmt: skip
    run.add_argument("pipeline", nargs="?", help=f"pipeline YAML (default: {DEFAULT_PIPELINE})")
    run.add_argument("overrides", nargs="*", help="key.path=value settings that replace the YAML's")
    run.add_argument("--run-dir", help="artifact directory (default: the YAML's run_dir)")
    order = run.add_mutually_exclusive_group()
    order.add_argument("--only", metavar="STAGE", help="run this stage only (its upstream stages must be complete)")
    order.add_argument("--from", dest="start", metavar="STAGE", help="re-run this stage and every later one")
    run.add_argument("--force", action="store_true", help="re-run the selected stages even if up to date")
    run.add_argument("--dry-run", action="store_true",
                     help="print the resolved config, the plan (skip or run, and why) and every check's verdict; "
                     "write nothing (exit 2 if the run would stop)")  # fmt: skip
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

    def sampling_flags(command, temperature: float, max_new_tokens: int = 64, top: bool = False):
        command.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"response length limit (default {max_new_tokens})")
        command.add_argument("--temperature", type=float, default=temperature, help=f"sampling temperature; 0 is greedy (default {temperature})")
        command.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
        if top:
            command.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (default 0: all)")
            command.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")

    compare = commands.add_parser(
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
    compare.set_defaults(handler=cmd_compare)

    evaluate = commands.add_parser(
        "eval", help="perplexity, next-token accuracy and BLEU of a model on a text or SFT dataset",
        description="Text (.txt, or rows with a 'text' column): perplexity over every token. SFT data (messages, "
        "prompt + completion, or prompt + reference): perplexity and next-token accuracy of the reference answers, "
        "and corpus BLEU (sacrebleu) of the model's own responses against them.",
    )  # fmt: skip
    evaluate.add_argument("model", metavar="MODEL", help="model directory (e.g. runs/demo/sft)")
    evaluate.add_argument("--data", required=True, metavar="FILE")
    evaluate.add_argument("--samples", type=int, default=0, metavar="N", help="use the first N rows (default: all)")
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--out", metavar="FILE", help="write the results as JSON")
    sampling_flags(evaluate, temperature=0.0)
    evaluate.set_defaults(handler=cmd_eval)

    generate = commands.add_parser("generate", help="sample responses to a prompt or a prompt file")
    generate.add_argument("model", metavar="MODEL", help="model directory (e.g. runs/demo/ppo)")
    generate.add_argument("--prompt", metavar="TEXT", help="one user message")
    generate.add_argument("--prompts", metavar="FILE", help="a prompt file ('prompt' column)")
    generate.add_argument("--out", metavar="FILE", help="write JSONL rows {prompt, response} instead of printing them")
    sampling_flags(generate, temperature=0.7, top=True)
    generate.set_defaults(handler=cmd_generate)

    chat = commands.add_parser("chat", help="talk with a model interactively")
    chat.add_argument("model", metavar="MODEL", help="model directory (e.g. runs/demo/ppo)")
    chat.add_argument("--system", metavar="TEXT", help="a system message to start the conversation with")
    sampling_flags(chat, temperature=0.7, top=True)
    chat.set_defaults(handler=cmd_chat)

    plot = commands.add_parser("plot", help="draw every stage's metrics into PNG curves (<run_dir>/plots/)")
    plot.add_argument("run_dir", metavar="RUN_DIR")
    plot.set_defaults(handler=cmd_plot)

    demo = commands.add_parser("demo-data", help="regenerate the demo task's data files (data_samples/)")
    demo.add_argument("out", nargs="?", default="data_samples")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=cmd_demo_data)
    return parser


def input_error_message(error: Exception) -> str | None:
    """One line for an error that bad input (a file, a folder, its format) causes; None for a bug.

    File-system errors, JSON and UTF-8 errors and safetensors' errors land here from any command.
    (tokenizers raises a bare Exception, so `check_model_dir` reads tokenizer.json as JSON first.)
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
    from rlhf.distributed import is_main_process, leave
    from rlhf.errors import TrainingDiverged, UserError

    def terminated(signum, frame):  # SIGTERM ends a run like Ctrl-C: lock released, checkpoints kept
        raise KeyboardInterrupt

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
