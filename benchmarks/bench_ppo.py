"""PPO throughput: episodes per second and the generation / scoring / update split, at the demo's shape
or at several sizes and response lengths.

Three ways to run it:

- default: the demo's shapes (decoder and reward model of `pipelines/demo.yaml`, random weights, random
  prompts of the demo's length) with the demo's PPO settings; no response ever stops (EOS is never
  sampled: every iteration generates the full `max_new_tokens`, the worst case). As a baseline measured
  in the same run it also times the rollout generation with transformers' `generate` on the same
  weights converted to GPT-2, the path a PPO loop would take without our engine. This is the side of
  `../shared/bench/trl-ppo-1.12/` (TRL 1.12's PPOTrainer) without `--stop-at-eos`.
- `--run-dir runs/demo`: the trained demo models (SFT policy and reference, reward model and a value
  model from it), the demo's PPO prompts and tokenizer: responses stop at EOS, as in a real run (the
  side of that harness with `--stop-at-eos`).
- `--against-trl PEER`: the comparison with TRL 1.12's PPOTrainer, the last TRL with PPO: this script on
  `--run-dir` (default runs/demo) and `PEER/trl_ppo_bench.py --stop-at-eos` (the harness of
  `../shared/bench/trl-ppo-1.12/`, set up in PEER as its README says, with its own environment in
  PEER/venv) run in turns, `--rounds` times each, each in a fresh process; prints every run's
  episodes/s, the medians and their ratio. Both sides stop at EOS, on the same trained models.
- `--sizes`: the scaling table. Episodes/s and the split at three model sizes (the demo's; ~11M: 6
  layers, 384 wide; GPT-2 small: 12 layers, 768 wide, vocabulary 50,257) and three response lengths
  (16, 64, 256), random weights, full-length responses, fewer episodes per iteration at the larger
  sizes (printed), so the table shows how cost grows with each.

The last line of a single run is machine-readable:

    RESULT episodes_per_second=<x> generate_share=<g> score_share=<s> update_share=<u> engine_vs_hf_generate=<r>

Run: python benchmarks/bench_ppo.py [--pipeline pipelines/demo.yaml] [--iterations 5] [--run-dir runs/demo | --sizes]
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time
from pathlib import Path

import torch

import rlhf  # noqa: F401
from rlhf.config import load_pipeline
from rlhf.model import RlhfConfig, RlhfForCausalLM, RlhfForSequenceClassification
from rlhf.ppo import PPO
from rlhf.ppo_math import FixedKLController
from rlhf.rl_models import RLModels
from rlhf.rl_training import adamw, update

SPLITS = {"time_generate": "generation", "time_score": "scoring (reward, reference, values)", "time_update": "update"}
SIZES = {"demo": None, "11M": (6, 6, 384, 1024), "gpt2-small": (12, 12, 768, 50257)}
"""Size -> (layers, heads, width, vocabulary); None: the pipeline's pretrain shape and the demo vocabulary."""
LENGTHS = (16, 64, 256)


class _Tokens:
    pad_token_id = 0
    eos_token_id = -1  # never sampled: every iteration generates the full max_new_tokens (the worst case)


def random_models(config: RlhfConfig) -> RLModels:
    policy, reference = RlhfForCausalLM(config), RlhfForCausalLM(config).eval().requires_grad_(False)
    reward = RlhfForSequenceClassification(config).eval().requires_grad_(False)
    value = RlhfForSequenceClassification(config)
    return RLModels(policy=policy, value=value, reward=reward, reference=reference, tokenizer=_Tokens())


def trained_models(run_dir: Path, prompts_file: str) -> tuple[RLModels, list[list[int]]]:
    """The demo run's SFT policy and reward model, as the PPO stage loads them, and its encoded prompts."""
    from transformers import AutoTokenizer

    from rlhf.data import read_rows
    from rlhf.responses import encode_prompts
    from rlhf.rl_models import load_models

    tokenizer = AutoTokenizer.from_pretrained(run_dir / "sft")
    models = load_models(run_dir / "sft", run_dir / "reward", tokenizer, lora=None, with_value=True)
    prompts = encode_prompts(tokenizer, [row["prompt"] for row in read_rows(prompts_file)])
    return models, prompts


