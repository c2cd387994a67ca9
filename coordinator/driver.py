"""The coordinator's driver: one thread that moves the round machine and carries out its effects.

:class:`RoundDriver` is the part of the :class:`~coordinator.server.Coordinator` that makes every
transition, on the state it shares with the other parts (:class:`~coordinator.state.CoordinatorState`).
:meth:`RoundDriver.run` ticks the machine, averages a round's sum into the next global model
outside the lock, records evaluations, keeps the best validation round, checkpoints, writes
``status.json`` and, at the end, the report.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from condi_models.checkpoint import atomic_write_bytes
from coordinator.report import TrainRecord, round_row, train_summary, write_report
from coordinator.rounds import (
    Aggregate,
    Counted,
    Evaluated,
    Failed,
    Finished,
    Persist,
    Phase,
    Retry,
)
from coordinator.state import CoordinatorState
from coordinator.store import split_saved_state
from federation.secure_metrics import MetricsEncodingError, decode_metrics
from federation.stages import Stage
from federation.statistics import PooledStatistics, StatisticsError

# One logger for all of the coordinator's operations, as operators filter its lines by name.
log = logging.getLogger("coordinator.server")
_DRIVER_PERIOD_S = 0.25


class RoundDriver:
    """The driver thread's operations on the coordinator's state."""

    def __init__(self, state: CoordinatorState) -> None:
        self.state = state
        # What status.json and the progress log line last said, so each is written only on change.
        self._status_text = ""
        self._progress_line = ""
        # How the run ended: ("complete" | "failed", message).
        self.outcome: tuple[str, str] | None = None

    def _count(self, effect: Counted) -> list[Any]:
        """Pool the statistics the silos sent before round 0 and fix them for the run."""
        state = self.state
        assert state.model is not None
        try:
            if effect.total is None:
                pooled = PooledStatistics.pool(list(effect.reports.values()))
            else:
                pooled = PooledStatistics.from_total(
                    state.model.statistics_layout,
                    effect.total,
                    len(effect.participants),
                    max_records=state.cfg.max_silo_records,
                )
        except StatisticsError as exc:
            return self._refuse_sum(0, effect.attempt, effect.participants, str(exc))
        with state.cond:
            state.ckpt.statistics = pooled
            state.machine.statistics_recorded(pooled, state.clock())
            state.checkpoint()
            state.cond.notify_all()
        per_class = dict(zip(state.model.settings.layout.classes, pooled.class_counts, strict=True))
        log.info(
            "data statistics pooled from %d silos (%s): %d training records, per class %s",
            pooled.silos,
            "secure sum" if effect.total is not None else ", ".join(effect.participants),
            sum(pooled.class_counts),
            per_class,
            extra={"event": {"event": "statistics_pooled", "silos": pooled.silos, "class_counts": per_class}},
        )
        return []

    def _aggregate(self, effect: Aggregate) -> list[Any]:
        state = self.state
        assert state.model is not None
        t0 = state.clock()
        layout = state.model.secure_layout
        clipped_entries: int | None = None  # known in plain mode only
        if effect.total is not None:
            # Only the sum of the masked vectors was ever unmasked: no individual update exists here,
            # so the sum itself must be one that clipped, capped contributions can give.
            assert state.plan.secure is not None
            try:
                layout.check_total(effect.total, len(effect.updates), 2.0**-state.plan.secure.quant.frac_bits)
            except ValueError as exc:
                return self._refuse_sum(effect.round, effect.attempt, tuple(sorted(effect.updates)), str(exc))
            total = effect.total
        else:
            with state.cond:
                total = state.sums.take(effect.round, effect.attempt, tuple(effect.updates))
            clipped = {silo: u.clipped for silo, u in effect.updates.items() if u.clipped}
            if clipped:
                log.warning("round %d: update entries clipped to +-%g: %s", effect.round, layout.clip_bound, clipped)
            clipped_entries = sum(clipped.values())
        new_state = state.model.next_state(total)
        aggregation_s = state.clock() - t0
        # In secure mode silos download and train in the ADVERTISE_KEYS task.
        train_stage = Stage.TRAIN if effect.total is None else Stage.ADVERTISE_KEYS
        name, sha = state.store.save_state(effect.round, new_state, state.model.optimizer.state())
        # The round's sum, journaled: with the initial model the run can be replayed and checked.
        aggregate = state.store.save_aggregate(effect.round, total)
        record = TrainRecord(
            attempt=effect.attempt,
            selected=effect.selected,
            uploads=effect.updates,
            download_bytes=dict(state.downloads.get((effect.round, effect.attempt, train_stage), {})),
            state_bytes=state.model.state_bytes,
            stage_s=effect.stage_s,
            aggregation_s=aggregation_s,
        )
        with state.cond:
            state.model.set_state(new_state)
            state.machine.aggregated(sha, state.clock())
            state.ckpt.state_file, state.ckpt.state_sha256 = name, sha
            state.ckpt.pending_row = train_summary(effect.round, record)
            state.ckpt.pending_row["aggregation"] = "plain" if effect.total is None else "secure"
            state.ckpt.pending_row["aggregate"] = aggregate
            state.ckpt.pending_row["state_sha256"] = sha
            if effect.total is not None:
                names = state.model.group_names
                if "all" in names:
                    # The summed weights are the only sample count the coordinator learns.
                    summed = float(effect.total[names.index("all") - len(names)])
                    state.ckpt.pending_row["samples"] = round(summed * layout.weight_unit)
            if clipped_entries is not None:
                state.ckpt.pending_row["clipped"] = clipped_entries
            state.checkpoint()
            state.cond.notify_all()
        log.info(
            "round %d aggregated from %s (%d samples) in %.3f s",
            effect.round,
            ", ".join(sorted(effect.updates)),
            state.ckpt.pending_row["samples"],
            aggregation_s,
        )
        return []

    def _refuse_sum(self, round_index: int, attempt: int, silos: tuple[str, ...], reason: str) -> list[Any]:
        """What an attempt produced (summed statistics, updates or scores) cannot be used: fail the
        attempt (it is retried, or the run fails), naming who took part."""
        state = self.state
        message = f"the sum of {', '.join(silos)} was refused: {reason}"
        log.error(
            "round %d attempt %d: %s",
            round_index,
            attempt,
            message,
            extra={"event": {"event": "sum_refused", "round": round_index, "silos": list(silos)}},
        )
        with state.cond:
            effects = state.machine.refuse_result(message, state.clock())
            self._persist(effects)
            state.cond.notify_all()
        return [e for e in effects if isinstance(e, Failed)]

    def _record(self, effect: Evaluated) -> list[Any]:
        state = self.state
        summary = state.ckpt.pending_row or {"round": effect.round}
        stage = Stage.EVALUATE if effect.total is None else Stage.ADVERTISE_KEYS
        with state.cond:
            eval_bytes = dict(state.downloads.get((effect.round, effect.attempt, stage), {}))
            layout = state.machine.metrics_layout(effect.round)
        pooled = None
        if effect.total is not None:
            try:
                pooled = decode_metrics(
                    layout, effect.total, len(effect.participants), max_n=state.cfg.max_silo_records
                )
            except MetricsEncodingError as exc:
                return self._refuse_sum(effect.round, effect.attempt, effect.participants, str(exc))
        secure_sum = None if pooled is None else (effect.participants, pooled)
        row = round_row(summary, effect.attempt, effect.stage_s, effect.reports, eval_bytes, secure_sum=secure_sum)
        with state.cond:
            if state.machine.final:
                return self._record_final(row)
            state.ckpt.rows.append(row)
            state.ckpt.pending_row = None
            if state.plan.final_test:
                self._track_best(row)
                if effect.round == state.plan.rounds - 1:
                    self._select_best()
            effects = state.machine.next_round(state.clock())
            state.checkpoint()
            state.downloads = {k: v for k, v in state.downloads.items() if k[0] > effect.round}
            state.cond.notify_all()
        val = row.get("val")
        log.info(
            "round %d of %d done: val accuracy %s from %d silos",
            effect.round + 1,
            state.plan.rounds,
            "n/a" if val is None else f"{val['accuracy']:.3f}",
            len(row["evaluated_by"]),
            extra={"event": {"event": "round_done", "round": effect.round, "val": val}},
        )
        return effects

    def _track_best(self, row: Mapping[str, Any]) -> None:
        """Remember the round whose model has the best pooled validation macro AUROC (lock held)."""
        state = self.state
        auroc = (row.get("val") or {}).get("macro_auroc")
        best = state.ckpt.best
        if auroc is None or (best is not None and auroc <= best["macro_auroc"]):
            return
        assert state.ckpt.state_file is not None
        state.ckpt.best = {
            "round": row["round"],
            "macro_auroc": float(auroc),
            "state_file": state.ckpt.state_file,
            "state_sha256": state.ckpt.state_sha256,
        }

    def _select_best(self) -> None:
        """After the last round: serve the best round's model (the last if no round had an AUROC) for
        the final test, and make it the checkpoint's state, so a restart tests and exports it too."""
        state = self.state
        best = state.ckpt.best
        if best is not None and best["state_sha256"] != state.ckpt.state_sha256:
            tensors, _ = split_saved_state(state.store.read_state(best["state_file"], best["state_sha256"]))
            assert state.model is not None
            state.model.set_state(tensors)
            state.ckpt.state_file, state.ckpt.state_sha256 = best["state_file"], best["state_sha256"]
        state.machine.select_state(state.ckpt.state_sha256)
        log.info(
            "model selection: round %s's model (validation macro AUROC %s) is tested and exported",
            "the last" if best is None else best["round"] + 1,
            "n/a" if best is None else f"{best['macro_auroc']:.3f}",
            extra={"event": {"event": "model_selected", "round": None if best is None else best["round"]}},
        )

    def _record_final(self, row: dict[str, Any]) -> list[Any]:
        """Record the final test of the selected model and end the run (lock held)."""
        state = self.state
        best = state.ckpt.best
        state.ckpt.final = {
            "selected_round": state.plan.rounds - 1 if best is None else best["round"],
            "val_macro_auroc": None if best is None else best["macro_auroc"],
            **row,
        }
        effects = state.machine.next_round(state.clock())
        state.checkpoint()
        state.cond.notify_all()
        test = row.get("test")
        log.info(
            "final test of round %d's model: accuracy %s, macro AUROC %s from %d silos",
            state.ckpt.final["selected_round"] + 1,
            "n/a" if test is None else f"{test['accuracy']:.3f}",
            "n/a" if test is None or test.get("macro_auroc") is None else f"{test['macro_auroc']:.3f}",
            len(row["evaluated_by"]),
            extra={"event": {"event": "final_test", "test": test}},
        )
        return effects

    def _write_status(self, now: float) -> None:
        state = self.state
        status = {
            "federation": state.cfg.name,
            "run_id": state.ckpt.run_id,
            "outcome": None if self.outcome is None else self.outcome[0],
            "rounds_recorded": len(state.ckpt.rows),
            **state.machine.status(now),
        }
        key_fields = {k: status[k] for k in ("round", "attempt", "phase", "pending", "members", "done", "outcome")}
        line = json.dumps(key_fields, sort_keys=True)
        if line != self._progress_line:
            self._progress_line = line
            members = status["members"]
            # The statistics stage runs in round 0's slot and the final test after the last round.
            what = {"statistics": "data statistics", "final": "final test"}.get(
                status["pending"], f"round {min(status['round'] + 1, status['rounds'])}/{status['rounds']}"
            )
            log.info(
                "progress: %s %s attempt %d: %d/%d done%s",
                what,
                status["phase"],
                max(status["attempt"], 0),
                len(status["done"]),
                len(members),
                f" (done: {', '.join(status['done']) or 'none'}; of {', '.join(members)})" if members else "",
                extra={"event": {"event": "progress", **key_fields}},
            )
        # The stage's deadline as a wall-clock time, whole seconds, so the file changes with the stage
        # and not with every tick of the countdown.
        # Each silo's last call likewise, to 10 s: enough to tell a silo gone quiet.
        wall = time.time()
        status["last_contact"] = {
            silo: datetime.fromtimestamp(10 * round((wall - ago) / 10), UTC).isoformat(timespec="seconds")
            for silo, ago in status.pop("seen_ago_s").items()
        }
        remaining = status.pop("remaining_s", None)
        status["deadline"] = (
            None if remaining is None
            else datetime.fromtimestamp(round(wall + remaining), UTC).isoformat(timespec="seconds")
        )
        text = json.dumps(status, sort_keys=True)
        if text != self._status_text:
            self._status_text = text
            atomic_write_bytes(state.run_dir / "status.json", (text + "\n").encode("utf-8"))

    def _persist(self, effects: list[Any]) -> None:
        """Carry out the bookkeeping effects (lock held): checkpoint a new attempt, log a retry."""
        for effect in effects:
            if isinstance(effect, Persist):
                self.state.checkpoint()
            elif isinstance(effect, Retry):
                log.warning("retrying round %d: %s", effect.round, effect.message)

    def run(self) -> int:
        """Drive the run to its end and write the report; 0 when every round completed, else 1."""
        state = self.state
        finished = state.machine.phase == Phase.DONE
        while not finished and not state.stopping.is_set():
            with state.cond:
                now = state.clock()
                before = (state.machine.round, state.machine.attempt, state.machine.phase)
                effects = state.machine.tick(now)
                self._persist(effects)
                if (state.machine.round, state.machine.attempt, state.machine.phase) != before:
                    # Silos holding a GetTask long poll learn their new task now, not when the poll ends.
                    state.cond.notify_all()
                self._write_status(now)
            queue = [e for e in effects if not isinstance(e, Persist | Retry)]
            while queue:
                effect = queue.pop(0)
                if isinstance(effect, Counted):
                    queue.extend(self._count(effect))
                elif isinstance(effect, Aggregate):
                    queue.extend(self._aggregate(effect))
                elif isinstance(effect, Evaluated):
                    queue.extend(self._record(effect))
                elif isinstance(effect, Failed):
                    log.error("run %s failed: %s", state.ckpt.run_id, effect.message)
                    self.outcome = ("failed", effect.message)
                    finished = True
                elif isinstance(effect, Finished):
                    self.outcome = ("complete", f"all {effect.rounds} rounds completed")
                    finished = True
            if not finished:
                with state.cond:
                    state.cond.wait(_DRIVER_PERIOD_S)
        if state.stopping.is_set() and self.outcome is None:
            log.warning("stopped before the run ended; the checkpoint resumes it")
            return 1
        if self.outcome is None:
            self.outcome = (
                "complete",
                f"all {state.plan.rounds} rounds completed (already before this start)",
            )
        path = self._final_report()
        log.info("run %s %s: %s; report %s", state.ckpt.run_id, self.outcome[0], self.outcome[1], path)
        self._tell_silos_done()
        return 0 if self.outcome[0] == "complete" else 1

    def _final_report(self) -> Path:
        state = self.state
        assert self.outcome is not None
        model = None
        normalizer = None
        with state.cond:
            self._write_status(state.clock())
            if state.model is not None:
                model = state.model.loaded_model()
                if state.ckpt.statistics is not None:
                    normalizer = state.ckpt.statistics.normalizer
            rows = list(state.ckpt.rows)
            departed = state.machine.departed()
            final = state.ckpt.final
        return write_report(
            state.run_dir,
            federation=state.cfg.name,
            run_id=state.ckpt.run_id,
            status=self.outcome[0],
            message=self.outcome[1],
            rows=rows,
            model=model,
            normalizer=normalizer,
            layout=state.ckpt.layout,
            departed=departed,
            aggregation=self._aggregation_summary(),
            final=final,
        )

    def _aggregation_summary(self) -> dict[str, Any]:
        """How the run combined what silos sent, in words for the report's reader."""
        state = self.state
        if state.plan.secure is None:
            return {"mode": "plain", "secure_metrics": False, "note": "the coordinator saw every silo's update"}
        learnt = "updates and evaluation scores" if state.machine.secure_metrics else "updates"
        return {
            "mode": "secure",
            "secure_metrics": state.machine.secure_metrics,
            "note": f"the coordinator learnt only sums of the silos' {learnt}",
        }

    def _tell_silos_done(self) -> None:
        """Keep answering until every connected silo has learnt the run is over, or the grace ends."""
        state = self.state
        end = state.clock() + state.cfg.timeouts.done_grace_s
        with state.cond:
            while not state.stopping.is_set():
                now = state.clock()
                waiting = set(state.machine.alive(now)) - set(state.machine.told_done())
                if not waiting or now >= end:
                    break
                state.cond.wait(min(_DRIVER_PERIOD_S, end - now))
