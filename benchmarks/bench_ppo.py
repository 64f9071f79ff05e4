"""PPO throughput on the demo model: episodes per second and the generation / scoring / update split.

Builds the demo pipeline's shapes (decoder and reward model of `pipelines/demo.yaml`, random
weights, random prompts of the demo's length), then times PPO iterations with the demo's PPO
settings. As a baseline measured in the same run it also times the rollout generation with
transformers' `generate` on the same weights converted to GPT-2, the path a PPO loop would take
without our engine. The last line is machine-readable:

    RESULT episodes_per_second=<x> generate_share=<g> score_share=<s> update_share=<u> engine_vs_hf_generate=<r>

Run: python benchmarks/bench_ppo.py [--pipeline pipelines/demo.yaml] [--iterations 5]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import rlhf  # noqa: F401
from rlhf.config import load_pipeline
from rlhf.convert import rlhf_to_gpt2
from rlhf.model import RlhfConfig, RlhfForCausalLM, RlhfForSequenceClassification
from rlhf.ppo import PPO
from rlhf.rl_models import RLModels
from rlhf.rl_training import update
from rlhf.ppo_math import FixedKLController


class _Tokens:
    pad_token_id = 0
    eos_token_id = -1  # never sampled: every iteration generates the full max_new_tokens (the worst case)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default="pipelines/demo.yaml")
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--vocab", type=int, default=700, help="the demo tokenizer's size, about")
    parser.add_argument("--prompt-len", type=int, default=12, help="the demo prompts' length in tokens, about")
    args = parser.parse_args()

    pipeline = load_pipeline(args.pipeline)
    shape, ppo = pipeline.stages["pretrain"].model, pipeline.stages["ppo"]
    torch.manual_seed(0)
    config = RlhfConfig(vocab_size=args.vocab, n_positions=shape.n_positions, n_embd=shape.n_embd,
                        n_layer=shape.n_layer, n_head=shape.n_head, pad_token_id=0, eos_token_id=1)  # fmt: skip
    policy, reference = RlhfForCausalLM(config), RlhfForCausalLM(config).eval()
    reward, value = RlhfForSequenceClassification(config).eval(), RlhfForSequenceClassification(config)
    models = RLModels(policy=policy, value=value, reward=reward, reference=reference, tokenizer=_Tokens())

    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    optimizer = torch.optim.AdamW([{"params": policy.parameters()}, {"params": value.parameters()}], lr=ppo.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    prompts = [torch.randint(5, args.vocab, (args.prompt_len,)).tolist() for _ in range(ppo.rollout_batch_size)]
    texts = [""] * len(prompts)
    kl = FixedKLController(ppo.kl_coef)

    splits = {"time_generate": [], "time_score": [], "time_update": []}
    for iteration in range(args.iterations + 1):  # the first is warm-up
        algorithm = PPO(models, ppo)
        rollout, stats = algorithm.rollout_step(prompts, texts, kl.value, torch.Generator().manual_seed(iteration))
        stats.update(update(models, algorithm, rollout, ppo, kl.value, accelerator, optimizer, schedule, torch.Generator().manual_seed(0)))
        if iteration:
            for key in splits:
                splits[key].append(stats[key])
    medians = {key: statistics.median(values) for key, values in splits.items()}
    total = sum(medians.values())

    # Baseline: the same rollouts' generation through transformers' generate on GPT-2 weights.
    gpt2 = rlhf_to_gpt2(policy).eval()
    ids = torch.tensor(prompts)
    hf_times = []
    for _ in range(3):
        start = time.perf_counter()
        with torch.no_grad():
            gpt2.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                          max_new_tokens=ppo.max_new_tokens, min_new_tokens=ppo.max_new_tokens, pad_token_id=0)  # fmt: skip
        hf_times.append(time.perf_counter() - start)
    hf_generate = statistics.median(hf_times)

    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"model: {shape.n_layer} layers, {shape.n_embd} wide, {sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M params; "
          f"{ppo.rollout_batch_size} episodes of {ppo.max_new_tokens} tokens per iteration, {ppo.ppo_epochs} PPO epochs")  # fmt: skip
    for key, label in (("time_generate", "generation"), ("time_score", "scoring (reward, reference, values)"),
                       ("time_update", "update")):  # fmt: skip
        print(f"{label:38}{medians[key]:8.3f} s  {medians[key] / total:6.1%}")
    print(f"{'iteration':38}{total:8.3f} s   {ppo.rollout_batch_size / total:.1f} episodes/s")
    print(f"{'generation with transformers generate':38}{hf_generate:8.3f} s   (ours is {hf_generate / medians['time_generate']:.2f}x faster)")
    print(
        f"RESULT episodes_per_second={ppo.rollout_batch_size / total:.2f} generate_share={medians['time_generate'] / total:.3f} "
        f"score_share={medians['time_score'] / total:.3f} update_share={medians['time_update'] / total:.3f} "
        f"engine_vs_hf_generate={hf_generate / medians['time_generate']:.2f}"
    )


if __name__ == "__main__":
    main()
