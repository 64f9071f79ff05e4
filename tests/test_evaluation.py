"""rlhf.evaluation: perplexity and next-token accuracy of reference answers equal TRL SFTTrainer's
own held-out loss and mean_token_accuracy on the same rows; text perplexity equals the model's loss."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import make_config, randomize_
from rlhf.evaluation import answer_token_stats, text_token_stats
from rlhf.model import RlhfForCausalLM

CORPUS = ["where is the cat? on the mat. what did the dog eat? the bone. say hi. hi there."] * 5
QA = [("where is the cat?", "on the mat."), ("what did the dog eat?", "the bone."), ("say hi.", "hi there."),
      ("where is the dog?", "in the park, eating the bone.")]  # fmt: skip


@pytest.fixture(scope="module")
def tok():
    from rlhf.tokenizer import train_tokenizer

    return train_tokenizer(CORPUS, vocab_size=300, kind="bpe")


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    lm = RlhfForCausalLM(make_config(vocab_size=len(tok), n_positions=64))
    lm.config.pad_token_id = tok.pad_token_id
    return randomize_(lm, scale=0.1).eval()  # sharper predictions than the init: accuracy is not trivially 0


def test_answer_stats_equal_trl_sft_evaluation(tok, model, tmp_path) -> None:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in QA]
    args = SFTConfig(output_dir=str(tmp_path), per_device_eval_batch_size=len(rows), max_length=64, assistant_only_loss=True,
                     report_to=[], use_cpu=True, bf16=False, disable_tqdm=True)  # fmt: skip
    trainer = SFTTrainer(model=model, args=args, eval_dataset=Dataset.from_dict({"messages": rows}),
                         train_dataset=Dataset.from_dict({"messages": rows}), processing_class=tok)  # fmt: skip
    reference = trainer.evaluate()  # one batch: TRL's loss is the token mean over all answer tokens

    stats, truncated = answer_token_stats(model, tok, [(r[:1], r[1]["content"]) for r in rows], batch_size=3)
    assert truncated == 0
    assert math.log(stats.perplexity) == pytest.approx(reference["eval_loss"], rel=1e-5)
    assert stats.accuracy == pytest.approx(reference["eval_mean_token_accuracy"], rel=1e-6)
    answer_tokens = sum(len(tok(a + tok.eos_token)["input_ids"]) for _, a in QA)
    assert stats.tokens == answer_tokens


def test_answer_stats_do_not_depend_on_batch_size(tok, model) -> None:
    pairs = [([{"role": "user", "content": q}], a) for q, a in QA]
    one, _ = answer_token_stats(model, tok, pairs, batch_size=1)
    all_, _ = answer_token_stats(model, tok, pairs, batch_size=4)
    assert one.tokens == all_.tokens and one.correct == all_.correct
    assert one.nll == pytest.approx(all_.nll, rel=1e-5)


def test_long_answers_are_cut_from_the_left_and_counted(tok, model) -> None:
    long_prompt = [{"role": "user", "content": "where is the cat? " * 40}]
    stats, truncated = answer_token_stats(model, tok, [(long_prompt, "on the mat.")])
    assert truncated == 1
    assert stats.tokens == len(tok("on the mat." + tok.eos_token)["input_ids"])


def test_text_stats_equal_the_models_own_loss(tok, model) -> None:
    text = CORPUS[0]
    stats = text_token_stats(model, tok, [text])
    ids = torch.tensor([tok(text)["input_ids"] + [tok.eos_token_id]])
    assert ids.shape[1] <= 64  # one window
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert stats.tokens == ids.shape[1] - 1
    assert math.log(stats.perplexity) == pytest.approx(loss.item(), rel=1e-5)
