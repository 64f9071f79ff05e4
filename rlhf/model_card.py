"""A Hugging Face model card (`README.md`) for every stage folder, so that a folder pushed to a hub
as it is reads properly: YAML metadata (`base_model`, `library_name`, `tags`, `datasets`, `metrics`),
then what the stage did, its headline metrics, its resolved config and the command that made it.

`base_model` is the model the stage started from: the first upstream stage whose output is a policy
(pretrain for sft, sft for reward, dpo and the RL stages), or, where the stage read no upstream
model, the folder its `init` names, as the pipeline gives it. An upstream stage is written by its
name (`sft`), not as a path (`../sft`): the name is how the pipeline, `rlhf status` and the manifest's
`upstream` name it, every stage folder of a run sits beside the others under that name, and a name
is a well-formed hub model id while a path is not (the hub refuses a README.md whose `base_model`
is not one). The tokenizer and pretrain (trained from scratch) have none; the report is not a model
and has no `library_name` either.

`metrics` lists the headline metrics' names (`rlhf.stages.headline_metrics`), the hub's form of that
field; their values are in the card's table. The card is not one of the stage's hashed outputs
(`rlhf.artifacts.NOT_OUTPUTS`): editing it leaves the stage up to date. It holds no time or duration,
so an identical re-run writes an identical card.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import yaml

from rlhf.artifacts import MODEL_CARD, atomic_write_text, plain
from rlhf.stages import STAGES, headline_metrics, stage_module

LIBRARY = "transformers"
"""What loads a stage folder (model or tokenizer: `from_pretrained` after `import rlhf`)."""


def command_line(pipeline: str, stage: str, argv: list[str] | None = None) -> str:
    """The command that made a stage: this process's own when it is the `rlhf` program (or
    `python -m rlhf`), else (tests, notebooks) the `rlhf run` that builds just that stage."""
    argv = sys.argv if argv is None else argv
    program = Path(argv[0]) if argv else Path()
    if program.name == "rlhf" or program.parts[-2:] == ("rlhf", "__main__.py"):
        return shlex.join(["rlhf", *argv[1:]])
    return shlex.join(["rlhf", "run", pipeline, "--only", stage])


def base_model(name: str, manifest: dict) -> str | None:
    """The model stage `name` started from: its first upstream policy stage, else its `init` folder, else None."""
    if not STAGES[name].transformers:
        return None
    upstream = [parent for parent in manifest.get("upstream", {}) if STAGES[parent].policy]
    return upstream[0] if upstream else manifest.get("config", {}).get("init")


def card_metadata(name: str, manifest: dict) -> dict:
    """The card's YAML front matter, keys without a value left out."""
    stage = STAGES[name]
    base = base_model(name, manifest)
    datasets = [Path(path).name for path in manifest.get("inputs", {}) if path != base]
    metadata = {
        "base_model": base,
        "library_name": LIBRARY if stage.transformers else None,
        "tags": list(dict.fromkeys(["rlhf", name, *(["text-generation"] if stage.policy else []), *stage.tags])),
        "datasets": list(dict.fromkeys(datasets)),
        "metrics": list(headline_metrics(name, manifest.get("metrics"))),
    }
    return {key: value for key, value in metadata.items() if value}


def what_it_did(name: str) -> str:
    """The first paragraph of the stage's recipe docstring, on one line."""
    paragraph = (stage_module(name).__doc__ or f"Stage `{name}`.").strip().split("\n\n")[0]
    return " ".join(paragraph.split())


def shown(value) -> str:
    """A metric as the card's table shows it: floats to 4 significant digits (the manifest keeps them whole)."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def render_card(name: str, manifest: dict, command: str) -> str:
    """The model card of stage `name`, from the manifest its build writes and the command that ran it."""
    manifest = plain(manifest)
    metadata = yaml.safe_dump(card_metadata(name, manifest), sort_keys=False, allow_unicode=True)
    base = base_model(name, manifest)
    started = f" It started from `{base}`." if base else ""
    made = f"Built by the `rlhf` pipeline `{manifest.get('pipeline', '')}` with seed {manifest.get('seed')}."
    metrics = headline_metrics(name, manifest.get("metrics"))
    table = ["| metric | value |", "| --- | --- |", *(f"| {key} | {shown(value)} |" for key, value in metrics.items())]
    config = yaml.safe_dump(manifest.get("config", {}), sort_keys=False, allow_unicode=True)
    return "\n".join([
        "---", metadata.rstrip(), "---", "",
        f"# {name}", "",
        f"{what_it_did(name)}{started} {made}", "",
        "## Headline metrics", "",
        *(table if metrics else ["(none recorded)"]), "",
        "## Config", "",
        "```yaml", config.rstrip(), "```", "",
        "## How it was made", "",
        "```bash", command, "```", "",
    ])  # fmt: skip


def write_card(folder: Path, name: str, manifest: dict, command: str) -> None:
    """Write stage `name`'s card into `folder` (its staging folder, before the manifest)."""
    atomic_write_text(Path(folder) / MODEL_CARD, render_card(name, manifest, command))
