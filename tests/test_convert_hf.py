"""Tests for rlhf.convert's transformers families (GPT-2, Llama, Qwen2, Mistral): exact fp32 logits on
left-padded batches and equal greedy generation, both directions, over shapes chosen to be awkward
(odd head counts, GQA with one and several key/value heads, vocabularies off multiples of 64);
rejected variants; directories (sharded, bf16, chat template) and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import randomize_
from rlhf.convert import SUPPORTED_HF_ARCHITECTURES, convert_directory, hf_to_rlhf, rlhf_to_hf
from rlhf.generation import generate, left_pad
from rlhf.model import RlhfConfig, RlhfForCausalLM

PAD, BOS, EOS = 0, 1, 2
LENGTHS = [9, 5, 2, 7]
# (width, heads, kv heads, head_dim or None, vocab, layers, inner, tied)
SHAPES = {
    "w96h6kv2": (96, 6, 2, None, 101, 2, 50, False),
    "w96h6kv1": (96, 6, 1, None, 130, 1, 64, True),
    "w48h3kv3": (48, 3, 3, None, 67, 2, 37, False),
    "w48h3kv1": (48, 3, 1, None, 97, 1, 40, False),
    "w40h2kv2hd24": (40, 2, 2, 24, 75, 2, 30, True),  # a head width other than width / heads
}
FAMILIES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")


def hf_model(architecture: str, width, heads, kv, head_dim, vocab, layers, inner, tied, seed=0, **extra):
    """A seeded random transformers model of `architecture`, built from its own config class."""
    model_class = getattr(transformers, architecture)
    common = dict(vocab_size=vocab, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=tied)
    if architecture == "GPT2LMHeadModel":
        config = model_class.config_class(n_embd=width, n_head=heads, n_layer=layers, n_inner=inner, n_positions=64,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common, **extra)  # fmt: skip
    else:
        if architecture == "MistralForCausalLM":
            extra.setdefault("sliding_window", None)
        if head_dim is not None and architecture != "Qwen2ForCausalLM":
            extra["head_dim"] = head_dim
        extra.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": 500.0})
        config = model_class.config_class(
            hidden_size=width, num_attention_heads=heads, num_key_value_heads=kv, num_hidden_layers=layers,
            intermediate_size=inner, max_position_embeddings=64, rms_norm_eps=1e-5, **common, **extra,
        )  # fmt: skip
    torch.manual_seed(seed)
    return randomize_(model_class(config), seed=seed).eval()


def ours_model(width, heads, kv, head_dim, vocab, layers, inner, tied, attention_bias=False, seed=0):
    config = RlhfConfig(layout="llama", vocab_size=vocab, n_positions=64, n_embd=width, n_layer=layers, n_head=heads,
                        n_kv_head=kv, head_dim=head_dim, n_inner=inner, rope_theta=500.0, rms_norm_eps=1e-5,
                        attention_bias=attention_bias, tie_word_embeddings=tied, bos_token_id=BOS, eos_token_id=EOS,
                        pad_token_id=PAD)  # fmt: skip
    torch.manual_seed(seed)
    return randomize_(RlhfForCausalLM(config), seed=seed).eval()


def left_padded_batch(vocab: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in LENGTHS]
    return left_pad(rows, PAD)


def max_logit_diff(ours, hf) -> float:
    """Largest |difference| of the fp32 logits on the real tokens of a left-padded batch (pad slots hold a junk token)."""
    ids, mask = left_padded_batch(ours.config.vocab_size)
    ids = ids.masked_fill(mask == 0, 3)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask).logits  # ours takes the positions from the mask
        b = hf(ids, attention_mask=mask, position_ids=positions).logits
    return (a - b)[mask.bool()].abs().max().item()


def assert_same_greedy_generation(ours, hf, new_tokens: int = 6) -> None:
    """Our engine and transformers' generate agree token for token, with EOS, and again with an EOS
    that stops a row early (the third token of the first row)."""
    ids, mask = left_padded_batch(ours.config.vocab_size, seed=2)
    eos = EOS
    for _ in range(2):
        mine = generate(ours, ids, mask, new_tokens, eos_token_id=eos, pad_token_id=PAD, temperature=0.0)
        theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos,
                             pad_token_id=PAD)  # fmt: skip
        assert torch.equal(mine.sequences, theirs), (eos, mine.sequences, theirs)
        eos = int(mine.responses[0, 2])


def assert_exact(ours, hf) -> None:
    assert max_logit_diff(ours, hf) <= 1e-4
    assert_same_greedy_generation(ours, hf)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("architecture", FAMILIES)
def test_hf_to_rlhf_is_exact(architecture, shape) -> None:
    hf = hf_model(architecture, *shape)
    ours = hf_to_rlhf(hf).eval()
    c = ours.config
    assert (c.layout, c.hf_architecture, c.n_kv_head, c.attention_bias) == ("llama", architecture, shape[2], architecture == "Qwen2ForCausalLM")
    assert (ours.lm_head.weight is ours.transformer.wte.weight) == shape[-1]
    assert_exact(ours, hf)
    back = rlhf_to_hf(ours).eval()  # and back: the same class, the same tensors
    assert type(back) is type(hf)
    theirs = hf.state_dict()
    assert set(back.state_dict()) == set(theirs)
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("architecture", FAMILIES + (None,))
def test_rlhf_to_hf_is_exact(architecture, shape) -> None:
    ours = ours_model(*shape, attention_bias=architecture == "Qwen2ForCausalLM")
    ours.config.hf_architecture = architecture
    hf = rlhf_to_hf(ours).eval()
    assert type(hf).__name__ == (architecture or "LlamaForCausalLM")
    assert_exact(ours, hf)
    back = hf_to_rlhf(hf)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("width,heads,vocab", [(48, 3, 67), (96, 6, 101), (45, 3, 70)])  # head width 15: odd
def test_gpt2_through_the_generic_functions(width, heads, vocab, tied) -> None:
    hf = hf_model("GPT2LMHeadModel", width, heads, heads, None, vocab, 2, None, tied)
    ours = hf_to_rlhf(hf).eval()
    assert ours.config.layout == "gpt2"
    assert_exact(ours, hf)
    back = rlhf_to_hf(ours).eval()
    assert type(back) is transformers.GPT2LMHeadModel
    assert max_logit_diff(ours, back) <= 1e-4


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    architecture=st.sampled_from(FAMILIES),
    kv=st.integers(1, 3),
    group=st.integers(1, 3),
    head_width=st.sampled_from([2, 6, 8, 10, 16]),
    vocab=st.integers(5, 150),
    inner=st.integers(1, 70),
    tied=st.booleans(),
)
def test_any_small_shape_converts_exactly(architecture, kv, group, head_width, vocab, inner, tied) -> None:
    """Property check over shapes: n_head = kv * group heads of `head_width`, any vocabulary."""
    heads = kv * group
    hf = hf_model(architecture, heads * head_width, heads, kv, None, vocab, 1, inner, tied, seed=vocab)
    ours = hf_to_rlhf(hf).eval()
    assert max_logit_diff(ours, hf) <= 1e-4
    assert max_logit_diff(ours, rlhf_to_hf(ours).eval()) <= 1e-4


def test_mistral_head_width_independent_of_the_width() -> None:
    """Mistral (unlike Llama) lets head_dim * heads differ from a width heads do not divide."""
    hf = hf_model("MistralForCausalLM", 40, 3, 1, 16, 67, 2, 30, False)
    ours = hf_to_rlhf(hf).eval()
    assert (ours.config.head_dim, ours.transformer.h[0].attn.q_proj.weight.shape) == (16, (48, 40))
    assert_exact(ours, hf)
    assert max_logit_diff(ours, rlhf_to_hf(ours).eval()) <= 1e-4


def test_llama_mlp_bias_converts_both_ways() -> None:
    hf = hf_model("LlamaForCausalLM", *SHAPES["w48h3kv1"], mlp_bias=True)
    ours = hf_to_rlhf(hf).eval()
    assert ours.config.mlp_bias and ours.transformer.h[0].mlp.up_proj.bias is not None
    assert_exact(ours, hf)
    assert max_logit_diff(ours, rlhf_to_hf(ours).eval()) <= 1e-4


def test_exactness_check_is_sensitive() -> None:
    """The 1e-4 bound would catch a slightly wrong RoPE base or a swapped pair of kv heads."""
    hf = hf_model("LlamaForCausalLM", *SHAPES["w96h6kv2"])
    ours = hf_to_rlhf(hf).eval()
    ours.config.rope_theta = 501.0
    assert max_logit_diff(ours, hf) > 1e-3
    ours = hf_to_rlhf(hf).eval()
    with torch.no_grad():
        k = ours.transformer.h[0].attn.k_proj.weight
        k.copy_(torch.cat(k.chunk(2)[::-1]))
    assert max_logit_diff(ours, hf) > 1e-3


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}  # head width 16: one frequency kept, two interpolated, five divided


@pytest.mark.parametrize("shape", [SHAPES["w96h6kv2"], SHAPES["w40h2kv2hd24"]], ids=["w96h6kv2", "w40h2kv2hd24"])
def test_llama3_rope_scaling_converts_exactly_both_ways(shape) -> None:
    hf = hf_model("LlamaForCausalLM", *shape, rope_parameters=dict(LLAMA3_ROPE))
    ours = hf_to_rlhf(hf).eval()
    assert ours.config.llama3_rope == {key: LLAMA3_ROPE[key] for key in ours.config.llama3_rope}
    assert_exact(ours, hf)
    assert max_logit_diff(hf_to_rlhf(hf_model("LlamaForCausalLM", *shape)).eval(), hf) > 1e-2, "the scaling matters here"
    back = rlhf_to_hf(ours).eval()
    assert back.config.rope_parameters == LLAMA3_ROPE
    assert_exact(ours, back)


@pytest.mark.parametrize(
    "architecture,extra,words",
    [
        ("LlamaForCausalLM", dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), "rope scaling type 'linear'"),
        ("LlamaForCausalLM", dict(hidden_act="gelu"), "hidden_act 'gelu'"),
        ("LlamaForCausalLM", dict(attention_bias=True), "attention_bias"),
        ("MistralForCausalLM", dict(sliding_window=16), "sliding-window attention (window 16 of a 64-token context)"),
        ("Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=16, max_window_layers=0), "sliding-window"),
    ],
)
def test_unsupported_variants_raise_naming_them(architecture, extra, words) -> None:
    hf = hf_model(architecture, *SHAPES["w48h3kv1"], **extra)
    with pytest.raises(ValueError) as raised:
        hf_to_rlhf(hf)
    assert words in str(raised.value) and "\n" not in str(raised.value)


def test_unsupported_architecture_raises() -> None:
    config = transformers.GPTNeoXConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=1, intermediate_size=40, vocab_size=50)
    with pytest.raises(ValueError, match="GPTNeoXForCausalLM is not supported"):
        hf_to_rlhf(transformers.GPTNeoXForCausalLM(config))
    assert set(SUPPORTED_HF_ARCHITECTURES) == {"GPT2LMHeadModel", *FAMILIES}


# --- directories and the CLI ----------------------------------------------------------------

CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory) -> Path:
    """A bf16, sharded Qwen2 folder with a tokenizer carrying its own chat template."""
    from rlhf.tokenizer import save_tokenizer, train_tokenizer

    tok = train_tokenizer(["hello world, hello there"], kind="char")
    path = tmp_path_factory.mktemp("qwen2")
    width, heads, kv, head_dim, _, layers, inner, tied = SHAPES["w96h6kv2"]
    model = hf_model("Qwen2ForCausalLM", width, heads, kv, head_dim, len(tok), layers, inner, tied).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="100KB")
    assert len(list(path.glob("model-*.safetensors"))) > 1
    save_tokenizer(tok, path)
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return path


def test_convert_directory_from_and_to_hf(qwen2_dir: Path, tmp_path: Path) -> None:
    import rlhf  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer

    convert_directory(qwen2_dir, tmp_path / "ours", to_hf=False)
    convert_directory(tmp_path / "ours", tmp_path / "back", to_hf=True)
    original = AutoModelForCausalLM.from_pretrained(qwen2_dir, dtype=torch.float32).eval()
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    assert type(ours) is RlhfForCausalLM and type(back) is transformers.Qwen2ForCausalLM
    assert ours.config.hf_architecture == "Qwen2ForCausalLM"
    for folder in (tmp_path / "ours", tmp_path / "back"):  # written in the source's dtype
        assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    assert_exact(ours, original)
    for name, tensor in original.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    for folder in (tmp_path / "ours", tmp_path / "back"):
        assert (folder / "chat_template.jinja").read_text() == CHAT_TEMPLATE
        tok = AutoTokenizer.from_pretrained(folder)
        assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<user>hi"


@pytest.mark.parametrize("architecture", ["GPT2LMHeadModel", "MistralForCausalLM"])
def test_convert_directory_each_family_round_trips(architecture, tmp_path: Path) -> None:
    original = hf_model(architecture, 48, 3, 1, None, 67, 1, 40, False)
    original.save_pretrained(tmp_path / "src")
    convert_directory(tmp_path / "src", tmp_path / "ours", to_hf=False)
    convert_directory(tmp_path / "ours", tmp_path / "back", to_hf=True)
    back = getattr(transformers, architecture).from_pretrained(tmp_path / "back")
    for name, tensor in original.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_convert_directory_refuses_other_architectures(qwen2_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Qwen2ForCausalLM is not supported"):
        convert_directory(qwen2_dir, tmp_path / "out", to_hf=True)  # --to-hf wants one of ours
    assert not (tmp_path / "out").exists()


def test_cli_convert_hf_errors_and_success(qwen2_dir: Path, tmp_path: Path, capsys) -> None:
    """Exit 2 and one `error:` line naming SRC; a good folder converts both ways."""
    from rlhf.cli import main

    (tmp_path / "empty").mkdir()
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text('{"architectures": ["BertForMaskedLM"], "model_type": "bert"}')
    scaled = tmp_path / "scaled"
    rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}
    hf_model("LlamaForCausalLM", *SHAPES["w48h3kv1"], rope_parameters=rope).save_pretrained(scaled)
    cases = [
        ["convert", "--from-hf", str(tmp_path / "absent"), "--out", str(tmp_path / "o1")],
        ["convert", "--from-hf", str(tmp_path / "empty"), "--out", str(tmp_path / "o2")],
        ["convert", "--from-hf", str(bert), "--out", str(tmp_path / "o3")],
        ["convert", "--from-hf", str(scaled), "--out", str(tmp_path / "o6")],  # read, then refused
        ["convert", "--to-hf", str(qwen2_dir), "--out", str(tmp_path / "o4")],
        ["convert", "--to-gpt2", str(qwen2_dir), "--out", str(tmp_path / "o5")],
    ]
    for argv in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: ") and Path(argv[2]).name in err, err
        assert not Path(argv[-1]).exists()
    assert main(["convert", "--from-hf", str(qwen2_dir), "--out", str(tmp_path / "ours")]) == 0
    assert main(["convert", "--to-hf", str(tmp_path / "ours"), "--out", str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "chat_template.jinja").is_file()
    capsys.readouterr()
    assert main(["convert", "--to-gpt2", str(tmp_path / "ours"), "--out", str(tmp_path / "o7")]) == 2
    assert "has no GPT-2 equivalent (convert it with --to-hf)" in capsys.readouterr().err
