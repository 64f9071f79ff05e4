"""Tests for rlhf.generation: greedy decoding against uncached and transformers references,
per-row EOS stopping, sampling log-probabilities, seeding, top-k/top-p and input checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import make_config, randomize_
from rlhf.generation import (
    DecodeCost,
    GenerationResult,
    StaticKVCache,
    decode_cost,
    generate,
    left_pad,
    roofline_report,
    sample_next_token,
    top_k_filter,
    top_p_filter,
)
from rlhf.model import RlhfForCausalLM

PAD = 0
NEVER = -1  # an EOS id no token equals: rows never stop
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14], [22, 23]]
N = 8


@pytest.fixture(scope="module")
def model() -> RlhfForCausalLM:
    # Noisy weights: peaked, varied next-token distributions, so greedy has no near-ties.
    torch.manual_seed(0)
    return randomize_(RlhfForCausalLM(make_config())).eval()


@pytest.fixture(scope="module")
def prompts():
    return left_pad(PROMPTS, PAD)


@pytest.fixture(scope="module")
def greedy(model, prompts) -> GenerationResult:
    return generate(model, *prompts, max_new_tokens=N, eos_token_id=NEVER, pad_token_id=PAD, temperature=0.0)


def _uncached_greedy(model, prompt: list[int], max_new: int, eos: int) -> list[int]:
    """Recompute the whole unpadded sequence at every step; argmax; stop after EOS."""
    seq, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new):
            token = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            seq.append(token)
            out.append(token)
            if token == eos:
                break
    return out


def _padded(rows: list[list[int]], width: int) -> torch.Tensor:
    return torch.tensor([r + [PAD] * (width - len(r)) for r in rows])


def test_left_pad() -> None:
    ids, mask = left_pad([[1, 2, 3], [4], []], pad_token_id=9)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4], [9, 9, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long


def test_static_kv_cache() -> None:
    cache = StaticKVCache(n_layer=2, max_length=5)
    k = torch.arange(2 * 1 * 3 * 2, dtype=torch.float).view(2, 1, 3, 2)  # (B, nh, T=3, hs)
    for layer in range(2):
        keys, values = cache.update(k, -k, layer)
        assert keys.shape == (2, 1, 3, 2) and torch.equal(keys, k) and torch.equal(values, -k)
        assert cache.get_seq_length() == (0 if layer == 0 else 3)  # advances after the last layer
    step = torch.full((2, 1, 1, 2), 7.0)
    keys, _ = cache.update(step, step, 0)
    assert keys.shape == (2, 1, 4, 2) and torch.equal(keys[:, :, :3], k) and torch.equal(keys[:, :, 3:], step)


def test_greedy_matches_uncached_decoding(model, prompts, greedy) -> None:
    assert greedy.sequences.shape == (len(PROMPTS), 5 + N)  # max_new_tokens respected, never stopped
    assert torch.equal(greedy.sequences[:, :5], prompts[0])
    expected = [_uncached_greedy(model, p, N, NEVER) for p in PROMPTS]
    assert greedy.responses.tolist() == expected
    assert greedy.response_mask.all() and not greedy.stopped.any()
    assert torch.equal(greedy.attention_mask, torch.cat([prompts[1], torch.ones(len(PROMPTS), N, dtype=torch.long)], 1))
    # Greedy log-probabilities are those of softmax(logits) (temperature 1).
    with torch.no_grad():
        logits = model(greedy.sequences, attention_mask=greedy.attention_mask).logits[:, 4:-1]
    want = F.log_softmax(logits, -1).gather(-1, greedy.responses[..., None]).squeeze(-1)
    torch.testing.assert_close(greedy.logprobs, want, atol=1e-4, rtol=0)


def _expected_stop(reference: torch.Tensor, eos: int):
    """From never-stopping greedy responses: each row cut after its first `eos`, pad after."""
    rows, stopped = [], []
    for row in reference.tolist():
        cut = row.index(eos) + 1 if eos in row else len(row)
        rows.append(row[:cut])
        stopped.append(eos in row)
    width = len(reference[0]) if not all(stopped) else max(len(r) for r in rows)
    return rows, stopped, width


def test_per_row_stop_at_eos(model, prompts, greedy) -> None:
    seen = {"some": False, "all": False}
    for eos in sorted(set(greedy.responses.flatten().tolist())):
        rows, stopped, width = _expected_stop(greedy.responses, eos)
        r = generate(model, *prompts, max_new_tokens=N, eos_token_id=eos, pad_token_id=PAD, temperature=0.0)
        assert r.responses.tolist() == _padded(rows, width).tolist(), eos
        assert r.stopped.tolist() == stopped
        lengths = torch.tensor([len(x) for x in rows])
        want_mask = torch.arange(width)[None, :] < lengths[:, None]
        assert torch.equal(r.response_mask, want_mask)
        assert torch.equal(r.attention_mask, torch.cat([prompts[1], want_mask.long()], 1))
        assert torch.equal(r.logprobs[~want_mask], torch.zeros(int((~want_mask).sum())))
        torch.testing.assert_close(r.logprobs[want_mask], greedy.logprobs[:, :width][want_mask])
        assert r.prompt_length == 5 and r.sequences.shape == (len(PROMPTS), 5 + width)
        seen["some"] |= any(stopped) and not all(stopped)
        seen["all"] |= all(stopped) and width < N  # trimmed
    assert seen == {"some": True, "all": True}  # both situations were exercised


def test_greedy_matches_transformers_gpt2(model, prompts, greedy) -> None:
    """transformers' own generate on the converted weights, with and without early stops."""
    from rlhf.convert import rlhf_to_gpt2

    gpt2 = rlhf_to_gpt2(model).eval()
    never_seen = next(t for t in range(1, 96) if t not in greedy.responses)
    stopping = greedy.responses[0, 2].item()
    for eos in (never_seen, stopping):
        ours = generate(model, *prompts, max_new_tokens=N, eos_token_id=eos, pad_token_id=PAD, temperature=0.0)
        theirs = gpt2.generate(
            prompts[0], attention_mask=prompts[1], max_new_tokens=N, do_sample=False, eos_token_id=eos, pad_token_id=PAD
        )
        assert theirs.tolist() == ours.sequences.tolist(), eos


