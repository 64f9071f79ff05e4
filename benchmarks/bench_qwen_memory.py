"""Peak memory and time of Qwen2.5-0.5B's shape in our decoder: SFT steps and one PPO iteration, on CPU.

The shape is Qwen/Qwen2.5-0.5B's `config.json` (transformers `Qwen2Config`): hidden 896, 24 layers,
14 query heads, 2 key/value heads (head width 64), intermediate 4864, vocabulary 151936, tied
embeddings, q/k/v biases (Qwen2), rope_theta 1e6, rms_norm_eps 1e-6, max_position_embeddings 32768,
no sliding window; 494M parameters. The weights are random: transformers' `Qwen2ForCausalLM` is built
and converted to our llama layout with `rlhf.convert.hf_to_rlhf`.

Each measurement runs in its own fresh process (multiprocessing spawn), so peaks do not mix; the
peak is that process's peak resident set size (`ru_maxrss`: weights, gradients, optimizer states,
activations, and the Python/torch runtime itself, about 0.4 GB). fp32 throughout.
- sft: `--steps` training steps (forward, backward, clipping, AdamW) on a random batch of
  `--batch` x `--seq` tokens, without and with gradient checkpointing (non-reentrant, train mode).
- ppo: one PPO iteration (`PPO.rollout_step`, then `rl_training.update`: `--ppo-epochs` passes over
  `--rollout` episodes of `--new-tokens` tokens in minibatches of `--minibatch`) with the four
  models: policy and value trained (gradient checkpointing on), reference and reward model frozen;
  the reward and value models are our `RlhfForSequenceClassification` of the same shape.

Weights, gradients and AdamW's two moments take 16 bytes per trained parameter and 4 per frozen
one, so PPO needs about 16 x (494M + 494M) + 4 x (494M + 494M) = 19.8 GB before activations. Where
that would not fit in the memory available (`--ppo-optimizer auto`), the PPO measurement steps a
stateless optimizer (SGD, no momentum: same weights, gradients and activations) and adds AdamW's
8 bytes per trained parameter to its peak; the table says which. The last line is machine-readable:

    RESULT sft_peak_gb=<a> sft_ckpt_peak_gb=<b> ppo_peak_gb=<c> ppo_peak_measured=<yes|estimate>

Run: python benchmarks/bench_qwen_memory.py [--steps 2] [--only sft,sft_ckpt,ppo]
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import resource
import statistics
import time

GB = 1e9
LIMIT_GB = 24.0
"""The issue's bar: one 24 GB machine (a 24 GB GPU, or this CPU box's RAM)."""
BYTES_TRAINED = 4 + 4 + 8
"""fp32 weight, gradient and AdamW's two moments, per trained parameter."""
BYTES_FROZEN = 4
ADAMW_STATE_BYTES = 8

QWEN25_05B = dict(
    vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
    intermediate_size=4864, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
    tie_word_embeddings=True, use_sliding_window=False, bos_token_id=151643, eos_token_id=151643,
)  # fmt: skip
"""Qwen/Qwen2.5-0.5B's config.json (rope_theta is passed as `rope_parameters` below)."""


def peak_rss_gb() -> float:
    """This process's peak resident set size so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def build_policy(config_overrides: dict | None = None):
    """Our llama-layout causal LM with Qwen2.5-0.5B's shape and random weights, via `hf_to_rlhf`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rlhf.convert import hf_to_rlhf

    torch.manual_seed(0)
    shape = {**QWEN25_05B, **(config_overrides or {})}
    if shape["vocab_size"] <= shape["eos_token_id"]:  # a smoke test's small vocabulary
        shape["bos_token_id"] = shape["eos_token_id"] = None
    rope_theta = shape.pop("rope_theta")
    qwen = Qwen2ForCausalLM(Qwen2Config(**shape, rope_parameters={"rope_type": "default", "rope_theta": rope_theta}))
    ours = hf_to_rlhf(qwen)
    del qwen
    return ours


def enable_checkpointing(model) -> None:
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # it recomputes only in training mode


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def measure_sft(args: argparse.Namespace, checkpointing: bool, overrides: dict | None) -> dict:
    import torch

    model = build_policy(overrides)
    model.train()
    if checkpointing:
        enable_checkpointing(model)
    built = peak_rss_gb()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batch = torch.randint(0, model.config.vocab_size, (args.batch, args.seq))
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {"params": n_params(model), "build_peak_gb": built, "peak_gb": peak_rss_gb(), "step_s": times}


