"""Differential privacy for local training: DP-SGD through Opacus with a persistent budget.

A silo that sets ``privacy:`` trains its private phases with DP-SGD: batches are Poisson
samples of its records (each record joins a step independently with probability
``q = batch_size / n``), every record's gradient is clipped to ``max_grad_norm``, and Gaussian
noise of standard deviation ``noise_multiplier * max_grad_norm`` is added to the clipped sum.
The guarantee is per record (one sample of the split); a patient with k records is covered by
group privacy, roughly k times epsilon.

Budget. The silo plans its participation: ``planned_rounds`` rounds of ``steps_per_round``
private steps at rate ``q``. Both private phases draw from the same budget and are accounted
together in one accountant (one noise multiplier, one composition), which is tighter than
splitting epsilon between them. The noise multiplier is the smallest that keeps the composed
epsilon of everything already spent plus the remaining planned rounds within the target; it is
derived once per plan and derived again only if the plan's inputs change (data size, batch
size, epochs, target, planned rounds), always counting what was already spent.

Ledger. What was spent is kept as the accountant's history, a list of
``(noise_multiplier, sample_rate, steps)`` entries, in a JSON file the caller names (the silo
agent keeps it in its state directory). It is written atomically after every round, checked
when read back (types, ranges, a SHA-256 over the contents), and never reset by this code: a
silo whose next round would pass the target refuses with :class:`BudgetExhausted`.

Randomness. Opacus' guarantee assumes the sampling and the noise are unknown to whoever sees
the update. The simulation derives them from the run seed so runs repeat exactly; a deployed
silo passes a local secret (:func:`load_or_create_secret`), so a coordinator that knows the
round seed still cannot predict them.

What is not covered: the silo's standardization statistics, sample counts and per-group
weights it reports, and any phase left out of ``phases``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import json
import logging
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from opacus.accountants import create_accountant
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DistributedDPOptimizer, DPOptimizer
from pydantic import ConfigDict
from torch import nn

from condi_models.batches import Batch, PreparedSplit, crop, template_windows, window_starts

log = logging.getLogger(__name__)

LEDGER_FORMAT = "condi-privacy-ledger"
LEDGER_VERSION = 1
ACCOUNTANTS = ("rdp", "prv")
PHASES = ("a", "b")
# The noise search stops within this relative distance of the target (in epsilon) or of the
# answer (in noise); it returns the end that fits, so a plan never exceeds the target.
_SIGMA_RTOL = 1e-3
_MAX_SIGMA = 1e6
_SECRET_BYTES = 32


# The name reads as the event the silo agent reports to the coordinator, as the design names it.
class BudgetExhausted(RuntimeError):  # noqa: N818
    """The silo's next round would pass its privacy budget (or its planned rounds are used up)."""

    def __init__(self, message: str, *, spent: float, target: float, rounds_done: int, planned_rounds: int) -> None:
        super().__init__(message)
        self.spent = spent
        self.target = target
        self.rounds_done = rounds_done
        self.planned_rounds = planned_rounds


class LedgerError(ValueError):
    """A privacy ledger file that cannot be trusted; the message names the file and the problem."""


