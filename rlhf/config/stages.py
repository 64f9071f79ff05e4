"""The configs of the tokenizer, pretraining, SFT, reward and report stages."""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhf.config.base import MAX_VOCAB, OMIT_DEFAULT, LoraSettings, ModelShape, TrainingConfig, _check


TOKENIZER_KINDS = ("bpe", "char")
"""The tokenizers `rlhf.tokenizer.train_tokenizer` builds."""


@dataclass
class TokenizerConfig:
    data: list[str] = field(default_factory=list)
    """Text files to train on: .txt read whole; .jsonl/.json every string value (messages included)."""
    kind: str = "bpe"
    """'bpe' (byte-level BPE) or 'char' (one token per character, byte fallback for unseen ones)."""
    vocab_size: int = 2048
    """Vocabulary size for 'bpe', special tokens and the 256 byte tokens included. Ignored for 'char'."""
    exclude_last_rows: int = 0
    """Rows at the end of each tabular file left out (keep a later stage's test split unseen)."""

    def __post_init__(self):
        _check(len(self.data) > 0, "data: give at least one file")
        _check(self.kind in TOKENIZER_KINDS, f"kind: must be one of {', '.join(TOKENIZER_KINDS)}, got {self.kind!r}")
        _check(261 <= self.vocab_size <= MAX_VOCAB,
               f"vocab_size: must be in [261, {MAX_VOCAB}] (specials + 256 bytes at least), got {self.vocab_size}")
        _check(self.exclude_last_rows >= 0, f"exclude_last_rows: must be >= 0, got {self.exclude_last_rows}")



PACKINGS = ("wrapped", "documents")
TXT_DOCUMENTS = ("file", "lines")


@dataclass
class PretrainConfig(TrainingConfig):
    data: list[str] = field(default_factory=list)
    """Plain-text corpus: .txt files read whole, or .jsonl/.json/.parquet/.csv with a 'text' column."""
    model: ModelShape = field(default_factory=ModelShape)
    """Shape of the decoder trained from scratch."""
    block_size: int = 0
    """Tokens per packed training block; 0 means the model's context (n_positions)."""
    text_column: str = "text"
    """Column holding the text in tabular files (e.g. 'chosen' for hh-rlhf dialogues)."""
    exclude_last_rows: int = 0
    """Rows at the end of each tabular file left out (keep a later stage's test split unseen)."""
    packing: str = "wrapped"
    """'wrapped': documents joined by EOS into one stream cut into blocks of block_size (nanoGPT);
    'documents': each document its own row, starting at position 0 (longer ones cut into blocks),
    padded per batch. With learned positions, a corpus of short independent documents teaches
    facts far faster when each starts where a prompt starts."""
    txt_documents: str = "file"
    """How a .txt file splits into documents: 'file' (the whole file is one) or 'lines' (each non-empty line)."""

    def __post_init__(self):
        super().__post_init__()
        _check(len(self.data) > 0, "data: give at least one file")
        _check(self.packing in PACKINGS, f"packing: must be one of {', '.join(PACKINGS)}, got {self.packing!r}")
        _check(self.txt_documents in TXT_DOCUMENTS,
               f"txt_documents: must be one of {', '.join(TXT_DOCUMENTS)}, got {self.txt_documents!r}")
        _check(0 <= self.block_size <= self.model.n_positions, "block_size: must be in [0, model.n_positions]")
        _check(self.exclude_last_rows >= 0, f"exclude_last_rows: must be >= 0, got {self.exclude_last_rows}")




SFT_INIT_STAGES = ("pretrain",)
"""The stages whose output `SFTConfig.init` may name; any other value is a model folder."""
REWARD_INIT_STAGES = ("sft", "pretrain")
"""The stages whose output `RewardConfig.init` may name; any other value is a model folder."""


def _check_init(init: str, stages: tuple[str, ...]) -> None:
    """`init` names one of `stages` or a model folder; another stage's name is a mistake, not a folder."""
    from rlhf.stages import STAGES  # the registry imports this module: imported here, not at the top

    allowed = " or ".join(map(repr, stages))
    _check(bool(init.strip()), f"init: give {allowed} or a model folder")
    _check(init in stages or init not in STAGES,
           f"init: {init!r} is a stage this one cannot start from ({allowed}, or a model folder: write ./{init} for a folder of that name)")


