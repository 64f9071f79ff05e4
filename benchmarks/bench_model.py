"""Our decoder and generation engine against transformers' on identical weights, for either layout.

In one process, on the same random batch: training-step throughput (forward, backward, gradient
clipping, AdamW; fp32) of `RlhfForCausalLM` against transformers' model of the same shape and
weights (SDPA attention), and generation throughput of `rlhf.generation.generate` against that
model's `generate` (with its static KV cache, the faster of its two here, unless `--their-cache
dynamic`). `--layout gpt2` (default) compares with `GPT2LMHeadModel`; `--layout llama` with
`LlamaForCausalLM` (grouped-query attention: `--kv-heads`, default 2; untied head, as Llama
checkpoints). Generation runs at batch 64 by default, and the roofline of our decoding step
(`rlhf.generation.decode_cost`) is printed against this machine's measured rates. Timings
interleave the two models; medians over repeats after warm-up. The last line is machine-readable (speedup = ours / theirs in tokens per second, above 1 when ours is faster):

    RESULT layout=<gpt2|llama> train_speedup=<x> generate_speedup=<y>

Run: python benchmarks/bench_model.py [--layout llama] [--layers 6 --width 384 ...]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import rlhf  # noqa: F401
from rlhf.convert import rlhf_to_hf
from rlhf.generation import decode_cost, generate, measure_machine, roofline_report
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


def reference_model(ours: RlhfForCausalLM):
    """transformers' model (GPT2LMHeadModel or LlamaForCausalLM) with `ours`'s weights, SDPA attention."""
    theirs = rlhf_to_hf(ours)
    theirs.config._attn_implementation = "sdpa"
    return theirs


def model_config(args: argparse.Namespace) -> RlhfConfig:
    shape = dict(vocab_size=args.vocab, n_positions=args.context, n_embd=args.width, n_layer=args.layers, n_head=args.heads)
    if args.layout == "llama":
        return RlhfConfig(layout="llama", n_kv_head=args.kv_heads, tie_word_embeddings=False, **shape)
    return RlhfConfig(**shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=("gpt2", "llama"), default="gpt2")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--kv-heads", type=int, default=2, help="llama layout: key/value heads (grouped-query attention)")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--gen-batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--generation-only", action="store_true", help="skip the training comparison (train_speedup=nan)")
    parser.add_argument("--their-cache", choices=("static", "dynamic"), default="static",
                        help="transformers' KV cache in generate: static was the faster of the two here")  # fmt: skip
    args = parser.parse_args()

    torch.manual_seed(0)
    ours = RlhfForCausalLM(model_config(args))
    theirs = reference_model(ours)
    their_name = type(theirs).__name__
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    kv = f" ({args.kv_heads} key/value)" if args.layout == "llama" else ""
    print(f"model: {args.layout} layout, {args.layers} layers, {args.width} wide, {args.heads} heads{kv}, vocab {args.vocab}, "
          f"{n_params / 1e6:.1f}M params; against {their_name}")  # fmt: skip

    # Training: each model trains its own copy from the same weights on the same batch.
    batch = torch.randint(0, args.vocab, (args.train_batch, args.context))
    tokens_per_step = batch.numel()
    train_ours = train_theirs = float("nan")
    if not args.generation_only:
        train_ours, train_theirs = interleaved_medians([train_step_fn(ours, batch), train_step_fn(theirs, batch)], args.warmup, args.repeats)

    # Generation: same weights again (training moved them), same prompts, no early stop.
    theirs = reference_model(ours).eval()
    ours.eval()
    prompts = torch.randint(2, args.vocab, (args.gen_batch, args.prompt_len))
    mask = torch.ones_like(prompts)
    no_eos = -1  # never sampled: every row runs the full length in both engines

    def gen_ours():
        generate(ours, prompts, mask, args.new_tokens, eos_token_id=no_eos, pad_token_id=0,
                 generator=torch.Generator().manual_seed(0))  # fmt: skip

    def gen_theirs():
        with torch.no_grad():
            theirs.generate(prompts, attention_mask=mask, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                          do_sample=True, top_k=0, pad_token_id=0, cache_implementation=args.their_cache)  # fmt: skip

    gen_tokens = args.gen_batch * args.new_tokens
    gen_ours_s, gen_theirs_s = interleaved_medians([gen_ours, gen_theirs], 1, args.repeats)

    rows = [
        ("train step (tokens/s)", tokens_per_step / train_theirs, tokens_per_step / train_ours),
        ("generation (new tokens/s)", gen_tokens / gen_theirs_s, gen_tokens / gen_ours_s),
    ]
    print(f"{'':28}{their_name:>18}{'rlhf':>12}{'speedup':>10}")
    for name, theirs, mine in rows:
        print(f"{name:28}{theirs:18.0f}{mine:12.0f}{mine / theirs:9.2f}x")
    # How far a decoding step is from this machine's bounds, at the mean cache length of the run.
    cost = decode_cost(ours, args.gen_batch, args.prompt_len + args.new_tokens // 2)
    print(roofline_report(cost, *measure_machine(), seconds_per_token=gen_ours_s / gen_tokens))
    print(f"RESULT layout={args.layout} train_speedup={train_theirs / train_ours:.2f} generate_speedup={gen_theirs_s / gen_ours_s:.2f}")


if __name__ == "__main__":
    main()
