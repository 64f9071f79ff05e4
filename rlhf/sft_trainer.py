"""TRL's `SFTTrainer`, computing the loss from the full logits where they are small.

TRL 1.16's `SFTTrainer` always projects through its chunked LM head (`add_fused_lm_head`), which
never builds the (B, T, V) logits: that saves memory at large vocabularies, but at ours it is the
slower path: a Tiny Shakespeare step (4 layers, 128 wide, 326 tokens) takes about 1.1x as long on
the CPU through it (`benchmarks/bench_sft_head.py`). Where one micro-batch's logits have at most
`FULL_LOGITS_MAX` elements, this subclass lets the model's own forward build them and takes the loss
and TRL's metrics (entropy, token accuracy, token count) from one log-softmax; above it, and for
every setting that needs TRL's own path (another loss type, label smoothing, a custom loss, MoE aux
losses), it defers to TRL unchanged. The loss is the same next-token cross-entropy either way.

Shapes: B batch, T sequence, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from trl import SFTTrainer as TRLSFTTrainer

FULL_LOGITS_MAX = 2**25
"""Elements of one micro-batch's (B, T, V) logits (128 MiB in fp32) up to which they are built in full."""


def next_token_statistics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums over the positions whose next token is a label: negative log-likelihood (with gradient),
    entropy and top-1 hits (without), and their count.

    logits (B, T, V) at t predict labels (B, T) at t + 1; -100 marks ignored labels.
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # (B, T): the token each position predicts
    valid = targets != -100  # (B, T)
    log_probs = logits.float().log_softmax(-1)  # (B, T, V)
    picked = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    with torch.no_grad():
        entropy = -torch.special.xlogy(log_probs.exp(), log_probs.exp()).sum(-1)  # (B, T); 0 log 0 = 0 (masked logits)
        hits = log_probs.argmax(-1) == targets  # (B, T), False where ignored
    return {  # masked_fill, not a product: an ignored position's -inf must not turn the sum into NaN
        "nll": -picked.masked_fill(~valid, 0.0).sum(),
        "entropy": entropy.masked_fill(~valid, 0.0).sum(),
        "correct": hits.sum(),
        "count": valid.sum(),
    }


class SFTTrainer(TRLSFTTrainer):
    """TRL's trainer; `compute_loss` builds the full logits when they are small (module docstring)."""

    def full_logits(self, inputs: dict) -> bool:
        """Whether this micro-batch takes the full-logit path: small logits and TRL's plain loss."""
        args = self.args
        plain = (
            args.loss_type == "nll" and self.label_smoother is None and self.compute_loss_func is None
            and not self.aux_loss_enabled and "labels" in inputs and "shift_labels" not in inputs
            and getattr(self.accelerator, "parallelism_config", None) is None
        )  # fmt: skip
        B, T = inputs["input_ids"].shape
        return plain and B * T * self.model.config.get_text_config().vocab_size <= FULL_LOGITS_MAX

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.full_logits(inputs):
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        # 1. The model's forward, logits in full (the labels stay here: the model computes no loss).
        outputs = model(**{key: value for key, value in inputs.items() if key != "labels"}, use_cache=False)
        sums = next_token_statistics(outputs.logits, inputs["labels"])
        # 2. The loss: summed over tokens, divided by the tokens of the whole accumulated batch (as TRL).
        tokens = sums["count"] if num_items_in_batch is None else num_items_in_batch
        loss = sums["nll"] / torch.as_tensor(tokens, device=sums["nll"].device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        # 3. TRL's metrics, under TRL's names, gathered over processes.
        gathered = {key: self.accelerator.gather_for_metrics(sums[key].detach()).sum() for key in ("entropy", "correct", "count")}
        count = gathered["count"].item()
        self._metrics[mode]["entropy"].append(gathered["entropy"].item() / count if count else 0.0)
        self._metrics[mode]["mean_token_accuracy"].append(gathered["correct"].item() / count if count else 0.0)
        if mode == "train":
            if "attention_mask" in inputs:
                local_tokens = inputs["attention_mask"].sum()
            else:
                local_tokens = torch.tensor(inputs["input_ids"].numel(), device=inputs["input_ids"].device)
            self._total_train_tokens += self.accelerator.gather_for_metrics(local_tokens).sum().item() // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return (loss, outputs) if return_outputs else loss
