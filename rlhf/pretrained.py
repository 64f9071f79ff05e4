"""Start a stage from a given model folder instead of an upstream stage (`stages.sft.init: DIR`,
`stages.reward.init: DIR`).

A model folder is either one of ours (`model_type` rlhf-gpt: `rlhf convert --from-gpt2` output, or
another run's sft or ppo stage) or a transformers checkpoint (config.json whose `architectures` names
a supported causal LM, safetensors weights, a tokenizer) that is converted to our decoder in memory
as it loads, so every later stage and command sees our model class.

The tokenizer comes from the folder: its chat template is kept; ours (`rlhf.tokenizer.chat_template`,
closing messages with the tokenizer's own end-of-sequence token, its role markers added as special
tokens) is added only where it has none. Pad stays distinct from end-of-sequence: a tokenizer with no
pad, or pad = EOS, gets ours (`<|pad|>`). When the tokenizer then outgrows the model's vocabulary the
embeddings are resized, and the model's pad and EOS ids are set to the tokenizer's.

`check_model_folder` refuses a bad folder with one `ArtifactError` naming it and the problem; stages call
it from `read_inputs`, before any stage runs.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

from rlhf.artifacts import CAUSAL_LM, check_model_dir, check_safetensors, read_json_object, weight_files
from rlhf.errors import ArtifactError, ConfigError

RLHF_MODEL_TYPE = "rlhf-gpt"
"""`model_type` of our own model folders (`rlhf.model.RlhfConfig.model_type`; not imported: that imports torch)."""

SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("GPT2LMHeadModel", "LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
"""The transformers causal-LM architectures a model folder may hold (`rlhf.convert.SUPPORTED_HF_ARCHITECTURES`,
which imports torch; a test keeps the two equal)."""

CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")
"""How transformers names its causal-LM classes."""

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

WHAT = (
    "a model folder (one of ours, e.g. a run's sft stage, or a transformers causal-LM checkpoint "
    f"saved by save_pretrained: {', '.join(SUPPORTED_ARCHITECTURES)})"
)


TRAINING_DTYPE = "float32"
"""The dtype a model from a folder is trained in. On the CPU bf16 matrix products are
about 100x slower; on CUDA, mixed precision computes in bf16/fp16 from float32 master weights."""


def init_folder(init: str, stages: tuple[str, ...]) -> Path | None:
    """The model folder a stage's `init` names, or None when it names one of the upstream `stages`."""
    return None if init in stages else Path(init)


def check_init(init: str, stages: tuple[str, ...]) -> None:
    """A stage's `init` that names a model folder must name a good one (else a `ConfigError`: 'init: DIR: problem')."""
    folder = init_folder(init, stages)
    if folder is None:
        return
    try:
        check_model_folder(folder)
    except ArtifactError as error:  # said as the setting that named the folder
        raise ConfigError(f"init: {error}") from None


def is_ours(config: dict) -> bool:
    return config.get("model_type") == RLHF_MODEL_TYPE


def check_model_folder(path: str | Path) -> None:
    """Refuse `path` (an `ArtifactError` naming it) unless it holds a causal LM we can start from and a
    tokenizer that fits it. Reads config files, safetensors headers and the tokenizer, not the weights."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path}: {'not a directory' if path.exists() else 'no such directory'}; expected {WHAT}")
    if not (path / "config.json").is_file():
        raise ArtifactError(f"{path}: not a model directory (no config.json); expected {WHAT}")
    config = read_json_object(path / "config.json")
    if is_ours(config):
        check_model_dir(path, CAUSAL_LM, WHAT)  # the architecture, weights and a stage's manifest hashes
    else:
        check_architecture(path, config)
        if not any(path.glob("*.safetensors")) and any(path.glob("pytorch_model*.bin")):
            raise ArtifactError(f"{path}: weights only as pytorch_model.bin; re-save the model with save_pretrained (safetensors)")
        for weights in weight_files(path):
            check_safetensors(weights)
    tokenizer = load_raw_tokenizer(path)
    vocab_size = config.get("vocab_size")
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1:
        raise ArtifactError(f"{path / 'config.json'}: vocab_size must be a positive integer, got {vocab_size!r}")
    if len(tokenizer) > vocab_size:
        raise ArtifactError(
            f"{path}: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {vocab_size}: "
            "they do not belong together"
        )
    if is_ours(config):
        from rlhf.tokenizer import check_fits_model

        check_fits_model(tokenizer, SimpleNamespace(**config), path)


def check_architecture(path: Path, config: dict) -> str:
    """The supported transformers architecture that config.json names, else an `ArtifactError`."""
    found = config.get("architectures")
    if not isinstance(found, list) or not found:
        raise ArtifactError(f"{path}: config.json names no architecture (not a causal LM); expected {WHAT}")
    names = ", ".join(map(str, found))
    if not any(str(name).endswith(CAUSAL_LM_SUFFIXES) for name in found):
        raise ArtifactError(f"{path}: {names} is not a causal language model; expected {WHAT}")
    supported = [name for name in found if name in SUPPORTED_ARCHITECTURES]
    if not supported:
        raise ArtifactError(f"{path}: unknown architecture {names} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    return supported[0]


def load_raw_tokenizer(path: Path):
    """The folder's tokenizer as saved (no rules applied), or an `ArtifactError`."""
    from transformers import AutoTokenizer

    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ArtifactError(f"{path}: no tokenizer ({' or '.join(TOKENIZER_FILES)}); save the tokenizer beside the model")
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as error:  # a transformers loading error of any kind: the folder is the user's to fix
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ArtifactError(f"{path}: the tokenizer does not load ({type(error).__name__}: {first_line})") from None