@dataclass(frozen=True)
class PrivacySpec:
    """DP-SGD settings of a silo; also the ``privacy:`` config section.

    ``target_epsilon`` and ``delta``: the (epsilon, delta) the silo may spend over all rounds it
    takes part in; ``planned_rounds``: how many rounds it plans to take part in (the noise is
    set so that exactly these fit); ``phases``: which of Phase A ("a") and Phase B ("b") train
    privately; ``accountant``: "rdp" (Renyi DP) or "prv" (privacy random variables, tighter).
    """

    __pydantic_config__ = ConfigDict(extra="forbid")

    target_epsilon: float
    planned_rounds: int
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    phases: tuple[str, ...] = PHASES
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        eps = _number("target_epsilon", self.target_epsilon)
        if math.isinf(eps):
            raise ValueError("privacy.target_epsilon must be finite; leave the privacy section out to train without DP")
        if not eps > 0:
            raise ValueError(f"privacy.target_epsilon must be > 0, got {self.target_epsilon}")
        delta = _number("delta", self.delta)
        if not 0 < delta < 1:
            raise ValueError(f"privacy.delta must be in (0, 1), got {self.delta}")
        norm = _number("max_grad_norm", self.max_grad_norm)
        if not (norm > 0 and math.isfinite(norm)):
            raise ValueError(f"privacy.max_grad_norm must be a finite number > 0, got {self.max_grad_norm}")
        if isinstance(self.planned_rounds, bool) or not isinstance(self.planned_rounds, int | np.integer):
            raise ValueError(f"privacy.planned_rounds must be an integer, got {self.planned_rounds!r}")
        if self.planned_rounds < 1:
            raise ValueError(f"privacy.planned_rounds must be >= 1, got {self.planned_rounds}")
        phases = (self.phases,) if isinstance(self.phases, str) else tuple(self.phases)
        phases = tuple(str(p).lower() for p in phases)
        if not phases or any(p not in PHASES for p in phases) or len(set(phases)) != len(phases):
            raise ValueError(f"privacy.phases must name 'a', 'b' or both, each once; got {list(self.phases)}")
        if self.accountant == "gdp":
            raise ValueError(
                "privacy.accountant 'gdp' is not offered: Opacus' Gaussian accountant is experimental, can "
                "underestimate the spending and cannot compose a changing noise level; use 'rdp' or 'prv'"
            )
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"privacy.accountant must be one of {list(ACCOUNTANTS)}, got {self.accountant!r}")
        object.__setattr__(self, "target_epsilon", eps)
        object.__setattr__(self, "delta", delta)
        object.__setattr__(self, "max_grad_norm", norm)
        object.__setattr__(self, "planned_rounds", int(self.planned_rounds))
        object.__setattr__(self, "phases", tuple(p for p in PHASES if p in phases))


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"privacy.{name} must be a number, got {value!r}")
    if math.isnan(value):
        raise ValueError(f"privacy.{name} must be a number, got NaN")
    return float(value)


# ---- accounting -------------------------------------------------------------------------------

HistoryEntry = tuple[float, float, int]


