"""Data-parallel training over processes and machines (torchrun + DistributedDataParallel): the process group, who
this process is, its shard of each epoch, and the collectives that make every rank hold the same numbers.

    torchrun --standalone --nproc-per-node 2 -m digitkit train --config configs/default.yaml

A single process (no torchrun, or torchrun with one process) starts no process group, and fit() runs exactly the
code it runs without this module. With N processes:
- `train.batch_size` is the global batch: each rank takes batch_size / N images a step, so a recipe means the same
  at any N (same steps per epoch, same schedule) and the run's config.yaml reproduces it.
- Every rank draws the epoch's permutation from (seed, epoch), as a single process does, and takes positions
  rank, rank + N, rank + 2N, ...: step s of all ranks together is batch s of the single-process run.
- Augmentation and dropout draw from (seed, epoch, rank): different on every rank, the same on every rerun or resume.
- DDP averages the gradients; before validation rank 0's batch-norm statistics are copied to every rank, so all
  ranks hold one model; each rank measures its part of the validation set and the sums are all-reduced.
- Rank 0 decides (best checkpoint, early stopping) and broadcasts the decision; only rank 0 writes files.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import ipaddress
import json
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from digitkit.errors import ConfigError, DigitkitError

SHARD_LOG_ENV = "DIGITKIT_SHARD_LOG"
"""A folder: each rank appends the images it trained on per epoch to shards-rank<R>.jsonl (tests, debugging)."""


@dataclass(frozen=True)
class World:
    """This process's place among the training processes: rank 0 of 1 without torchrun."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = World()


def world() -> World:
    """The current process group's view of this process, or SINGLE when no group was started."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    return SINGLE


# ----------------------------------------------------------------------------------------------------------
# Starting the process group


def init_from_env(device: torch.device) -> World:
    """Join the process group torchrun describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT): gloo for the CPU, NCCL for CUDA. One process, or none of these variables: nothing is started and
    this returns SINGLE. Calling it again returns the group already joined.

    Ranks other than 0 then print nothing on stdout (the summary and --json output come from rank 0 alone); their
    errors still reach stderr.
    """
    if dist.is_available() and dist.is_initialized():
        return world()
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1:
        return SINGLE
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={size} is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: start "
            "data-parallel training with torchrun, which sets them all (torchrun --standalone --nproc-per-node 2 "
            "-m digitkit train ...), or unset WORLD_SIZE to train in one process"
        )
    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed, so it cannot train in several processes; "
                          "install the official torch wheel or train in one process (without torchrun)")  # fmt: skip
    backend = backend_for(device)
    local_rank = _env_int("LOCAL_RANK", 0)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} CUDA device(s): start at "
                "most one process per GPU (torchrun --nproc-per-node <GPUs>)"
            )
        torch.cuda.set_device(local_rank)  # "cuda" now means this rank's own GPU
    if backend == "gloo" and not os.environ.get("GLOO_SOCKET_IFNAME") and _is_loopback(os.environ["MASTER_ADDR"]):
        # A one-machine job: keep gloo's connections on the loopback interface, not on whatever address the host
        # name resolves to (a cause of "connection refused" on machines with odd /etc/hosts entries).
        loopback = _loopback_interface()
        if loopback:
            os.environ["GLOO_SOCKET_IFNAME"] = loopback
    dist.init_process_group(backend, timeout=timedelta(minutes=30))
    atexit.register(_shutdown)
    current = world()
    if not current.is_main:
        sys.stdout = open(os.devnull, "w")  # for the life of the process
    return current


def backend_for(device: torch.device) -> str:
    """gloo for the CPU, NCCL for CUDA; anything else, or a backend missing from this build, is a ConfigError."""
    if device.type == "cuda":
        if device.index is not None:
            raise ConfigError(
                f"train.device = {device}: with several processes each one uses the GPU of its LOCAL_RANK; set "
                "train.device to auto or cuda (and CUDA_VISIBLE_DEVICES to choose the GPUs)"
            )
        if not dist.is_nccl_available():
            raise ConfigError("data-parallel training on CUDA needs the NCCL backend, which this PyTorch build lacks; "
                              "install a CUDA build of torch with NCCL, or set train.device=cpu (gloo)")  # fmt: skip
        return "nccl"
    if device.type == "cpu":
        if not dist.is_gloo_available():
            raise ConfigError("data-parallel training on the CPU needs the gloo backend, which this PyTorch build "
                              "lacks; install the official torch wheel (it has gloo) or train in one process "
                              "(without torchrun)")  # fmt: skip
        return "gloo"
    raise ConfigError(f"train.device = {device.type}: data-parallel training runs on the CPU (gloo) or CUDA (NCCL); "
                      "set train.device=cpu, or train in one process (without torchrun)")  # fmt: skip


def _shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def leave(code: int) -> NoReturn:
    """End a data-parallel process after its work: destroy the process group while everything it uses is still
    alive, run the exit handlers, flush the streams, and end the process without the interpreter's and the C++
    runtime's teardown. In that teardown gloo's threads sometimes aborted a finished run ("terminate called
    without an active exception", exit code -6: seen in CI on a torchrun resume, with the work already written)."""
    _shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "")
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r}: expected an integer (torchrun sets it)") from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _loopback_interface() -> str | None:
    names = [name for _, name in socket.if_nameindex()] if hasattr(socket, "if_nameindex") else []
    return next((n for n in ("lo", "lo0") if n in names), None)