def measure(models: RLModels, ppo, prompts: list[list[int]], iterations: int) -> dict[str, float]:
    """Median seconds of each phase over `iterations` PPO iterations after one warm-up (the same prompts,
    a new sampling seed each)."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    optimizer = adamw(models.trained(), {"policy": ppo.lr, "value": ppo.value_lr or ppo.lr}, ppo.weight_decay)  # as the RL driver
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    beta = FixedKLController(ppo.kl_coef).value
    splits: dict[str, list[float]] = {key: [] for key in SPLITS}
    for iteration in range(iterations + 1):  # the first is warm-up
        algorithm = PPO(models, ppo)
        rollout, stats = algorithm.rollout_step(prompts, [""] * len(prompts), beta, torch.Generator().manual_seed(iteration))
        stats.update(update(models, algorithm, rollout, ppo, beta, accelerator, optimizer, schedule, torch.Generator().manual_seed(0)))
        if iteration:
            for key in splits:
                splits[key].append(stats[key])
    medians = {key: statistics.median(values) for key, values in splits.items()}
    medians["episodes_per_second"] = len(prompts) / sum(medians[key] for key in SPLITS)
    medians["response_length"] = stats["response_length"]
    return medians


def hf_generate_seconds(policy, prompts: list[list[int]], max_new_tokens: int) -> float:
    """Median seconds of transformers' `generate` on the same weights as GPT-2, full-length responses."""
    from rlhf.convert import rlhf_to_gpt2

    gpt2 = rlhf_to_gpt2(policy).eval()
    ids = torch.tensor(prompts)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        with torch.no_grad():
            gpt2.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                          max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, pad_token_id=0)  # fmt: skip
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def print_split(result: dict[str, float]) -> None:
    total = sum(result[key] for key in SPLITS)
    for key, label in SPLITS.items():
        print(f"{label:38}{result[key]:8.3f} s  {result[key] / total:6.1%}")
    print(f"{'iteration':38}{total:8.3f} s   {result['episodes_per_second']:.1f} episodes/s "
          f"(responses of {result['response_length']:.1f} tokens on average)")  # fmt: skip


def scaling_table(pipeline, iterations: int) -> None:
    """Episodes/s and the phase split at each size and response length."""
    shape, ppo = pipeline.stages["pretrain"].model, pipeline.stages["ppo"]
    print(f"{'size':>11} {'params':>8} {'tokens':>6} {'episodes':>8} {'episodes/s':>10} {'generate':>8} {'score':>6} {'update':>6}")
    for size, dims in SIZES.items():
        layers, heads, width, vocab = dims or (shape.n_layer, shape.n_head, shape.n_embd, 653)
        for length in LENGTHS:
            torch.manual_seed(0)
            config = RlhfConfig(vocab_size=vocab, n_positions=length + 32, n_embd=width, n_layer=layers, n_head=heads,
                                pad_token_id=0, eos_token_id=1)  # fmt: skip
            models = random_models(config)
            episodes = 64 if dims is None else 16 if size == "11M" else 8
            settings = dataclasses.replace(ppo, rollout_batch_size=episodes, max_new_tokens=length,
                                           minibatch_size=min(ppo.minibatch_size, episodes))  # fmt: skip
            prompts = [torch.randint(5, vocab, (12,)).tolist() for _ in range(episodes)]
            result = measure(models, settings, prompts, iterations)
            total = sum(result[key] for key in SPLITS)
            params = sum(p.numel() for p in models.policy.parameters()) / 1e6
            print(f"{size:>11} {params:7.1f}M {length:6d} {episodes:8d} {result['episodes_per_second']:10.2f} "
                  + " ".join(f"{result[key] / total:{width_}.0%}" for key, width_ in zip(SPLITS, (8, 6, 6))), flush=True)


def result_line(text: str) -> dict[str, float]:
    """The fields of a benchmark's last `RESULT key=value ...` line."""
    line = [line for line in text.splitlines() if line.startswith("RESULT ")][-1]
    return {key: float(value) for key, value in (item.split("=") for item in line.split()[1:])}


