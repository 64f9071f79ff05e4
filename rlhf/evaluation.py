"""Evaluating a policy: its samples on held-out prompts (reward-model scores, judge scores, KL to a
reference policy; every policy answers the same prompts with the same sampling seed), best-of-n
sampling with a reward model, and how well a policy predicts held-out text and reference answers
(perplexity, next-token accuracy)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from rlhf.ppo_math import kl_k1
from rlhf.responses import decode_responses, encode_prompts, prompt_text, sample_batch


@dataclass
class PolicySamples:
    """One sampled response per prompt with per-response measurements (lists aligned with prompts)."""

    prompts: list[Any]
    responses: list[str]
    rm_scores: list[float] = field(default_factory=list)
    """Normalised reward-model scores (mean 0, std 1 under the SFT policy)."""
    judge_scores: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    """Sum over the response of log pi(a) - log pi_ref(a) (k1; its expectation is the KL)."""
    lengths: list[int] = field(default_factory=list)
    stopped: list[bool] = field(default_factory=list)

    def mean(self, name: str) -> float:
        values = getattr(self, name)
        return float(sum(values) / len(values)) if values else float("nan")


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || base policy) in nats: log n - (n - 1) / n (Stiennon et al. 2020).

    Beirami et al. (2024) show it is an upper bound on the true KL, tight when the base policy rarely
    samples the same answer twice. n = 1 gives 0; n = 4 gives log 4 - 0.75 = 0.636.
    """
    if n < 1:
        raise ValueError(f"best-of-n needs n >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def best_candidates(scores: torch.Tensor, n: int) -> torch.LongTensor:
    """Row indices (B,) of the highest score in each group of n adjacent candidates; the first among ties.

    scores: (B * n,), the candidates of prompt i in rows i * n ... i * n + n - 1.
    """
    grouped = scores.view(-1, n)  # (B, n)
    return torch.arange(grouped.shape[0], device=scores.device) * n + grouped.argmax(-1)  # argmax: first maximum


@torch.no_grad()
def sample_policy(
    policy,
    tokenizer,
    prompts: list[Any],
    max_new_tokens: int,
    seed: int,
    temperature: float = 1.0,
    reward_model=None,
    reference=None,
    judge: Callable | None = None,
    batch_size: int = 64,
    best_of: int = 1,
) -> PolicySamples:
    """Sample one response per prompt (seeded per batch) and measure it.

    best_of = n > 1 is best-of-n sampling: every prompt is answered n times, its n candidates being
    adjacent rows of one batch (so a batch holds batch_size // n prompts, at least one, and is seeded
    like any other), and the candidate the reward model scores highest is kept, the first among ties.
    With n = 1 this is plain sampling. Best-of-n needs `reward_model` and takes no `reference`: the
    sampled log-ratio of the kept answers would measure the base policy, not best-of-n (its KL is
    `best_of_n_kl`).
    """
    from rlhf.rl_models import normalised_scores, response_logprobs

    if best_of < 1:
        raise ValueError(f"best_of must be >= 1, got {best_of}")
    if best_of > 1 and (reward_model is None or reference is not None):
        raise ValueError("best-of-n sampling needs a reward model and takes no reference (its KL is analytic)")
    device = next(policy.parameters()).device
    encoded = encode_prompts(tokenizer, prompts)
    per_batch = max(1, batch_size // best_of)
    result = PolicySamples(prompts=list(prompts), responses=[])
    for number, start in enumerate(range(0, len(encoded), per_batch)):
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + number)
        sample = sample_batch(policy, tokenizer, encoded[start : start + per_batch], max_new_tokens, temperature,
                              generator, copies=best_of)  # fmt: skip
        if reward_model is not None:
            scores = normalised_scores(reward_model, sample.sequences, sample.attention_mask)  # (B * best_of,)
            kept = best_candidates(scores, best_of)  # (B,); every row when best_of is 1
            sample, scores = sample.select(kept), scores[kept]
            result.rm_scores += scores.tolist()
        result.responses += decode_responses(tokenizer, sample.responses, sample.response_mask)
        result.lengths += sample.response_mask.sum(-1).tolist()
        result.stopped += sample.stopped.tolist()
        if reference is not None:
            ref_logprobs, _ = response_logprobs(reference, sample.sequences, sample.attention_mask, sample.prompt_length, temperature)
            result.kl += ((kl_k1(sample.logprobs, ref_logprobs)) * sample.response_mask).sum(-1).tolist()
    if judge is not None:
        result.judge_scores = [float(s) for s in judge([prompt_text(p) for p in prompts], result.responses)]
    return result


@dataclass
class TokenStats:
    """Next-token prediction over a set of target tokens."""

    nll: float
    """Summed negative log-likelihood (nats)."""
    correct: int
    """Targets that were the argmax prediction."""
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")

    @property
    def accuracy(self) -> float:
        return self.correct / self.tokens if self.tokens else float("nan")

    def __add__(self, other: "TokenStats") -> "TokenStats":
        return TokenStats(self.nll + other.nll, self.correct + other.correct, self.tokens + other.tokens)


@torch.no_grad()
def token_stats(model, sequences: list[list[int]], targets: list[list[bool]], pad_token_id: int, batch_size: int = 32,
                progress: bool = False) -> TokenStats:  # fmt: skip
    """NLL and accuracy of predicting each token marked in `targets` from the tokens before it.

    sequences: token id lists (each at most the model's context); targets: per token, whether it counts.
    """
    device = next(model.parameters()).device
    total = TokenStats(0.0, 0, 0)
    from rlhf.console import progress_bar

    for start in progress_bar("evaluating", iterable=range(0, len(sequences), batch_size), unit="batch", disable=not progress):
        rows, marks = sequences[start : start + batch_size], targets[start : start + batch_size]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        counted = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, (row, mark) in enumerate(zip(rows, marks)):  # right-padded
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
            counted[i, : len(row)] = torch.tensor(mark)
        ids, mask, counted = ids.to(device), mask.to(device), counted.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # (B, T-1, V)
        target, counted = ids[:, 1:], counted[:, 1:]
        nll = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # (B, T-1)
        total = total + TokenStats(float(nll[counted].sum()), int((logits.argmax(-1) == target)[counted].sum()), int(counted.sum()))
    return total


def answer_token_stats(model, tokenizer, pairs: list[tuple[list[dict], str]], batch_size: int = 32,
                       progress: bool = False) -> tuple[TokenStats, int]:  # fmt: skip
    """(stats over the answer tokens (end-of-turn included), answers cut by the context) for
    (prompt messages, answer) pairs rendered with the chat template: the SFT stage's held-out loss."""
    limit = model.config.n_positions
    sequences, targets, truncated = [], [], 0
    for prompt, answer in pairs:
        prompt_ids = tokenizer(tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True),
                               add_special_tokens=False)["input_ids"]  # fmt: skip
        full = tokenizer(tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": answer}], tokenize=False),
                         add_special_tokens=False)["input_ids"]  # fmt: skip
        marks = [i >= len(prompt_ids) for i in range(len(full))]
        if len(full) > limit:  # keep the end: the answer matters, the prompt's start least
            truncated += 1
            full, marks = full[-limit:], marks[-limit:]
        sequences.append(full)
        targets.append(marks)
    return token_stats(model, sequences, targets, tokenizer.pad_token_id, batch_size, progress), truncated


