"""Pipeline YAML -> typed stage configs: shipped pipelines parse and describe buildable models;
unknown keys, wrong types and invalid values are ConfigErrors naming file and key. YAML syntax and
overrides: tests/test_config_yaml.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf.config import (
    LoraSettings,
    ModelShape,
    PretrainConfig,
    SFTConfig,
    TokenizerConfig,
    load_pipeline,
)
from rlhf.errors import ConfigError, UserError
from rlhf.stages import STAGES

from config_helpers import MINIMAL, config_error, write

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "pipelines").glob("*.yaml"))
TINY = ROOT / "tests" / "fixtures" / "tiny.yaml"


def gpt2_parameter_count(vocab: int, positions: int, width: int, layers: int) -> int:
    """Tied LM head: token and position embeddings, per block 2 LayerNorms, qkv, proj, 4x MLP; final LN."""
    per_block = 2 * width + (3 * width * width + 3 * width) + (width * width + width) + 2 * width
    per_block += (4 * width * width + 4 * width) + (4 * width * width + width)
    return vocab * width + positions * width + layers * per_block + 2 * width


# ----------------------------------------------------------------------------- shipped pipelines


def test_there_are_shipped_pipelines() -> None:
    assert (ROOT / "pipelines" / "demo.yaml") in SHIPPED


@pytest.mark.parametrize("path", SHIPPED + [TINY], ids=lambda p: p.name)
def test_shipped_pipeline_parses_and_builds(path: Path) -> None:
    import torch

    from rlhf.model import RlhfConfig, RlhfForCausalLM

    config = load_pipeline(path)
    assert config.source == str(path)
    assert config.stages, f"{path.name} has no stages"
    for name, stage in config.stages.items():
        assert name in STAGES and isinstance(stage, STAGES[name].config)
    tokenizer = config.stages.get("tokenizer")
    # BPE vocabularies are exact; a char vocabulary depends on the corpus: any plausible size will do.
    vocab = tokenizer.vocab_size if tokenizer is not None and tokenizer.kind == "bpe" else 512
    shapes = [(name, stage.model) for name, stage in config.stages.items() if isinstance(getattr(stage, "model", None), ModelShape)]
    for name, shape in shapes:
        model_config = RlhfConfig(
            vocab_size=vocab, n_positions=shape.n_positions, n_embd=shape.n_embd,
            n_layer=shape.n_layer, n_head=shape.n_head, dropout=shape.dropout,
        )  # fmt: skip
        with torch.device("meta"):  # a GPT-2-small shape must not be materialised on the CPU
            model = RlhfForCausalLM(model_config)
        count = sum(p.numel() for p in model.parameters())
        expected = gpt2_parameter_count(vocab, shape.n_positions, shape.n_embd, shape.n_layer)
        assert count == expected, f"{path.name} stages.{name}.model: {count} parameters, expected {expected}"
        assert next(model.parameters()).device.type == "meta"
        # Later stages read sequences through this model's context.
        for later, stage in config.stages.items():
            max_length = getattr(stage, "max_length", 0)
            assert max_length <= shape.n_positions, (
                f"{path.name}: stages.{later}.max_length {max_length} exceeds the model context {shape.n_positions}"
            )
        block = getattr(config.stages[name], "block_size", 0)
        assert block <= shape.n_positions


def test_gpt2_small_shape_has_124m_parameters_on_meta() -> None:
    """The parameter arithmetic above is checked against GPT-2 small's well-known 124,439,808."""
    import torch

    from rlhf.model import RlhfConfig, RlhfForCausalLM

    with torch.device("meta"):
        model = RlhfForCausalLM(RlhfConfig(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12))
    assert sum(p.numel() for p in model.parameters()) == 124_439_808 == gpt2_parameter_count(50257, 1024, 768, 12)


# ----------------------------------------------------------------------------- typed parsing