def test_transformers_generate_on_our_model(model, prompts, greedy) -> None:
    """GenerationMixin.generate (DynamicCache path of our forward) agrees with our engine."""
    eos = greedy.responses[1, 3].item()
    ours = generate(model, *prompts, max_new_tokens=N, eos_token_id=eos, pad_token_id=PAD, temperature=0.0)
    theirs = model.generate(
        prompts[0], attention_mask=prompts[1], max_new_tokens=N, do_sample=False, eos_token_id=eos, pad_token_id=PAD
    )
    assert theirs.tolist() == ours.sequences.tolist()


def test_sampled_logprobs_match_full_forward(model, prompts) -> None:
    T, k, p = 0.7, 5, 0.9
    gen = torch.Generator().manual_seed(0)
    r = generate(model, *prompts, max_new_tokens=N, eos_token_id=3, pad_token_id=PAD, temperature=T, top_k=k, top_p=p, generator=gen)
    P = r.prompt_length
    with torch.no_grad():
        logits = model(r.sequences, attention_mask=r.attention_mask).logits[:, P - 1 : -1] / T  # (B, N', V)
    logp = F.log_softmax(logits, -1)  # the temperature-scaled distribution, before truncation
    tokens = r.responses
    want = logp.gather(-1, tokens[..., None]).squeeze(-1)
    m = r.response_mask
    assert m.sum() > 0
    torch.testing.assert_close(r.logprobs[m], want[m], atol=1e-4, rtol=0)
    # Truncation applied to the sampling: every token is within the top k and inside the nucleus.
    token_logp = want[..., None]
    rank = (logp > token_logp).sum(-1)  # how many tokens are strictly more likely
    assert (rank[m] < k).all()
    mass_before = logp.exp().masked_fill(logp <= token_logp, 0).sum(-1)
    assert (mass_before[m] < p).all()
    # Truncation did remove mass somewhere, so the renormalised (truncated) log-probabilities
    # would differ from the ones checked above.
    assert (logp.exp().topk(k, -1).values.sum(-1)[m] < 0.99).any()


def test_seeded_sampling(model, prompts) -> None:
    def run(seed: int) -> GenerationResult:
        gen = torch.Generator().manual_seed(seed)
        return generate(model, *prompts, max_new_tokens=N, eos_token_id=NEVER, pad_token_id=PAD, temperature=1.5, generator=gen)

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.sequences, c.sequences)


