"""What every RL stage (ppo, grpo, rloo, reinforce_pp) declares to the pipeline: the stages it reads,
the data files it hashes, and its checked inputs.

Kept apart from the RL driver (`rlhf.rl_driver`), which imports torch: the planner, the dry run and
`rlhf status` import each stage module to ask these questions, and must answer without loading torch.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from rlhf.data import check_prompt_rows, read_rows


def upstream(config) -> tuple[str, ...]:
    """Every RL stage trains the SFT policy and scores with the reward stage's model."""
    return ("sft", "reward")


def inputs(config) -> list[str]:
    return [config.prompts] + ([config.eval_prompts] if config.eval_prompts else [])


class RLInputs(NamedTuple):
    prompts: list[Any]
    eval_prompts: list[Any]
    reward_functions: list[Callable]
    judge: Callable | None


def read_inputs(config) -> RLInputs:
    """The checked training and held-out prompts, the extra reward functions and the judge."""
    from rlhf.distributed import sharding
    from rlhf.errors import ConfigError
    from rlhf.responses import load_function

    if sharding():
        raise ConfigError(
            f"RL stages do not run under {sharding()} sharding (sampling needs every weight in each process); "
            "launch this stage data-parallel: torchrun, or accelerate launch without the sharding config"
        )
    prompts, eval_prompts = [], []
    for name, kept in ((config.prompts, prompts), (config.eval_prompts, eval_prompts)):
        if name:
            rows = read_rows(name)
            check_prompt_rows(name, rows)
            kept += [row["prompt"] for row in rows]
    reward_functions = [load_function(name, f"reward_functions[{i}]", probe=prompts)
                        for i, name in enumerate(config.reward_functions)]  # fmt: skip
    judge = load_function(config.judge, "judge", probe=eval_prompts) if config.judge else None
    return RLInputs(prompts, eval_prompts, reward_functions, judge)
