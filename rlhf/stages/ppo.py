"""Stage `ppo`: PPO with a KL penalty against the SFT policy, scored by the reward model.

Models: the policy (from SFT), a frozen reference (the SFT model, or the LoRA policy with its
adapters disabled), the frozen reward model (normalised scores) and a value model initialised
from the reward model; dropout off everywhere. Before training, the SFT policy answers
`norm_prompts` prompts exactly as rollouts sample, and the mean and std of the reward model's
scores on those that stopped normalise PPO's scores; the same map is folded into the value
model's head, so it starts on the scale of its targets. Each iteration: sample, score, compute
KL-penalised rewards and GAE advantages, then several epochs of clipped updates (`rlhf.ppo`).

The RL driver (`rlhf.rl_driver`) does the rest, as for every RL algorithm: the prompt stream and
seeds, checkpoints (both models, the optimizer, its schedule and fp16's gradient scaler, the KL
controller, the score normalisation), resume to the same curve, stopping, logging, the held-out
evaluation. Under torchrun every process samples its own share of each iteration's prompts;
advantages are whitened, the KL controller steered and the metrics averaged over all of them, and
DDP averages the gradients. The main process evaluates, logs and saves.
"""

from __future__ import annotations

from rlhf.rl_inputs import inputs, read_inputs, upstream  # noqa: F401  (what every RL stage reads; no torch)
from rlhf.stages import StageContext

DATA_PARALLEL = True


def run(ctx: StageContext) -> dict:
    from rlhf.ppo import PPO
    from rlhf.rl_driver import RLRun

    config = ctx.config

    # 1. Read the prompts and plug-ins, check the upstream models, load the policy, its reference, the
    #    reward model and the value model (initialised from the reward model).
    run = RLRun.start(ctx, with_value=True)

    # 2. One optimizer with a group per model, its schedule over every PPO step.
    run.prepare({"policy": config.lr, "value": config.value_lr or config.lr})

    # 3. Resume from the last checkpoint, or normalise the scores under the SFT policy's own samples
    #    (folded into the value head too).
    run.resume_or_normalise()

    # 4. Evaluate the SFT policy on held-out prompts (same seed as the final evaluation).
    run.evaluate_sft()

    # 5. Iterate: PPO's rollout step (sample, score, GAE), then its clipped updates over minibatches.
    run.train(PPO(run.models, config, run.inputs.reward_functions, run.inputs.judge))

    # 6. Evaluate the trained policy; save it (adapters merged) and the value model.
    return run.finish()
