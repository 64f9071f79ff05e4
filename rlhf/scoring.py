"""Scoring text with a trained reward model.

A response is rendered after its prompt with the chat template (exactly as the reward stage
and PPO see it) and scored at its last token. Scores do not depend on batch size or padding.
`normalised = (raw - reward_mean) / reward_std` from the model's config. The reward stage folds its
statistics (mean 0, std 1 over the SFT policy's own responses) into the score head and leaves 0 and 1
there, so a new model's raw scores are already normalised; older models (no head bias) keep their
statistics in the config. Either way the normalised scores are the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rlhf.responses import prompt_messages


def render_conversation(tokenizer, prompt: Any, response: Any) -> str:
    """prompt (string or messages) + response (string or [assistant message]) as one chat text."""
    if prompt is None:  # implicit format: the response is the whole conversation or text
        return response if isinstance(response, str) else tokenizer.apply_chat_template(response, tokenize=False)
    reply = [{"role": "assistant", "content": response}] if isinstance(response, str) else list(response)
    return tokenizer.apply_chat_template(prompt_messages(prompt) + reply, tokenize=False)


class RewardScorer:
    """Scores (prompt, response) pairs with a reward model directory from the reward stage.

    >>> scorer = RewardScorer("runs/demo/reward")
    >>> scorer.score(["What is 2 + 2?"], ["Sure! 2 + 2 = 4. Have a nice day."])
    """

    def __init__(self, model_dir: str | Path, device: str | None = None, batch_size: int = 32):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        import rlhf.model  # noqa: F401  (registers the Auto classes)
        from rlhf.devices import resolve_device

        self.device = resolve_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir).to(self.device).eval()
        self.batch_size = batch_size
        self.mean = float(getattr(self.model.config, "reward_mean", 0.0))
        self.std = float(getattr(self.model.config, "reward_std", 1.0))

    @torch.no_grad()
    def score_texts(self, texts: list[str], progress: bool = False) -> list[float]:
        """Raw scores of already-rendered texts, truncated from the left to the model's context."""
        from rlhf.console import progress_bar

        limit = self.model.config.n_positions
        scores: list[float] = []
        starts = range(0, len(texts), self.batch_size)
        for start in progress_bar("scoring", iterable=starts, unit="batch", disable=not progress):
            encoded = [self.tokenizer(t, add_special_tokens=False)["input_ids"][-limit:] for t in texts[start : start + self.batch_size]]
            width = max(len(ids) for ids in encoded)
            ids = torch.full((len(encoded), width), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(encoded), width), dtype=torch.long)
            for row, tokens in enumerate(encoded):
                ids[row, : len(tokens)] = torch.tensor(tokens)
                mask[row, : len(tokens)] = 1
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            scores += logits[:, 0].float().cpu().tolist()
        return scores

    def normalise(self, scores: list[float]) -> list[float]:
        return [(s - self.mean) / self.std for s in scores]

    def score(self, prompts: list[Any], responses: list[Any], normalised: bool = True, progress: bool = False) -> list[float]:
        """Scores of responses to prompts (prompt None: the response is the whole text)."""
        texts = [render_conversation(self.tokenizer, p, r) for p, r in zip(prompts, responses)]
        raw = self.score_texts(texts, progress=progress)
        return self.normalise(raw) if normalised else raw


def summarise(values: list[float]) -> dict[str, float]:
    """count, mean, std and quantiles of a list of scores."""
    import statistics

    ordered = sorted(values)

    def quantile(q: float) -> float:
        position = q * (len(ordered) - 1)
        low, high = int(position), min(int(position) + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    return {
        "count": len(values), "mean": statistics.fmean(values), "std": statistics.pstdev(values),
        "min": ordered[0], "p25": quantile(0.25), "median": quantile(0.5), "p75": quantile(0.75), "max": ordered[-1],
    }  # fmt: skip


def check_score_rows(data: str | Path, rows: list[dict]) -> str:
    """Check rows to score without any model; returns their kind: 'pairs' (chosen/rejected) or 'responses'."""
    from rlhf.data import check_response_rows, preference_pairs
    from rlhf.errors import DataError

    first = rows[0]
    if "chosen" in first and "rejected" in first:
        preference_pairs(data, rows)
        return "pairs"
    if "prompt" in first and "response" in first:
        check_response_rows(data, rows)  # an empty response is refused, as the pipeline refuses one
        return "responses"
    raise DataError(f"{data}: row 1: expected 'prompt' and 'response' columns or 'chosen' and 'rejected', got {sorted(first)}")


def score_file(scorer: RewardScorer, data: str | Path, progress: bool = True, rows: list[dict] | None = None) -> tuple[list[dict], dict]:
    """Score every row of a data file: (output rows with the input columns plus scores, summary).
    `rows`: the file's rows if already read (`rlhf score` reads them before loading the model).

    prompt + response rows get `score` (normalised) and `score_raw`; chosen/rejected rows get both
    sides' scores, and the summary adds pairwise accuracy.
    """
    from rlhf.data import preference_pairs, read_rows

    rows = read_rows(data) if rows is None else rows
    if check_score_rows(data, rows) == "pairs":
        pairs, skipped = preference_pairs(data, rows)
        rows = [row for index, row in enumerate(rows) if index not in set(skipped)]
        prompts = [p.get("prompt") for p in pairs]
        raw = scorer.score(prompts + prompts, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs],
                           normalised=False, progress=progress)  # fmt: skip
        chosen, rejected = raw[: len(pairs)], raw[len(pairs) :]
        out = []
        for row, c, r in zip(rows, chosen, rejected):
            (c_norm, r_norm) = scorer.normalise([c, r])
            out.append({**row, "chosen_score": c_norm, "rejected_score": r_norm, "chosen_score_raw": c, "rejected_score_raw": r})
        summary = {"chosen": summarise(scorer.normalise(chosen)), "rejected": summarise(scorer.normalise(rejected)),
                   "accuracy": sum(c > r for c, r in zip(chosen, rejected)) / len(pairs), "skipped_empty_pairs": len(skipped)}  # fmt: skip
        return out, summary
    raw = scorer.score([r["prompt"] for r in rows], [r["response"] for r in rows], normalised=False, progress=progress)
    normalised = scorer.normalise(raw)
    out = [{**row, "score": s, "score_raw": r} for row, s, r in zip(rows, normalised, raw)]
    return out, {"score": summarise(normalised)}


def write_rows(rows: list[dict], path: str | Path) -> None:
    """JSONL, or CSV when the name ends in .csv (non-string cells as JSON)."""
    import csv
    import io
    import json

    from rlhf.artifacts import atomic_write_text

    path = Path(path)
    if path.suffix == ".csv":
        buffer = io.StringIO()
        columns = list(dict.fromkeys(key for row in rows for key in row))  # every row's keys, first-seen order
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: v if isinstance(v, (str, int, float)) else json.dumps(v, ensure_ascii=False) for k, v in row.items()})
        atomic_write_text(path, buffer.getvalue())
    else:
        atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
