"""Data-parallel and sharded runs on the CPU (gloo): the cross-process helpers in two spawned
processes, FSDP2 sharding of the decoder by the shipped accelerate config, the shipped demo
pipeline (shortened by overrides) and the tiny pipeline under `torchrun --nproc_per_node 2` end to end (artifacts written once, metrics sane, models load,
a second run skips everything, bad input fails every process with one error line).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline_helpers import PPO_STEPS, ROLLOUT, write_tiny_rlhf

ROOT = Path(__file__).resolve().parents[1]
FSDP_CONFIG = ROOT / "pipelines" / "accelerate" / "fsdp.yaml"
DEEPSPEED_CONFIG = ROOT / "pipelines" / "accelerate" / "deepspeed_zero3.yaml"
SHARDED_PIPELINE = ROOT / "pipelines" / "gpt2_xl_fsdp.yaml"
WORLD = 2
TORCHRUN_TIMEOUT = 600  # seconds; the tiny pipeline takes about a minute on 2 loaded cores

pytestmark = pytest.mark.filterwarnings("ignore:ppo iteration .* negative mean KL:UserWarning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker, *args, timeout: float = 300) -> None:
    """Run `worker(rank, *args)` in WORLD spawned processes joined in a gloo group, as torchrun would;
    a worker's exception fails the test, and so does a hang."""
    import torch.multiprocessing as mp

    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    context = mp.start_processes(_joined, args=(worker, args, rendezvous), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{worker.__name__}: the {WORLD} processes did not finish within {timeout} s")


def _joined(rank: int, worker, args, rendezvous: dict) -> None:
    os.environ.update(rendezvous, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    from rlhf.distributed import init

    init()
    worker(rank, *args)


# ----------------------------------------------------------------------------- helpers, one process


def test_helpers_in_one_process_call_through_without_torch() -> None:
    probe = """
import json, sys
sys.argv[0] = "rlhf"
import rlhf.distributed as d
results = [d.on_main(lambda: 41) + 1, d.any_process(False), d.every_process(True),
           d.mean_over_processes({"a": 2.0, "m": 3.0}, maxima=("m",)), d.is_main_process(), d.world_size()]
print(json.dumps({"results": results, "torch": "torch" in sys.modules}))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"results": [42, False, True, {"a": 2.0, "m": 3.0}, True, 1], "torch": False}, result.stderr


def test_prompt_chunks_of_an_iteration_split_the_stream_between_processes() -> None:
    """Iteration `step` of process `rank` takes chunk `step * world + rank`: together the processes take
    the next world x batch prompts of the one-process stream, each its own."""
    from rlhf.rl_driver import prompt_order

    n, batch, seed = 13, 4, 3
    stream = prompt_order(n, 0, 3 * WORLD * batch, seed)  # one process, one big chunk
    for step in range(3):
        chunks = [prompt_order(n, step * WORLD + rank, batch, seed) for rank in range(WORLD)]
        assert sum(chunks, []) == stream[step * WORLD * batch : (step + 1) * WORLD * batch]
        assert chunks[0] != chunks[1]


# ----------------------------------------------------------------------------- helpers, two processes


def _reductions(rank: int) -> None:
    import torch

    from rlhf.distributed import any_process, every_process, mean_over_processes, on_main
    from rlhf.errors import DataError
    from rlhf.rl_models import whiten_across_processes
    from rlhf.ppo_math import masked_whiten

    # Whitening over both processes' batches equals whitening their concatenation in one process.
    generator = torch.Generator().manual_seed(0)
    values = [torch.randn(3, 5, generator=generator) * 2 + 1, torch.randn(2, 5, generator=generator) - 3]
    masks = [torch.rand(3, 5, generator=generator) > 0.3, torch.rand(2, 5, generator=generator) > 0.5]
    whole = masked_whiten(torch.cat(values), torch.cat(masks))
    mine = whiten_across_processes(values[rank], masks[rank])
    torch.testing.assert_close(mine, whole[:3] if rank == 0 else whole[3:], rtol=0, atol=1e-6)
    scaled = masked_whiten(torch.cat(values), torch.cat(masks), shift_mean=False)
    torch.testing.assert_close(whiten_across_processes(values[rank], masks[rank], shift_mean=False),
                               scaled[:3] if rank == 0 else scaled[3:], rtol=0, atol=1e-6)  # fmt: skip
    assert not torch.allclose(mine, masked_whiten(values[rank], masks[rank])), "local statistics would differ"

    # Statistics: means over the processes, maxima where asked; flags from any or every process.
    stats = mean_over_processes({"kl": 1.0 + rank, "ratio_max": 2.0 + 3 * rank, "episodes": 8.0}, maxima=("ratio_max",))
    assert stats == {"kl": 1.5, "ratio_max": 5.0, "episodes": 8.0}
    # A process whose every update was skipped holds NaN statistics, or none: the others' values stand,
    # and no process waits in a reduction the other does not make.
    nan = float("nan")
    mine = [{"kl": 1.0, "policy_loss": 2.0, "ratio_max": 3.0, "entropy": nan}, {"kl": 3.0, "ratio_max": nan, "entropy": nan}][rank]
    stats = mean_over_processes(mine, maxima=("ratio_max",))
    assert stats.keys() == {"kl", "policy_loss", "ratio_max", "entropy"} and math.isnan(stats.pop("entropy"))
    assert stats == {"kl": 2.0, "policy_loss": 2.0, "ratio_max": 3.0}
    assert any_process(rank == 1) and not every_process(rank == 1) and every_process(True)

    # The main process's result and its errors reach every process; the error is printed once.
    assert on_main(lambda: f"decided by {rank}") == "decided by 0"
    with pytest.raises(DataError, match="row 3: bad") as caught:
        on_main(lambda: (_ for _ in ()).throw(DataError("data.jsonl: row 3: bad")))
    assert getattr(caught.value, "reported_by_main", False) == (rank == 1)


def test_whitening_statistics_and_decisions_are_shared_by_two_processes() -> None:
    spawn(_reductions)


# ----------------------------------------------------------------------------- sharding


def fsdp_plugin_from(config_file: Path):
    """accelerate's FSDP plugin exactly as `accelerate launch --config_file` hands it to each process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "--num_processes", str(WORLD), "-m", "rlhf.cli"])
    args, _, _ = _validate_launch_command(args)
    variables = {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith(("ACCELERATE_", "FSDP_"))}
    saved = dict(os.environ)
    os.environ.update(variables)
    try:
        return FullyShardedDataParallelPlugin(), variables
    finally:
        os.environ.clear()
        os.environ.update(saved)


def shard(model, plugin) -> list:
    """Apply FSDP2 as accelerate does: every module the plugin's auto-wrap policy picks (returned), then the root."""
    from torch.distributed.fsdp import fully_shard

    plugin.set_auto_wrap_policy(model)
    units = [m for m in model.modules() if m is not model and plugin.auto_wrap_policy(module=m, recurse=False, nonwrapped_numel=0)]
    assert units, "the auto-wrap policy picked no module"
    for unit in units:
        fully_shard(unit, reshard_after_forward=plugin.reshard_after_forward)
    fully_shard(model, reshard_after_forward=plugin.reshard_after_forward)
    return units


def test_sharded_configs_parse_and_name_our_block() -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    from rlhf.config import load_pipeline
    from rlhf.model import Block

    plugin, variables = fsdp_plugin_from(FSDP_CONFIG)
    assert variables["ACCELERATE_USE_FSDP"] == "true" and plugin.fsdp_version == 2
    assert plugin.transformer_cls_names_to_wrap == [Block.__name__]
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type), "save_pretrained needs the full weights gathered"
    deepspeed = load_config_from_file(str(DEEPSPEED_CONFIG))  # deepspeed is not installed here: parsed only
    assert deepspeed.distributed_type == "DEEPSPEED" and deepspeed.deepspeed_config["zero_stage"] == 3
    pipeline = load_pipeline(SHARDED_PIPELINE)
    assert "ppo" not in pipeline.stages, "PPO refuses sharding"
    assert pipeline.stages["pretrain"].model.n_embd == 1600


def _fsdp_step(rank: int, config_file: Path, pipeline_file: Path) -> None:
    """FSDP2 by the shipped config on the tiny decoder: one AdamW step gives the loss and the gathered
    full weights of the same step unsharded; the sharded pipeline's model builds on the meta device,
    each process holding half of every parameter."""
    import copy

    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from conftest import make_config
    from rlhf.config import load_pipeline
    from rlhf.model import RlhfConfig, RlhfForCausalLM

    plugin, _ = fsdp_plugin_from(config_file)
    torch.manual_seed(0)
    reference = RlhfForCausalLM(make_config(n_layer=2))
    sharded = copy.deepcopy(reference)
    units = shard(sharded, plugin)
    assert len(units) == 2 and isinstance(next(sharded.parameters()), torch.distributed.tensor.DTensor)
    ids = torch.randint(0, 96, (2 * WORLD, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for model, batch in ((reference, ids), (sharded, ids.chunk(WORLD)[rank])):  # each process: its half of the batch
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    torch.distributed.all_reduce(losses[1])
    torch.testing.assert_close(losses[1] / WORLD, losses[0], rtol=0, atol=1e-5)
    gathered = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(gathered[name], tensor, rtol=0, atol=1e-5, msg=name)

    shape = load_pipeline(pipeline_file).stages["pretrain"].model
    with torch.device("meta"):
        large = RlhfForCausalLM(RlhfConfig(vocab_size=50304, n_positions=shape.n_positions, n_embd=shape.n_embd,
                                           n_layer=shape.n_layer, n_head=shape.n_head))  # fmt: skip
    total = sum(p.numel() for p in large.parameters())
    shard(large, plugin)
    local = sum(p.to_local().numel() for p in large.parameters())
    assert total > 1.5e9 and abs(local - total / WORLD) < 0.01 * total, (local, total)


def test_fsdp_by_the_shipped_config_trains_like_one_process_on_cpu() -> None:
    """accelerate shards only on accelerators; FSDP2 itself runs on the CPU with gloo, so the wrap its
    config asks for is applied here directly."""
    spawn(_fsdp_step, FSDP_CONFIG, SHARDED_PIPELINE)


# ----------------------------------------------------------------------------- the pipeline under torchrun


def torchrun(*args, timeout: float = TORCHRUN_TIMEOUT) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 -m rlhf.cli ARGS` on this checkout. Past `timeout` it is
    sent SIGTERM (torchrun then ends its workers, which run in sessions of their own) and the test fails
    with the end of its output."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
               "-m", "rlhf.cli", *map(str, args)]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            stdout, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        pytest.fail(f"torchrun did not finish within {timeout} s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("torchrun")
    pipeline = write_tiny_rlhf(folder)
    result = torchrun("run", pipeline)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return pipeline, folder / "run", result


@pytest.mark.slow
def test_every_stage_completes_once_on_two_processes(two_process_run) -> None:
    from rlhf.artifacts import read_manifest, read_metrics, verify_outputs
    from rlhf.config import load_pipeline

    pipeline, run_dir, result = two_process_run
    for stage in load_pipeline(pipeline).stages:
        manifest = read_manifest(run_dir / stage)
        assert manifest["status"] == "complete" and verify_outputs(run_dir / stage, manifest) is None, stage
        assert result.stdout.count(f"[{stage}] running") == 1, f"{stage}: only rank 0 prints"
    assert not (run_dir / ".lock").exists()
    for stage, steps in (("pretrain", 4), ("sft", 3), ("reward", 3), ("ppo", PPO_STEPS)):
        rows = read_metrics(run_dir / stage)
        training = [row for row in rows if "loss" in row or "policy_loss" in row]
        assert [row["step"] for row in training] == list(range(1, steps + 1)), f"{stage}: one row per step, written once"
    # Each optimizer step of the Trainer stages consumed WORLD x batch_size distinct examples.
    first = read_metrics(run_dir / "reward")[0]
    assert first["epoch"] == pytest.approx(WORLD * 4 / 40)
    assert read_metrics(run_dir / "pretrain")[0]["num_tokens"] == WORLD * 4 * 96


@pytest.mark.slow
def test_ppo_on_two_processes_counts_both_and_stays_sane(two_process_run) -> None:
    from rlhf.artifacts import read_manifest, read_metrics

    _, run_dir, _ = two_process_run
    rows = read_metrics(run_dir / "ppo")
    assert [row["episodes"] for row in rows] == [WORLD * ROLLOUT * (i + 1) for i in range(PPO_STEPS)]
    for row in rows:
        for key in ("score", "rm_score", "kl", "policy_loss", "value_loss", "entropy", "approx_kl", "judge"):
            assert math.isfinite(row[key]), (key, row)
        assert row["kl"] >= -0.1 and 0 <= row["clipfrac"] <= 1 and row["nonfinite_steps"] == 0
        assert 0 < row["ratio_max"] < 10 and 1 <= row["response_length"] <= 8
    metrics = read_manifest(run_dir / "ppo")["metrics"]
    assert metrics["episodes"] == WORLD * ROLLOUT * PPO_STEPS and math.isfinite(metrics["eval_rm_score"])
    checkpoint = run_dir / "ppo" / "checkpoints" / "step-2"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["optimizer.pt", "policy.safetensors", "state.json", "value.safetensors"]


@pytest.mark.slow
def test_models_saved_by_two_processes_load(two_process_run) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    _, run_dir, _ = two_process_run
    ids = torch.tensor([[5, 6, 7, 8]])
    for stage in ("pretrain", "sft", "ppo"):
        logits = AutoModelForCausalLM.from_pretrained(run_dir / stage)(input_ids=ids).logits
        assert torch.isfinite(logits).all(), stage
    for folder in (run_dir / "reward", run_dir / "ppo" / "value"):
        model = AutoModelForSequenceClassification.from_pretrained(folder)
        assert torch.isfinite(model(input_ids=ids).logits).all(), folder
    assert AutoModelForSequenceClassification.from_pretrained(run_dir / "reward").config.reward_std > 0
    assert (run_dir / "report.md").is_file()


@pytest.mark.slow
def test_second_two_process_run_skips_every_stage(two_process_run) -> None:
    pipeline, run_dir, _ = two_process_run
    manifests = {p: p.read_bytes() for p in run_dir.glob("*/manifest.json")}
    result = torchrun("run", pipeline)
    assert result.returncode == 0, result.stderr[-5000:]
    assert result.stdout.count("up to date, skipped") == 6, result.stdout
    assert {p: p.read_bytes() for p in run_dir.glob("*/manifest.json")} == manifests


@pytest.mark.slow
def test_bad_input_fails_both_processes_with_one_error_line(tmp_path) -> None:
    pipeline = write_tiny_rlhf(tmp_path)
    (tmp_path / "sft.jsonl").write_text('{"prompt": "hi", "completion": ""}\n', encoding="utf-8")
    result = torchrun("run", pipeline, timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "sft.jsonl: row 1: completion: empty text" in errors[0], result.stderr[-3000:]
    assert not (tmp_path / "run").exists(), "nothing is written"


DEMO_SHORTENED = (  # pipelines/demo.yaml as shipped (model, data, settings), with fewer steps
    "stages.pretrain.max_steps=8", "stages.pretrain.log_every=2", "stages.sft.max_steps=4", "stages.sft.log_every=2",
    "stages.reward.max_steps=4", "stages.reward.log_every=2", "stages.reward.norm_prompts=32",
    "stages.ppo.steps=2", "stages.ppo.rollout_batch_size=16", "stages.ppo.minibatch_size=8", "stages.report.samples=32",
)  # fmt: skip


@pytest.mark.slow
def test_the_demo_pipeline_runs_on_two_processes(tmp_path) -> None:
    """The shipped demo pipeline itself (its model, data files, judge and report), shortened by overrides."""
    from rlhf.artifacts import read_manifest, read_metrics, verify_outputs
    from rlhf.config import load_pipeline

    run_dir = tmp_path / "demo"
    result = torchrun("run", "pipelines/demo.yaml", "--run-dir", run_dir, *DEMO_SHORTENED)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    for stage in load_pipeline("pipelines/demo.yaml").stages:
        manifest = read_manifest(run_dir / stage)
        assert manifest["status"] == "complete" and verify_outputs(run_dir / stage, manifest) is None, stage
        assert result.stdout.count(f"[{stage}] done") == 1, stage
    rows = read_metrics(run_dir / "ppo")
    assert [row["episodes"] for row in rows] == [WORLD * 16, WORLD * 32]
    assert all(math.isfinite(row["score"]) and row["kl"] >= -0.1 for row in rows)
    assert [row["step"] for row in read_metrics(run_dir / "pretrain") if "loss" in row] == [2, 4, 6, 8]
    report = json.loads((run_dir / "report" / "compare.json").read_text(encoding="utf-8"))
    assert report["prompts"] == 32
    assert [row["policy"] for row in report["policies"]] == ["sft", "ppo", "pretrain", "sft@best-of-4", "sft@best-of-16"]
    assert (run_dir / "report.md").is_file()
