"""Replay a run from its journal and check that it gives the global model the run committed.

The global model after round r is a pure function of the initial model (built from the layout,
the model config and the seed), the summed contributions of rounds 0..r (journaled by the store)
and the server optimizer. Replaying that function and comparing each round's state SHA-256 with
the one its row records shows that no round was lost, doubled or applied twice, however often the
coordinator and the silos were killed and restarted; and it lets anyone holding the run
directory check that the exported model came from the recorded sums.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.config import FederationConfig
from coordinator.global_model import GlobalModel
from coordinator.store import CheckpointStore, StoreError


@dataclass(frozen=True)
class ReplayResult:
    """What a replay found: the rounds replayed, and whether every state matched its record."""

    rounds: tuple[int, ...]
    matches: bool
    state_sha256: str
    committed_sha256: str
    problems: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (for reports)."""
        return {
            "rounds": len(self.rounds),
            "each_round_once": list(self.rounds) == list(range(len(self.rounds))),
            "matches": self.matches,
            "state_sha256": self.state_sha256,
            "committed_sha256": self.committed_sha256,
            "problems": list(self.problems),
        }


def replay(cfg: FederationConfig, run_dir: str | Path | None = None) -> ReplayResult:
    """Rebuild the global model of the run in ``run_dir`` (federation.yaml's by default) from its
    journal, round by round; raises :class:`StoreError` when the run has no model yet or a journal
    file is missing or altered."""
    store = CheckpointStore(cfg.run_dir if run_dir is None else run_dir)
    loaded = store.load()
    if loaded is None or loaded[0].model is None:
        raise StoreError(f"{store.progress_path}: no run with a model to replay")
    ckpt = loaded[0]
    assert ckpt.layout is not None
    # The coordinator's own model code, started from the seeded initial weights.
    model = GlobalModel(cfg, ckpt.layout, ckpt.model)
    rows = [*ckpt.rows, *([ckpt.pending_row] if ckpt.pending_row else [])]
    rounds: list[int] = []
    problems: list[str] = []
    replayed: dict[int, str] = {}
    for row in rows:
        if "aggregate" not in row:
            problems.append(f"round {row.get('round')}: no journaled aggregate")
            continue
        rounds.append(int(row["round"]))
        replayed[rounds[-1]] = model.set_state(model.next_state(store.read_aggregate(row["aggregate"])))
        if replayed[rounds[-1]] != row["state_sha256"]:
            problems.append(f"round {row['round']}: the replayed state differs from the recorded one")
    final = model.sha256
    # The committed model is the last round's, or after the last round the one model selection chose.
    allowed = {final}
    if ckpt.best is not None:
        best = int(ckpt.best["round"])
        if replayed.get(best) != ckpt.best["state_sha256"]:
            problems.append(f"round {best}, the best so far: its recorded state is not the replayed one")
        allowed.add(ckpt.best["state_sha256"])
    if ckpt.state_sha256 not in allowed:
        problems.append("the committed global state is neither the last round's replayed state nor the best round's")
    if rounds != list(range(len(rounds))):
        problems.append(f"rounds recorded {rounds}: expected each of 0..{len(rounds) - 1} once, in order")
    return ReplayResult(
        rounds=tuple(rounds),
        matches=not problems,
        state_sha256=final,
        committed_sha256=ckpt.state_sha256,
        problems=tuple(problems),
    )
