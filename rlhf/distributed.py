"""Data-parallel runs: one process per device, started by `torchrun` or `accelerate launch`.

The launcher gives each process RANK, LOCAL_RANK and WORLD_SIZE in its environment. With WORLD_SIZE
above 1 the first collective call here joins the process group through accelerate's `PartialState`
(gloo on CPU, NCCL on CUDA, each process on its LOCAL_RANK's GPU). With one process every helper
answers from the environment or calls straight through, and never imports torch: single-process
runs, the skip path and `rlhf --help` are unchanged.

The contract: every process runs the same code and reaches the same collective calls in the same
order; only the main process (rank 0) writes to the run directory; what it decides or raises
reaches the others through `on_main`, so all processes take the same path and fail together.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import pickle
import sys
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")

WAIT_TIMEOUT = datetime.timedelta(hours=2)
"""How long a process waits in a collective for the others. The main process works alone at times
(training the tokenizer, writing the report, evaluating a policy) while the others wait."""


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_distributed() -> bool:
    return world_size() > 1


def is_main_process() -> bool:
    return rank() == 0


def sharding() -> str | None:
    """'fsdp' or 'deepspeed' when `accelerate launch --config_file` asked for sharded training, else None."""
    for name, variable in (("fsdp", "ACCELERATE_USE_FSDP"), ("deepspeed", "ACCELERATE_USE_DEEPSPEED")):
        if os.environ.get(variable, "false").lower() == "true":
            return name
    return None


def init() -> None:
    """Join the process group (once; nothing to do for a single process)."""
    if not is_distributed():
        return
    import torch

    if not torch.distributed.is_initialized():
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available(), timeout=WAIT_TIMEOUT)


def leave(synchronise: bool = False) -> None:
    """Leave the process group before the interpreter exits (once joined; a no-op otherwise). A
    process that exits with the group alive can abort in gloo's threads ("terminate called without
    an active exception"). `synchronise`: wait for every process first (on the way out of a
    finished command; not after an error, where another process may never arrive)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    if synchronise:
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _device():
    """Where collective tensors live: the process's GPU under NCCL, else the CPU."""
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        import torch

        init()
        torch.distributed.barrier()


def _picklable(error: Exception) -> Exception:
    try:
        pickle.dumps(error)
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def on_main(function: Callable[[], T]) -> T:
    """Call `function` on the main process only; every process returns its result or raises its error.

    Also a barrier: no process goes on before the main one has finished. An error re-raised on the
    other processes carries `reported_by_main = True`, so the command prints it once.
    """
    if not is_distributed():
        return function()
    import torch

    init()
    outcome: list = [None]
    if is_main_process():
        try:
            outcome = [("result", function())]
        except Exception as error:
            outcome = [("error", _picklable(error))]
            torch.distributed.broadcast_object_list(outcome, src=0)
            raise
    torch.distributed.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if kind == "error":
        value.reported_by_main = True
        raise value
    return value


def _reduce(values: list[float], op: str) -> list[float]:
    import torch

    init()
    tensor = torch.tensor(values, dtype=torch.float64, device=_device())
    torch.distributed.all_reduce(tensor, op=getattr(torch.distributed.ReduceOp, op))
    return tensor.tolist()


def any_process(flag: bool) -> bool:
    """Whether `flag` holds on any process (every process calls this at the same point)."""
    return bool(_reduce([float(flag)], "MAX")[0]) if is_distributed() else bool(flag)


def every_process(flag: bool) -> bool:
    """Whether `flag` holds on every process (every process calls this at the same point)."""
    return bool(_reduce([float(flag)], "MIN")[0]) if is_distributed() else bool(flag)


def all_sum(tensor):
    """`tensor` summed over the processes, in place (returned as well); unchanged for one process."""
    if is_distributed():
        import torch

        init()
        torch.distributed.all_reduce(tensor)
    return tensor


def mean_over_processes(stats: dict[str, float], maxima: tuple[str, ...] = ()) -> dict[str, float]:
    """Each statistic averaged over the processes where it is not NaN (the keys in `maxima`: their
    maximum); NaN where it is NaN on every process.

    A key that some process lacks counts as NaN there, so processes whose statistics differ (one whose
    every update was skipped, say) still make the same reductions, of the union of the keys. Equal
    batch sizes make the mean of means the global mean.
    """
    if not is_distributed():
        return dict(stats)
    import torch

    init()
    key_sets: list = [None] * world_size()
    torch.distributed.all_gather_object(key_sets, sorted(stats))
    keys = sorted(set().union(*key_sets))
    values = [float(stats.get(k, math.nan)) for k in keys]
    present = [not math.isnan(v) for v in values]
    reduced = _reduce([v if ok else 0.0 for v, ok in zip(values, present)] + [float(ok) for ok in present], "SUM")
    counts = dict(zip(keys, reduced[len(keys) :]))
    result = {k: total / counts[k] if counts[k] else math.nan for k, total in zip(keys, reduced)}
    top = [i for i, k in enumerate(keys) if k in maxima]
    if top:
        highest = _reduce([values[i] if present[i] else -math.inf for i in top], "MAX")
        result.update((keys[i], value if counts[keys[i]] else math.nan) for i, value in zip(top, highest))
    return result


@contextlib.contextmanager
def quiet_unless_main() -> Iterator[None]:
    """Silence stdout and stderr of the processes other than the main one: rank 0 speaks for the run.

    An exception still leaves the block and reaches the command, which reports it.
    """
    if is_main_process():
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield
