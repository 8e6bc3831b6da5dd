"""Process-group set-up shared by training, sampling and extraction (torchrun or a single process).

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK. The device is chosen by the *local* rank (the official code uses
the global rank, which names a GPU that does not exist on the second node). NCCL on GPUs, gloo on CPU.

A rank that dies closes its connections, and the others fail at their next collective; a rank that stops
answering (a frozen process, a lost node) makes them fail after the process group's timeout, which
DITKIT_DIST_TIMEOUT (seconds) overrides. `describe_peer_failure` turns either error into the one line that the
command line prints.
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ditkit.runtime.errors import UserError

TIMEOUT_ENV = "DITKIT_DIST_TIMEOUT"
_timeout_s: float | None = None  # the running group's timeout, for the message when a peer is lost
_cpu_group: object | None = None  # a gloo group for small host-side votes when the main group is NCCL


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_info(prefer_cuda: bool = True, device: torch.device | None = None) -> DistInfo:
    """Rank, world size, local rank and device from the environment, without creating a process group.

    device: an explicit choice (e.g. a `--device` flag); a bare "cuda" becomes this process's local GPU.
    """
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device is not None:
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local % max(torch.cuda.device_count(), 1))
    elif prefer_cuda and torch.cuda.is_available():
        device = torch.device("cuda", local % torch.cuda.device_count())
    else:
        device = torch.device("cpu")
    return DistInfo(rank, world, local, device)


def init(
    prefer_cuda: bool = True,
    *,
    device: torch.device | None = None,
    timeout: datetime.timedelta = datetime.timedelta(minutes=30),
    always: bool = False,
) -> DistInfo:
    """Join the process group when launched by torchrun (no-op for a single process); returns this rank's info.

    timeout: how long a collective waits for the slowest rank before this rank fails (extraction allows hours:
    ranks that finish their shards early wait at the final barrier); DITKIT_DIST_TIMEOUT, in seconds, overrides
    it. always: create a group even for one process (FSDP2 needs one; torchrun's MASTER_ADDR/MASTER_PORT must
    then be set).
    """
    global _timeout_s
    info = env_info(prefer_cuda, device)
    if (info.distributed or always) and not dist.is_initialized():
        timeout = timeout_from_env(timeout)
        _timeout_s = timeout.total_seconds()
        backend = "nccl" if info.device.type == "cuda" else "gloo"
        if info.device.type == "cuda":
            torch.cuda.set_device(info.device)
        dist.init_process_group(
            backend,
            rank=info.rank,
            world_size=info.world_size,
            timeout=timeout,
            **({"device_id": info.device} if info.device.type == "cuda" else {}),
        )
    return info


def timeout_from_env(default: datetime.timedelta) -> datetime.timedelta:
    """DITKIT_DIST_TIMEOUT (seconds, > 0) when set, else `default`."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None or not raw.strip():
        return default
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise UserError(f"{TIMEOUT_ENV}={raw!r} is not a positive number of seconds; set e.g. {TIMEOUT_ENV}=600")
    return datetime.timedelta(seconds=seconds)


# What gloo and NCCL say when the other end of a collective went away or stopped answering.
_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused")
_SILENT = ("Timed out waiting", "timed out", "Timeout", "timeout")


def describe_peer_failure(err: BaseException, verb: str) -> str | None:
    """One line for an error that means another process of a multi-process run died or stopped answering
    (None for any other error, and for a single process). `verb`: the ditkit command, for the fix it names."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1 or not isinstance(err, RuntimeError):
        return None
    text = str(err)
    if any(s in text for s in _LOST):
        why = "its connection closed: another process of the run died"
    elif isinstance(err, dist.DistError) or "gloo" in text or "NCCL" in text or "c10d" in text:
        if not any(s in text for s in _SILENT):
            return None
        waited = f" for {_timeout_s:g} s" if _timeout_s is not None else ""
        why = (f"another process of the run did not answer{waited} (it froze, or its node was lost; "
               f"{TIMEOUT_ENV} sets the wait)")
    else:
        return None
    again = {"train": "restart the job with --resume auto to continue from the last checkpoint",
             "sample": "rerun the same command: finished shards are kept",
             "extract": "rerun the same command: finished shards are kept"}.get(verb, "rerun the job")
    rank = os.environ.get("RANK", "?")
    return f"rank {rank} of {world} stopped: {why}; read that rank's log for the cause, then {again}"


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (in place); identity for one process."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


def broadcast_object(obj: object, src: int = 0) -> object:
    """Send a small picklable object from `src` to every rank (trusted: produced by this program)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def max_over_ranks(value: int) -> int:
    """The largest of every rank's `value` (the value itself for one process). A collective: every rank must
    call it at the same point. It runs over gloo on the host, so a GPU run does not wait for its GPU here."""
    global _cpu_group
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    if _cpu_group is None:  # created on first use, which is the same call on every rank
        _cpu_group = (dist.group.WORLD if dist.get_backend() == "gloo" else
                      dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=_timeout_s or 1800)))
    box = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(box, op=dist.ReduceOp.MAX, group=_cpu_group)
    return int(box.item())


def cleanup() -> None:
    global _cpu_group
    _cpu_group = None
    if dist.is_initialized():
        dist.destroy_process_group()


STRATEGIES = ("ddp", "fsdp")


def shard_dit(model: torch.nn.Module, *, bf16: bool) -> torch.nn.Module:
    """FSDP2 in place: each DiT block is a unit, then the root (embedders, final layer); returns `model`.

    bf16: parameters are all-gathered and computed in bf16, gradients reduced in fp32 (the sharded master
    weights and AdamW state stay fp32). Needs an initialised process group; every rank must call it.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
              else MixedPrecisionPolicy())
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel as training uses it: gradients live in the all-reduce buckets
    (`gradient_as_bucket_view`, one copy less per step and less memory) and buckets of 100 MB, fewer and larger
    all-reduces than the 25 MB default for models of DiT-XL's size."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        gradient_as_bucket_view=True,
        bucket_cap_mb=100,
    )