def test_minimal_pipeline_types(tmp_path) -> None:
    config = load_pipeline(write(tmp_path, MINIMAL))
    assert (config.run_dir, config.seed) == ("runs/x", 3)
    assert list(config.stages) == ["tokenizer", "pretrain", "sft"]
    tokenizer, pretrain, sft = (config.stages[k] for k in ("tokenizer", "pretrain", "sft"))
    assert isinstance(tokenizer, TokenizerConfig) and tokenizer.data == ["corpus.txt"] and tokenizer.vocab_size == 300
    assert isinstance(pretrain, PretrainConfig) and isinstance(pretrain.model, ModelShape)
    assert (pretrain.model.n_layer, pretrain.model.n_embd, pretrain.max_steps) == (2, 32, 10)
    assert isinstance(sft, SFTConfig) and sft.data == "sft.jsonl"
    assert isinstance(sft.lr, float) and sft.lr == 1e-3
    assert sft.lora is None


def test_exponent_without_dot_is_a_float_and_int_is_widened(tmp_path) -> None:
    # YAML 1.1 reads 3e-4 (no dot) as a string; a float field must still accept it, and an int.
    path = write(tmp_path, MINIMAL.replace("lr: 1.0e-3", "lr: 3e-4, min_lr: 0"))
    sft = load_pipeline(path).stages["sft"]
    assert sft.lr == pytest.approx(3e-4) and isinstance(sft.lr, float)
    assert sft.min_lr == 0.0 and isinstance(sft.min_lr, float)


def test_single_file_where_a_list_is_expected(tmp_path) -> None:
    path = write(tmp_path, MINIMAL.replace("tokenizer: {data: [corpus.txt]", "tokenizer: {data: corpus.txt"))
    assert load_pipeline(path).stages["tokenizer"].data == ["corpus.txt"]


def test_absent_stage_is_not_run_and_run_dir_argument_wins(tmp_path) -> None:
    path = write(tmp_path, "stages:\n  tokenizer: {data: [a.txt]}\n")
    config = load_pipeline(path, run_dir=str(tmp_path / "elsewhere"))
    assert list(config.stages) == ["tokenizer"]
    assert config.run_dir == str(tmp_path / "elsewhere")


def test_lora_mapping_builds_nested_dataclass(tmp_path) -> None:
    path = write(tmp_path, MINIMAL.replace("lr: 1.0e-3}", "lr: 1.0e-3, lora: {r: 4, target_modules: c_attn}}"))
    lora = load_pipeline(path).stages["sft"].lora
    assert isinstance(lora, LoraSettings) and lora.r == 4 and lora.target_modules == ["c_attn"]


# ----------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    "old, new, key, suggestion",
    [
        ("run_dir: runs/x", "run_dri: runs/x", "run_dri", "run_dir"),
        ("max_steps: 10", "max_step: 10", "stages.pretrain.max_step", "max_steps"),
        ("lr: 1.0e-3}", "lr: 1.0e-3, judgee: x}", "stages.sft.judgee", "judge"),
        ("n_layer: 2,", "n_layr: 2,", "stages.pretrain.model.n_layr", "n_layer"),
    ],
    ids=["top-level", "stage", "stage-2", "nested-model"],
)
def test_unknown_key_names_file_dotted_key_and_close_match(tmp_path, old, new, key, suggestion) -> None:
    assert old in MINIMAL
    path = write(tmp_path, MINIMAL.replace(old, new))
    message = config_error(path)
    assert str(path) in message
    assert key in message
    assert "unknown key" in message
    assert f"did you mean '{suggestion}'" in message


def test_unknown_key_in_lora_mapping(tmp_path) -> None:
    path = write(tmp_path, MINIMAL.replace("lr: 1.0e-3}", "lr: 1.0e-3, lora: {rank: 4}}"))
    message = config_error(path)
    assert str(path) in message and "stages.sft.lora.rank" in message


def test_source_is_not_a_settable_key(tmp_path) -> None:
    message = config_error(write(tmp_path, MINIMAL + "source: other.yaml\n"))
    assert "source" in message and "unknown key" in message


def test_unknown_stage_suggests_close_match(tmp_path) -> None:
    path = write(tmp_path, MINIMAL.replace("  sft: {", "  sfft: {"))
    message = config_error(path)
    assert str(path) in message and "stages.sfft" in message and "did you mean 'sft'" in message