class _Tokens:
    pad_token_id = 0
    eos_token_id = -1  # never sampled: every episode runs the full --new-tokens (the worst case)


def measure_ppo(args: argparse.Namespace, overrides: dict | None) -> dict:
    import copy

    import psutil
    import torch
    from accelerate import Accelerator
    from transformers.initialization import no_init_weights

    from rlhf.config.rl import PPOConfig
    from rlhf.model import RlhfForSequenceClassification
    from rlhf.ppo import PPO
    from rlhf.rl_models import RLModels
    from rlhf.rl_training import update

    policy = build_policy(overrides)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    with no_init_weights():  # random but cheap: every weight is copied from the policy's backbone next
        reward = RlhfForSequenceClassification(policy.config)
        value = RlhfForSequenceClassification(policy.config)
    for head in (reward, value):
        head.transformer.load_state_dict(policy.transformer.state_dict())
        torch.nn.init.normal_(head.score.weight, std=0.02)
        torch.nn.init.zeros_(head.score.bias)
    reward.eval().requires_grad_(False)
    enable_checkpointing(policy)
    enable_checkpointing(value)
    models = RLModels(policy=policy, value=value, reward=reward, reference=reference, tokenizer=_Tokens())
    trained = n_params(policy) + n_params(value)
    built = peak_rss_gb()

    adamw_bytes = ADAMW_STATE_BYTES * trained
    use_adamw = args.ppo_optimizer == "adamw" or (
        args.ppo_optimizer == "auto" and psutil.virtual_memory().available > 2 * adamw_bytes + 4 * GB
    )  # room for the gradients and moments plus a margin for activations
    params = [{"params": policy.parameters()}, {"params": value.parameters()}]
    optimizer = torch.optim.AdamW(params, lr=1e-6) if use_adamw else torch.optim.SGD(params, lr=1e-6)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    config = PPOConfig(prompts="(random token prompts)", rollout_batch_size=args.rollout, minibatch_size=args.minibatch, max_new_tokens=args.new_tokens,
                       ppo_epochs=args.ppo_epochs, lr=1e-6)  # fmt: skip
    prompts = [torch.randint(5, policy.config.vocab_size, (args.prompt_len,)).tolist() for _ in range(args.rollout)]
    algorithm = PPO(models, config)
    rollout, stats = algorithm.rollout_step(prompts, [""] * len(prompts), 0.05, torch.Generator().manual_seed(0))
    accelerator = Accelerator(cpu=True)
    stats.update(update(models, algorithm, rollout, config, 0.05, accelerator, optimizer, schedule, torch.Generator().manual_seed(0)))
    peak = peak_rss_gb()
    return {
        "params": n_params(policy), "value_params": n_params(value), "trained_params": trained, "build_peak_gb": built,
        "peak_gb": peak if use_adamw else peak + adamw_bytes / GB, "measured_peak_gb": peak, "adamw": use_adamw,
        "time_generate": stats["time_generate"], "time_score": stats["time_score"], "time_update": stats["time_update"],
    }  # fmt: skip


def _child(name: str, args: argparse.Namespace, overrides: dict | None, queue) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if name == "ppo":
        queue.put(measure_ppo(args, overrides))
    else:
        queue.put(measure_sft(args, checkpointing=name == "sft_ckpt", overrides=overrides))