def has_generation_markers(tokenizer) -> bool:
    """The chat template marks assistant turns with {% generation %} (TRL's assistant-only loss needs them)."""
    return bool(re.search(r"{%-?\s*generation\s*-?%}", tokenizer.chat_template or ""))


def load_tokenizer(path: str | Path):
    """The folder's tokenizer with a chat template (its own, else ours) and a pad token distinct from EOS."""
    return with_template_and_pad(load_raw_tokenizer(Path(path)))


def tokenizer_and_shipped_size(path: Path):
    """(`load_tokenizer(path)`, how many tokens it had as saved)."""
    tokenizer = load_raw_tokenizer(path)
    shipped_size = len(tokenizer)
    return with_template_and_pad(tokenizer), shipped_size


def with_template_and_pad(tokenizer):
    """`tokenizer` given our chat template if it has none (closed by its own EOS, our role markers added as
    special tokens) and our pad token if it has none or its pad is its EOS; changed in place and returned."""
    from tokenizers import AddedToken

    from rlhf.tokenizer import EOS_TOKEN, PAD_TOKEN, ROLE_TOKENS, chat_template

    if tokenizer.eos_token is None:
        tokenizer.add_special_tokens({"eos_token": EOS_TOKEN})
    if tokenizer.chat_template is None:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in ROLE_TOKENS], special_tokens=True)
        tokenizer.chat_template = chat_template(tokenizer.eos_token)
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer


def fit_to_tokenizer(model, tokenizer, shipped_size: int) -> None:
    """Resize the embeddings for the tokens `with_template_and_pad` added to a tokenizer of `shipped_size`
    tokens; the model's pad and EOS become the tokenizer's. A tokenizer that was already too large is left
    for `rlhf.tokenizer.check_fits_model` to refuse."""
    if shipped_size <= model.config.vocab_size < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is not None:
            config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id


def to_rlhf(model):
    """Our decoder with the weights and function of transformers' causal LM `model`."""
    from rlhf.convert import hf_to_rlhf

    return hf_to_rlhf(model)


def load_causal_lm(path: str | Path):
    """(our causal LM, its tokenizer) from a model folder, converted in memory if it is a transformers checkpoint.

    The weights load in the checkpoint's dtype (a bf16 checkpoint is read as bf16, with no float32 copy
    made while loading) and are then cast to TRAINING_DTYPE for training."""
    import torch
    from transformers import AutoModelForCausalLM

    import rlhf.model  # noqa: F401  (registers the Auto classes)

    path = Path(path)
    tokenizer, shipped_size = tokenizer_and_shipped_size(path)
    if is_ours(read_json_object(path / "config.json")):
        model = AutoModelForCausalLM.from_pretrained(path).to(getattr(torch, TRAINING_DTYPE))
        if len(tokenizer) > shipped_size:  # else our own pair, as saved: check_fits_model judges it
            fit_to_tokenizer(model, tokenizer, shipped_size)
    else:
        model = to_rlhf(AutoModelForCausalLM.from_pretrained(path)).to(getattr(torch, TRAINING_DTYPE))
        fit_to_tokenizer(model, tokenizer, shipped_size)
    return model, tokenizer


def load_reward_model(path: str | Path):
    """(our scalar-head model with a new score head, its tokenizer) on the backbone of a model folder; the
    head is initialised from torch's random state (seed it first)."""
    import copy

    import torch
    from transformers import AutoModelForSequenceClassification

    from rlhf.model import RlhfForSequenceClassification

    path = Path(path)
    if is_ours(read_json_object(path / "config.json")):
        tokenizer, shipped_size = tokenizer_and_shipped_size(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).to(getattr(torch, TRAINING_DTYPE))
        if len(tokenizer) > shipped_size:  # else our own pair, as saved: check_fits_model judges it
            fit_to_tokenizer(model, tokenizer, shipped_size)
        return model, tokenizer
    policy, tokenizer = load_causal_lm(path)
    config = copy.deepcopy(policy.config)
    config.num_labels = 1
    model = RlhfForSequenceClassification(config)
    model.transformer.load_state_dict(policy.transformer.state_dict())
    return model, tokenizer
