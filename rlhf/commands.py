"""The `rlhf` command's handlers, one per subcommand (the parser and the error boundary are in
rlhf.cli). Each checks its arguments and files before any model loads, raises `UserError` for bad
input, and imports torch, transformers and trl only inside, so that `rlhf --help` answers at once."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_PIPELINE = "pipelines/demo.yaml"

CHAT_COMMANDS = {
    "/help": "list these commands",
    "/reset": "forget the conversation and start over (the system message stays)",
    "/system TEXT": "set the system message (empty: none) and start over",
    "/quit": "end the chat (so do Ctrl-D and Ctrl-C at the prompt; Ctrl-C during a reply stops the reply)",
}
"""What `rlhf chat` understands besides a message: its /help text and its parser's description."""
CHAT_COMMANDS_SUMMARY = ", ".join(CHAT_COMMANDS)
CHAT_HISTORY_FILE = "~/.rlhf_chat_history"
"""Where chat keeps its input history between sessions (readline); an unwritable file only loses the history."""


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
    from rlhf.artifacts import CAUSAL_LM, GPT2, check_model_dir, read_json_object
    from rlhf.errors import UserError

    source = Path(args.to_gpt2 or args.from_gpt2 or args.to_hf or args.from_hf)
    to_ours = args.from_gpt2 is not None or args.from_hf is not None
    if not to_ours:
        check_model_dir(source, CAUSAL_LM, "one of our causal LMs (e.g. runs/demo/sft)")
    elif args.from_gpt2 is not None:
        check_model_dir(source, GPT2, "a transformers GPT-2 model")
    else:
        from rlhf.convert import SUPPORTED_HF_ARCHITECTURES

        # The supported class the folder names, else all of them (then the check refuses it, naming both).
        named = read_json_object(source / "config.json").get("architectures") if (source / "config.json").is_file() else None
        found = [name for name in named or [] if name in SUPPORTED_HF_ARCHITECTURES] if isinstance(named, list) else []
        check_model_dir(source, found[0] if found else ", ".join(SUPPORTED_HF_ARCHITECTURES), "a transformers causal LM")
    _check_out(args.out, directory=True)
    import rlhf.model  # noqa: F401
    from rlhf.convert import convert_directory

    try:
        if args.from_hf is not None or args.to_hf is not None:
            convert_directory(source, args.out, to_hf=args.to_hf is not None)
        else:
            convert_directory(source, args.out, to_gpt2=args.to_gpt2 is not None)
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
    device = _device(args)
    from rlhf.data import read_rows
    from rlhf.scoring import RewardScorer, check_score_rows, score_file, write_rows

    rows = read_rows(args.data)  # a bad data file is refused before the model loads
    check_score_rows(args.data, rows)
    scorer = RewardScorer(args.reward, device=device, batch_size=args.batch_size)
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