def run_isolated(name: str, args: argparse.Namespace, overrides: dict | None = None) -> dict:
    """One measurement in a fresh spawned process: its peak RSS is its own."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(name, args, overrides, queue))
    start = time.perf_counter()
    process.start()
    result = queue.get()
    process.join()
    result["wall_s"] = time.perf_counter() - start
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="sft,sft_ckpt,ppo", help="comma-separated: sft, sft_ckpt, ppo")
    parser.add_argument("--steps", type=int, default=2, help="SFT training steps (the first also allocates AdamW's moments)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rollout", type=int, default=8, help="PPO episodes per iteration")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--minibatch", type=int, default=4)
    parser.add_argument("--ppo-epochs", type=int, default=1)
    parser.add_argument("--ppo-optimizer", choices=("auto", "adamw", "sgd"), default="auto",
                        help="auto: AdamW if its moments fit in the memory available now, else SGD plus AdamW's bytes")  # fmt: skip
    parser.add_argument("--threads", type=int, default=0, help="torch threads in each measurement (0: torch's default)")
    parser.add_argument("--layers", type=int, default=0, help="override the layer count (0: Qwen2.5-0.5B's 24; for smoke tests)")
    parser.add_argument("--vocab", type=int, default=0, help="override the vocabulary (0: 151936; for smoke tests)")
    args = parser.parse_args()
    overrides = {k: v for k, v in (("num_hidden_layers", args.layers), ("vocab_size", args.vocab)) if v}
    names = [n for n in args.only.split(",") if n]
    unknown = set(names) - {"sft", "sft_ckpt", "ppo"}
    if unknown:
        parser.error(f"--only: unknown measurement(s) {', '.join(sorted(unknown))}")

    import psutil
    import torch

    print(f"machine: {platform.machine()}, {psutil.cpu_count()} cores, {psutil.virtual_memory().total / GB:.1f} GB RAM "
          f"({psutil.virtual_memory().available / GB:.1f} GB available), torch {torch.__version__}")  # fmt: skip
    results = {}
    for name in names:
        results[name] = run_isolated(name, args, overrides)
        print(f"  {name}: done in {results[name]['wall_s']:.0f} s", flush=True)

    any_result = next(iter(results.values()))
    params = any_result["params"]
    shape = "Qwen2.5-0.5B" + (f" (overridden: {overrides})" if overrides else "")
    print(f"model: {shape}, {params / 1e6:.1f}M parameters, fp32")
    print(f"{'measurement':54}{'peak GB':>9}{'fits 24 GB':>12}{'seconds':>36}")
    rows = {"sft": "SFT steps, AdamW", "sft_ckpt": "SFT steps, AdamW, gradient checkpointing"}
    for name in ("sft", "sft_ckpt"):
        if name in results:
            r = results[name]
            later = statistics.median(r["step_s"][1:]) if len(r["step_s"]) > 1 else r["step_s"][0]
            timing = f"{later:.1f} s/step (first {r['step_s'][0]:.1f})"
            label = f"{rows[name]}, {args.batch}x{args.seq} tokens"
            print(f"{label:54}{r['peak_gb']:9.2f}{'yes' if r['peak_gb'] <= LIMIT_GB else 'no':>12}{timing:>36}")
    if "ppo" in results:
        r = results["ppo"]
        how = "measured" if r["adamw"] else f"estimate: SGD measured {r['measured_peak_gb']:.2f} + AdamW moments"
        label = f"PPO iteration, checkpointing ({args.rollout}x{args.new_tokens} new)"
        timing = f"gen {r['time_generate']:.0f} + score {r['time_score']:.0f} + update {r['time_update']:.0f}"
        print(f"{label:54}{r['peak_gb']:9.2f}{'yes' if r['peak_gb'] <= LIMIT_GB else 'no':>12}{timing:>36}")
        print(f"  PPO peak: {how}; trained parameters {r['trained_params'] / 1e6:.0f}M (policy + value)")
    static_sft = BYTES_TRAINED * params / GB
    static_ppo = (BYTES_TRAINED * 2 + BYTES_FROZEN * 2) * params / GB
    print(f"estimate before activations: SFT {BYTES_TRAINED} B x {params / 1e6:.0f}M = {static_sft:.1f} GB; "
          f"PPO {BYTES_TRAINED} B x 2 trained + {BYTES_FROZEN} B x 2 frozen models = {static_ppo:.1f} GB")  # fmt: skip

    def figure(name: str, key: str = "peak_gb") -> str:
        return f"{results[name][key]:.2f}" if name in results else "nan"

    measured = ("yes" if results["ppo"]["adamw"] else "estimate") if "ppo" in results else "no"
    print(f"RESULT sft_peak_gb={figure('sft')} sft_ckpt_peak_gb={figure('sft_ckpt')} ppo_peak_gb={figure('ppo')} "
          f"ppo_peak_measured={measured}")  # fmt: skip


if __name__ == "__main__":
    main()
