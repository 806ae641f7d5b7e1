"""Data parallelism's plumbing: ranks, reductions, gathers and parameter hashes.

Under ``torchrun`` every rank holds a full replica of the model and samples its own share of
each step's prompts.  What keeps the replicas one model:

- ``broadcast_parameters`` once at the start: every rank starts from rank 0's weights;
- ``sum_over_ranks`` of each optimiser batch's loss denominator, before any backward pass, so
  every rank divides by the count of the whole batch (``losses.aggregation_normalizer``);
- ``sum_gradients`` once per optimiser step, after all of this rank's micro-batches: each rank's
  gradient is its share of the whole batch's, so the sum *is* the whole batch's gradient, and
  every rank takes the same AdamW step.

Every rank calls these the same number of times whatever its own batch holds (a rank with no
rows in a mini-batch still sums its zero gradient), so the collectives always match.  Without
an initialised process group each function is the one-process identity, but a process that was
launched as one of several (``WORLD_SIZE`` > 1) and has no process group is an error
(``dist_info``): it would otherwise train alone, one of K independent copies.  Gloo on CPUs,
NCCL with one GPU per rank; under NCCL a model that is not on the rank's GPU is an error too.
"""

from __future__ import annotations

import hashlib
import math
import os

import torch
import torch.distributed as dist

from minigrpo.metrics import REDUCE_OVER_UPDATES


def init_distributed() -> None:
    """Join the process group when launched by torchrun with more than one process: NCCL with
    one GPU per rank (``cuda`` then means ``cuda:LOCAL_RANK``; the model must be put there), gloo
    on CPUs.  ``python -m minigrpo`` calls it; a script of one's own must too, before the trainer."""
    if launched_world_size() > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def launched_world_size() -> int:
    """The number of processes the launcher started (``WORLD_SIZE``, which ``torchrun`` and
    ``accelerate launch`` set in every process's environment); 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` from torch.distributed when initialised, else ``(0, 1)``.

    A launcher only sets environment variables; the process group is made by
    ``init_distributed`` (``python -m minigrpo`` calls it) or by the caller's own
    ``torch.distributed.init_process_group``.  A process launched as one of several
    (``WORLD_SIZE`` > 1) without it raises ``RuntimeError`` here, where the trainer asks for its
    rank, instead of training alone: K such processes would be K independent copies of one
    run."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if launched_world_size() > 1:
        raise RuntimeError(
            f"WORLD_SIZE={launched_world_size()}: this process was launched as one of several (torchrun, "
            "accelerate launch), but torch.distributed is not initialised, so it would train alone as one of "
            "several independent copies. Call minigrpo.distributed.init_distributed() (or "
            "torch.distributed.init_process_group) before building the trainer.")
    return 0, 1


def _dist_device() -> torch.device:
    """Where collectives' tensors must live: the rank's GPU under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _check_backend_device(tensors: list[torch.Tensor], what: str) -> None:
    """Under NCCL every tensor of a collective must be on this rank's GPU: say so, before any
    collective, when ``tensors`` are elsewhere (a model left on the CPU)."""
    if dist.get_backend() != "nccl":
        return
    want = _dist_device()
    elsewhere = sorted({str(t.device) for t in tensors if t.device != want})
    if elsewhere:
        raise ValueError(
            f"{what} on {', '.join(elsewhere)}, but the process group uses NCCL, whose collectives take tensors "
            f"on this rank's GPU ({want}) only: move the model there first (after init_distributed, 'cuda' is "
            "that GPU), or run on CPUs with gloo (CUDA_VISIBLE_DEVICES= torchrun ...).")


def sum_over_ranks(values: list[float]) -> list[float]:
    """Each value summed over all ranks (float64), returned on every rank."""
    if dist_info()[1] == 1:
        return list(values)
    total = torch.tensor(values, dtype=torch.float64, device=_dist_device())
    dist.all_reduce(total)
    return total.tolist()


def broadcast_parameters(model: torch.nn.Module) -> None:
    """Every rank's parameters and buffers become rank 0's."""
    if dist_info()[1] == 1:
        return
    tensors = [*model.parameters(), *model.buffers()]
    _check_backend_device(tensors, "the model's parameters are")
    with torch.no_grad():
        for tensor in tensors:
            dist.broadcast(tensor.data, src=0)


