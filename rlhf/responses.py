"""Prompts in, response texts out: chat rendering, batched sampling with our engine, judges.

Shared by the SFT and DPO stages (judge before/after), PPO (rollouts and reward functions) and evaluation.
"""

from __future__ import annotations

import importlib
import math
from typing import Any, Callable

import torch

from rlhf.data import prompt_messages
from rlhf.errors import ConfigError
from rlhf.generation import GenerationResult, generate, left_pad


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


def sample_batch(
    model,
    tokenizer,
    prompt_tokens: list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    copies: int = 1,
    top_k: int = 0,
    top_p: float = 1.0,
    on_token: Callable[[torch.LongTensor], None] | None = None,
) -> GenerationResult:
    """The one batched sampler: each token prompt `copies` times in adjacent rows, left-padded, answered
    by our KV-cache engine. A prompt longer than the context less `max_new_tokens` keeps its end, where
    the question is (the RL stages count such prompts up front). Temperature 0 is greedy. `on_token`
    receives each step's tokens (B,) as they are sampled (`generate`)."""
    device = next(model.parameters()).device
    limit = model.config.n_positions - max_new_tokens
    rows = [tokens[-limit:] for tokens in prompt_tokens for _ in range(copies)]
    ids, mask = left_pad(rows, tokenizer.pad_token_id, device)
    return generate(
        model, ids, mask, max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id,
        temperature=temperature, top_k=top_k, top_p=top_p, generator=generator, on_token=on_token,
    )  # fmt: skip


def seeded_generator(model, seed: int) -> torch.Generator:
    """The random stream `sample_responses` and `stream_response` draw from: on the model's device, so
    that a seed means the same answers in both."""
    return torch.Generator(device=next(model.parameters()).device).manual_seed(seed)


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
    copies: int = 1,
) -> list[str]:
    """`copies` response texts per prompt, adjacent (prompt i's are texts i * copies ... i * copies + copies - 1),
    each a separate sample; temperature 0 is greedy. Reproducible for a given seed, batch size (prompts per
    batch) and number of copies."""
    generator = seeded_generator(model, seed)
    encoded = encode_prompts(tokenizer, prompts)
    texts: list[str] = []
    for start in range(0, len(encoded), batch_size):
        result = sample_batch(model, tokenizer, encoded[start : start + batch_size], max_new_tokens, temperature,
                              generator, copies=copies, top_k=top_k, top_p=top_p)  # fmt: skip
        texts += decode_responses(tokenizer, result.responses, result.response_mask)
    return texts


def stream_response(
    model,
    tokenizer,
    prompt: Any,
    max_new_tokens: int,
    write: Callable[[str], None],
    temperature: float = 1.0,
    seed: int = 0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> str:
    """One response to `prompt`, the same as `sample_responses` gives for this seed, handed to `write` piece
    by piece as it is generated; returns the whole text, which the pieces add up to.

    Each step decodes the whole response so far and writes what is new: a token may carry only part of
    a UTF-8 character (byte-level BPE), so text ending in the replacement character waits for the next token.
    """
    tokens: list[int] = []
    shown = ""

    def show(text: str) -> None:
        nonlocal shown
        if text.startswith(shown) and len(text) > len(shown):
            write(text[len(shown) :])
            shown = text

    def on_token(step_tokens: torch.LongTensor) -> None:  # (1,)
        token = int(step_tokens[0])
        if token != tokenizer.eos_token_id:
            tokens.append(token)
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            if not text.endswith("\ufffd"):
                show(text)

    result = sample_batch(model, tokenizer, encode_prompts(tokenizer, [prompt]), max_new_tokens, temperature,
                          seeded_generator(model, seed), top_k=top_k, top_p=top_p, on_token=on_token)  # fmt: skip
    reply = decode_responses(tokenizer, result.responses, result.response_mask)[0]
    show(reply)
    return reply


PROBE_PROMPTS = 2
"""Prompts a plug-in scores once when loaded, so that a wrong signature or result fails before any stage starts."""
PROBE_RESPONSE = "OK."


def load_function(reference: str, key: str = "", probe: list[Any] | None = None) -> Callable:
    """Import 'package.module:function'; errors name the setting `key` it came from. With `probe` (prompt
    cells), the function scores the first few of them once, answered by PROBE_RESPONSE, and must return
    one finite number per prompt."""
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
    if probe:
        check_scores(function, [prompt_text(p) for p in probe[:PROBE_PROMPTS]], where)
    return function


def check_scores(function: Callable, prompts: list[str], where: str) -> None:
    """Call a (prompts, responses) -> floats plug-in once; a failure or a bad result is a ConfigError naming `where`."""
    n = len(prompts)
    try:
        scores = function(prompts, [PROBE_RESPONSE] * n)
    except Exception as error:  # the plug-in is user code: any failure here means it does not fit
        raise ConfigError(f"{where}: failed when called with {n} prompts and {n} responses "
                          f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from None  # fmt: skip
    try:
        values = [float(x) for x in scores] if not isinstance(scores, (str, bytes, dict)) else None
    except (TypeError, ValueError):
        values = None
    if values is None or any(isinstance(x, (bool, str, bytes)) for x in scores):
        raise ConfigError(f"{where}: must return a list of numbers, one per response; got {type(scores).__name__} {str(scores)[:60]}")
    if len(values) != n:
        raise ConfigError(f"{where}: returned {len(values)} scores for {n} responses")
    if not all(math.isfinite(x) for x in values):
        raise ConfigError(f"{where}: returned a NaN or infinite score ({values})")


def judge_mean(judge: Callable, prompts: list[Any], responses: list[str]) -> float:
    scores = judge([prompt_text(p) for p in prompts], responses)
    return float(sum(scores) / len(scores))


def read_judge(eval_prompts: str, judge: str) -> tuple[Callable | None, list[Any]]:
    """(the judge, its held-out prompts) of a stage's `eval_prompts` and `judge` settings, checked and
    probed; (None, []) when the stage has no judge."""
    from rlhf.data import check_prompt_rows, read_rows

    if not judge:
        return None, []
    rows = read_rows(eval_prompts)
    check_prompt_rows(eval_prompts, rows)
    prompts = [row["prompt"] for row in rows]
    return load_function(judge, "judge", probe=prompts), prompts


def judge_policy(model, tokenizer, prompts: list[Any], judge: Callable, max_new_tokens: int, seed: int) -> float:
    """The judge's mean score of `model`'s greedy answers to `prompts`."""
    responses = sample_responses(model, tokenizer, prompts, max_new_tokens, temperature=0.0, seed=seed)
    return judge_mean(judge, prompts, responses)
