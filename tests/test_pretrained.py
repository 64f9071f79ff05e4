"""Starting from a given model (`rlhf.pretrained`, `stages.sft.init: DIR`): the tokenizer rules (a chat
template kept or ours added, pad distinct from EOS, embeddings resized), a transformers checkpoint converted
to our decoder, the `init` settings, and `pipelines/from_pretrained.yaml` run end to end from a tiny random
GPT-2 checkpoint made here, then read by `rlhf compare`; a changed file in DIR re-runs every stage.
(Bad folders are cases of tests/test_bad_input.py's table.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf.config import RewardConfig, SFTConfig
from rlhf.pretrained import has_generation_markers, load_causal_lm, load_reward_model, load_tokenizer
from rlhf.tokenizer import EOS_TOKEN, PAD_TOKEN, ROLE_TOKENS, chat_template

from pipeline_helpers import ROOT, one_line_error, run, write_checkpoint, write_subsets

PIPELINE = ROOT / "pipelines" / "from_pretrained.yaml"
OWN_TEMPLATE = (
    "{%- for message in messages -%}{{- '### ' + message['role'] + ': ' + message['content'] + eos_token + '\\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '### assistant: ' -}}{%- endif -%}"
)
"""A chat template of the checkpoint's own, without {% generation %} markers."""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("checkpoint") / "gpt2")


# ----------------------------------------------------------------------------- the tokenizer and the model


def test_a_tokenizer_without_a_template_gets_ours_closed_by_its_eos_and_a_pad(checkpoint) -> None:
    tokenizer = load_tokenizer(checkpoint)
    assert tokenizer.chat_template == chat_template(tokenizer.eos_token)
    assert has_generation_markers(tokenizer)
    assert all(len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1 for token in ROLE_TOKENS)
    assert tokenizer.pad_token == PAD_TOKEN and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert len(tokenizer) == 300 + len(ROLE_TOKENS) + 1


def test_a_tokenizer_with_its_own_template_keeps_it(tmp_path) -> None:
    tokenizer = load_tokenizer(write_checkpoint(tmp_path / "own", template=OWN_TEMPLATE))
    assert tokenizer.chat_template == OWN_TEMPLATE and not has_generation_markers(tokenizer)
    assert tokenizer.pad_token == PAD_TOKEN and len(tokenizer) == 301, "a pad is added, no role markers"


