"""Tests for rlhf.convert: exact conversion both ways between our decoder and transformers'
GPT2LMHeadModel on padded batches, rejected variants, directory conversion and the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import make_config, randomize_
from rlhf.convert import TOKENIZER_FILES, convert_directory, gpt2_to_rlhf, rlhf_to_gpt2
from rlhf.model import RlhfForCausalLM

SHAPES = {  # vocab, context, width, layers, heads, LayerNorm eps
    "w32l2h4": dict(vocab_size=96, n_positions=40, n_embd=32, n_layer=2, n_head=4, layer_norm_epsilon=1e-5),
    "w48l3h3": dict(vocab_size=80, n_positions=32, n_embd=48, n_layer=3, n_head=3, layer_norm_epsilon=1e-3),
    "w16l1h2": dict(vocab_size=64, n_positions=24, n_embd=16, n_layer=1, n_head=2, layer_norm_epsilon=1e-5),
}
VARIANTS = [(None, "gelu_new"), (None, "gelu"), (40, "gelu_new"), (40, "gelu")]  # (n_inner, activation)
LENGTHS = [9, 5, 2]


def _gpt2(shape: dict, n_inner=None, act="gelu_new", seed=0, **extra) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        **shape, n_inner=n_inner, activation_function=act, bos_token_id=1, eos_token_id=1, pad_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **extra,
    )  # fmt: skip
    return randomize_(GPT2LMHeadModel(config), seed=seed).eval()


def _batch(vocab: int, side: str, seed: int = 1):
    """Padded ids (pad slots hold a junk token), mask and GPT-2's position ids (cumsum(mask) - 1)."""
    gen = torch.Generator().manual_seed(seed)
    width = max(LENGTHS)
    ids = torch.full((len(LENGTHS), width), 3, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(LENGTHS):
        span = slice(width - n, width) if side == "left" else slice(0, n)
        ids[i, span] = torch.randint(2, vocab, (n,), generator=gen)
        mask[i, span] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _max_diff_on_real_tokens(ours: RlhfForCausalLM, gpt2: GPT2LMHeadModel, side: str) -> float:
    ids, mask, positions = _batch(ours.config.vocab_size, side)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask).logits  # ours derives the positions from the mask
        b = gpt2(ids, attention_mask=mask, position_ids=positions).logits
    assert a.shape == b.shape
    return (a - b)[mask.bool()].abs().max().item()


