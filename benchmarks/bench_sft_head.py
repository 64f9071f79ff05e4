"""Training step of `SFTTrainer` with the full-logit loss (`rlhf.sft_trainer`) against TRL's chunked LM head.

Both are the same trainer class on the same model and batches; the baseline sets
`rlhf.sft_trainer.FULL_LOGITS_MAX` to 0, which sends every micro-batch through TRL's own
`compute_loss` (its fused, chunked head). Default shape: `pipelines/shakespeare.yaml`'s (4 layers,
128 wide, context 64, batch 12) with the character tokenizer's 326 tokens. The two run in turns,
`--rounds` times, `--steps` optimizer steps each after `--warmup`; the medians are printed. The last
line is machine-readable:

    RESULT full_logits_ms=<ms per step> chunked_head_ms=<ms per step> speedup=<chunked / full>

Run: python benchmarks/bench_sft_head.py [--vocab 326 --layers 4 --width 128 --context 64 --batch 12]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch


def trainer(args, out_dir: str):
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig

    from rlhf.model import RlhfConfig, RlhfForCausalLM
    from rlhf.sft_trainer import SFTTrainer
    from rlhf.tokenizer import train_tokenizer

    tokenizer: PreTrainedTokenizerFast = train_tokenizer(["abc"], kind="char")  # only its pad and EOS ids are used
    torch.manual_seed(0)
    model = RlhfForCausalLM(RlhfConfig(
        vocab_size=args.vocab, n_positions=args.context, n_embd=args.width, n_layer=args.layers, n_head=args.heads,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, activation_function="gelu",
    ))  # fmt: skip
    steps = args.warmup + args.steps
    rows = torch.randint(5, args.vocab, (steps * args.batch, args.context), generator=torch.Generator().manual_seed(0))
    config = SFTConfig(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=args.batch, learning_rate=1e-3, max_grad_norm=1.0,
        optim="adamw_torch_fused", save_strategy="no", logging_steps=10**9, report_to=[], use_cpu=not torch.cuda.is_available(),
        bf16=False, gradient_checkpointing=False, disable_tqdm=True, max_length=args.context, packing=True,
        packing_strategy="wrapped", dataloader_num_workers=0,
    )  # fmt: skip
    return SFTTrainer(model=model, args=config, train_dataset=Dataset.from_dict({"input_ids": rows.tolist()}), processing_class=tokenizer)


def seconds_per_step(args, full_logits: bool) -> float:
    """Mean seconds of an optimizer step after the warm-up steps, one fresh trainer."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from rlhf import sft_trainer

    class Clock(TrainerCallback):
        def on_step_begin(self, run_args, state, control, **kwargs):
            if state.global_step == args.warmup:
                self.start = time.perf_counter()

        def on_train_end(self, run_args, state, control, **kwargs):
            self.seconds = (time.perf_counter() - self.start) / args.steps

    saved = sft_trainer.FULL_LOGITS_MAX
    sft_trainer.FULL_LOGITS_MAX = saved if full_logits else 0
    try:
        with tempfile.TemporaryDirectory() as out_dir:
            run = trainer(args, out_dir)
            run.remove_callback(PrinterCallback)
            clock = Clock()
            run.add_callback(clock)
            run.train()
    finally:
        sft_trainer.FULL_LOGITS_MAX = saved
    return clock.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=326, help="vocabulary (the Tiny Shakespeare character tokenizer's is 326)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--steps", type=int, default=100, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="untimed optimizer steps first")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each side, in turns")
    args = parser.parse_args()
    from rlhf.console import QUIET, configure

    configure(QUIET)  # the libraries' own logs, warnings and progress bars off
    warnings.filterwarnings("ignore")

    times: dict[str, list[float]] = {"full": [], "chunked": []}
    for round_ in range(1, args.rounds + 1):
        times["full"].append(seconds_per_step(args, full_logits=True))
        times["chunked"].append(seconds_per_step(args, full_logits=False))
        print(f"round {round_}: full logits {times['full'][-1] * 1e3:.1f} ms/step, TRL's chunked head {times['chunked'][-1] * 1e3:.1f} ms/step", flush=True)
    full, chunked = statistics.median(times["full"]), statistics.median(times["chunked"])
    print(f"RESULT full_logits_ms={full * 1e3:.1f} chunked_head_ms={chunked * 1e3:.1f} speedup={chunked / full:.2f}")


if __name__ == "__main__":
    main()
