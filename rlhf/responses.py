"""Prompts in, response texts out: chat rendering, batched sampling with our engine, judges.

Shared by the SFT stage (judge before/after), PPO (rollouts and reward functions) and evaluation.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import torch

from rlhf.data import prompt_messages
from rlhf.errors import ConfigError
from rlhf.generation import generate, left_pad


def prompt_text(prompt: Any) -> str:
    """The last user message of a prompt cell (what a judge reads)."""
    messages = prompt_messages(prompt)
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else messages[-1]["content"]


def encode_prompts(tokenizer, prompts: list[Any]) -> list[list[int]]:
    """Token ids of each prompt rendered with the chat template and the assistant marker."""
    texts = [tokenizer.apply_chat_template(prompt_messages(p), tokenize=False, add_generation_prompt=True) for p in prompts]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


def decode_responses(tokenizer, responses: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
    """Response texts (B,) from token rows (B, N): cut at EOS, special tokens dropped."""
    texts = []
    for tokens, mask in zip(responses.tolist(), response_mask.tolist()):
        kept = [t for t, m in zip(tokens, mask) if m and t != tokenizer.eos_token_id]
        texts.append(tokenizer.decode(kept, skip_special_tokens=True))
    return texts


def sample_responses(
    model,
    tokenizer,
    prompts: list[Any],
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    top_k: int = 0,
    top_p: float = 1.0,
) -> list[str]:
    """One response per prompt; temperature 0 is greedy. Reproducible for a given seed and batch size."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    encoded = encode_prompts(tokenizer, prompts)
    limit = model.config.n_positions - max_new_tokens
    texts: list[str] = []
    for start in range(0, len(encoded), batch_size):
        batch = [ids[-limit:] for ids in encoded[start : start + batch_size]]  # keep the prompt's end
        ids, mask = left_pad(batch, tokenizer.pad_token_id, device)
        result = generate(
            model, ids, mask, max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id,
            temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
        )  # fmt: skip
        texts += decode_responses(tokenizer, result.responses, result.response_mask)
    return texts


def load_function(reference: str, key: str = "") -> Callable:
    """Import 'package.module:function'; errors name the setting `key` it came from."""
    where = f"{key}: {reference!r}" if key else repr(reference)
    module_name, sep, name = reference.partition(":")
    if not sep or not module_name or not name:
        raise ConfigError(f"{where}: expected 'module:function'")
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"{where}: cannot import ({error})") from None
    if not callable(function):
        raise ConfigError(f"{where}: not callable")
    return function


def judge_mean(judge: Callable, prompts: list[Any], responses: list[str]) -> float:
    scores = judge([prompt_text(p) for p in prompts], responses)
    return float(sum(scores) / len(scores))