def gpt2_copies(run_dir: Path, out: Path) -> tuple[Path, Path]:
    """The run's SFT policy as transformers' GPT2LMHeadModel and its reward model as GPT2ForSequenceClassification
    (same weights; GPT-2's score head has no bias: the folded normalisation, a constant shift of every score,
    is left out, which changes no timing), with the tokenizer, for TRL."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, GPT2ForSequenceClassification

    from rlhf.convert import _transpose_conv1d, rlhf_to_gpt2

    tokenizer = AutoTokenizer.from_pretrained(run_dir / "sft")
    policy = rlhf_to_gpt2(AutoModelForCausalLM.from_pretrained(run_dir / "sft"))
    reward = AutoModelForSequenceClassification.from_pretrained(run_dir / "reward")
    gpt2 = GPT2ForSequenceClassification(policy.config.__class__(**{**policy.config.to_dict(), "num_labels": 1}))
    state = _transpose_conv1d(reward.state_dict())
    state.pop("score.bias", None)
    missing, unexpected = gpt2.load_state_dict(state, strict=False)
    if unexpected or any(not key.endswith(".attn.bias") for key in missing):
        raise SystemExit(f"reward model layout mismatch: missing {missing}, unexpected {unexpected}")
    for model, name in ((policy, "sft_gpt2"), (gpt2, "rm_gpt2")):
        model.save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
    return out / "sft_gpt2", out / "rm_gpt2"


def random_run(out: Path, like: Path, layers: int, heads: int, width: int) -> Path:
    """A run folder with randomly initialised SFT and reward models of another shape (the tokenizer of `like`),
    to measure PPO at that shape; EOS is then rarely sampled, so responses run to max_new_tokens."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(like / "sft")
    like_config = AutoConfig.from_pretrained(like / "sft")
    config = RlhfConfig(vocab_size=like_config.vocab_size, n_positions=like_config.n_positions, n_layer=layers, n_head=heads,
                        n_embd=width, pad_token_id=like_config.pad_token_id, eos_token_id=like_config.eos_token_id,
                        bos_token_id=like_config.bos_token_id)  # fmt: skip
    torch.manual_seed(0)
    for name, cls in (("sft", RlhfForCausalLM), ("reward", RlhfForSequenceClassification)):
        cls(config).save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
    return out


