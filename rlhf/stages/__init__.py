"""Stage recipes, and `STAGES`, the one registry of them.

A stage is registered once, by one line in `STAGES`: its name, its typed config class (parsed from
`stages.<name>` of a pipeline YAML), its recipe module, and whether its output folder is a policy
(a causal LM that the report and `rlhf compare` can compare). Adding a stage is one config class,
one recipe module and one line here; nothing else lists the stages. The run order is not declared
either: `stage_order` derives it from each module's `upstream`, so a pipeline may say
sft -> reward -> report without ppo, and a new stage falls into place by what it reads.

Each recipe module defines:

    def upstream(config) -> tuple[str, ...]   stages whose outputs it reads
    def inputs(config) -> list[str]    data files it reads (hashed into the fingerprint)
    def read_inputs(config) -> <a NamedTuple>  reads and checks those files (and plug-ins) without any
                                       model: the pipeline calls it for every stage before any stage
                                       runs, and `run` takes its fields by name from the same call
    def run(ctx: StageContext) -> dict final metrics (kept in the manifest)

and reads its upstream stages' outputs only through the artifact directory (`ctx.upstream`).

A stage writes into `ctx.out_dir`, its staging folder `<run_dir>/.<stage>.building/`, never into
its complete folder `<run_dir>/<stage>/`: once `run` returns, the pipeline writes the manifest there
and swaps it in (`rlhf.artifacts.swap_in`). Until then the complete stage stays as it was, so a build
that fails (an error, a NaN, Ctrl-C) loses nothing, and an interrupted build resumes from the
checkpoints it saved in its staging folder.

A module with `DATA_PARALLEL = True` runs on every process of a torchrun / `accelerate launch` run
(each writing nothing but what the main process writes); the others run on the main process alone.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.artifacts import begin_build, building_dir, complete_manifest
from rlhf.config.dpo import DPOStageConfig
from rlhf.config.rl import GRPOConfig, PPOConfig, ReinforcePPConfig, RLOOConfig
from rlhf.config.stages import PretrainConfig, ReportConfig, RewardConfig, SFTConfig, TokenizerConfig
from rlhf.distributed import is_main_process
from rlhf.errors import ArtifactError, ConfigError


@dataclass(frozen=True)
class Stage:
    config: type
    """The typed config class that `stages.<name>` of a pipeline YAML parses into."""
    module: str
    """Import path of the recipe (imported only when the stage is planned: heavy imports stay deferred)."""
    policy: bool = False
    """The output folder is a causal-LM policy that the report and `rlhf compare` can compare."""
    headline: tuple[str, ...] = ()
    """The manifest metrics that sum the stage up (`rlhf status`, model cards), in the order shown."""
    transformers: bool = True
    """The output folder loads with transformers' `from_pretrained` (a model, or the tokenizer); the report's does not."""
    tags: tuple[str, ...] = ()
    """Model-card tags beyond 'rlhf', the stage's name and, for a policy, 'text-generation' (`rlhf.model_card`)."""


RL_HEADLINE = ("eval_judge_sft", "eval_judge", "eval_rm_score", "eval_kl", "iterations")

STAGES: dict[str, Stage] = {
    "tokenizer": Stage(TokenizerConfig, "rlhf.stages.tokenizer", headline=("vocab_size", "characters")),
    "pretrain": Stage(PretrainConfig, "rlhf.stages.pretrain", policy=True, headline=("eval_loss", "eval_perplexity", "eval_accuracy", "steps")),
    "sft": Stage(SFTConfig, "rlhf.stages.sft", policy=True, headline=("eval_loss", "eval_accuracy", "judge_before", "judge_after", "steps")),
    "reward": Stage(RewardConfig, "rlhf.stages.reward", headline=("eval_accuracy", "eval_margin", "steps"), tags=("reward-model", "text-classification")),
    "dpo": Stage(DPOStageConfig, "rlhf.stages.dpo", policy=True, headline=("eval_accuracy", "eval_margin", "judge_before", "judge_after", "steps")),
    "ppo": Stage(PPOConfig, "rlhf.stages.ppo", policy=True, headline=RL_HEADLINE),
    "grpo": Stage(GRPOConfig, "rlhf.stages.critic_free", policy=True, headline=RL_HEADLINE),
    "rloo": Stage(RLOOConfig, "rlhf.stages.critic_free", policy=True, headline=RL_HEADLINE),
    "reinforce_pp": Stage(ReinforcePPConfig, "rlhf.stages.critic_free", policy=True, headline=RL_HEADLINE),
    "report": Stage(ReportConfig, "rlhf.stages.report", transformers=False),
}
"""Every stage, in declaration order: the order that breaks ties between stages that do not depend
on each other, and the order in which the report and `rlhf plots` list them."""