def test_on_token_streams_each_step_and_leaves_sampling_unchanged(model, prompts, greedy) -> None:
    eos = greedy.responses[0, 2].item()  # some row stops early: its later steps stream pad
    def run(on_token=None) -> GenerationResult:
        gen = torch.Generator().manual_seed(3)
        return generate(model, *prompts, max_new_tokens=N, eos_token_id=eos, pad_token_id=PAD, temperature=1.5,
                        generator=gen, on_token=on_token)  # fmt: skip

    streamed: list[torch.Tensor] = []
    result = run(lambda tokens: streamed.append(tokens.clone()))
    plain = run()
    assert torch.equal(result.sequences, plain.sequences) and torch.equal(result.logprobs, plain.logprobs)
    assert len(streamed) == result.responses.shape[1]
    assert torch.equal(torch.stack(streamed, 1), result.responses)


def test_generate_evaluates_in_eval_mode_and_restores_training(prompts) -> None:
    torch.manual_seed(0)
    model = randomize_(RlhfForCausalLM(make_config(dropout=0.5)))
    reference = generate(model.eval(), *prompts, max_new_tokens=4, eos_token_id=NEVER, pad_token_id=PAD, temperature=0.0)
    model.train()
    for _ in range(2):  # dropout would make these differ
        r = generate(model, *prompts, max_new_tokens=4, eos_token_id=NEVER, pad_token_id=PAD, temperature=0.0)
        assert torch.equal(r.sequences, reference.sequences)
        assert model.training


def test_generate_through_peft_wrapper(model, prompts) -> None:
    import copy

    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        copy.deepcopy(model),
        LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_fc"], lora_dropout=0.0, init_lora_weights=False),
    ).eval()
    kw = dict(max_new_tokens=N, eos_token_id=NEVER, pad_token_id=PAD, temperature=0.0)
    wrapped = generate(peft_model, *prompts, **kw)
    merged = generate(peft_model.merge_and_unload(), *prompts, **kw)
    assert torch.equal(wrapped.sequences, merged.sequences)
    torch.testing.assert_close(wrapped.logprobs, merged.logprobs, atol=1e-4, rtol=0)
    assert not torch.equal(wrapped.sequences, generate(model, *prompts, **kw).sequences)  # the adapter matters


def test_input_errors(model) -> None:
    ids = torch.tensor([[5, 6, 0], [7, 8, 9]])
    right_padded = torch.tensor([[1, 1, 0], [1, 1, 1]])
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, ids, right_padded, max_new_tokens=2, eos_token_id=1, pad_token_id=PAD)
    ids, mask = left_pad([[5] * 40], PAD)
    generate(model, ids, mask, max_new_tokens=8, eos_token_id=NEVER, pad_token_id=PAD)  # 48: exactly the context
    with pytest.raises(ValueError, match="exceeds"):
        generate(model, ids, mask, max_new_tokens=9, eos_token_id=NEVER, pad_token_id=PAD)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, ids, mask, max_new_tokens=0, eos_token_id=NEVER, pad_token_id=PAD)


# --- the sampling primitives on a hand-worked distribution ----------------------------------

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


def _kept(filtered: torch.Tensor) -> list[set[int]]:
    return [set(torch.isfinite(row).nonzero().flatten().tolist()) for row in filtered]


def test_top_k_filter() -> None:
    logits = PROBS.log()[None]
    assert _kept(top_k_filter(logits, 2)) == [{0, 1}]
    assert _kept(top_k_filter(logits, 1)) == [{0}]
    assert _kept(top_k_filter(logits, 0)) == [{0, 1, 2, 3}]  # 0 disables
    assert _kept(top_k_filter(logits, 9)) == [{0, 1, 2, 3}]
    kept = top_k_filter(logits, 2)
    assert torch.equal(kept[0, :2], logits[0, :2])  # kept logits unchanged
    # Per row, in any order.
    rows = torch.stack([PROBS.log(), PROBS.flip(0).log()])
    assert _kept(top_k_filter(rows, 3)) == [{0, 1, 2}, {1, 2, 3}]


@pytest.mark.parametrize("p,kept", [(0.5, {0}), (0.7, {0, 1}), (0.8, {0, 1}), (0.9, {0, 1, 2}), (0.97, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})])
def test_top_p_filter(p: float, kept: set[int]) -> None:
    # Smallest prefix whose mass reaches p: 0.5 | 0.8 | 0.95 | 1.0.
    assert _kept(top_p_filter(PROBS.log()[None], p)) == [kept]
    # Unsorted rows, scaled logits (softmax is shift-invariant): the same tokens by probability.
    order = torch.tensor([2, 0, 3, 1])  # position i holds the token of probability PROBS[order[i]]
    shuffled = PROBS[order].log() + 3.0
    assert _kept(top_p_filter(shuffled[None], p)) == [{int((order == t).nonzero()) for t in kept}]