def sum_gradients(params: list[torch.nn.Parameter], bucket_numel: int = 2**24) -> None:
    """Replace each parameter's gradient by its sum over ranks (a missing gradient counts as 0
    and is created), in buckets of at most ``bucket_numel`` elements per collective."""
    if dist_info()[1] == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    _check_backend_device([p.grad for p in params], "the gradients are")
    bucket: list[torch.Tensor] = []
    for grad in [p.grad for p in params]:
        if bucket and (sum(g.numel() for g in bucket) + grad.numel() > bucket_numel or grad.dtype != bucket[0].dtype):
            _all_reduce_in_place(bucket)
            bucket = []
        bucket.append(grad)
    if bucket:
        _all_reduce_in_place(bucket)


def _all_reduce_in_place(tensors: list[torch.Tensor]) -> None:
    """Sum same-dtype tensors over ranks with one collective on their flattened concatenation."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def mean_over_ranks(metrics: dict[str, float | None]) -> dict[str, float | None]:
    """Each metric over ranks: the mean over the ranks where it is not ``None`` (a rank whose
    batch had no Â > 0 has no ``completion_tokens_pos_adv``), but ``REDUCE_OVER_UPDATES``'
    extremes (``ratio_min``, ``ratio_max``) by min and max; ``None`` where no rank has a value.
    Every key any rank has is reduced on every rank (a rank without it counts out), so the
    collectives match (identity without torch.distributed)."""
    _, world_size = dist_info()
    if world_size == 1:
        return metrics
    keys = sorted(set().union(*gather_objects(sorted(metrics))))
    metrics = {k: metrics.get(k) for k in keys}
    out = dict(metrics)
    ops = {min: dist.ReduceOp.MIN, max: dist.ReduceOp.MAX}
    device = _dist_device()
    for op in (dist.ReduceOp.MIN, dist.ReduceOp.MAX, dist.ReduceOp.SUM):
        group = [k for k in keys if ops.get(REDUCE_OVER_UPDATES.get(k), dist.ReduceOp.SUM) == op]
        if not group:
            continue
        missing = {dist.ReduceOp.MIN: math.inf, dist.ReduceOp.MAX: -math.inf, dist.ReduceOp.SUM: 0.0}[op]
        values = torch.tensor([missing if metrics[k] is None else float(metrics[k]) for k in group],
                              dtype=torch.float64, device=device)
        counts = torch.tensor([float(metrics[k] is not None) for k in group], dtype=torch.float64, device=device)
        dist.all_reduce(values, op=op)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        if op == dist.ReduceOp.SUM:
            values = values / counts.clamp(min=1)
        out.update((k, v if c > 0 else None) for k, v, c in zip(group, values.tolist(), counts.tolist()))
    return out


def gather_objects(obj) -> list:
    """``obj`` from every rank, in rank order (``[obj]`` in one process)."""
    _, world_size = dist_info()
    if world_size == 1:
        return [obj]
    shares = [None] * world_size
    dist.all_gather_object(shares, obj)
    return shares


def interleave(shares: list[list]) -> list:
    """Undo a round-robin split: rank r held items r, r + K, r + 2K, … of the K ranks' list."""
    out = [None] * sum(map(len, shares))
    for rank, share in enumerate(shares):
        out[rank :: len(shares)] = share
    return out


def gathered(values: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, slice]:
    """Every rank's ``values`` concatenated along ``dim`` in rank order, and the slice of that
    dimension that is this rank's own: for statistics of the whole batch (the advantages'
    batch std).  In one process: a copy of ``values`` and all of it."""
    rank, _ = dist_info()
    shares = gather_objects(values.cpu())
    start = sum(s.shape[dim] for s in shares[:rank])
    return torch.cat(shares, dim=dim).to(values.device), slice(start, start + values.shape[dim])


def params_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over (name, float32 bytes) of every parameter, in ``named_parameters`` order."""
    digest = hashlib.sha256()
    for name, param in getattr(model, "module", model).named_parameters():
        digest.update(name.encode())
        digest.update(param.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
