"""rlhf: staged RLHF fine-tuning (pretrain, SFT, reward model, PPO with a KL penalty) for an
in-house GPT-2-layout decoder.

`import rlhf` registers the model with transformers' Auto classes, so that
`AutoModelForCausalLM.from_pretrained(run_dir / "sft")` works without `trust_remote_code`.
"""

import os
import sys

__version__ = "0.1.0"


def _is_cli_process() -> bool:
    # The `rlhf` console script imports this package before it parses its arguments. Registering
    # imports torch and transformers (several seconds), so the CLI defers it to the commands that
    # load models, and `rlhf --help` answers at once.
    return os.path.basename(sys.argv[0]) == "rlhf"


if not _is_cli_process():
    from rlhf import model as _model  # noqa: F401  (registers the Auto classes)
