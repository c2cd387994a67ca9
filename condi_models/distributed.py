"""One silo's local training on several worker processes (``compute: {workers: N}`` in site.yaml).

:func:`train_on_workers` is :func:`~condi_models.training.train_local` with the training step
run by ``N`` processes in a ``torch.distributed`` group on this host: gloo on CPU, NCCL on GPUs
(rank r on ``cuda:r``, one GPU each). The caller keeps its model and gets one trained model and
one :class:`~condi_models.training.LocalResult` back, as from ``train_local``: the silo still
uploads one update.

What each rank does. Every rank gets the whole training split (in shared memory, one copy on
the host) and the model, and draws the same global batches as one process would (the same seed:
order, crops, Phase A's conditioning masks, steps and noise). Of each global batch it trains on
its own contiguous rows, about 1/N of them, and the ranks' gradients are combined (DDP without
DP, Opacus' DPDDP and DistributedDPOptimizer under DP) so that each step is the gradient of the
global batch's loss. With the same seed a run on N workers therefore takes the same steps as one
process with the same ``batch_size``, and ends at the same parameters up to floating-point
summation order (tests/test_workers.py: 2 CPU workers against one, max abs difference below 1e-5
after a round, but for the attention keys' bias, whose gradient is zero in exact arithmetic and
rounding noise in either run). ``batch_size`` stays the global batch: more workers do not change
the optimisation, only how the work of a step is shared.

Where it differs from one process:

- dropout masks: each rank draws its own, from a seed derived from the round seed and its rank,
  where one process draws them from its global RNG; a model with classifier dropout (0.1 by
  default) therefore takes different steps, of the same distribution;
- the refit of the imputer's prior before Phase A and, with ``phase_b_input: imputed``, the
  imputation of the split run whole on every rank (the same work, side by side), not shared.

Differential privacy. The sample rate stays q = batch_size / n over the whole silo's training
split of n records: every step's batch is one Poisson sample of all n records, drawn alike by
every rank from the round's secret-keyed stream and then split among them; each record's
gradient is clipped where the record is, the clipped sums are added across ranks and Gaussian
noise of the planned scale is added once, on rank 0. Each step is thus exactly one DP-SGD step of
the one-process run, and the ledger records the same (noise, q, steps) as it would: the parent
checks the budget before the workers start and commits the round after they finish.

The workers are started for the training step only and end with it; rank 0 sends the trained
parameters back through a pipe on this host. Their gradients stay on the host: gloo binds the
loopback interface (unless ``GLOO_SOCKET_IFNAME`` says otherwise), NCCL goes between the local
GPUs. Each round starts them afresh (seconds of imports), which pays when a round trains for
minutes.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp

from condi_models.batches import PreparedSplit
from condi_models.data.dataset import DatasetInfo
from condi_models.nn.config import ModelConfig
from condi_models.nn.model import CondIModel
from condi_models.privacy import PrivateRound, SiloPrivacy
from condi_models.training import (
    ClassTerms,
    LocalResult,
    LocalTrainingConfig,
    PhasesRun,
    ProgressHook,
    Shard,
    TrainingProgress,
    begin_private_round,
    class_terms,
    local_result,
    train_phases,
)

log = logging.getLogger(__name__)

_ARRAYS = ("x", "observed", "y", "truth", "hidden")
# How often the parent looks at its workers while none has anything to say.
_POLL_S = 0.2


class WorkerError(RuntimeError):
    """A training worker failed in a way that left no exception of its own (killed, out of memory)."""


def worker_devices(device: torch.device, workers: int) -> tuple[torch.device, ...]:
    """The device of each of ``workers`` ranks: the CPU for all, or one GPU each (rank r on ``cuda:r``).

    Raises ValueError naming ``compute.workers`` when a GPU run asks for more workers than GPUs.
    """
    if workers < 1:
        raise ValueError(f"compute.workers must be >= 1, got {workers}")
    if device.type != "cuda":
        return (torch.device("cpu"),) * workers
    gpus = torch.cuda.device_count()
    if workers > gpus:
        raise ValueError(
            f"compute.workers: {workers} workers on CUDA need one GPU each, and this host has {gpus}"
        )
    return tuple(torch.device("cuda", r) for r in range(workers))


@dataclass(frozen=True)
class _SharedSplit:
    """A PreparedSplit whose arrays sit in shared memory, so the workers read one copy of the data."""

    info: DatasetInfo
    arrays: dict[str, torch.Tensor]
    sample_ids: tuple[str, ...]

    @classmethod
    def of(cls, split: PreparedSplit) -> _SharedSplit:
        arrays = {k: torch.from_numpy(np.ascontiguousarray(getattr(split, k))).share_memory_() for k in _ARRAYS}
        return cls(split.info, arrays, split.sample_ids)

    def open(self) -> PreparedSplit:
        arrays = {k: t.numpy() for k, t in self.arrays.items()}
        return PreparedSplit(info=self.info, sample_ids=self.sample_ids, **arrays)


@dataclass(frozen=True)
class _Job:
    """What every worker gets: the model to start from, the data, the round's settings and the group."""

    model: ModelConfig
    state: dict[str, torch.Tensor]
    split: _SharedSplit
    cfg: LocalTrainingConfig
    seed: int
    lr_scale: float
    terms: ClassTerms
    # Pickled here, not shared: torch's IPC cannot carry a generator's state tensor.
    private: bytes | None
    devices: tuple[str, ...]
    store: str
    threads: int


