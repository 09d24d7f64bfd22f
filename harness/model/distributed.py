"""Data parallel over several processes started by `torchrun` (or `accelerate launch`).

A launcher starts N copies of `python -m harness ...` and tells each one who it is through the
environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE). `setup` turns that into a
torch.distributed process group (gloo on CPU, nccl on GPU, each process on the GPU of its
LOCAL_RANK), the way lm-eval's HFLM and accelerate expect to find it. Without those variables
(one plain process) every function here is a no-op, so the single-process path is unchanged.

How the work is split lives with the work (evals/ce.py splits sequences, lm-eval shards requests
through the backend's rank / world_size); this module only holds the plumbing: who am I, which
rows are mine, and the few collectives the stages use. Every process computes the same
gathered results; only rank 0 writes files and draws progress bars.
"""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist

from harness.errors import UserError


def _env(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else _env("WORLD_SIZE", 1)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else _env("RANK", 0)


def is_main() -> bool:
    """True in the one process that writes files and draws progress (rank 0)."""
    return rank() == 0


def setup(device: str, device_map: str | None = None) -> str:
    """Join the launcher's process group (once) and return this process's device.

    `--device cuda` becomes `cuda:LOCAL_RANK`; a node must have a GPU per process. Checked
    before any rendezvous, so bad input fails at once with one line on every process."""
    n = _env("WORLD_SIZE", 1)
    if n <= 1:
        return device
    if device_map is not None:
        raise UserError("--device-map shards one model over every GPU of a single process; under torchrun "
                        "each process holds a whole model: use one or the other")
    kind = device.split(":")[0]
    local, per_node = _env("LOCAL_RANK", 0), _env("LOCAL_WORLD_SIZE", n)
    if kind == "cuda":
        if ":" in device:
            raise UserError(f"--device {device}: under torchrun give --device cuda; each process takes the GPU "
                            "of its LOCAL_RANK")
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if have < per_node:
            raise UserError(f"--device cuda: {per_node} processes on this node but {have} CUDA GPU(s) visible; "
                            f"start at most {have} processes per node (--nproc_per_node) or use --device cpu")
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    elif kind != "cpu":
        raise UserError(f"--device {device}: several processes run on cpu or cuda")
    if not dist.is_initialized():
        if kind == "cuda":
            dist.init_process_group("nccl", device_id=torch.device(device))
        else:
            dist.init_process_group("gloo")
        atexit.register(_finish)
    return device


def _finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def share(n_rows: int, chunk: int) -> tuple[int, int]:
    """This process's rows [lo, hi) of `n_rows`: whole chunks of `chunk` rows, contiguous,
    chunk counts differing by at most one. Chunk boundaries are the one-process batches, so
    every batch is computed exactly as a single process would compute it."""
    n_chunks = -(-n_rows // chunk)
    w, r = world_size(), rank()
    first, last = r * n_chunks // w, (r + 1) * n_chunks // w
    return min(first * chunk, n_rows), min(last * chunk, n_rows)


def all_gather_objects(obj) -> list:
    """Every process's `obj`, in rank order, on every process (one process: [obj])."""
    if world_size() <= 1 or not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every process's rows of `t` (its share, see `share`), concatenated in rank order: the
    whole array in its original order."""
    return torch.cat([p.to(t.device) for p in all_gather_objects(t.cpu())]) if world_size() > 1 else t


def collective_device() -> torch.device:
    """Where tensors handed to a collective must live: the process's GPU under nccl."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_tensor(t: torch.Tensor) -> torch.Tensor:
    """Every process's `t` concatenated along dim 0 in rank order (a 0-d tensor counts as one
    row), as accelerate's `gather`, on `t`'s device."""
    if world_size() <= 1:
        return t
    rows = t.reshape(1) if t.dim() == 0 else t
    rows = rows.to(collective_device())
    out = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
    dist.all_gather(out, rows)  # equal shapes only: what lm-eval gathers (request counts) has them
    return torch.cat(out).to(t.device)


def gather_object(obj, dst: int = 0) -> list | None:
    """Every process's `obj` in rank order on `dst`, None elsewhere (as HFLM does it)."""
    if world_size() <= 1:
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
