"""The in-house decoder, read top to bottom: config, backbone, the two heads. Layers: `rlhf.layers`.

Two layouts (`RlhfConfig.layout`):
- gpt2: token + learned position embeddings -> N pre-LayerNorm blocks (multi-head attention, GELU
  MLP) -> final LayerNorm -> LM head (tied to the token embedding by default). Parameter names
  follow GPT-2 (`transformer.h.0.attn.c_attn`, ...); GPT-2's `Conv1D` stores weights transposed,
  ours are plain `nn.Linear`.
- llama: token embeddings -> N pre-RMSNorm blocks (grouped-query attention with rotary positions,
  SwiGLU MLP) -> final RMSNorm -> LM head (untied by default in Llama checkpoints, tied allowed).
  Names: `transformer.h.0.attn.q_proj`, `mlp.gate_proj`, `ln_1`/`ln_2`/`ln_f` as RMSNorm; no
  biases except Qwen2's q/k/v (`attention_bias`).
Either way positions come from the attention mask, so left or right padding changes nothing.

Two heads share the backbone: `RlhfForCausalLM` (language model) and
`RlhfForSequenceClassification` (a `score` head giving one value per token; the reward model and
PPO's value model). Both are `PreTrainedModel`s registered with the Auto classes on `import rlhf`.

Shapes in comments: B batch, T query length, S key length (cache + new tokens), C = n_embd,
nh = n_head, hs = head dim, V = vocab size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast, SequenceClassifierOutputWithPast

from rlhf.config.base import LAYOUTS, SUPPORTED_ACTIVATIONS  # the one list of layout names; the gpt2 layout's GELUs
from rlhf.layers import (  # noqa: F401  (Block and the masks are imported from here too)
    LLAMA3_ROPE_KEYS,
    MLP,
    Block,
    CausalSelfAttention,
    RMSNorm,
    attention_mask_4d,
    norm,
    position_ids_from_mask,
    rotary_cos_sin,
)


class RlhfConfig(PretrainedConfig):
    """Shape and regularisation of the decoder. Shared fields keep GPT-2's names (n_embd, n_layer,
    n_head, n_positions, n_inner); configs saved before `layout` existed load as gpt2."""

    model_type = "rlhf-gpt"

    def __init__(
        self,
        vocab_size: int = 4096,
        n_positions: int = 256,
        n_embd: int = 256,
        n_layer: int = 4,
        n_head: int = 4,
        n_inner: int | None = None,
        activation_function: str = "gelu_new",
        dropout: float = 0.0,
        layer_norm_epsilon: float = 1e-5,
        initializer_range: float = 0.02,
        reward_mean: float = 0.0,
        reward_std: float = 1.0,
        folded_reward_mean: float | None = None,
        folded_reward_std: float | None = None,
        tie_word_embeddings: bool = True,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        layout: str = "gpt2",
        n_kv_head: int | None = None,
        head_dim: int | None = None,
        rope_theta: float = 10000.0,
        llama3_rope: dict | None = None,
        rms_norm_eps: float = 1e-6,
        attention_bias: bool = False,
        mlp_bias: bool = False,
        hf_architecture: str | None = None,
        **kwargs,
    ):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        if n_embd % n_head and not (layout == "llama" and head_dim):  # a llama-layout head may have its own width
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        if activation_function not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"activation_function must be one of {SUPPORTED_ACTIVATIONS}, got {activation_function!r}")
        n_kv_head = n_kv_head or n_head
        head_dim = head_dim or n_embd // n_head
        if layout == "gpt2" and (n_kv_head != n_head or head_dim != n_embd // n_head or attention_bias or mlp_bias):
            raise ValueError("n_kv_head, head_dim, attention_bias and mlp_bias are llama-layout settings")
        if n_head % n_kv_head:
            raise ValueError(f"n_head ({n_head}) must be a multiple of n_kv_head ({n_kv_head})")
        if layout == "llama" and head_dim % 2:
            raise ValueError(f"head_dim ({head_dim}) must be even (rotary positions rotate pairs)")
        if llama3_rope is not None and (layout != "llama" or set(llama3_rope) != set(LLAMA3_ROPE_KEYS)):
            raise ValueError(f"llama3_rope: a llama-layout setting with exactly the keys {', '.join(LLAMA3_ROPE_KEYS)}")
        self.layout = layout
        self.llama3_rope = llama3_rope  # Llama 3.1's frequency scaling of RoPE (`rlhf.layers.rope_inv_freq`); None: plain
        # llama layout only: key/value heads (grouped-query attention; n_head = multi-head), the width of
        # a head (n_embd // n_head unless a checkpoint says otherwise), the RoPE base, the RMSNorm
        # epsilon, Qwen2's q/k/v biases, MLP biases, and the transformers class it came from or goes to.
        self.n_kv_head, self.head_dim, self.rope_theta, self.rms_norm_eps = n_kv_head, head_dim, rope_theta, rms_norm_eps
        self.attention_bias, self.mlp_bias, self.hf_architecture = attention_bias, mlp_bias, hf_architecture
        self.vocab_size = vocab_size
        self.n_positions = n_positions
        self.n_embd = n_embd
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_inner = n_inner
        self.activation_function = activation_function
        self.dropout = dropout  # embeddings, attention probabilities and residual branches alike
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_range = initializer_range
        # Reward normalisation: normalised = (head output - reward_mean) / reward_std. The reward stage
        # folds its statistics into the score head instead (`normalise_score_head`), leaving 0 and 1
        # here, and records them: the head outputs (trained head - folded_reward_mean) / folded_reward_std.
        # Older reward models (no head bias) keep their statistics in reward_mean/std, folded_* None.
        self.reward_mean = reward_mean
        self.reward_std = reward_std
        self.folded_reward_mean = folded_reward_mean
        self.folded_reward_std = folded_reward_std
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos_token_id, eos_token_id, pad_token_id
        kwargs.setdefault("num_labels", 1)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    # Names the transformers tooling looks up generically.
    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer

    @property
    def num_attention_heads(self) -> int:
        return self.n_head

    @property
    def max_position_embeddings(self) -> int:
        return self.n_positions

    @property
    def num_key_value_heads(self) -> int:
        return self.n_kv_head


class RlhfPreTrainedModel(PreTrainedModel):
    config_class = RlhfConfig
    config: RlhfConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        if isinstance(module, (CausalSelfAttention, MLP)):  # GPT-2's scaled init of residual projections
            init.normal_(module.c_proj.weight, mean=0.0, std=std / (2 * self.config.n_layer) ** 0.5)


class RlhfModel(RlhfPreTrainedModel):
    """The backbone: embeddings (learned positions in the gpt2 layout), blocks, final norm."""

    def __init__(self, config: RlhfConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        if config.layout == "gpt2":  # the llama layout rotates q and k instead
            self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.ln_f = norm(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """`last_hidden_state` (B, T, C). Extra keyword arguments (`use_cache`, ...) are accepted and ignored."""
        B, T = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if past + T > self.config.n_positions:
            raise ValueError(f"sequence of {past + T} tokens exceeds the model's context of {self.config.n_positions}")
        padded = attention_mask is not None and not bool(attention_mask.all())
        if position_ids is None:
            if padded:
                position_ids = position_ids_from_mask(attention_mask, T)
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device)[None, :]
        # Without padding the fused causal kernel applies (mask=None -> is_causal), and a single new token
        # after a cache sees every key: only several new tokens after a cache need the causal offset.
        mask = None
        if padded or (past > 0 and T > 1):
            if attention_mask is None:
                attention_mask = torch.ones(B, past + T, dtype=torch.long, device=input_ids.device)
            mask = attention_mask_4d(attention_mask, T)  # (B, 1, T, S)
        x = self.wte(input_ids)  # (B, T, C)
        rope = None
        if self.config.layout == "gpt2":
            x = x + self.wpe(position_ids)
        else:
            rope = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype,
                                  self.config.llama3_rope)  # (B, 1, T, hs)
        x = self.drop(x)
        for block in self.h:
            x = block(x, mask, cache=cache, rope=rope)  # by keyword: checkpointing drops a cache passed so
        return BaseModelOutputWithPast(last_hidden_state=self.ln_f(x), cache=cache)


@dataclass
class ScalarHeadOutput(SequenceClassifierOutputWithPast):
    """`logits` (B, num_labels): the score at the last non-pad token; `token_scores` (B, T, num_labels)."""

    token_scores: torch.Tensor | None = None


def _resolve_cache(cache, kwargs: dict):
    # transformers renamed `past_key_values` to `cache`; accept either.
    return cache if cache is not None else kwargs.pop("past_key_values", None)


class RlhfForCausalLM(RlhfPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: RlhfConfig):
        super().__init__(config)
        self.transformer = RlhfModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """`labels` (B, T) are the inputs themselves (shifted here); -100 marks ignored positions."""
        cache = _resolve_cache(cache, kwargs)
        if use_cache and cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.config)
        hidden = self.transformer(input_ids, attention_mask, position_ids, cache).last_hidden_state  # (B, T, C)
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)  # (B, T, V)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.LongTensor, num_items_in_batch: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Next-token cross-entropy: logits (B, T, V) at t predict labels (B, T) at t + 1.

    With `num_items_in_batch` (the Trainer's count over all accumulated micro-batches) the sum is
    divided by it, so gradient accumulation weighs every token equally.
    """
    # Shift the labels, not the logits: slicing (B, T, V) logits would copy them, and again in backward.
    shift_labels = F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1).to(logits.device)  # (B * T,)
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()  # (B * T, V)
    if num_items_in_batch is None:
        return F.cross_entropy(flat_logits, shift_labels, ignore_index=-100)
    total = F.cross_entropy(flat_logits, shift_labels, ignore_index=-100, reduction="sum")
    return total / torch.as_tensor(num_items_in_batch, device=total.device)