def headline_metrics(name: str, metrics: dict | None) -> dict[str, Any]:
    """The headline metrics (`Stage.headline`) that a stage's manifest metrics hold, in the registry's order.
    The report stage's are the gold judge's score of every policy it compared (`<policy>_judge`)."""
    metrics = metrics or {}
    keys = STAGES[name].headline if name in STAGES else ()
    if name == "report":
        keys = tuple(key for key in metrics if key.endswith("_judge"))
    return {key: metrics[key] for key in keys if metrics.get(key) is not None}


POLICY_STAGES: tuple[str, ...] = tuple(name for name, stage in STAGES.items() if stage.policy)

A_POLICY = f"a policy (the {', '.join(POLICY_STAGES[:-1])} or {POLICY_STAGES[-1]} stage's output)"
"""What a policy folder is, for errors about a folder that is not one."""


@dataclass
class StageContext:
    name: str
    config: Any
    """The stage's typed config (e.g. `rlhf.config.SFTConfig`)."""
    run_dir: Path
    seed: int
    fingerprint: str
    """Hash of config, inputs and upstream outputs: checkpoints from another fingerprint are not resumed."""
    source: str = ""
    """The pipeline YAML, named by errors about the stage's settings."""

    @property
    def out_dir(self) -> Path:
        """The staging folder this build writes into (swapped in for `<run_dir>/<stage>` once complete)."""
        return building_dir(self.run_dir, self.name)

    def upstream(self, stage: str) -> Path:
        """The output folder of a completed upstream stage."""
        folder = self.run_dir / stage
        if complete_manifest(folder) is None:
            raise ArtifactError(f"{folder}: stage '{stage}' has not completed; run it first (rlhf run --only {stage})")
        return folder

    def setting_error(self, key: str, problem: str) -> ConfigError:
        """A setting that does not fit the upstream models, named as in the YAML."""
        return ConfigError(f"{self.source}: stages.{self.name}.{key}: {problem}")

    def begin(self) -> Path:
        """Called once the inputs are checked: the staging folder, emptied of all but an interrupted
        build's checkpoints and metrics (by the main process; the complete stage is not touched)."""
        if is_main_process():
            begin_build(self.run_dir, self.name)
        return self.out_dir


def stage_module(name: str):
    """The recipe module of registered stage `name`."""
    return importlib.import_module(STAGES[name].module)


def stage_order(config) -> list[str]:
    """The stages of pipeline `config` in an order that runs each after the upstream stages it reads.

    Only upstream stages present in the pipeline constrain the order (an absent one must already be
    complete in the run directory: `rlhf.pipeline.check_inputs` says so). Among the stages ready to
    run, the one declared first in `STAGES` goes first, so a pipeline written in any order runs as
    the registry lists it whenever its dependencies allow. A cycle is a `ConfigError` naming its stages.
    """
    present = [name for name in STAGES if name in config.stages]
    needs = {name: {p for p in stage_module(name).upstream(config.stages[name]) if p in config.stages}
             for name in present}  # fmt: skip
    order: list[str] = []
    while len(order) < len(present):
        ready = [name for name in present if name not in order and needs[name] <= set(order)]
        if not ready:
            raise ConfigError(f"{config.source}: stages: {' -> '.join(cycle(needs, order))}: each reads the next, in a cycle")
        order.append(ready[0])
    return order


def cycle(needs: dict[str, set[str]], done: list[str]) -> list[str]:
    """A cycle among the stages not `done` (each waits for one that is not done either), as a path
    that ends where it starts: follow the first unmet need from the first waiting stage until one repeats."""
    path = [next(name for name in needs if name not in done)]
    while path.count(path[-1]) < 2:
        path.append(min(needs[path[-1]] - set(done), key=list(needs).index))
    return path[path.index(path[-1]) :]