def text_token_stats(model, tokenizer, documents: list[str], batch_size: int = 32, progress: bool = False) -> TokenStats:
    """Stats over every token of the documents (each followed by EOS), in context-sized windows."""
    ids: list[int] = []
    for document in documents:
        ids += tokenizer(document, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    limit = model.config.n_positions
    windows = [ids[start : start + limit] for start in range(0, len(ids), limit)]
    windows = [w for w in windows if len(w) > 1]
    return token_stats(model, windows, [[True] * len(w) for w in windows], tokenizer.pad_token_id, batch_size, progress)


def load_policy(path, device: str | None = None):
    """(causal LM in eval mode, its tokenizer) from a save_pretrained folder of ours, on `device`
    (a `resolve_device` name; None: cuda if available, else cpu)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import rlhf.model  # noqa: F401  (registers the Auto classes)
    from rlhf.artifacts import CAUSAL_LM, check_model_dir
    from rlhf.devices import resolve_device

    check_model_dir(path, CAUSAL_LM, "a policy (the pretrain, sft or ppo stage's output)")
    device = resolve_device(device)
    return AutoModelForCausalLM.from_pretrained(path).to(device).eval(), AutoTokenizer.from_pretrained(path)


def evaluate_model(model_dir, data, max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0,
                   batch_size: int = 32, samples: int = 0, device: str | None = None) -> dict[str, Any]:  # fmt: skip
    """`rlhf eval`: perplexity and next-token accuracy on text or reference answers; BLEU of the
    model's responses (greedy at temperature 0) against the references."""
    from pathlib import Path

    from rlhf.data import prompts_and_references, read_rows, read_text_documents
    from rlhf.errors import DataError
    from rlhf.responses import sample_responses
    from rlhf.statistics import corpus_bleu

    path = Path(data)
    rows = None if path.suffix == ".txt" else read_rows(path)
    is_text = rows is None or ("text" in rows[0] and not {"prompt", "messages"} & set(rows[0]))
    model, tokenizer = load_policy(model_dir, device)
    result: dict[str, Any] = {"model": str(model_dir), "data": str(data)}
    if is_text:
        documents = read_text_documents([str(path)])
        documents = documents[:samples] if samples else documents
        stats = text_token_stats(model, tokenizer, documents, batch_size, progress=True)
        result.update(kind="text", documents=len(documents))
    else:
        pairs = prompts_and_references(path, rows)
        pairs = pairs[:samples] if samples else pairs
        with_answers = [(p, r) for p, r in pairs if r is not None]
        if not with_answers:
            raise DataError(f"{path}: no reference answers (a 'reference' column, completions or messages) to evaluate against")
        stats, truncated = answer_token_stats(model, tokenizer, with_answers, batch_size, progress=True)
        responses = sample_responses(model, tokenizer, [p for p, _ in with_answers], max_new_tokens, temperature, seed, batch_size)
        result.update(kind="answers", rows=len(with_answers), truncated=truncated,
                      bleu=corpus_bleu(responses, [r for _, r in with_answers]),
                      decoding="greedy" if temperature == 0 else f"sampled at temperature {temperature}, seed {seed}",
                      max_new_tokens=max_new_tokens)  # fmt: skip
    result.update(tokens=stats.tokens, loss=stats.nll / stats.tokens if stats.tokens else float("nan"),
                  perplexity=stats.perplexity, accuracy=stats.accuracy)  # fmt: skip
    return result


def format_evaluation(result: dict[str, Any]) -> str:
    """`rlhf eval`'s table."""
    what = f"{result['documents']} documents" if result["kind"] == "text" else f"{result['rows']} reference answers"
    lines = [f"{result['model']} on {result['data']} ({what}, {result['tokens']} predicted tokens)",
             f"  {'loss (nats/token)':22}{result['loss']:.4f}", f"  {'perplexity':22}{result['perplexity']:.3f}",
             f"  {'next-token accuracy':22}{result['accuracy']:.4f}"]  # fmt: skip
    if "bleu" in result:
        lines.append(f"  {'BLEU (' + result['decoding'].split(' ')[0] + ')':22}{result['bleu']:.2f}")
    if result.get("truncated"):
        lines.append(f"  ({result['truncated']} examples longer than the context were cut from the left)")
    return "\n".join(lines)