class RlhfForSequenceClassification(RlhfPreTrainedModel):
    """Backbone + a linear `score` head: one value per token (B, T, num_labels).

    `logits` is the value at each row's last non-pad token, which is what TRL's `RewardTrainer`
    and transformers' sequence-classification tooling read. PPO's value model reads `token_scores`.
    The head's bias carries the folded normalisation (`normalise_score_head`); models saved before
    it had one load with bias 0, which scores as they did.
    """

    _keys_to_ignore_on_load_missing = [r"^score\.bias$"]

    def __init__(self, config: RlhfConfig):
        super().__init__(config)
        self.transformer = RlhfModel(config)
        self.score = nn.Linear(config.n_embd, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> ScalarHeadOutput:
        hidden = self.transformer(input_ids, attention_mask, position_ids).last_hidden_state  # (B, T, C)
        token_scores = self.score(hidden)  # (B, T, num_labels)
        if attention_mask is None:
            last = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
        else:  # index of the last real token, for left and right padding alike
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            last = (attention_mask.long() * positions).argmax(-1)  # (B,)
        logits = token_scores[torch.arange(input_ids.shape[0], device=input_ids.device), last]  # (B, num_labels)
        loss = None
        if labels is not None:  # regression on the scalar, as transformers does for num_labels == 1
            loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
        return ScalarHeadOutput(loss=loss, logits=logits, token_scores=token_scores)


@torch.no_grad()
def normalise_score_head(model: RlhfForSequenceClassification, mean: float, std: float) -> None:
    """Fold `(score - mean) / std` into the score head (weight / std, bias (bias - mean) / std), so the
    model outputs normalised scores; `folded_reward_mean/std` record the map from the trained head."""
    model.score.weight.div_(std)
    model.score.bias.sub_(mean).div_(std)
    folded_mean, folded_std = model.config.folded_reward_mean or 0.0, model.config.folded_reward_std or 1.0
    model.config.folded_reward_mean, model.config.folded_reward_std = folded_mean + mean * folded_std, folded_std * std


def set_dropout(model: nn.Module, p: float) -> None:
    """Set the model's own dropout (embeddings, attention, residuals) to `p`; 0 turns it off.

    PEFT adapters' dropout (`lora_dropout`, configured with the adapters) is left as it is.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout) and "lora_dropout" not in name.split("."):
            module.p = p
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "dropout"):
        config.dropout = p


def register_auto_classes() -> None:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    AutoConfig.register(RlhfConfig.model_type, RlhfConfig, exist_ok=True)
    AutoModel.register(RlhfConfig, RlhfModel, exist_ok=True)
    AutoModelForCausalLM.register(RlhfConfig, RlhfForCausalLM, exist_ok=True)
    AutoModelForSequenceClassification.register(RlhfConfig, RlhfForSequenceClassification, exist_ok=True)


register_auto_classes()
