"""Our decoder and generation engine against transformers' GPT-2 on identical weights.

In one process, on the same random batch: training-step throughput (forward, backward, gradient
clipping, AdamW; fp32) of `RlhfForCausalLM` against `GPT2LMHeadModel` (SDPA attention), and
generation throughput of `rlhf.generation.generate` against `GPT2LMHeadModel.generate`.
Medians over repeats after warm-up. The last line is machine-readable:

    RESULT train_speedup=<x> generate_speedup=<y>

Run: python benchmarks/bench_model.py [--layers 6 --width 384 ...]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import rlhf  # noqa: F401
from rlhf.convert import rlhf_to_gpt2
from rlhf.generation import generate
from rlhf.model import RlhfConfig, RlhfForCausalLM


def interleaved_medians(fns: list, warmup: int, repeats: int) -> list[float]:
    """Median seconds of each function, run in turns so that drift (heat, other load) hits all alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, record in zip(fns, times):
            start = time.perf_counter()
            fn()
            record.append(time.perf_counter() - start)
    return [statistics.median(record) for record in times]


def train_step_fn(model, batch):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step():
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--gen-batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = RlhfConfig(
        vocab_size=args.vocab, n_positions=args.context, n_embd=args.width, n_layer=args.layers, n_head=args.heads
    )
    ours = RlhfForCausalLM(config)
    gpt2 = rlhf_to_gpt2(ours)
    gpt2.config._attn_implementation = "sdpa"
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"model: {args.layers} layers, {args.width} wide, {args.heads} heads, vocab {args.vocab}, {n_params / 1e6:.1f}M params")

    # Training: each model trains its own copy from the same weights on the same batch.
    batch = torch.randint(0, args.vocab, (args.train_batch, args.context))
    tokens_per_step = batch.numel()
    train_ours, train_gpt2 = interleaved_medians([train_step_fn(ours, batch), train_step_fn(gpt2, batch)], args.warmup, args.repeats)

    # Generation: same weights again (training moved them), same prompts, no early stop.
    gpt2 = rlhf_to_gpt2(ours).eval()
    gpt2.config._attn_implementation = "sdpa"
    ours.eval()
    prompts = torch.randint(2, args.vocab, (args.gen_batch, args.prompt_len))
    mask = torch.ones_like(prompts)
    no_eos = -1  # never sampled: every row runs the full length in both engines

    def gen_ours():
        generate(ours, prompts, mask, args.new_tokens, eos_token_id=no_eos, pad_token_id=0,
                 generator=torch.Generator().manual_seed(0))  # fmt: skip

    def gen_gpt2():
        with torch.no_grad():
            gpt2.generate(prompts, attention_mask=mask, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                          do_sample=True, top_k=0, pad_token_id=0)  # fmt: skip

    gen_tokens = args.gen_batch * args.new_tokens
    gen_ours_s, gen_gpt2_s = interleaved_medians([gen_ours, gen_gpt2], 1, args.repeats)

    rows = [
        ("train step (tokens/s)", tokens_per_step / train_gpt2, tokens_per_step / train_ours),
        ("generation (new tokens/s)", gen_tokens / gen_gpt2_s, gen_tokens / gen_ours_s),
    ]
    print(f"{'':28}{'GPT2LMHeadModel':>18}{'rlhf':>12}{'speedup':>10}")
    for name, theirs, mine in rows:
        print(f"{name:28}{theirs:18.0f}{mine:12.0f}{mine / theirs:9.2f}x")
    print(f"RESULT train_speedup={train_gpt2 / train_ours:.2f} generate_speedup={gen_gpt2_s / gen_ours_s:.2f}")


if __name__ == "__main__":
    main()