def test_unknown_stage_without_close_match_lists_known(tmp_path) -> None:
    message = config_error(write(tmp_path, MINIMAL.replace("  sft: {", "  zzzz: {")))
    assert "stages.zzzz" in message and "unknown stage" in message
    assert "tokenizer" in message and "pretrain" in message


# ----------------------------------------------------------------------------- wrong types and values


@pytest.mark.parametrize(
    "old, new, key, expected",
    [
        ("max_steps: 10", "max_steps: '10'", "stages.pretrain.max_steps", "expected an integer"),
        ("max_steps: 10", "max_steps: 10.0", "stages.pretrain.max_steps", "expected an integer"),
        ("max_steps: 10", "max_steps: true", "stages.pretrain.max_steps", "expected an integer"),
        ("n_layer: 2,", "n_layer: 2.5,", "stages.pretrain.model.n_layer", "expected an integer"),
        ("seed: 3", "seed: three", "seed", "expected an integer"),
        ("lr: 1.0e-3}", "lr: fast}", "stages.sft.lr", "expected a number"),
        ("lr: 1.0e-3}", "lr: [1.0e-3]}", "stages.sft.lr", "expected a number"),
        ("data: sft.jsonl", "data: [a.jsonl, b.jsonl]", "stages.sft.data", "expected a string"),
        ("data: [corpus.txt], vocab", "data: {a: 1}, vocab", "stages.tokenizer.data", "expected a list"),
        ("model: {n_layer: 2, n_head: 2, n_embd: 32, n_positions: 64}", "model: 4", "stages.pretrain.model", "expected a mapping"),
        ("max_steps: 10", "max_steps: 10\n    gradient_checkpointing: 'yes'", "stages.pretrain.gradient_checkpointing", "true or false"),
    ],
    ids=["str-for-int", "float-for-int", "bool-for-int", "nested-float-for-int", "top-level-int", "str-for-float",
         "list-for-float", "list-for-str", "mapping-for-list", "scalar-for-mapping", "str-for-bool"],
)  # fmt: skip
def test_wrong_type_names_file_and_key(tmp_path, old, new, key, expected) -> None:
    assert old in MINIMAL
    path = write(tmp_path, MINIMAL.replace(old, new))
    message = config_error(path)
    assert str(path) in message and key in message and expected in message


@pytest.mark.parametrize(
    "old, new, words",
    [
        ("lr: 1.0e-3}", "lr: -1.0e-3}", ["stages.sft", "lr", "positive"]),
        ("lr: 1.0e-3}", "lr: 0}", ["stages.sft", "lr", "positive"]),
        ("max_steps: 10", "max_steps: 0", ["stages.pretrain", "max_steps"]),
        ("n_embd: 32", "n_embd: 33", ["stages.pretrain.model", "n_embd", "n_head"]),
        ("vocab_size: 300", "vocab_size: 100", ["stages.tokenizer", "vocab_size", "261"]),
        ("max_steps: 10", "max_steps: 10, block_size: 128", ["stages.pretrain", "block_size"]),
        ("lr: 1.0e-3}", "lr: 1.0e-3, judge: 'a:b'}", ["stages.sft", "eval_prompts", "judge"]),
        ("lr: 1.0e-3}", "lr: 1.0e-3, eval_fraction: 1.5}", ["stages.sft", "eval_fraction"]),
        ("lr: 1.0e-3}", "lr: 1.0e-3, lr_schedule: cosnie}", ["stages.sft", "lr_schedule", "cosnie"]),
    ],
    ids=["negative-lr", "zero-lr", "zero-steps", "heads", "vocab", "block", "judge-alone", "fraction", "schedule"],
)
def test_invalid_value_names_file_stage_and_field(tmp_path, old, new, words) -> None:
    assert old in MINIMAL
    path = write(tmp_path, MINIMAL.replace(old, new).replace("max_steps: 10, block_size", "max_steps: 10\n    block_size"))
    message = config_error(path)
    assert str(path) in message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_report_best_of_defaults_to_4_and_16_and_takes_positive_distinct_integers(tmp_path) -> None:
    report = MINIMAL + "  report: {eval_prompts: eval.jsonl}\n"
    assert load_pipeline(write(tmp_path, report)).stages["report"].best_of == [4, 16]
    none = report.replace("eval.jsonl}", "eval.jsonl, best_of: []}")
    assert load_pipeline(write(tmp_path, none)).stages["report"].best_of == []
    for value, words in [("[0]", ["best_of", "positive integer", "0"]), ("[4, -2]", ["best_of", "-2"]),
                         ("[4, 4]", ["best_of", "twice"]), ("[2.5]", ["stages.report.best_of[0]", "expected an integer"]),
                         ("16", ["stages.report.best_of", "expected a list"])]:  # fmt: skip
        path = write(tmp_path, report.replace("eval.jsonl}", f"eval.jsonl, best_of: {value}}}"))
        message = config_error(path)
        assert str(path) in message and "stages.report" in message
        for word in words:
            assert word in message, f"{word!r} not in {message!r}"