def test_a_transformers_checkpoint_becomes_our_decoder_with_the_same_function(checkpoint) -> None:
    import torch
    from transformers import GPT2LMHeadModel

    model, tokenizer = load_causal_lm(checkpoint)
    assert type(model).__name__ == "RlhfForCausalLM"
    assert model.config.vocab_size == len(tokenizer) == 304, "embeddings resized for the added tokens"
    assert (model.config.pad_token_id, model.config.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)
    ids = torch.tensor([tokenizer("Sure! 2 + 2 = 4.", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        ours = model.eval()(ids).logits[..., :300]
        theirs = GPT2LMHeadModel.from_pretrained(checkpoint).eval()(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    reward, _ = load_reward_model(checkpoint)
    assert type(reward).__name__ == "RlhfForSequenceClassification" and reward.config.num_labels == 1
    torch.testing.assert_close(reward.transformer.wte.weight[:300], model.transformer.wte.weight[:300])


def test_init_names_a_stage_or_else_a_folder() -> None:
    from rlhf.stages import reward, sft

    assert SFTConfig(data="x").init == "pretrain"
    assert sft.upstream(SFTConfig(data="x")) == ("pretrain",) and sft.inputs(SFTConfig(data="x")) == ["x"]
    folder = SFTConfig(data="x", init="models/base")
    assert sft.upstream(folder) == () and sft.inputs(folder) == ["x", "models/base"]
    assert reward.upstream(RewardConfig(data="p")) == ("sft",)
    assert reward.upstream(RewardConfig(data="p", init="models/base")) == ()
    assert reward.inputs(RewardConfig(data="p", init="models/base")) == ["p", "models/base"]


def test_the_default_init_leaves_the_fingerprint_of_runs_recorded_before_it_existed() -> None:
    from rlhf.config import fingerprinted_config, stage_config_dict

    assert "init" not in fingerprinted_config(SFTConfig(data="x")) and stage_config_dict(SFTConfig(data="x"))["init"] == "pretrain"
    assert fingerprinted_config(SFTConfig(data="x", init="models/base"))["init"] == "models/base"


def test_the_shipped_pipeline_without_a_folder_stops_with_one_line(capsys, tmp_path) -> None:
    code, out, err = run(capsys, PIPELINE, "--run-dir", tmp_path / "run")
    assert code == 2
    assert "stages.sft: init: MODEL_DIR: no such directory" in one_line_error(err)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- the pipeline end to end


def tiny_overrides(folder: Path, base: Path) -> list[str]:
    """`pipelines/from_pretrained.yaml` from `base`, cut down as tests/pipeline_helpers.write_tiny_rlhf cuts the
    demo (on data subsets written into `folder`), as command-line arguments."""
    write_subsets(folder, {"sft.jsonl": 64, "preferences.jsonl": 48, "ppo_prompts.jsonl": 16, "eval.jsonl": 8})
    eval_prompts = str(folder / "eval.jsonl")
    training = dict(max_steps=3, batch_size=4, eval_batch_size=8, lr=1.0e-3, warmup_steps=0, min_lr=0, log_every=1)
    settings = {
        "sft": dict(init=str(base), data=str(folder / "sft.jsonl"), eval_prompts=eval_prompts, max_new_tokens=8, **training),
        "reward": dict(data=str(folder / "preferences.jsonl"), eval_rows=8, norm_prompts=8, norm_max_new_tokens=8, **training),
        "ppo": dict(prompts=str(folder / "ppo_prompts.jsonl"), steps=2, rollout_batch_size=8, minibatch_size=4, ppo_epochs=1,
                    max_new_tokens=8, norm_prompts=8, eval_prompts=eval_prompts),
        "report": dict(eval_prompts=eval_prompts, max_new_tokens=8, batch_size=4, best_of=[2]),
    }  # fmt: skip
    overrides = [f"stages.{stage}.{key}={json.dumps(value) if isinstance(value, list) else value}"
                 for stage, values in settings.items() for key, value in values.items()]  # fmt: skip
    return ["--run-dir", str(folder / "run"), *overrides]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_from_pretrained_runs_sft_reward_ppo_report_and_compare_reads_it(tmp_path, capsys, family) -> None:
    from rlhf.cli import main

    base = write_checkpoint(tmp_path / "base", family=family)
    overrides = tiny_overrides(tmp_path, base)
    code, out, err = run(capsys, PIPELINE, *overrides)
    assert code == 0, err[-3000:]
    run_dir = tmp_path / "run"
    for stage in ("sft", "reward", "ppo", "report"):
        assert f"[{stage}] done" in out
    assert not (run_dir / "tokenizer").exists() and not (run_dir / "pretrain").exists()
    sft_config = json.loads((run_dir / "sft" / "config.json").read_text())
    assert sft_config["model_type"] == "rlhf-gpt" and sft_config["architectures"] == ["RlhfForCausalLM"]
    assert sft_config.get("layout", "gpt2") == family
    assert sft_config["vocab_size"] == 304
    saved = load_tokenizer(run_dir / "sft")
    assert saved.chat_template == chat_template(EOS_TOKEN) and saved.pad_token == PAD_TOKEN
    assert str(base) in json.loads((run_dir / "sft" / "manifest.json").read_text())["inputs"]
    assert (run_dir / "report.md").is_file()

    code = main(["compare", str(run_dir / "sft"), str(run_dir / "ppo"), "--reward", str(run_dir / "reward"),
                 "--reference", str(run_dir / "sft"), "--prompts", str(tmp_path / "eval.jsonl"), "--max-new-tokens", "8",
                 "--batch-size", "4", "--out", str(tmp_path / "compare")])  # fmt: skip
    assert code == 0, capsys.readouterr().err[-3000:]
    capsys.readouterr()

    # Up to date as it is; a changed file in DIR re-runs sft and, after it, everything downstream.
    code, out, err = run(capsys, PIPELINE, *overrides, "--dry-run")
    assert code == 0 and "sft: skip: up to date" in out and "report: skip: up to date" in out, out + err
    (base / "generation_config.json").write_text('{"eos_token_id": 0}\n', encoding="utf-8")
    code, out, err = run(capsys, PIPELINE, *overrides, "--dry-run")
    assert code == 0, err
    assert f"sft: run: inputs changed: {base} (contents differ)" in out
    for stage in ("reward", "ppo", "report"):
        assert f"  {stage}: run: upstream" in out


@pytest.mark.slow
def test_sft_keeps_a_checkpoints_own_template_and_trains_on_the_last_answer(tmp_path, capsys) -> None:
    base = write_checkpoint(tmp_path / "own", template=OWN_TEMPLATE)
    overrides = tiny_overrides(tmp_path, base)
    overrides = overrides[:2] + [o for o in overrides[2:] if o.startswith("stages.sft.")]
    code, out, err = run(capsys, PIPELINE, *overrides, "stages.reward=false", "stages.ppo=false", "stages.report=false")
    assert code == 0, err[-3000:]
    assert "chat template has no {% generation %} markers: loss on each conversation's last answer" in out
    assert load_tokenizer(tmp_path / "run" / "sft").chat_template == OWN_TEMPLATE


@pytest.mark.slow
def test_the_reward_model_starts_from_a_folder_too(tmp_path, checkpoint, capsys) -> None:
    overrides = tiny_overrides(tmp_path, checkpoint)
    overrides = overrides[:2] + [o for o in overrides[2:] if o.startswith("stages.reward.")]
    code, out, err = run(capsys, PIPELINE, *overrides, f"stages.reward.init={checkpoint}", "stages.sft=false", "stages.ppo=false",
                         "stages.report=false")  # fmt: skip
    assert code == 0, err[-3000:]
    assert f"responses of the {checkpoint} policy" in out
    reward_dir = tmp_path / "run" / "reward"
    assert json.loads((reward_dir / "config.json").read_text())["architectures"] == ["RlhfForSequenceClassification"]
    manifest = json.loads((reward_dir / "manifest.json").read_text())
    assert str(checkpoint) in manifest["inputs"] and manifest["upstream"] == {}
    assert load_tokenizer(reward_dir).vocab == load_tokenizer(checkpoint).vocab


def test_the_supported_architectures_are_the_converters() -> None:
    from rlhf.convert import SUPPORTED_HF_ARCHITECTURES
    from rlhf.pretrained import SUPPORTED_ARCHITECTURES

    assert SUPPORTED_ARCHITECTURES == SUPPORTED_HF_ARCHITECTURES


def test_a_bf16_checkpoint_loads_in_its_dtype_and_trains_in_float32(tmp_path) -> None:
    """transformers reads a bf16 folder as bf16 (no float32 copy while loading); SFT and the reward model
    then train it in float32 (bf16 products are ~100x slower on the CPU, and AMP wants float32 masters)."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf.pretrained import load_causal_lm, load_reward_model

    base = write_checkpoint(tmp_path / "base", family="llama")
    model = AutoModelForCausalLM.from_pretrained(base)
    model.to(torch.bfloat16).save_pretrained(base)
    assert AutoModelForCausalLM.from_pretrained(base).dtype == torch.bfloat16, "the checkpoint's own dtype"
    assert load_causal_lm(base)[0].dtype == torch.float32
    assert load_reward_model(base)[0].dtype == torch.float32