@dataclass(frozen=True)
class _Trained:
    """What rank 0 sends back: the trained state, the phases' losses and timings, the DP steps taken."""

    state: dict[str, np.ndarray]
    run: PhasesRun
    dp_steps: int


def _rank_seed(seed: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling (its type then reaches the caller), else a WorkerError with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # any exception type may refuse to pickle, in any way
        return WorkerError(f"{type(exc).__name__}: {exc}")
    return exc


def _worker(rank: int, job: _Job, messages: torch_mp.Queue) -> None:
    """One rank: join the group, train its rows of every batch; rank 0 reports progress and the result."""
    world = len(job.devices)
    device = torch.device(job.devices[rank])
    torch.set_num_threads(job.threads)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif sys.platform == "linux":
        # The ranks talk only to each other: keep their traffic on the loopback interface.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(backend, init_method=Path(job.store).as_uri(), rank=rank, world_size=world)
    try:
        # Dropout draws from the global RNG; ranks seeded alike would drop the same units of their rows.
        torch.manual_seed(_rank_seed(job.seed, rank))
        model = CondIModel(job.model)
        model.load_named_tensors(job.state)

        def report(p: TrainingProgress) -> None:
            messages.put(("progress", p))

        private: PrivateRound | None = None if job.private is None else pickle.loads(job.private)
        run = train_phases(
            model,
            job.split.open(),
            job.cfg,
            seed=job.seed,
            device=device,
            progress=report if rank == 0 else None,
            private=private,
            lr_scale=job.lr_scale,
            terms=job.terms,
            shard=Shard(rank, world),
        )
        if rank == 0:
            state = {k: v.numpy() for k, v in model.state_to_named_tensors().items()}
            steps = 0 if private is None else private.steps_taken
            messages.put(("done", _Trained(state, run, steps)))
    except BaseException as exc:
        messages.put(("failed", rank, _portable(exc), traceback.format_exc()))
        raise
    finally:
        dist.destroy_process_group()


def _run_workers(job: _Job, progress: ProgressHook | None) -> _Trained:
    """Start one process per device, pass rank 0's progress on, and return its result."""
    ctx = torch_mp.get_context("spawn")
    messages = ctx.Queue()
    context = torch_mp.start_processes(
        _worker, args=(job, messages), nprocs=len(job.devices), join=False, start_method="spawn"
    )
    trained: _Trained | None = None
    failure: tuple[int, BaseException, str] | None = None

    def take(message: tuple) -> None:
        nonlocal trained, failure
        if message[0] == "progress" and progress is not None:
            progress(message[1])
        elif message[0] == "done":
            trained = message[1]
        elif message[0] == "failed" and failure is None:
            failure = message[1:]

    try:
        done = False
        while not done:
            try:
                take(messages.get(timeout=_POLL_S))
                continue
            except queue.Empty:
                pass
            try:
                done = context.join(timeout=0)
            except (torch_mp.ProcessRaisedException, torch_mp.ProcessExitedException) as exc:
                # The other ranks are ended by join; what the failed one said, it said before exiting.
                while failure is None:
                    try:
                        take(messages.get(timeout=_POLL_S))
                    except queue.Empty:
                        break
                if failure is not None:
                    rank, error, trace = failure
                    error.add_note(f"in training worker {rank}:\n{trace}")
                    raise error from None
                raise WorkerError(f"a training worker failed: {exc}") from None
        while trained is None:
            try:
                take(messages.get(timeout=_POLL_S))
            except queue.Empty:
                break
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
            process.join()
        messages.close()
    if trained is None:
        raise WorkerError("the training workers ended without a result from rank 0")
    return trained


def train_on_workers(
    model: CondIModel,
    split: PreparedSplit,
    cfg: LocalTrainingConfig,
    *,
    workers: int,
    seed: int,
    device: torch.device,
    progress: ProgressHook | None = None,
    privacy: SiloPrivacy | None = None,
    lr_scale: float = 1.0,
    class_counts: np.ndarray | None = None,
) -> LocalResult:
    """:func:`~condi_models.training.train_local` with the training run by ``workers`` processes.

    The arguments mean what they mean there; ``device`` picks the CPU (gloo) or the GPUs (NCCL,
    one per worker). The budget is checked before the workers start, ``model`` holds the trained
    parameters afterwards, and under ``privacy`` the round is recorded in the ledger once. See
    the module docstring for how the result relates to one process's.
    """
    devices = worker_devices(device, workers)
    terms = class_terms(cfg, split, class_counts)
    private = None if privacy is None else begin_private_round(model, split, cfg, privacy, seed=seed, device=device)
    with tempfile.TemporaryDirectory(prefix="condi-workers-") as rendezvous:
        job = _Job(
            model=model.cfg,
            state={k: v.share_memory_() for k, v in model.state_to_named_tensors().items()},
            split=_SharedSplit.of(split),
            cfg=cfg,
            seed=seed,
            lr_scale=lr_scale,
            terms=terms,
            private=None if private is None else pickle.dumps(private),
            devices=tuple(str(d) for d in devices),
            store=str(Path(rendezvous) / "store"),
            threads=max(1, torch.get_num_threads() // workers),
        )
        log.info("local training on %d workers (%s, %d threads each)", workers, devices[0].type, job.threads)
        trained = _run_workers(job, progress)
    model.load_named_tensors({k: torch.from_numpy(v) for k, v in trained.state.items()})
    model.to(device).train()
    if private is not None:
        private.steps_taken = trained.dp_steps
    return local_result(split, trained.run, privacy, private)
