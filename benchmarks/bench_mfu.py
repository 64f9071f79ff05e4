"""Training MFU of the GPT-2-small pipeline on one CUDA GPU, against the card's measured bf16 rate.

1. The card's dense bf16 matrix-product rate, measured: 8192 x 8192 by 8192 x 8192 products timed
   with CUDA events, the best of several trials (2 n^3 FLOPs each).
2. The pretrain stage of `pipelines/gpt2_small_gpu.yaml` as the pipeline runs it (TRL's SFTTrainer with
   our arguments: bf16 autocast, fused AdamW, TF32, clipping at 1.0; 12 layers, 12 heads, 768 wide,
   context 1024, vocabulary 50304) on random packed blocks; the optimizer steps after the warm-up are
   timed (CUDA synchronised at each step's end).
3. Model FLOPs per token by the PaLM paper's formula (Chowdhery et al. 2022, appendix B):
   6 N + 12 L H Q T, N the parameters without the position embeddings (the token embedding counts
   once: it is also the LM head's matrix), L layers, H heads, Q head size, T context.
4. MFU = FLOPs per token x tokens per second / the measured bf16 rate.

The last line is machine-readable:

    RESULT card=<name> bf16_tflops=<x> tokens_per_second=<t> model_tflops=<m> mfu=<f>

Run: python benchmarks/bench_mfu.py [--batch-size 16] [--steps 20] [--warmup 5] [--compile]
It needs a CUDA GPU and refuses to run (exit 2) without one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 50304  # GPT-2's 50257 rounded up to a multiple of 64, as the pipeline's tokenizer config asks


def matmul_tflops(n: int = 8192, trials: int = 5, repeats: int = 20) -> float:
    """The best measured rate of bf16 (n x n) @ (n x n) products, in TFLOP/s."""
    import torch

    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b  # warm-up: kernel selection, clocks
    best = 0.0
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            a @ b
        end.record()
        torch.cuda.synchronize()
        best = max(best, 2 * n**3 * repeats / (start.elapsed_time(end) / 1e3) / 1e12)
    return best


def flops_per_token(model) -> float:
    """PaLM's 6 N + 12 L H Q T for one training token (forward and backward)."""
    config = model.config
    n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()  # tied head counted once
    return 6 * n + 12 * config.n_layer * config.n_head * (config.n_embd // config.n_head) * config.n_positions


def pipeline_tokens_per_second(batch_size: int, steps: int, warmup: int, compile_model: bool) -> tuple[float, object]:
    """Tokens per second of the pipeline's pretrain stage on random blocks, after `warmup` steps."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from rlhf.config import load_pipeline
    from rlhf.model import RlhfConfig, RlhfForCausalLM
    from rlhf.tokenizer import train_tokenizer
    from rlhf.training import trainer_arguments

    stage = load_pipeline(ROOT / "pipelines" / "gpt2_small_gpu.yaml").stages["pretrain"]
    stage.max_steps, stage.batch_size, stage.grad_accum, stage.compile = warmup + steps, batch_size, 1, compile_model
    stage.save_every = 0  # no checkpoints inside the timing
    shape, block = stage.model, stage.block_size or stage.model.n_positions
    torch.manual_seed(0)
    model = RlhfForCausalLM(RlhfConfig(vocab_size=VOCAB, n_positions=shape.n_positions, n_embd=shape.n_embd,
                                       n_layer=shape.n_layer, n_head=shape.n_head, dropout=shape.dropout,
                                       pad_token_id=0, eos_token_id=1, bos_token_id=1))  # fmt: skip
    rows = torch.randint(2, VOCAB, ((warmup + steps) * batch_size, block)).tolist()
    tokenizer = train_tokenizer(["the trainer needs a tokenizer for its pad id"], vocab_size=300)  # rows are ids already

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    clock = StepClock()
    with tempfile.TemporaryDirectory() as folder:
        args = trainer_arguments(SFTConfig, stage, Path(folder), seed=0, has_eval=False, max_length=block,
                                 packing=True, packing_strategy="wrapped")  # fmt: skip
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": rows}),
                             processing_class=tokenizer, callbacks=[clock])  # fmt: skip
        trainer.train()
    timed = clock.times[warmup - 1 :]
    return (len(timed) - 1) * batch_size * block / (timed[-1] - timed[0]), model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16, help="sequences of 1024 tokens per step (default 16)")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps (default 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5; more with --compile)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (the pipeline's compile: true)")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("error: bench_mfu.py measures a CUDA GPU and there is none here; run it on a machine with one", file=sys.stderr)
        sys.exit(2)
    if args.warmup < 1 or args.steps < 2:
        parser.error("--warmup must be >= 1 and --steps >= 2")
    card = torch.cuda.get_device_name()
    peak = matmul_tflops()
    tokens_per_second, model = pipeline_tokens_per_second(args.batch_size, args.steps, args.warmup, args.compile)
    model_tflops = flops_per_token(model) * tokens_per_second / 1e12
    mfu = model_tflops / peak
    print(f"card: {card}; torch {torch.__version__}, CUDA {torch.version.cuda}")
    print(f"measured bf16 matrix-product rate: {peak:.1f} TFLOP/s")
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {flops_per_token(model) / 1e9:.3f} GFLOP per token")
    print(f"training: batch {args.batch_size} x 1024, {tokens_per_second:,.0f} tokens/s, {model_tflops:.1f} TFLOP/s"
          f"{' (torch.compile)' if args.compile else ''}")  # fmt: skip
    print(f"MFU: {mfu:.1%} of the measured bf16 rate")
    print(f"RESULT card={card.replace(' ', '_')} bf16_tflops={peak:.1f} tokens_per_second={tokens_per_second:.0f} "
          f"model_tflops={model_tflops:.1f} mfu={mfu:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
