"""rlhf.evaluation: perplexity and next-token accuracy of reference answers equal TRL SFTTrainer's
own held-out loss and mean_token_accuracy on the same rows; text perplexity equals the model's loss.
Best-of-n sampling: its analytic KL by hand, n = 1 is plain sampling, and it keeps the candidate the
reward model scores highest (the first among ties), checked on the tiny pipeline's SFT and reward models."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import make_config, randomize_
from rlhf.evaluation import answer_token_stats, best_candidates, best_of_n_kl, sample_policy, text_token_stats
from rlhf.model import RlhfForCausalLM

pytestmark = pytest.mark.filterwarnings("ignore:ppo iteration .* negative mean KL:UserWarning")  # the tiny pipeline's PPO

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


# ----------------------------------------------------------------------------- best-of-n


def test_best_of_n_kl_by_hand() -> None:
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)  # 0.1931
    assert best_of_n_kl(4) == pytest.approx(1.3862944 - 0.75)  # log 4 - 3/4 = 0.6363
    assert best_of_n_kl(16) == pytest.approx(2.7725887 - 0.9375)  # log 16 - 15/16 = 1.8351
    with pytest.raises(ValueError):
        best_of_n_kl(0)


def test_best_candidates_takes_each_groups_maximum_and_the_first_among_ties() -> None:
    scores = torch.tensor([0.1, 0.5, 0.2,  # prompt 0: candidate 1
                           -1.0, -3.0, -2.0,  # prompt 1: candidate 0
                           0.7, 0.9, 0.9])  # prompt 2: candidates 1 and 2 tie, the first is kept  # fmt: skip
    assert best_candidates(scores, 3).tolist() == [1, 3, 7]
    assert best_candidates(scores, 1).tolist() == list(range(9)), "best-of-1 keeps every row"


@pytest.fixture(scope="module")
def tiny_models(tiny_rlhf):
    """(SFT policy, reward model, tokenizer, 8 held-out prompts) of the session's tiny pipeline."""
    from transformers import AutoModelForSequenceClassification

    from rlhf.data import read_rows
    from rlhf.evaluation import load_policy

    policy, tokenizer = load_policy(tiny_rlhf.run_dir / "sft", device="cpu")
    reward = AutoModelForSequenceClassification.from_pretrained(tiny_rlhf.run_dir / "reward").eval()
    prompts = [row["prompt"] for row in read_rows(tiny_rlhf.folder / "eval.jsonl")]
    return policy, tokenizer, reward, prompts


def test_best_of_1_is_plain_sampling_with_the_same_seeds(tiny_models) -> None:
    policy, tokenizer, reward, prompts = tiny_models
    plain = sample_policy(policy, tokenizer, prompts, 8, seed=3, reward_model=reward, batch_size=4)
    best = sample_policy(policy, tokenizer, prompts, 8, seed=3, reward_model=reward, batch_size=4, best_of=1)
    assert best == plain
    other_seed = sample_policy(policy, tokenizer, prompts, 8, seed=4, reward_model=reward, batch_size=4, best_of=1)
    assert other_seed.responses != plain.responses, "the seed matters: the equality above is not vacuous"


def test_best_of_n_keeps_the_candidate_the_reward_model_scores_highest(tiny_models, monkeypatch) -> None:
    import rlhf.responses as responses
    from rlhf.responses import decode_responses
    from rlhf.rl_models import normalised_scores

    policy, tokenizer, reward, prompts = tiny_models
    n, batches = 4, []
    real = responses.generate

    def recording(*args, **kwargs):
        batches.append(real(*args, **kwargs))
        return batches[-1]

    monkeypatch.setattr(responses, "generate", recording)
    best = sample_policy(policy, tokenizer, prompts, 8, seed=0, reward_model=reward, batch_size=8, best_of=n)
    assert len(best.responses) == len(best.rm_scores) == len(prompts)
    assert [len(b.stopped) for b in batches] == [8] * (len(prompts) * n // 8), "batches of batch_size rows: 2 prompts x 4"
    # Score every candidate on its own (a batch of one, no padding) and find each prompt's best.
    candidates, scores = [], []
    for batch in batches:
        texts = decode_responses(tokenizer, batch.responses, batch.response_mask)
        for row, text in enumerate(texts):
            real_tokens = batch.attention_mask[row].bool()
            sequence = batch.sequences[row][real_tokens][None]
            candidates.append(text)
            scores.append(normalised_scores(reward, sequence, torch.ones_like(sequence)).item())
    chosen = []
    for prompt in range(len(prompts)):
        mine = scores[prompt * n : (prompt + 1) * n]
        top = max(mine)
        chosen.append(min(j for j in range(n) if mine[j] >= top - 1e-5))
        assert best.responses[prompt] == candidates[prompt * n + chosen[-1]]
        assert best.rm_scores[prompt] == pytest.approx(top, abs=1e-5)
    assert any(chosen), f"some prompt's best is not its first candidate (chosen: {chosen}): the choice is not vacuous"