def epsilon_of(history: Sequence[HistoryEntry], *, delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` of the composition of ``(noise_multiplier, sample_rate, steps)`` entries."""
    return _epsilon(tuple((float(s), float(q), int(k)) for s, q, k in history), float(delta), accountant)


@functools.lru_cache(maxsize=256)
def _epsilon(history: tuple[HistoryEntry, ...], delta: float, accountant: str) -> float:
    # Cached: a round asks for the same composition several times (check, record, report), and
    # each RDP evaluation costs tens of milliseconds.
    if not history:
        return 0.0
    acc = create_accountant(accountant)
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


def plan_noise(
    history: Sequence[HistoryEntry],
    *,
    sample_rate: float,
    steps: int,
    target_epsilon: float,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """The smallest noise multiplier with which ``steps`` more steps at ``sample_rate`` keep the
    composition with ``history`` within ``target_epsilon`` (the epsilon it gives lies within
    0.1 % below the target, or the noise within 0.1 % of the exact answer).

    With an empty history this is what Opacus' ``get_noise_multiplier`` computes; the history
    makes it usable for a plan that changes after some rounds were spent. Raises ValueError
    when nothing fits: the history alone reaches the target, or no noise level up to 1e6 does.
    """

    def excess(sigma: float) -> float:
        """log(epsilon / target): decreasing in sigma, <= 0 where the plan fits."""
        eps = epsilon_of([*history, (sigma, sample_rate, steps)], delta=delta, accountant=accountant)
        return math.log(eps / target_epsilon) if eps > 0 else -math.inf

    spent = epsilon_of(history, delta=delta, accountant=accountant)
    if spent >= target_epsilon:
        raise ValueError(f"the epsilon already spent ({spent:.4g}) reaches the target {target_epsilon:g}")
    with warnings.catch_warnings():
        # The search visits noise levels far from the answer, where the RDP orders hit their ends.
        warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
        # PRV is slow at small noise levels, so start it from the RDP answer, which lies close by.
        hi = 1.0 if accountant == "rdp" else plan_noise(
            history, sample_rate=sample_rate, steps=steps, target_epsilon=target_epsilon, delta=delta
        )
        f_hi = excess(hi)
        while f_hi > 0:
            hi *= 2.0
            if hi > _MAX_SIGMA:
                raise ValueError(
                    f"no noise multiplier up to {_MAX_SIGMA:g} keeps {steps} more steps at sample rate "
                    f"{sample_rate:.4g} within epsilon {target_epsilon:g} (already spent: {spent:.4g})"
                )
            f_hi = excess(hi)
        lo = hi / 2.0
        f_lo = excess(lo)
        while f_lo <= 0:
            hi, f_hi, lo = lo, f_lo, lo / 2.0
            f_lo = excess(lo)
        # Illinois false position on the bracket [lo, hi]; hi always fits.
        side = 0
        while f_hi < -_SIGMA_RTOL and hi - lo > _SIGMA_RTOL * hi:
            mid = hi - f_hi * (hi - lo) / (f_hi - f_lo) if math.isfinite(f_lo) else (lo + hi) / 2.0
            mid = min(max(mid, lo + 0.01 * (hi - lo)), hi - 0.01 * (hi - lo))
            f_mid = excess(mid)
            if f_mid <= 0:
                hi, f_hi = mid, f_mid
                if side == -1:
                    f_lo /= 2.0
                side = -1
            else:
                lo, f_lo = mid, f_mid
                if side == 1:
                    f_hi /= 2.0
                side = 1
    return hi


@dataclass(frozen=True)
class NoisePlan:
    """A silo's noise level and the participation it was derived for."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    planned_rounds: int
    target_epsilon: float
    delta: float
    accountant: str

    def inputs(self) -> tuple[Any, ...]:
        """Everything the noise multiplier was derived from; a different tuple means a new plan."""
        return (
            self.sample_rate, self.steps_per_round, self.planned_rounds, self.target_epsilon, self.delta,
            self.accountant,
        )


@dataclass
class PrivacyLedger:
    """What a silo has spent: the accountant's history, the rounds it covers, and the current plan."""

    path: Path
    history: list[HistoryEntry] = field(default_factory=list)
    rounds: int = 0
    plan: NoisePlan | None = None

    @classmethod
    def open(cls, path: str | Path) -> PrivacyLedger:
        """The ledger in ``path``, or a new, empty one when the file does not exist yet."""
        path = Path(path)
        if not path.exists():
            return cls(path=path)
        return cls.load(path)

    @classmethod
    def load(cls, path: str | Path) -> PrivacyLedger:
        """Read and check a ledger file; any problem is a LedgerError naming the file and field."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise LedgerError(f"privacy ledger {path}: cannot read it: {err.strerror}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise LedgerError(
                f"privacy ledger {path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
                "the spent budget cannot be read, restore the file from a backup"
            ) from None
        return cls(path=path, **_parse_ledger(data, path))

    def epsilon(self, *, delta: float, accountant: str) -> float:
        """Epsilon spent so far at ``delta`` under ``accountant``."""
        return epsilon_of(self.history, delta=delta, accountant=accountant)

    def record(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Add one round of ``steps`` private steps (merged into the last entry when it has the same noise)."""
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            s, q, k = self.history[-1]
            self.history[-1] = (s, q, k + steps)
        else:
            self.history.append((noise_multiplier, sample_rate, steps))
        self.rounds += 1

    def to_json(self) -> dict[str, Any]:
        """The file's contents, with the checksum over everything else."""
        if self.plan is None:
            raise ValueError("a privacy ledger is saved only after a planned round")
        body: dict[str, Any] = {
            "format": LEDGER_FORMAT,
            "version": LEDGER_VERSION,
            "rounds": self.rounds,
            "history": [[s, q, k] for s, q, k in self.history],
            "plan": {
                "noise_multiplier": self.plan.noise_multiplier,
                "sample_rate": self.plan.sample_rate,
                "steps_per_round": self.plan.steps_per_round,
                "planned_rounds": self.plan.planned_rounds,
                "target_epsilon": self.plan.target_epsilon,
                "delta": self.plan.delta,
                "accountant": self.plan.accountant,
            },
            "epsilon_spent": self.epsilon(delta=self.plan.delta, accountant=self.plan.accountant),
        }
        body["sha256"] = _digest(body)
        return body

    def save(self) -> None:
        """Write the ledger atomically: a temporary file, fsync, rename, fsync of the directory."""
        text = json.dumps(self.to_json(), indent=2) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _digest(body: Mapping[str, Any]) -> str:
    canonical = json.dumps({k: v for k, v in body.items() if k != "sha256"}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _positive(value: object, name: str, path: Path, *, upper: float | None = None) -> float:
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value) and value > 0
    if not ok or (upper is not None and value > upper):
        expected = f"a number in (0, {upper:g}]" if upper is not None else "a finite number > 0"
        raise LedgerError(f"privacy ledger {path}: {name} must be {expected}, got {value!r}")
    return float(value)


def _count(value: object, name: str, path: Path, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise LedgerError(f"privacy ledger {path}: {name} must be an integer >= {minimum}, got {value!r}")
    return value


def _parse_ledger(data: object, path: Path) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise LedgerError(f"privacy ledger {path}: expected a JSON object, got {type(data).__name__}")
    expected = {"format", "version", "rounds", "history", "plan", "epsilon_spent", "sha256"}
    if set(data) != expected:
        raise LedgerError(
            f"privacy ledger {path}: keys {sorted(data)} do not match the expected {sorted(expected)}"
        )
    if data["format"] != LEDGER_FORMAT or data["version"] != LEDGER_VERSION:
        raise LedgerError(
            f"privacy ledger {path}: format {data['format']!r} version {data['version']!r} is not "
            f"{LEDGER_FORMAT!r} version {LEDGER_VERSION}"
        )
    rounds = _count(data["rounds"], "rounds", path, minimum=1)
    raw_history = data["history"]
    if not isinstance(raw_history, list) or not raw_history:
        raise LedgerError(f"privacy ledger {path}: history must be a non-empty list, got {raw_history!r}")
    history: list[HistoryEntry] = []
    for i, entry in enumerate(raw_history):
        if not isinstance(entry, list) or len(entry) != 3:
            raise LedgerError(
                f"privacy ledger {path}: history[{i}] must be [noise_multiplier, sample_rate, steps], got {entry!r}"
            )
        history.append((
            _positive(entry[0], f"history[{i}] noise_multiplier", path),
            _positive(entry[1], f"history[{i}] sample_rate", path, upper=1.0),
            _count(entry[2], f"history[{i}] steps", path, minimum=1),
        ))
    raw_plan = data["plan"]
    if not isinstance(raw_plan, dict):
        raise LedgerError(f"privacy ledger {path}: plan must be an object, got {raw_plan!r}")
    if set(raw_plan) != set(NoisePlan.__dataclass_fields__):
        expected_plan = sorted(NoisePlan.__dataclass_fields__)
        raise LedgerError(f"privacy ledger {path}: plan has keys {sorted(raw_plan)}, expected {expected_plan}")
    accountant = raw_plan["accountant"]
    if accountant not in ACCOUNTANTS:
        raise LedgerError(
            f"privacy ledger {path}: plan.accountant must be one of {list(ACCOUNTANTS)}, got {accountant!r}"
        )
    plan = NoisePlan(
        noise_multiplier=_positive(raw_plan["noise_multiplier"], "plan.noise_multiplier", path),
        sample_rate=_positive(raw_plan["sample_rate"], "plan.sample_rate", path, upper=1.0),
        steps_per_round=_count(raw_plan["steps_per_round"], "plan.steps_per_round", path, minimum=1),
        planned_rounds=_count(raw_plan["planned_rounds"], "plan.planned_rounds", path, minimum=1),
        target_epsilon=_positive(raw_plan["target_epsilon"], "plan.target_epsilon", path),
        delta=_positive(raw_plan["delta"], "plan.delta", path, upper=1.0),
        accountant=accountant,
    )
    _positive(data["epsilon_spent"], "epsilon_spent", path)
    if not isinstance(data["sha256"], str) or not hmac.compare_digest(data["sha256"], _digest(data)):
        raise LedgerError(
            f"privacy ledger {path}: the checksum does not match the contents, so the file was edited or "
            "corrupted and the spent budget cannot be trusted; restore it from a backup (never delete it "
            "to start over: that would spend the budget twice)"
        )
    return {"history": history, "rounds": rounds, "plan": plan}


# ---- one private round ----------------------------------------------------------------------


def load_or_create_secret(path: str | Path) -> bytes:
    """The silo's local secret for DP randomness: read from ``path``, or created there (mode 0600)."""
    path = Path(path)
    if path.exists():
        secret = path.read_bytes()
        if len(secret) != _SECRET_BYTES:
            raise ValueError(f"DP secret {path}: expected {_SECRET_BYTES} bytes, found {len(secret)}")
        return secret
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = os.urandom(_SECRET_BYTES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secret)
        fh.flush()
        os.fsync(fh.fileno())
    return secret


@dataclass
class PrivateRound:
    """One round's DP-SGD settings and randomness, made by :meth:`SiloPrivacy.begin_round`.

    ``phases`` are the private phases that have work this round; each runs its epochs as
    ``steps_per_epoch`` Poisson-sampled steps. ``steps_taken`` counts the noisy steps done.
    """

    phases: tuple[str, ...]
    noise_multiplier: float
    sample_rate: float
    steps_per_epoch: int
    expected_batch_size: int
    max_grad_norm: float
    planned_steps: int
    rng: np.random.Generator
    noise_generator: torch.Generator
    steps_taken: int = 0

    def batches(
        self, split: PreparedSplit, *, window: int | None, device: torch.device, template: bool = False
    ) -> Iterator[Batch]:
        """One epoch: ``steps_per_epoch`` Poisson samples of the split (possibly empty), randomly cropped.

        With ``template`` each batch carries its windows' beat template (``iterate_batches``).
        """
        n, _, length = split.x.shape
        w = length if window is None else window
        for _ in range(self.steps_per_epoch):
            idx = np.flatnonzero(self.rng.random(n) < self.sample_rate)
            st = window_starts(len(idx), length, w, self.rng)
            yield Batch(
                x=torch.from_numpy(crop(split.x, idx, st, w)).to(device),
                observed=torch.from_numpy(crop(split.observed, idx, st, w)).to(device),
                y=torch.from_numpy(split.y[idx]).to(device),
                index=idx,
                start=st,
                template=template_windows(split, idx, st, w, device) if template else None,
            )

    @contextlib.contextmanager
    def optimizer(
        self,
        model: nn.Module,
        params: Sequence[nn.Parameter],
        optimizer: torch.optim.Optimizer,
        *,
        world: int = 1,
    ) -> Iterator[DPOptimizer]:
        """Per-sample gradients for ``params`` and a DP optimizer around ``optimizer``, for one phase.

        Only ``params`` require gradients meanwhile, so per-sample work and hooks stay on the
        phase's modules. Everything Opacus attaches (hooks, ``grad_sample`` and friends) is
        removed afterwards, so the model's names, state and later rounds are as without DP.

        With ``world`` > 1 this process is one rank of a data-parallel group training the silo
        (:mod:`condi_models.distributed`): the model is wrapped in Opacus' DPDDP, which starts
        every rank from rank 0's parameters, and the optimizer is Opacus' DistributedDPOptimizer:
        it sums the ranks' clipped gradients, adds the noise once (on rank 0, from this round's
        noise stream) and, each rank dividing by its 1/world of the expected batch before the
        ranks' mean, divides by the expected size of the global batch, as one process would.
        """
        wanted = {id(p) for p in params}
        saved = [(p, p.requires_grad) for p in model.parameters()]
        for p, _ in saved:
            p.requires_grad_(id(p) in wanted)
        gsm = None
        try:
            with warnings.catch_warnings():
                # Inputs here never require grad, so PyTorch notes that full backward hooks fire on
                # the outputs' gradients, which are exactly what Opacus needs.
                warnings.filterwarnings("ignore", message=".*[Ff]ull backward hook.*")
                module = model if world == 1 else DifferentiallyPrivateDistributedDataParallel(model)
                gsm = GradSampleModule(module, batch_first=True, loss_reduction="mean", strict=True)
                kind = DPOptimizer if world == 1 else DistributedDPOptimizer
                yield kind(
                    optimizer,
                    noise_multiplier=self.noise_multiplier,
                    max_grad_norm=self.max_grad_norm,
                    expected_batch_size=self.expected_batch_size if world == 1 else self.expected_batch_size / world,
                    loss_reduction="mean",
                    generator=self.noise_generator,
                    secure_mode=True,
                )
        finally:
            if gsm is not None:
                gsm.cleanup()
            for module in model.modules():
                for attr in ("activations", "max_batch_len"):
                    if hasattr(module, attr):
                        delattr(module, attr)
            for p, flag in saved:
                if hasattr(p, "summed_grad"):
                    del p.summed_grad
                p.grad = None
                p.requires_grad_(flag)

    def step(self, optimizer: DPOptimizer, batch_len: int) -> None:
        """Clip, noise and apply one step; a parameter without per-sample gradients had zero gradient.

        An empty Poisson sample still takes a noise-only step, as the accounting assumes.
        """
        for p in optimizer.params:
            if getattr(p, "grad_sample", None) is None:
                p.grad_sample = torch.zeros((batch_len, *p.shape), dtype=p.dtype, device=p.device)
        optimizer.step()
        self.steps_taken += 1


class SiloPrivacy:
    """A silo's DP-SGD: its spec, its ledger file, and the rounds it starts and commits.

    ``secret`` (32 bytes, see :func:`load_or_create_secret`) keys the sampling and the noise;
    without it they follow the round seed, which only a simulation should do.
    """

    def __init__(self, spec: PrivacySpec, ledger_path: str | Path, *, secret: bytes | None = None) -> None:
        if secret is not None and len(secret) != _SECRET_BYTES:
            raise ValueError(f"the DP secret must be {_SECRET_BYTES} bytes, got {len(secret)}")
        self.spec = spec
        self.ledger = PrivacyLedger.open(ledger_path)
        self._secret = secret

    def epsilon_spent(self) -> float:
        """Epsilon spent so far, at the spec's delta and accountant."""
        return self.ledger.epsilon(delta=self.spec.delta, accountant=self.spec.accountant)

    def begin_round(
        self,
        *,
        n_samples: int,
        batch_size: int,
        phase_epochs: Mapping[str, int],
        seed: int,
        device: torch.device,
    ) -> PrivateRound:
        """Check the budget and set up one round; raises BudgetExhausted before anything trains.

        ``phase_epochs`` gives each phase's epochs this round (0 for a phase without work); the
        private ones among them are accounted.
        """
        spec = self.spec
        phases = tuple(p for p in spec.phases if phase_epochs.get(p, 0) > 0)
        sample_rate = min(1.0, batch_size / n_samples) if n_samples > 0 else 1.0
        steps_per_epoch = math.ceil(n_samples / batch_size) if n_samples > 0 else 0
        # The mean of a Poisson batch: what DP-SGD divides the noisy sum by.
        expected_batch = max(1, min(batch_size, n_samples))
        steps = sum(phase_epochs[p] for p in phases) * steps_per_epoch
        rng, noise = self._streams(seed, device)
        if steps == 0:
            return PrivateRound(
                phases, 0.0, sample_rate, steps_per_epoch, expected_batch, spec.max_grad_norm, 0, rng, noise
            )
        if n_samples * spec.delta >= 1:
            log.warning("privacy.delta %g is not below 1/n for n = %d records; the guarantee is weak", spec.delta,
                        n_samples)
        plan = self._plan(sample_rate, steps)
        history = [*self.ledger.history, (plan.noise_multiplier, sample_rate, steps)]
        after = epsilon_of(history, delta=spec.delta, accountant=spec.accountant)
        if after > spec.target_epsilon:
            raise self._exhausted(f"the next round would bring it to {after:.4g}")
        return PrivateRound(
            phases, plan.noise_multiplier, sample_rate, steps_per_epoch, expected_batch, spec.max_grad_norm, steps,
            rng, noise,
        )

    def commit(self, rnd: PrivateRound) -> float:
        """Record the round's noisy steps in the ledger file; returns epsilon spent so far."""
        if rnd.steps_taken > 0:
            self.ledger.record(rnd.noise_multiplier, rnd.sample_rate, rnd.steps_taken)
            self.ledger.save()
            log.info(
                "DP round recorded: %d steps at noise %.4g, rate %.4g; epsilon spent %.4g of %g (delta %g)",
                rnd.steps_taken, rnd.noise_multiplier, rnd.sample_rate, self.epsilon_spent(), self.spec.target_epsilon,
                self.spec.delta,
            )
        return self.epsilon_spent()

    def _plan(self, sample_rate: float, steps: int) -> NoisePlan:
        spec, ledger = self.spec, self.ledger
        rounds_left = spec.planned_rounds - ledger.rounds
        if rounds_left <= 0:
            raise self._exhausted(f"all {spec.planned_rounds} planned rounds are used")
        wanted = (sample_rate, steps, spec.planned_rounds, spec.target_epsilon, spec.delta, spec.accountant)
        if ledger.plan is not None and ledger.plan.inputs() == wanted:
            return ledger.plan
        if ledger.plan is not None:
            log.warning(
                "privacy plan changed (sample rate, steps per round, planned rounds, target, delta or accountant); "
                "deriving the noise again for the %d remaining rounds, counting what was spent", rounds_left
            )
        try:
            sigma = plan_noise(
                ledger.history, sample_rate=sample_rate, steps=rounds_left * steps,
                target_epsilon=spec.target_epsilon, delta=spec.delta, accountant=spec.accountant,
            )
        except ValueError as err:
            raise self._exhausted(str(err)) from None
        ledger.plan = NoisePlan(sigma, sample_rate, steps, spec.planned_rounds, spec.target_epsilon, spec.delta,
                                spec.accountant)
        log.info("DP noise multiplier %.4g for %d rounds of %d steps at sample rate %.4g (target epsilon %g)",
                 sigma, rounds_left, steps, sample_rate, spec.target_epsilon)
        return ledger.plan

    def _exhausted(self, why: str) -> BudgetExhausted:
        spent = self.epsilon_spent()
        return BudgetExhausted(
            f"privacy budget exhausted ({self.ledger.path}): epsilon {spent:.4g} of {self.spec.target_epsilon:g} "
            f"(delta {self.spec.delta:g}) spent over {self.ledger.rounds} of {self.spec.planned_rounds} planned "
            f"rounds, and {why}; this silo does not train any more rounds",
            spent=spent, target=self.spec.target_epsilon, rounds_done=self.ledger.rounds,
            planned_rounds=self.spec.planned_rounds,
        )

    def _streams(self, seed: int, device: torch.device) -> tuple[np.random.Generator, torch.Generator]:
        """Sampling and noise randomness for a round: from the secret when there is one, else the seed."""
        if self._secret is None:
            entropy = [int(seed), 0x44502D5347]
        else:
            mac = hmac.new(self._secret, b"condi-dp-round" + int(seed).to_bytes(16, "big", signed=True), "sha256")
            entropy = [int.from_bytes(mac.digest(), "big")]
        ss = np.random.SeedSequence(entropy)
        rng = np.random.default_rng(ss.spawn(1)[0])
        noise = torch.Generator(device=device)
        noise.manual_seed(int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)))
        return rng, noise
