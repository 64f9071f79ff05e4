"""Batched sampling with a preallocated KV cache: the rollout engine of PPO.

transformers' `generate()` pays a large fixed cost per step at our model sizes; here a step is one
forward of the new tokens against a cache allocated once, then sampling. The log-probabilities
returned are those of the sampling distribution (temperature-scaled logits, before top-k/top-p
truncation), which is what PPO's importance ratios need.

Shapes: B batch, P prompt length (left-padded), N max new tokens, V vocabulary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


class StaticKVCache:
    """Keys and values of every layer in tensors allocated once: (B, nkv, P + N, hs) each.

    nkv and hs are those of the keys the first update brings (the config's n_kv_head and head_dim:
    with grouped-query attention the cache holds the shared key/value heads only).

    Implements the two methods our attention calls (`update`, `get_seq_length`), the same ones as
    transformers' `Cache`, so the model needs no special path for it.
    """

    def __init__(self, n_layer: int, max_length: int):
        self.n_layer, self.max_length, self.length = n_layer, max_length, 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def get_seq_length(self) -> int:
        return self.length

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write k, v (B, nkv, T, hs) after the cached tokens; return all keys/values (B, nkv, S, hs)."""
        if len(self.keys) <= layer_idx:  # first call: allocate, in the dtype autocast gives k
            B, nkv, _, hs = k.shape
            self.keys.append(k.new_zeros(B, nkv, self.max_length, hs))
            self.values.append(v.new_zeros(B, nkv, self.max_length, hs))
        end = self.length + k.shape[2]
        self.keys[layer_idx][:, :, self.length : end] = k
        self.values[layer_idx][:, :, self.length : end] = v
        if layer_idx == self.n_layer - 1:
            self.length = end
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]


@dataclass
class GenerationResult:
    """Prompts and sampled responses, row-aligned.

    sequences: (B, P + N') left-padded prompt then response; pad after a row stops. N' <= N is the
        number of steps taken (all rows stopped early, or N).
    attention_mask: (B, P + N') 1 on real prompt tokens and response tokens up to and including EOS.
    response_mask: (B, N') the response part of `attention_mask`, as bool.
    logprobs: (B, N') log-probability of each sampled token under the temperature-scaled
        distribution; 0 where `response_mask` is False.
    stopped: (B,) whether each row emitted EOS.
    prompt_length: P.
    """

    sequences: torch.LongTensor
    attention_mask: torch.LongTensor
    response_mask: torch.BoolTensor
    logprobs: torch.Tensor
    stopped: torch.BoolTensor
    prompt_length: int

    @property
    def responses(self) -> torch.LongTensor:
        """(B, N') the generated tokens, pad after stop."""
        return self.sequences[:, self.prompt_length :]

    def select(self, rows: torch.LongTensor) -> "GenerationResult":
        """The result for the rows `rows` (K,) of the batch, in that order."""
        return GenerationResult(self.sequences[rows], self.attention_mask[rows], self.response_mask[rows],
                                self.logprobs[rows], self.stopped[rows], self.prompt_length)  # fmt: skip


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Logits (B, V) with all but the k largest per row set to -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Logits (B, V) keeping the smallest set of tokens whose probability reaches p (nucleus).

    The most likely token is always kept.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    # Drop a token once the mass before it already reaches p.
    drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.LongTensor, torch.Tensor]:
    """Pick the next token from logits (B, V); temperature 0 means greedy.

    Returns tokens (B,) and their log-probabilities (B,) under softmax(logits / temperature)
    (softmax(logits) when greedy), before truncation.
    """
    logits = logits.float()
    if temperature == 0.0:
        tokens = logits.argmax(-1)
        return tokens, F.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    scaled = logits if temperature == 1.0 else logits / temperature  # x / 1 == x: a pass over (B, V) saved
    filtered = top_p_filter(top_k_filter(scaled, top_k), top_p)
    # Inverse-CDF sampling: one uniform draw per row (torch.multinomial draws one per vocabulary entry).
    cdf = filtered.softmax(-1).cumsum(-1)  # (B, V)
    u = torch.rand((cdf.shape[0], 1), generator=generator, device=cdf.device) * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)
    return tokens, F.log_softmax(scaled, -1).gather(-1, tokens[:, None]).squeeze(-1)


