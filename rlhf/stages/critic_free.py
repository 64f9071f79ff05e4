"""Stages `grpo`, `rloo` and `reinforce_pp`: the critic-free RL algorithms (`rlhf.critic_free`),
trained from the SFT policy against the reward model with a KL to the SFT policy.

The stage's config type picks the algorithm. Each iteration every prompt is answered
`answers_per_prompt` times; the answers' scores (the reward model normalised under the SFT policy's
own samples, as for PPO, plus any programmatic rewards) become advantages without a value model, and
the policy takes clipped updates. Everything else is the RL driver's (`rlhf.rl_driver`), as for PPO:
prompt stream and seeds, checkpoints and resume, stopping, logging, held-out evaluation, torchrun.
"""

from __future__ import annotations

from rlhf.rl_inputs import inputs, read_inputs, upstream  # noqa: F401  (what every RL stage reads; no torch)
from rlhf.stages import StageContext

DATA_PARALLEL = True


def algorithm_class(config) -> type:
    """The algorithm a critic-free stage's config stands for."""
    from rlhf.config import GRPOConfig, ReinforcePPConfig, RLOOConfig
    from rlhf.critic_free import GRPO, RLOO, ReinforcePP

    return {GRPOConfig: GRPO, RLOOConfig: RLOO, ReinforcePPConfig: ReinforcePP}[type(config)]


def run(ctx: StageContext) -> dict:
    from rlhf.rl_driver import RLRun

    # 1. Read the prompts and plug-ins, check the upstream models, load the policy, its reference and
    #    the reward model (no value model).
    run = RLRun.start(ctx, with_value=False)

    # 2. The optimizer over the policy alone, its schedule over every step of the run.
    run.prepare({"policy": ctx.config.lr})

    # 3. Resume from the last checkpoint, or normalise the scores under the SFT policy's own samples.
    run.resume_or_normalise()

    # 4. Evaluate the SFT policy on held-out prompts (same seed as the final evaluation).
    run.evaluate_sft()

    # 5. Iterate: sample groups and compute their advantages, then clipped updates over minibatches.
    run.train(algorithm_class(ctx.config)(run.models, ctx.config, run.inputs.reward_functions, run.inputs.judge))

    # 6. Evaluate the trained policy and save it (adapters merged).
    return run.finish()