def test_top_p_keeps_the_most_likely_token() -> None:
    assert _kept(top_p_filter(PROBS.log()[None], 0.01)) == [{0}]
    assert len(_kept(top_p_filter(torch.zeros(1, 4), 0.3))[0]) == 2  # uniform: 0.25 < 0.3 <= 0.5


def _frequencies(temperature: float, top_k: int = 0, top_p: float = 1.0, n: int = 20_000):
    gen = torch.Generator().manual_seed(0)
    logits = PROBS.log().expand(n, 4)
    tokens, logprobs = sample_next_token(logits, temperature, top_k, top_p, generator=gen)
    return torch.bincount(tokens, minlength=4).float() / n, tokens, logprobs


@pytest.mark.parametrize(
    "temperature,top_k,top_p,want",
    [
        (1.0, 0, 1.0, [0.5, 0.3, 0.15, 0.05]),
        (1.0, 2, 1.0, [0.625, 0.375, 0.0, 0.0]),  # 0.5 / 0.8, 0.3 / 0.8
        (1.0, 0, 0.9, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]),
        (0.5, 2, 1.0, [0.25 / 0.34, 0.09 / 0.34, 0.0, 0.0]),  # p ** 2, renormalised
        (2.0, 2, 1.0, [0.5**0.5 / (0.5**0.5 + 0.3**0.5), 0.3**0.5 / (0.5**0.5 + 0.3**0.5), 0.0, 0.0]),  # sqrt p
    ],
)
def test_sampling_frequencies(temperature, top_k, top_p, want) -> None:
    freq, tokens, logprobs = _frequencies(temperature, top_k, top_p)
    torch.testing.assert_close(freq, torch.tensor(want), atol=0.02, rtol=0)
    assert set(tokens.tolist()) == {i for i, w in enumerate(want) if w > 0}  # truncated tokens never drawn
    # Log-probabilities are of softmax(logits / T) before truncation.
    scaled = PROBS ** (1 / temperature)
    torch.testing.assert_close(logprobs, (scaled / scaled.sum()).log()[tokens])


def test_sample_temperature_zero_is_argmax() -> None:
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9], [3.0, 0.0, 0.0, 0.0]])
    tokens, logprobs = sample_next_token(logits, temperature=0.0, top_k=3, top_p=0.1)
    assert tokens.tolist() == [1, 0]
    torch.testing.assert_close(logprobs, F.log_softmax(logits, -1)[[0, 1], [1, 0]])
    assert math.isclose(
        sample_next_token(PROBS.log()[None], 0.0)[1].item(), math.log(0.5), rel_tol=1e-6
    )


def test_top_k_one_samples_argmax() -> None:
    _, tokens, logprobs = _frequencies(1.0, top_k=1, n=500)
    assert (tokens == 0).all()
    torch.testing.assert_close(logprobs, torch.full((500,), math.log(0.5)))


@pytest.mark.parametrize("n_kv_head", [1, 3])
def test_llama_layout_greedy_matches_uncached_decoding(n_kv_head, monkeypatch) -> None:
    """Rotary positions and grouped-query attention through the cache: it holds n_kv_head heads."""
    torch.manual_seed(0)
    config = make_config(layout="llama", n_embd=48, n_head=6, n_kv_head=n_kv_head, n_inner=40)
    model = randomize_(RlhfForCausalLM(config)).eval()
    prompts = left_pad(PROMPTS, PAD)
    seen = {}
    real_update = StaticKVCache.update

    def update(self, k, v, layer_idx, *args, **kwargs):
        seen["kv_shape"] = tuple(k.shape)
        return real_update(self, k, v, layer_idx, *args, **kwargs)

    monkeypatch.setattr(StaticKVCache, "update", update)
    greedy = generate(model, *prompts, max_new_tokens=N, eos_token_id=NEVER, pad_token_id=PAD, temperature=0.0)
    assert seen["kv_shape"] == (len(PROMPTS), n_kv_head, 1, 8)
    assert greedy.responses.tolist() == [_uncached_greedy(model, p, N, NEVER) for p in PROMPTS]


# --- the roofline's arithmetic on a model small enough to count by hand ----------------------