def against_trl(args, ppo) -> None:
    """Ours and TRL's PPOTrainer in turns (ours, TRL, ours, ...), each a fresh process, on the same models
    (ours converted to GPT-2 for TRL), the same prompts and PPO settings, both stopping at EOS; medians of
    episodes/s and their ratio."""
    import os
    import subprocess
    import sys
    import tempfile

    peer = args.against_trl.resolve()
    work = Path(tempfile.mkdtemp(prefix="bench_ppo_"))
    run_dir = (args.run_dir or Path("runs/demo")).resolve()
    if args.shape:
        run_dir = random_run(work / "run", run_dir, *args.shape)
    sft, rm = gpt2_copies(run_dir, work)
    env = {**os.environ, "PEER": str(peer), "CLONE": str(Path.cwd()), "VENV": str(Path(sys.executable).parent.parent)}
    settings = ["--iterations", str(args.iterations)]
    sides = {
        "rlhf": [sys.executable, __file__, "--pipeline", args.pipeline, "--run-dir", str(run_dir), "--episodes", str(ppo.rollout_batch_size),
                 "--minibatch", str(ppo.minibatch_size), *settings],
        "trl 1.12": [str(peer / "venv" / "bin" / "python"), str(peer / "trl_ppo_bench.py"), "--stop-at-eos", "--warmup", "1",
                     "--sft", str(sft), "--rm", str(rm), "--batch", str(ppo.rollout_batch_size), "--minibatch", str(ppo.minibatch_size),
                     "--epochs", str(ppo.ppo_epochs), "--max-new-tokens", str(ppo.max_new_tokens), "--temperature", str(ppo.temperature),
                     "--lr", str(ppo.lr), "--kl-coef", str(ppo.kl_coef), *settings],
    }  # fmt: skip
    rates: dict[str, list[float]] = {side: [] for side in sides}
    for round_ in range(args.rounds):
        for side, command in sides.items():
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise SystemExit(f"{side} failed:\n{done.stdout[-1000:]}{done.stderr[-2000:]}")
            rates[side].append(result_line(done.stdout)["episodes_per_second"])
            print(f"round {round_ + 1} {side:8} {rates[side][-1]:7.2f} episodes/s", flush=True)
    ours, theirs = (statistics.median(rates[side]) for side in sides)
    print(f"median: rlhf {ours:.2f} episodes/s, TRL 1.12 {theirs:.2f}: rlhf is {ours / theirs:.2f}x "
          f"(per-round ratios {', '.join(f'{a / b:.2f}' for a, b in zip(*rates.values()))})")
    print(f"RESULT rlhf_episodes_per_second={ours:.2f} trl_episodes_per_second={theirs:.2f} speedup={ours / theirs:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default="pipelines/demo.yaml", help="the pipeline whose pretrain shape and ppo settings to use")
    parser.add_argument("--iterations", type=int, default=5, help="timed PPO iterations, after one warm-up (default 5)")
    parser.add_argument("--vocab", type=int, default=700, help="vocabulary of the random models (the demo tokenizer's is 653)")
    parser.add_argument("--prompt-len", type=int, default=12, help="random prompts' length in tokens (the demo's are about 9-12)")
    parser.add_argument("--run-dir", type=Path, help="a finished run (e.g. runs/demo): its trained models and prompts, stopping at EOS")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--sizes", action="store_true", help="the scaling table: three model sizes by three response lengths")
    mode.add_argument("--against-trl", type=Path, metavar="PEER",
                      help="run ours and TRL 1.12's PPOTrainer (the harness set up in PEER) in turns, and print their ratio")
    parser.add_argument("--rounds", type=int, default=3, help="--against-trl: runs of each side, alternating (default 3)")
    parser.add_argument("--shape", type=int, nargs=3, metavar=("LAYERS", "HEADS", "WIDTH"),
                        help="--against-trl: random models of this shape instead of the run's (e.g. 12 12 768, GPT-2 small's)")
    parser.add_argument("--episodes", type=int, help="episodes per iteration (default: the pipeline's rollout_batch_size)")
    parser.add_argument("--minibatch", type=int, help="episodes per minibatch (default: the pipeline's minibatch_size)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile(dynamic=True) the policy's and value model's forwards first (compilation happens in the "
                             "warm-up iteration, whose time is printed apart)")  # fmt: skip
    args = parser.parse_args()

    pipeline = load_pipeline(args.pipeline)
    shape, ppo = pipeline.stages["pretrain"].model, pipeline.stages["ppo"]
    ppo = dataclasses.replace(ppo, rollout_batch_size=args.episodes or ppo.rollout_batch_size,
                              minibatch_size=args.minibatch or ppo.minibatch_size)  # fmt: skip
    if args.against_trl:
        against_trl(args, ppo)
        return
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    if args.sizes:
        scaling_table(pipeline, args.iterations)
        return
    if args.run_dir:
        models, prompts = trained_models(args.run_dir, ppo.prompts)
        prompts = prompts[: ppo.rollout_batch_size]
    else:
        torch.manual_seed(0)
        config = RlhfConfig(vocab_size=args.vocab, n_positions=shape.n_positions, n_embd=shape.n_embd,
                            n_layer=shape.n_layer, n_head=shape.n_head, pad_token_id=0, eos_token_id=1)  # fmt: skip
        models = random_models(config)
        prompts = [torch.randint(5, args.vocab, (args.prompt_len,)).tolist() for _ in range(ppo.rollout_batch_size)]
    if args.compile:  # the trained models' forwards, which the update step runs most
        for model in (models.policy, models.value):
            model.forward = torch.compile(model.forward, dynamic=True)
    started = time.perf_counter()
    result = measure(models, ppo, prompts, args.iterations)
    if args.compile:
        timed = sum(result[key] for key in SPLITS) * args.iterations
        print(f"compiled forwards: warm-up iteration and compilation about {time.perf_counter() - started - timed:.0f} s")
    policy = models.policy
    print(f"model: {policy.config.n_layer} layers, {policy.config.n_embd} wide, {sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M "
          f"params; {len(prompts)} episodes of up to {ppo.max_new_tokens} tokens per iteration, {ppo.ppo_epochs} PPO epochs")  # fmt: skip
    print_split(result)
    total = sum(result[key] for key in SPLITS)
    engine = "engine_vs_hf_generate=nan"
    if not args.run_dir:  # (a stopping run generates fewer tokens than `generate` forced to full length)
        hf = hf_generate_seconds(policy, prompts, ppo.max_new_tokens)
        print(f"{'generation with transformers generate':38}{hf:8.3f} s   (ours is {hf / result['time_generate']:.2f}x faster)")
        engine = f"engine_vs_hf_generate={hf / result['time_generate']:.2f}"
    print(f"RESULT episodes_per_second={result['episodes_per_second']:.2f} generate_share={result['time_generate'] / total:.3f} "
          f"score_share={result['time_score'] / total:.3f} update_share={result['time_update'] / total:.3f} {engine}")


if __name__ == "__main__":
    main()