@torch.no_grad()  # not inference_mode: PPO feeds the returned tensors to forwards that keep a graph
def generate(
    model: torch.nn.Module,
    input_ids: torch.LongTensor,
    attention_mask: torch.LongTensor,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    on_token: Callable[[torch.LongTensor], None] | None = None,
) -> GenerationResult:
    """Sample continuations of left-padded prompts input_ids (B, P) with attention_mask (B, P).

    `model` is a causal LM taking `(input_ids, attention_mask, position_ids, cache, logits_to_keep)`
    (ours, or a PEFT wrapper of it). Each row stops after its first EOS; later slots hold pad.
    `on_token`, if given, receives each step's tokens (B,) (pad for rows already stopped) as soon as
    they are sampled, so that a caller can stream them; it draws no random numbers, so sampling is
    the same with it or without.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("prompts must be left-padded: a row has padding at its end")
    config = getattr(model, "config")
    B, P = input_ids.shape
    total = P + max_new_tokens
    if total > config.n_positions:
        raise ValueError(f"prompt ({P}) + max_new_tokens ({max_new_tokens}) exceeds the context ({config.n_positions})")
    device = input_ids.device
    was_training = model.training
    model.eval()

    cache = StaticKVCache(config.n_layer, total)
    sequences = torch.full((B, total), pad_token_id, dtype=torch.long, device=device)
    sequences[:, :P] = input_ids
    mask = torch.zeros((B, total), dtype=torch.long, device=device)
    mask[:, :P] = attention_mask
    logprobs = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    next_position = attention_mask.long().sum(-1)  # (B,) position of the first new token

    logits = model(input_ids=input_ids, attention_mask=attention_mask, cache=cache, logits_to_keep=1).logits
    steps = 0
    for step in range(max_new_tokens):
        tokens, token_logprobs = sample_next_token(logits[:, -1], temperature, top_k, top_p, generator)
        tokens = tokens.masked_fill(finished, pad_token_id)
        sequences[:, P + step] = tokens
        mask[:, P + step] = (~finished).long()
        logprobs[:, step] = token_logprobs.masked_fill(finished, 0.0)
        finished |= tokens == eos_token_id
        steps = step + 1
        if on_token is not None:
            on_token(tokens)
        if steps == max_new_tokens or bool(finished.all()):
            break
        logits = model(
            input_ids=tokens[:, None],
            attention_mask=mask[:, : P + steps],
            position_ids=(next_position + step)[:, None],
            cache=cache,
            logits_to_keep=1,
        ).logits

    model.train(was_training)
    return GenerationResult(
        sequences=sequences[:, : P + steps],
        attention_mask=mask[:, : P + steps],
        response_mask=mask[:, P : P + steps].bool(),
        logprobs=logprobs[:, :steps],
        stopped=finished,
        prompt_length=P,
    )


def left_pad(token_lists: list[list[int]], pad_token_id: int, device: torch.device | str = "cpu"):
    """Left-pad token lists into input_ids (B, P) and attention_mask (B, P)."""
    width = max(len(t) for t in token_lists)
    ids = torch.full((len(token_lists), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), width), dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        if tokens:
            ids[row, width - len(tokens) :] = torch.tensor(tokens, dtype=torch.long)
            mask[row, width - len(tokens) :] = 1
    return ids.to(device), mask.to(device)


@dataclass
class DecodeCost:
    """What one decoding step costs per new token: FLOPs, and bytes read from memory (fp32 unless told).

    Per step the batch shares one read of the weights; each row reads its own keys and values.
    """

    flops: float
    weight_bytes: float
    cache_bytes: float

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.cache_bytes


def decode_cost(model: torch.nn.Module, batch: int, cache_length: int, bytes_per_value: int = 4) -> DecodeCost:
    """The cost per token of a decoding step of `batch` rows attending to `cache_length` keys.

    FLOPs: 2 per weight of every matrix product (LM head included), and 4 * nh * hs per key per layer
    (q.k and the weighted sum of v). Weights read: every parameter except embedding tables, of
    which only `batch` rows are gathered (a tied LM head is read as the head), divided by the
    batch. Cache read: keys and values of every layer, n_kv_head heads of head_dim.
    """
    config = model.config
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    tables = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    untied_tables = sum(t.numel() for t in tables if all(t is not m.weight for m in linears))
    streamed = sum(p.numel() for p in model.parameters()) - untied_tables
    attention_flops = 4 * config.n_layer * config.n_head * config.head_dim * cache_length
    cache_values = 2 * config.n_layer * config.n_kv_head * config.head_dim * cache_length
    return DecodeCost(
        flops=2 * sum(m.weight.numel() for m in linears) + attention_flops,
        weight_bytes=streamed * bytes_per_value / batch,
        cache_bytes=cache_values * bytes_per_value,
    )


def measure_machine(size: int = 1024, copy_mib: int = 256, repeats: int = 5) -> tuple[float, float]:
    """This machine's fp32 matrix-product rate (FLOP/s) and copy bandwidth (bytes/s, read + write): best of repeats."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    src = torch.empty(copy_mib * 2**20 // 4)
    dst = torch.empty_like(src)
    best_mm = best_copy = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best_mm = min(best_mm, time.perf_counter() - start)
        start = time.perf_counter()
        dst.copy_(src)
        best_copy = min(best_copy, time.perf_counter() - start)
    return 2 * size**3 / best_mm, 2 * src.numel() * 4 / best_copy


def roofline_report(cost: DecodeCost, flops_per_s: float, bytes_per_s: float, seconds_per_token: float | None = None) -> str:
    """One line: a token's FLOPs and bytes, the time each bound allows, and how far a measured time is from it."""
    compute_s, memory_s = cost.flops / flops_per_s, cost.bytes / bytes_per_s
    line = (f"roofline per token: {cost.flops / 1e6:.1f} MFLOP, {cost.bytes / 1e6:.2f} MB "
            f"({cost.weight_bytes / 1e6:.2f} weights + {cost.cache_bytes / 1e6:.2f} cache); "
            f"at {flops_per_s / 1e9:.0f} GFLOP/s and {bytes_per_s / 1e9:.1f} GB/s: {compute_s * 1e6:.0f} us compute, "
            f"{memory_s * 1e6:.0f} us memory")  # fmt: skip
    if seconds_per_token is not None:
        line += f"; measured {seconds_per_token * 1e6:.0f} us ({max(compute_s, memory_s) / seconds_per_token:.0%} of the bound)"
    return line