def test_decode_cost_counts_by_hand() -> None:
    # 1 layer, width 4, 2 heads of 2, MLP 16 wide, vocabulary 10, 8 positions, head tied to wte.
    model = RlhfForCausalLM(make_config(vocab_size=10, n_positions=8, n_embd=4, n_layer=1, n_head=2))
    cost = decode_cost(model, batch=2, cache_length=5)
    # Matrix weights: c_attn 4x12, attn c_proj 4x4, c_fc 4x16, mlp c_proj 16x4, lm_head 4x10 = 232;
    # attention: 4 FLOPs x 2 heads x 2 wide x 5 keys = 80.
    assert cost.flops == 2 * 232 + 80
    # Parameters 324 (wte 40 shared with the head, wpe 32, norms 3 x 8, c_attn 60, c_proj 20, c_fc 80,
    # mlp c_proj 68) less the wpe table (2 rows gathered): 292 fp32 values shared by 2 rows.
    assert cost.weight_bytes == 292 * 4 / 2
    assert cost.cache_bytes == 2 * 1 * 2 * 2 * 5 * 4  # keys and values, 1 layer, 2 heads of 2, 5 keys
    assert cost.bytes == 584 + 160


def test_decode_cost_llama_cache_holds_the_shared_heads() -> None:
    config = make_config(layout="llama", n_embd=48, n_head=6, n_kv_head=2, n_inner=40)
    one, three = (decode_cost(RlhfForCausalLM(config), batch=1, cache_length=s) for s in (1, 3))
    assert three.cache_bytes - one.cache_bytes == 2 * config.n_layer * 2 * 8 * 2 * 4  # 2 more keys: 2 heads of 8
    assert three.flops - one.flops == 4 * config.n_layer * 6 * 8 * 2  # queries: all 6 heads


def test_roofline_report_names_the_bound() -> None:
    cost = DecodeCost(flops=1e9, weight_bytes=6e7, cache_bytes=4e7)
    line = roofline_report(cost, flops_per_s=1e12, bytes_per_s=1e10, seconds_per_token=0.02)
    assert "1000.0 MFLOP, 100.00 MB" in line and "1000 us compute, 10000 us memory" in line
    assert "(50% of the bound)" in line  # memory-bound: 10 ms of 20 ms measured


def _reference_sampling(model, ids, mask, max_new: int, eos: int, generator, **sampling) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's semantics, slowly: a full uncached forward per step, then the same draw per row."""
    tokens_out, logprobs_out = [], []
    finished = torch.zeros(ids.shape[0], dtype=torch.bool)
    with torch.no_grad():
        for _ in range(max_new):
            logits = model(ids, attention_mask=mask).logits[:, -1]
            tokens, logprobs = sample_next_token(logits, generator=generator, **sampling)
            tokens = tokens.masked_fill(finished, PAD)
            tokens_out.append(tokens)
            logprobs_out.append(logprobs.masked_fill(finished, 0.0))
            mask = torch.cat([mask, (~finished).long()[:, None]], 1)
            finished |= tokens == eos
            ids = torch.cat([ids, tokens[:, None]], 1)
            if finished.all():
                break
    return torch.stack(tokens_out, 1), torch.stack(logprobs_out, 1)


@pytest.mark.parametrize("layout", ["gpt2", "llama"])
@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.7, top_k=5, top_p=0.9)])
def test_seeded_sampling_equals_the_uncached_reference(layout, sampling) -> None:
    """Same seed, same tokens as sampling from full forwards: the cache, the masks left out of
    decoding steps and the grouped-query fold change nothing a draw can see."""
    torch.manual_seed(0)
    overrides = dict(layout="llama", n_embd=48, n_head=6, n_kv_head=2, n_inner=40) if layout == "llama" else {}
    model = randomize_(RlhfForCausalLM(make_config(**overrides))).eval()
    padded = left_pad(PROMPTS, PAD)
    unpadded = (torch.randint(2, 96, (16, 6), generator=torch.Generator().manual_seed(1)), torch.ones(16, 6, dtype=torch.long))
    for (ids, mask), eos in ((padded, 3), (unpadded, NEVER)):
        result = generate(model, ids, mask, N, eos_token_id=eos, pad_token_id=PAD, generator=torch.Generator().manual_seed(7), **sampling)
        tokens, logprobs = _reference_sampling(model, ids, mask, N, eos, torch.Generator().manual_seed(7), **sampling)
        assert torch.equal(result.responses, tokens)
        torch.testing.assert_close(result.logprobs, logprobs, atol=1e-4, rtol=0)