@dataclass
class SFTConfig(TrainingConfig):
    data: str = ""
    """Demonstrations: conversational 'messages', or 'prompt' + 'completion' (strings or messages)."""
    init: str = field(default="pretrain", metadata={OMIT_DEFAULT: True})
    """The model fine-tuned: 'pretrain' (the pretrain stage's output), or a model folder DIR (any other
    value; write ./pretrain for a folder of that name): one of ours (`model_type` rlhf-gpt, e.g. another
    run's sft stage or `rlhf convert --from-gpt2` output) or a transformers causal-LM checkpoint
    (`rlhf.pretrained.SUPPORTED_ARCHITECTURES`), converted to our decoder as it loads. A folder's tokenizer
    is used, its chat template kept (ours added if it has none), a pad token distinct from EOS added if
    missing; its files are hashed into the fingerprint, and the pipeline then needs no tokenizer or
    pretrain stage."""
    max_length: int = 0
    """Longest tokenized example; 0 means the model's context. A longer example is an error naming its row."""
    lora: LoraSettings | None = None
    """Train LoRA adapters instead of all weights; they are merged into the saved model."""
    eval_prompts: str = ""
    """Optional held-out prompts ('prompt' column) whose responses the judge scores, before and after SFT."""
    judge: str = ""
    """Optional 'module:function' scoring (prompts, responses) -> floats, e.g. 'rlhf.demo_task:gold_judge'."""
    max_new_tokens: int = 48
    """Response length limit when generating for the judge."""

    def __post_init__(self):
        super().__post_init__()
        _check(bool(self.data), "data: give a file")
        _check_init(self.init, SFT_INIT_STAGES)
        _check(bool(self.eval_prompts) == bool(self.judge), "eval_prompts and judge: give both or neither")
        _check(self.max_length >= 0, f"max_length: must be >= 0, got {self.max_length}")
        _check(self.max_new_tokens > 0, f"max_new_tokens: must be positive, got {self.max_new_tokens}")


@dataclass
class RewardConfig(TrainingConfig):
    data: str = ""
    """Preference pairs: prompt + chosen + rejected, chosen + rejected, messages, or hh-rlhf dialogue strings."""
    init: str = "sft"
    """Stage ('sft' or 'pretrain') or model folder (any other value, as for `SFTConfig.init`) whose model
    initialises the backbone and whose policy samples the normalisation responses."""
    max_length: int = 0
    """Longest tokenized prompt + response; 0 means the model's context. Longer pairs are counted and left out."""
    eval_rows: int = 0
    """Hold out exactly the last this many rows (a fixed test split); 0 uses eval_fraction."""
    center_rewards_coefficient: float = 0.0
    """Weight of the auxiliary loss pulling rewards toward 0 (reward centring); 0 disables it."""
    norm_prompts: int = 256
    """Training prompts the init policy answers to compute the normalisation mean and std."""
    norm_max_new_tokens: int = 48
    """Response length limit for those samples."""

    def __post_init__(self):
        super().__post_init__()
        _check(bool(self.data), "data: give a file")
        _check_init(self.init, REWARD_INIT_STAGES)
        _check(self.max_length >= 0 and self.eval_rows >= 0, "max_length and eval_rows: must be >= 0")
        _check(self.center_rewards_coefficient >= 0, "center_rewards_coefficient: must be >= 0")
        _check(self.norm_prompts > 1, f"norm_prompts: must be > 1, got {self.norm_prompts}")
        _check(self.norm_max_new_tokens > 0, f"norm_max_new_tokens: must be positive, got {self.norm_max_new_tokens}")



@dataclass
class ReportConfig:
    eval_prompts: str = ""
    """Held-out prompts ('prompt' column); a 'reference' answer column adds BLEU and perplexity."""
    policies: list[str] = field(default_factory=lambda: ["sft", "ppo", "pretrain"])
    """Stages whose policies are compared, the first being the baseline of the win rates."""
    best_of: list[int] = field(default_factory=lambda: [4, 16])
    """Best-of-N baselines compared after those policies: for each N, `<first policy>@best-of-N` (N answers
    per prompt from the first policy, the one the reward model scores highest kept; see `rlhf compare`).
    Empty: none. Each costs N times the first policy's sampling."""
    reward: str = "reward"
    """Stage whose reward model scores the responses."""
    reference: str = "sft"
    """Stage whose policy KL is measured against."""
    judge: str = ""
    """Optional 'module:function' gold judge of (prompts, responses), e.g. 'rlhf.demo_task:gold_judge'."""
    eval_data: str = ""
    """Held-out SFT-format data for perplexity; empty: the eval prompts' reference answers."""
    samples: int = 0
    """Use the first this many prompts; 0 means all."""
    max_new_tokens: int = 64
    """Response length limit."""
    temperature: float = 1.0
    """Sampling temperature (the PPO stage samples at its own; keep them equal to compare like with like)."""
    batch_size: int = 64
    """Prompts sampled together; part of the seeding, so `rlhf compare` must use the same to match."""

    def __post_init__(self):
        _check(bool(self.eval_prompts), "eval_prompts: give a prompt file")
        _check(len(self.policies) > 0, "policies: name at least one stage")
        from rlhf.stages import POLICY_STAGES  # the registry imports this module: imported here, not at the top

        for name in (*self.policies, self.reference):
            _check(name in POLICY_STAGES, f"policies and reference: {name!r} is not a policy stage ({', '.join(POLICY_STAGES)})")
        for n in self.best_of:
            _check(n >= 1, f"best_of: N must be a positive integer, got {n}")
        _check(len(set(self.best_of)) == len(self.best_of), f"best_of: an N is listed twice in {self.best_of}")
        _check(self.samples >= 0 and self.batch_size > 0 and self.max_new_tokens > 0,
               "samples >= 0, batch_size > 0 and max_new_tokens > 0 required")  # fmt: skip
        _check(self.temperature > 0, f"temperature: must be positive, got {self.temperature}")