def test_ppo_reward_model_weight(tmp_path) -> None:
    ppo = MINIMAL + "  ppo: {prompts: p.jsonl}\n"
    assert load_pipeline(write(tmp_path, ppo)).stages["ppo"].reward_model_weight == 1.0
    gold = ppo.replace("p.jsonl}", "p.jsonl, reward_model_weight: 0, reward_functions: [rlhf.demo_task:gold_judge]}")
    assert load_pipeline(write(tmp_path, gold)).stages["ppo"].reward_model_weight == 0.0
    message = config_error(write(tmp_path, ppo.replace("p.jsonl}", "p.jsonl, reward_model_weight: 0}")))
    assert "stages.ppo" in message and "reward_model_weight" in message and "reward_functions" in message
    message = config_error(write(tmp_path, ppo.replace("p.jsonl}", "p.jsonl, reward_model_weight: -1}")))
    assert "reward_model_weight: must be >= 0" in message


def test_stage_without_required_data(tmp_path) -> None:
    message = config_error(write(tmp_path, "stages:\n  sft:\n"))
    assert "stages.sft" in message and "data" in message


def test_top_level_not_a_mapping_and_stages_not_a_mapping(tmp_path) -> None:
    assert str(tmp_path / "a.yaml") in config_error(write(tmp_path, "- a\n- b\n", "a.yaml"))
    message = config_error(write(tmp_path, "stages: [tokenizer]\n", "b.yaml"))
    assert str(tmp_path / "b.yaml") in message and "stages" in message


def test_missing_file(tmp_path) -> None:
    message = config_error(tmp_path / "nope.yaml")
    assert str(tmp_path / "nope.yaml") in message and "not found" in message


def test_config_error_is_a_user_error() -> None:
    assert issubclass(ConfigError, UserError)


# ----------------------------------------------------------------------------- PPO settings

PPO_MINIMAL = "stages:\n  ppo: {prompts: p.jsonl}\n"


def test_kl_estimator_accepts_the_reward_path_estimators_and_refuses_k3(tmp_path) -> None:
    """Only estimators whose gradient as a detached reward is the KL's are allowed (see
    tests/test_ppo_math.py); 'k3' gets a one-line error saying why and what to use instead."""
    from rlhf.ppo_math import KL_ESTIMATORS

    path = write(tmp_path, PPO_MINIMAL)
    for name in KL_ESTIMATORS:
        assert load_pipeline(path, [f"stages.ppo.kl_estimator={name}"]).stages["ppo"].kl_estimator == name
    message = config_error(path, ["stages.ppo.kl_estimator=k3"])
    assert "stages.ppo" in message and "kl_estimator" in message and "biased" in message and "use 'k1'" in message
    message = config_error(path, ["stages.ppo.kl_estimator=k2"])
    assert "kl_estimator" in message and "'k2'" in message


def test_norm_prompts_must_not_be_negative(tmp_path) -> None:
    path = write(tmp_path, PPO_MINIMAL)
    assert load_pipeline(path).stages["ppo"].norm_prompts == 256
    assert load_pipeline(path, ["stages.ppo.norm_prompts=0"]).stages["ppo"].norm_prompts == 0
    message = config_error(path, ["stages.ppo.norm_prompts=-1"])
    assert "norm_prompts" in message and ">= 0" in message