def _device(args: argparse.Namespace) -> str:
    """The torch device `--device` names, checked (it exists here) before any model loads."""
    from rlhf.devices import resolve_device

    return resolve_device(args.device)


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
    _device(args)  # checked now; kept as named, so that the command recorded in compare.json says "auto" by omission
    settings = CompareSettings(
        prompts=args.prompts, reward=args.reward, reference=args.reference, samples=args.samples, seed=args.seed,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, judge=args.judge,
        eval_data=args.eval_data, batch_size=args.batch_size,
        device=None if args.device == "auto" else args.device,
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
    device = _device(args)
    result = evaluate_model(args.model, args.data, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            seed=args.seed, batch_size=args.batch_size, samples=args.samples, device=device)  # fmt: skip
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
    if args.num_return_sequences < 1:
        raise UserError(f"--num-return-sequences must be positive, got {args.num_return_sequences}")
    if args.out:
        _check_out(args.out)
    from rlhf.data import check_prompt_rows, read_rows

    rows = [{"prompt": args.prompt}] if args.prompt is not None else read_rows(args.prompts)
    check_prompt_rows(args.prompts or "--prompt", rows)
    _check_policy(args, args.model)
    device = _device(args)
    from rlhf.evaluation import load_policy
    from rlhf.responses import prompt_text, sample_responses

    model, tokenizer = load_policy(args.model, device)
    prompts = [row["prompt"] for row in rows]
    n = args.num_return_sequences
    responses = sample_responses(model, tokenizer, prompts, args.max_new_tokens, args.temperature, args.seed,
                                 top_k=args.top_k, top_p=args.top_p, copies=n)  # fmt: skip
    answers = [responses[i * n : (i + 1) * n] for i in range(len(prompts))]  # prompt i's n samples
    if args.out:
        from rlhf.artifacts import atomic_write_text

        lines = [json.dumps({"prompt": p, "sample": i, "response": r}, ensure_ascii=False)
                 for p, group in zip(prompts, answers) for i, r in enumerate(group)]  # fmt: skip
        atomic_write_text(args.out, "\n".join(lines) + "\n")
        print(f"wrote {len(lines)} responses to {args.out}")
        return
    for prompt, group in zip(prompts, answers):
        numbered = group if n == 1 else [f"[{i + 1}] {r}" for i, r in enumerate(group)]
        heading = [] if args.prompt is not None else [f"> {prompt_text(prompt)}"]
        print("\n".join(heading + numbered) + ("" if args.prompt is not None else "\n"))


def _chat_help() -> str:
    return "\n".join(f"  {name:14}{what}" for name, what in CHAT_COMMANDS.items())


def _chat_history(path: str):
    """readline's line editing and history for `input()`, loaded from `path`; returns a function that saves
    the history, or None where Python has no readline (then `input()` is plain, as on Windows)."""
    try:
        import readline
    except ImportError:
        return None
    file = Path(path).expanduser()
    readline.set_history_length(1000)
    try:
        readline.read_history_file(file)
    except OSError:  # no history yet, or unreadable: start empty
        pass

    def save() -> None:
        try:
            readline.write_history_file(file)
        except OSError:  # a read-only home loses the history, never the chat
            pass

    return save


def _chat_reply(model, tokenizer, conversation: list[dict], args: argparse.Namespace, seed: int) -> str:
    """The model's reply, printed as it is generated. Ctrl-C stops it and returns what was shown, which then
    stays in the conversation as the reply; SIGTERM (`Terminated`) still ends the command."""
    import sys

    from rlhf.errors import Terminated
    from rlhf.responses import stream_response

    shown: list[str] = []

    def write(piece: str) -> None:  # on screen at once
        shown.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()

    print("assistant> ", end="", flush=True)
    try:
        reply = stream_response(model, tokenizer, conversation, args.max_new_tokens, write, args.temperature, seed,
                                top_k=args.top_k, top_p=args.top_p)  # fmt: skip
    except KeyboardInterrupt as stop:
        if isinstance(stop, Terminated):
            raise
        print("\n(stopped)")
        return "".join(shown)
    print()
    return reply


def cmd_chat(args: argparse.Namespace) -> None:
    from rlhf.errors import Terminated

    _sampling(args)
    _check_policy(args, args.model)
    device = _device(args)
    from rlhf.evaluation import load_policy
    from rlhf.responses import encode_prompts

    model, tokenizer = load_policy(args.model, device)
    save_history = _chat_history(CHAT_HISTORY_FILE)
    system = args.system
    history: list[dict] = []
    print(f"chatting with {args.model} on {device} (context {model.config.n_positions} tokens); "
          "/help lists the commands; Ctrl-C stops a reply; /quit, Ctrl-D or Ctrl-C at the prompt ends")  # fmt: skip
    turn = 0
    try:
        while True:
            try:
                text = input("you> ").strip()
            except (EOFError, KeyboardInterrupt) as stop:
                if isinstance(stop, Terminated):
                    raise
                print()
                return
            command, _, rest = text.partition(" ")
            if command in ("/quit", "/exit"):
                return
            if command == "/help":
                print(_chat_help())
                continue
            if command == "/reset":
                history = []
                print("(history cleared)")
                continue
            if command == "/system":
                system, history = rest.strip() or None, []
                print(f"(system message {'set' if system else 'removed'}; history cleared)")
                continue
            if command.startswith("/"):
                print(f"(unknown command {command}; /help lists them)")
                continue
            if not text:
                continue
            history.append({"role": "user", "content": text})
            conversation = ([{"role": "system", "content": system}] if system else []) + history
            if len(encode_prompts(tokenizer, [conversation])[0]) > model.config.n_positions - args.max_new_tokens:
                print("(the conversation is longer than the context: the model sees only its end)")
            reply = _chat_reply(model, tokenizer, conversation, args, seed=args.seed + turn)
            turn += 1
            history.append({"role": "assistant", "content": reply or " "})
    finally:
        if save_history is not None:
            save_history()


def cmd_status(args: argparse.Namespace) -> None:
    from rlhf.status import format_status, run_status, status_json  # no torch: status answers in well under 2 s

    status = run_status(args.run_dir, args.pipeline)
    print(status_json(status) if args.json else format_status(status))


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