# ----------------------------------------------------------------------------------------------------------
# Checks before a run folder is made


def check_launch(batch_size: int, world: World, custom_step: bool = False) -> None:
    """The global batch must split evenly over the processes; custom optimizer steps (distillation, pruning)
    call the model directly, past DDP's gradient averaging, so they run in one process only."""
    if world.size == 1:
        return
    if batch_size % world.size:
        lower, upper = batch_size // world.size * world.size, -(-batch_size // world.size) * world.size
        raise ConfigError(
            f"train.batch_size = {batch_size} is the global batch and does not split over {world.size} processes; "
            f"use a multiple of {world.size} (e.g. {lower or upper} or {upper})"
        )
    if custom_step:
        raise ConfigError("distillation and pruning fine-tuning run in one process; start them without torchrun")


def check_resume(resume: dict[str, Any], world: World, run_dir: Path) -> None:
    """A run resumes with the number of processes it was trained with: the shards and augmentation draws of its
    remaining epochs depend on it."""
    saved = int(resume.get("world_size", 1))
    if saved != world.size:
        how = ("without torchrun (or torchrun --nproc-per-node 1)" if saved == 1
               else f"with torchrun and {saved} processes in all (--nnodes x --nproc-per-node = {saved})")  # fmt: skip
        raise ConfigError(
            f"{run_dir} was trained with {saved} process(es) but this launch has {world.size}; resume it {how}, "
            "so its remaining epochs draw what the uninterrupted run would have"
        )


# ----------------------------------------------------------------------------------------------------------
# Shards and draws


def shard(perm: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's part of an epoch's permutation: positions rank, rank + N, ... Taken batch_size / N at a time,
    step s of all ranks together is perm[s * batch_size : (s + 1) * batch_size], the single-process batch s."""
    return perm[world.rank :: world.size]


def rank_seed(seed: int, epoch: int, rank: int) -> int:
    """A seed for (seed, epoch, rank): independent streams per rank, the same on every rerun."""
    digest = hashlib.sha256(f"digitkit/{seed}/{epoch}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def rank_draws(seed: int, epoch: int, perm: torch.Tensor, world: World) -> tuple[torch.Generator, torch.Tensor]:
    """(augmentation generator, shard) of this rank for `epoch`, and dropout reseeded for this rank."""
    torch.manual_seed(rank_seed(seed, epoch, world.rank) ^ 1)  # dropout
    return torch.Generator().manual_seed(rank_seed(seed, epoch, world.rank)), shard(perm, world)


def shard_dataset(ds: Any, world: World) -> Any:
    """This rank's contiguous part of a data set (validation); the data set itself in a single process."""
    if world.size == 1:
        return ds
    return ds.subset(torch.tensor_split(torch.arange(len(ds)), world.size)[world.rank])


def log_shard(epoch: int, used: torch.Tensor, shard_size: int, world: World) -> None:
    """With $DIGITKIT_SHARD_LOG set: append what this rank trained on in `epoch` to <folder>/shards-rank<R>.jsonl."""
    folder = os.environ.get(SHARD_LOG_ENV)
    if not folder:
        return
    ids = used.tolist()
    record = {"epoch": epoch, "rank": world.rank, "world_size": world.size, "shard_size": shard_size,
              "used": ids, "sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest()}  # fmt: skip
    with open(Path(folder) / f"shards-rank{world.rank}.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------------------------------------
# The model and the collectives


def wrap(model: torch.nn.Module, device: torch.device, world: World) -> torch.nn.Module:
    """DistributedDataParallel around `model` (which keeps its weights: checkpoints save it as usual); the model
    itself in a single process."""
    if world.size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [torch.cuda.current_device()] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def sync_buffers(model: torch.nn.Module, world: World) -> None:
    """Copy rank 0's buffers (batch-norm statistics, which each rank updates from its own batches) to every rank."""
    if world.size == 1:
        return
    for buf in model.buffers():
        dist.broadcast(buf.data, src=0)


def sum_over_ranks(values: list[float], world: World) -> list[float]:
    """Each value summed over all ranks (the values themselves in a single process)."""
    if world.size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    with _peer_failures(world):
        dist.all_reduce(t)
    return t.tolist()


def mean_over_ranks(means: list[float], count: int, world: World) -> list[float]:
    """Means over every rank's samples, from each rank's means over its `count` samples."""
    if world.size == 1:
        return means
    *sums, total = sum_over_ranks([m * count for m in means] + [float(count)], world)
    return [s / total for s in sums]


def broadcast(obj: Any, world: World) -> Any:
    """Rank 0's `obj` on every rank (picklable data: a decision, a folder name, a summary)."""
    if world.size == 1:
        return obj
    box = [obj]
    with _peer_failures(world):
        dist.broadcast_object_list(box, src=0, device=_collective_device())
    return box[0]


@contextlib.contextmanager
def _peer_failures(world: World) -> Iterator[None]:
    """A rank that stopped (rank 0 refusing an existing --out, say) breaks the others' collectives: say so in one
    line instead of gloo's traceback; the stopped rank has printed the reason."""
    try:
        yield
    except RuntimeError as e:
        raise DigitkitError(f"rank {world.rank}: another training process stopped (its error is printed above: "
                            f"fix that and launch again) [{str(e).splitlines()[0][:200]}]") from None  # fmt: skip


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
