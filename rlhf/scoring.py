"""Scoring text with a trained reward model.

A response is rendered after its prompt with the chat template (exactly as the reward stage
and PPO see it) and scored at its last token. Scores do not depend on batch size or padding.
`normalised = (raw - reward_mean) / reward_std`, the statistics the reward stage stored in the
model's config (mean 0, std 1 over the SFT policy's own responses).
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

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir).to(self.device).eval()
        self.batch_size = batch_size
        self.mean = float(getattr(self.model.config, "reward_mean", 0.0))
        self.std = float(getattr(self.model.config, "reward_std", 1.0))

    @torch.no_grad()
    def score_texts(self, texts: list[str], progress: bool = False) -> list[float]:
        """Raw scores of already-rendered texts, truncated from the left to the model's context."""
        from tqdm.auto import tqdm

        limit = self.model.config.n_positions
        scores: list[float] = []
        starts = range(0, len(texts), self.batch_size)
        for start in tqdm(starts, desc="scoring", unit="batch", disable=not progress):
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