@pytest.mark.parametrize("n_inner,act", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_gpt2_to_rlhf_is_exact(shape, n_inner, act) -> None:
    gpt2 = _gpt2(shape, n_inner, act)
    ours = gpt2_to_rlhf(gpt2).eval()
    assert isinstance(ours, RlhfForCausalLM)
    c = ours.config
    assert (c.n_inner, c.activation_function, c.layer_norm_epsilon) == (n_inner, act, shape["layer_norm_epsilon"])
    assert (c.vocab_size, c.n_positions, c.n_embd, c.n_layer, c.n_head) == tuple(
        shape[k] for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
    )
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (1, 1, 0)
    assert ours.lm_head.weight is ours.transformer.wte.weight
    for side in ("left", "right"):
        assert _max_diff_on_real_tokens(ours, gpt2, side) <= 1e-4, side


@pytest.mark.parametrize("n_inner,act", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_rlhf_to_gpt2_is_exact(shape, n_inner, act) -> None:
    torch.manual_seed(0)
    ours = randomize_(RlhfForCausalLM(make_config(**shape, n_inner=n_inner, activation_function=act))).eval()
    gpt2 = rlhf_to_gpt2(ours).eval()
    assert isinstance(gpt2, GPT2LMHeadModel)
    assert (gpt2.config.n_inner, gpt2.config.activation_function) == (n_inner, act)
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    for side in ("left", "right"):
        assert _max_diff_on_real_tokens(ours, gpt2, side) <= 1e-4, side
    # And back again: the very same weights.
    back = gpt2_to_rlhf(gpt2)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_exactness_check_is_sensitive() -> None:
    """The 1e-4 bound would catch the subtlest mix-up the converter could make (GELU flavour)."""
    gpt2 = _gpt2(SHAPES["w32l2h4"], None, "gelu")
    wrong = gpt2_to_rlhf(gpt2)
    for block in wrong.transformer.h:
        block.mlp.approximate = "tanh"
    assert _max_diff_on_real_tokens(wrong.eval(), gpt2, "left") > 1e-3


def test_dropout_maps_both_ways() -> None:
    gpt2 = _gpt2(SHAPES["w16l1h2"])
    gpt2.config.resid_pdrop = 0.25
    assert gpt2_to_rlhf(gpt2).config.dropout == 0.25
    ours = RlhfForCausalLM(make_config(**SHAPES["w16l1h2"], dropout=0.125))
    g = rlhf_to_gpt2(ours).config
    assert (g.resid_pdrop, g.embd_pdrop, g.attn_pdrop) == (0.125, 0.125, 0.125)


@pytest.mark.parametrize(
    "extra",
    [
        dict(scale_attn_by_inverse_layer_idx=True),
        dict(reorder_and_upcast_attn=True),
        dict(scale_attn_weights=False),
        dict(activation_function="relu"),
    ],
    ids=lambda d: next(iter(d)),
)
def test_unsupported_gpt2_variants_raise(extra) -> None:
    shape = SHAPES["w16l1h2"]
    config = GPT2Config(**shape, **{"activation_function": "gelu_new", **extra})
    with pytest.raises(ValueError):
        gpt2_to_rlhf(GPT2LMHeadModel(config))


def test_untied_lm_head_converts_exactly() -> None:
    """GPT2Config and RlhfConfig both allow tie_word_embeddings=False; conversion keeps the heads apart."""
    gpt2 = _gpt2(SHAPES["w16l1h2"], tie_word_embeddings=False)
    assert gpt2.lm_head.weight is not gpt2.transformer.wte.weight
    assert _max_diff_on_real_tokens(gpt2_to_rlhf(gpt2).eval(), gpt2, "right") <= 1e-4


# --- directories and the CLI ----------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    """A GPT-2 save_pretrained directory with a tokenizer whose vocabulary the model matches."""
    from rlhf.tokenizer import save_tokenizer, train_tokenizer

    tok = train_tokenizer(["hello world, hello there"], kind="char")
    path = tmp_path_factory.mktemp("gpt2")
    shape = dict(SHAPES["w16l1h2"], vocab_size=len(tok))
    _gpt2(shape).save_pretrained(path)
    save_tokenizer(tok, path)
    return path


def _assert_same_function(a, b, vocab: int) -> None:
    for side in ("left", "right"):
        ids, mask, positions = _batch(vocab, side)
        with torch.no_grad():
            la = a(ids, attention_mask=mask, position_ids=positions).logits
            lb = b(ids, attention_mask=mask, position_ids=positions).logits
        assert (la - lb)[mask.bool()].abs().max().item() <= 1e-4


def _check_round_trip(src: Path, mid: Path, out: Path) -> None:
    import rlhf  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer

    original = GPT2LMHeadModel.from_pretrained(src).eval()
    ours = AutoModelForCausalLM.from_pretrained(mid).eval()
    assert type(ours) is RlhfForCausalLM
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back) is GPT2LMHeadModel
    vocab = original.config.vocab_size
    _assert_same_function(ours, original, vocab)
    _assert_same_function(back, original, vocab)
    for name, tensor in original.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    for d in (mid, out):
        copied = [n for n in TOKENIZER_FILES if (src / n).is_file()]
        assert "tokenizer.json" in copied
        for name in copied:
            assert (d / name).read_bytes() == (src / name).read_bytes(), name
        assert not list(d.glob("*.bin"))
        tok = AutoTokenizer.from_pretrained(d)
        assert tok.decode(tok("hello world").input_ids) == "hello world"


def test_convert_directory_round_trip(gpt2_dir: Path, tmp_path: Path) -> None:
    convert_directory(gpt2_dir, tmp_path / "ours", to_gpt2=False)
    convert_directory(tmp_path / "ours", tmp_path / "back", to_gpt2=True)
    _check_round_trip(gpt2_dir, tmp_path / "ours", tmp_path / "back")


def test_convert_directory_without_tokenizer(tmp_path: Path) -> None:
    RlhfForCausalLM(make_config(**SHAPES["w16l1h2"])).save_pretrained(tmp_path / "src")
    convert_directory(tmp_path / "src", tmp_path / "out", to_gpt2=True)
    assert (tmp_path / "out" / "config.json").is_file()
    assert not any((tmp_path / "out" / n).exists() for n in TOKENIZER_FILES)


def test_convert_directory_missing_source(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for src in (tmp_path / "absent", tmp_path / "empty"):
        with pytest.raises(FileNotFoundError, match="config.json"):
            convert_directory(src, tmp_path / "out", to_gpt2=False)
    assert not (tmp_path / "out").exists()


def test_cli_convert_errors_in_process(tmp_path: Path, capsys) -> None:
    """Exit 2 and a one-line `error: ...` (the same `main` as `python -m rlhf.cli`)."""
    from rlhf.cli import main

    (tmp_path / "empty").mkdir()
    bad = tmp_path / "bad"
    GPT2LMHeadModel(GPT2Config(**SHAPES["w16l1h2"], scale_attn_by_inverse_layer_idx=True)).save_pretrained(bad)
    cases = [
        ["convert", "--from-gpt2", str(tmp_path / "absent"), "--out", str(tmp_path / "o1")],
        ["convert", "--to-gpt2", str(tmp_path / "empty"), "--out", str(tmp_path / "o2")],
        ["convert", "--from-gpt2", str(bad), "--out", str(tmp_path / "o3")],  # an unsupported variant
    ]
    for argv in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        # The last stderr line; transformers' "Loading weights" progress bar may precede it.
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: ") and str(Path(argv[2]).name) in err, err
        assert not Path(argv[-1]).exists()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhf.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_convert_round_trip(gpt2_dir: Path, tmp_path: Path) -> None:
    """`python -m rlhf.cli convert --from-gpt2/--to-gpt2` (two subprocesses, ~10 s each)."""
    mid, out = tmp_path / "ours", tmp_path / "back"
    done = _cli("convert", "--from-gpt2", str(gpt2_dir), "--out", str(mid))
    assert done.returncode == 0, done.stderr
    done = _cli("convert", "--to-gpt2", str(mid), "--out", str(out))
    assert done.returncode == 0, done.stderr
    _check_round_trip(gpt2_dir, mid, out)
