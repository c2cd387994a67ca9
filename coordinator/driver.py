"""The coordinator's driver: one thread that moves the round machine and carries out its effects.

:class:`RoundDriver` is mixed into :class:`~coordinator.server.Coordinator`. :meth:`RoundDriver.run`
ticks the machine, averages a round's sum into the next global model outside the lock, records
evaluations, keeps the best validation round, checkpoints, writes ``status.json`` and, at the end,
the report.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
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
from federation.proto_gen.condi.v1 import federation_pb2 as pb
from federation.secure_metrics import MetricsEncodingError, decode_metrics
from federation.statistics import PooledStatistics, StatisticsError

# One logger for all of the coordinator's operations, as operators filter its lines by name.
log = logging.getLogger("coordinator.server")
_DRIVER_PERIOD_S = 0.25


class RoundDriver(CoordinatorState):
    """The driver thread's operations on the coordinator's state."""

    def stop(self) -> None:
        """Ask the driver and any held long polls to finish."""
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()

    def _count(self, effect: Counted) -> list[Any]:
        """Pool the statistics the silos sent before round 0 and fix them for the run."""
        try:
            if effect.total is None:
                pooled = PooledStatistics.pool(list(effect.reports.values()))
            else:
                pooled = PooledStatistics.from_total(
                    self._statistics_layout(),
                    effect.total,
                    len(effect.participants),
                    max_records=self.cfg.max_silo_records,
                )
        except StatisticsError as exc:
            return self._refuse_sum(0, effect.attempt, effect.participants, str(exc))
        with self._cond:
            self.ckpt.statistics = pooled
            self.machine.statistics_recorded(pooled, self.clock())
            self._checkpoint()
            self._cond.notify_all()
        assert self.model is not None
        per_class = dict(zip(self.model.settings.layout.classes, pooled.class_counts, strict=True))
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
        assert self.model is not None
        t0 = self.clock()
        layout = self.model.secure_layout
        clipped_entries: int | None = None  # known in plain mode only
        if effect.total is not None:
            # Only the sum of the masked vectors was ever unmasked: no individual update exists here,
            # so the sum itself must be one that clipped, capped contributions can give.
            assert self.plan.secure is not None
            try:
                layout.check_total(effect.total, len(effect.updates), 2.0**-self.plan.secure.quant.frac_bits)
            except ValueError as exc:
                return self._refuse_sum(effect.round, effect.attempt, tuple(sorted(effect.updates)), str(exc))
            total = effect.total
        else:
            with self._cond:
                total = self._sums.take(effect.round, effect.attempt, tuple(effect.updates))
            clipped = {silo: u.clipped for silo, u in effect.updates.items() if u.clipped}
            if clipped:
                log.warning("round %d: update entries clipped to +-%g: %s", effect.round, layout.clip_bound, clipped)
            clipped_entries = sum(clipped.values())
        new_state = self.model.next_state(total)
        aggregation_s = self.clock() - t0
        # In secure mode silos download and train in the ADVERTISE_KEYS task.
        train_stage = pb.STAGE_TRAIN if effect.total is None else pb.STAGE_ADVERTISE_KEYS
        name, sha = self.store.save_state(effect.round, new_state, self.model.optimizer.state())
        # The round's sum, journaled: with the initial model the run can be replayed and checked.
        aggregate = self.store.save_aggregate(effect.round, total)
        record = TrainRecord(
            attempt=effect.attempt,
            selected=effect.selected,
            uploads=effect.updates,
            download_bytes=dict(self._downloads.get((effect.round, effect.attempt, train_stage), {})),
            state_bytes=self.model.state_bytes,
            stage_s=effect.stage_s,
            aggregation_s=aggregation_s,
        )
        with self._cond:
            self.model.set_state(new_state)
            self.machine.aggregated(sha, self.clock())
            self.ckpt.state_file, self.ckpt.state_sha256 = name, sha
            self.ckpt.pending_row = train_summary(effect.round, record)
            self.ckpt.pending_row["aggregation"] = "plain" if effect.total is None else "secure"
            self.ckpt.pending_row["aggregate"] = aggregate
            self.ckpt.pending_row["state_sha256"] = sha
            if effect.total is not None:
                names = self.model.group_names
                if "all" in names:
                    # The summed weights are the only sample count the coordinator learns.
                    summed = float(effect.total[names.index("all") - len(names)])
                    self.ckpt.pending_row["samples"] = round(summed * layout.weight_unit)
            if clipped_entries is not None:
                self.ckpt.pending_row["clipped"] = clipped_entries
            self._checkpoint()
            self._cond.notify_all()
        log.info(
            "round %d aggregated from %s (%d samples) in %.3f s",
            effect.round,
            ", ".join(sorted(effect.updates)),
            self.ckpt.pending_row["samples"],
            aggregation_s,
        )
        return []

    def _refuse_sum(self, round_index: int, attempt: int, silos: tuple[str, ...], reason: str) -> list[Any]:
        """What an attempt produced (summed statistics, updates or scores) cannot be used: fail the
        attempt (it is retried, or the run fails), naming who took part."""
        message = f"the sum of {', '.join(silos)} was refused: {reason}"
        log.error(
            "round %d attempt %d: %s",
            round_index,
            attempt,
            message,
            extra={"event": {"event": "sum_refused", "round": round_index, "silos": list(silos)}},
        )
        with self._cond:
            effects = self.machine.refuse_result(message, self.clock())
            self._persist(effects)
            self._cond.notify_all()
        return [e for e in effects if isinstance(e, Failed)]

    def _record(self, effect: Evaluated) -> list[Any]:
        summary = self.ckpt.pending_row or {"round": effect.round}
        stage = pb.STAGE_EVALUATE if effect.total is None else pb.STAGE_ADVERTISE_KEYS
        with self._cond:
            eval_bytes = dict(self._downloads.get((effect.round, effect.attempt, stage), {}))
            layout = self.machine.metrics_layout(effect.round)
        pooled = None
        if effect.total is not None:
            try:
                pooled = decode_metrics(
                    layout, effect.total, len(effect.participants), max_n=self.cfg.max_silo_records
                )
            except MetricsEncodingError as exc:
                return self._refuse_sum(effect.round, effect.attempt, effect.participants, str(exc))
        secure_sum = None if pooled is None else (effect.participants, pooled)
        row = round_row(summary, effect.attempt, effect.stage_s, effect.reports, eval_bytes, secure_sum=secure_sum)
        with self._cond:
            if self.machine.final:
                return self._record_final(row)
            self.ckpt.rows.append(row)
            self.ckpt.pending_row = None
            if self.plan.final_test:
                self._track_best(row)
                if effect.round == self.plan.rounds - 1:
                    self._select_best()
            effects = self.machine.next_round(self.clock())
            self._checkpoint()
            self._downloads = {k: v for k, v in self._downloads.items() if k[0] > effect.round}
            self._cond.notify_all()
        val = row.get("val")
        log.info(
            "round %d of %d done: val accuracy %s from %d silos",
            effect.round + 1,
            self.plan.rounds,
            "n/a" if val is None else f"{val['accuracy']:.3f}",
            len(row["evaluated_by"]),
            extra={"event": {"event": "round_done", "round": effect.round, "val": val}},
        )
        return effects

    def _track_best(self, row: Mapping[str, Any]) -> None:
        """Remember the round whose model has the best pooled validation macro AUROC (lock held)."""
        auroc = (row.get("val") or {}).get("macro_auroc")
        best = self.ckpt.best
        if auroc is None or (best is not None and auroc <= best["macro_auroc"]):
            return
        assert self.ckpt.state_file is not None
        self.ckpt.best = {
            "round": row["round"],
            "macro_auroc": float(auroc),
            "state_file": self.ckpt.state_file,
            "state_sha256": self.ckpt.state_sha256,
        }

    def _select_best(self) -> None:
        """After the last round: serve the best round's model (the last if no round had an AUROC) for
        the final test, and make it the checkpoint's state, so a restart tests and exports it too."""
        best = self.ckpt.best
        if best is not None and best["state_sha256"] != self.ckpt.state_sha256:
            tensors, _ = split_saved_state(self.store.read_state(best["state_file"], best["state_sha256"]))
            assert self.model is not None
            self.model.set_state(tensors)
            self.ckpt.state_file, self.ckpt.state_sha256 = best["state_file"], best["state_sha256"]
        self.machine.select_state(self.ckpt.state_sha256)
        log.info(
            "model selection: round %s's model (validation macro AUROC %s) is tested and exported",
            "the last" if best is None else best["round"] + 1,
            "n/a" if best is None else f"{best['macro_auroc']:.3f}",
            extra={"event": {"event": "model_selected", "round": None if best is None else best["round"]}},
        )

    def _record_final(self, row: dict[str, Any]) -> list[Any]:
        """Record the final test of the selected model and end the run (lock held)."""
        best = self.ckpt.best
        self.ckpt.final = {
            "selected_round": self.plan.rounds - 1 if best is None else best["round"],
            "val_macro_auroc": None if best is None else best["macro_auroc"],
            **row,
        }
        effects = self.machine.next_round(self.clock())
        self._checkpoint()
        self._cond.notify_all()
        test = row.get("test")
        log.info(
            "final test of round %d's model: accuracy %s, macro AUROC %s from %d silos",
            self.ckpt.final["selected_round"] + 1,
            "n/a" if test is None else f"{test['accuracy']:.3f}",
            "n/a" if test is None or test.get("macro_auroc") is None else f"{test['macro_auroc']:.3f}",
            len(row["evaluated_by"]),
            extra={"event": {"event": "final_test", "test": test}},
        )
        return effects

    def _write_status(self, now: float) -> None:
        status = {
            "federation": self.cfg.name,
            "run_id": self.ckpt.run_id,
            "outcome": None if self.outcome is None else self.outcome[0],
            "rounds_recorded": len(self.ckpt.rows),
            **self.machine.status(now),
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
        status.pop("remaining_s", None)
        text = json.dumps(status, sort_keys=True)
        if text != self._status_text:
            self._status_text = text
            atomic_write_bytes(self.run_dir / "status.json", (text + "\n").encode("utf-8"))

    def _persist(self, effects: list[Any]) -> None:
        """Carry out the bookkeeping effects (lock held): checkpoint a new attempt, log a retry."""
        for effect in effects:
            if isinstance(effect, Persist):
                self._checkpoint()
            elif isinstance(effect, Retry):
                log.warning("retrying round %d: %s", effect.round, effect.message)

    def run(self) -> int:
        """Drive the run to its end and write the report; 0 when every round completed, else 1."""
        finished = self.machine.phase == Phase.DONE
        while not finished and not self._stopping.is_set():
            with self._cond:
                now = self.clock()
                before = (self.machine.round, self.machine.attempt, self.machine.phase)
                effects = self.machine.tick(now)
                self._persist(effects)
                if (self.machine.round, self.machine.attempt, self.machine.phase) != before:
                    # Silos holding a GetTask long poll learn their new task now, not when the poll ends.
                    self._cond.notify_all()
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
                    log.error("run %s failed: %s", self.ckpt.run_id, effect.message)
                    self.outcome = ("failed", effect.message)
                    finished = True
                elif isinstance(effect, Finished):
                    self.outcome = ("complete", f"all {effect.rounds} rounds completed")
                    finished = True
            if not finished:
                with self._cond:
                    self._cond.wait(_DRIVER_PERIOD_S)
        if self._stopping.is_set() and self.outcome is None:
            log.warning("stopped before the run ended; the checkpoint resumes it")
            return 1
        if self.outcome is None:
            self.outcome = (
                "complete",
                f"all {self.plan.rounds} rounds completed (already before this start)",
            )
        path = self._final_report()
        log.info("run %s %s: %s; report %s", self.ckpt.run_id, self.outcome[0], self.outcome[1], path)
        self._tell_silos_done()
        return 0 if self.outcome[0] == "complete" else 1

    def _final_report(self) -> Path:
        assert self.outcome is not None
        model = None
        normalizer = None
        with self._cond:
            self._write_status(self.clock())
            if self.model is not None:
                model = self.model.loaded_model()
                if self.ckpt.statistics is not None:
                    normalizer = self.ckpt.statistics.normalizer
            rows = list(self.ckpt.rows)
            departed = self.machine.departed()
            final = self.ckpt.final
        return write_report(
            self.run_dir,
            federation=self.cfg.name,
            run_id=self.ckpt.run_id,
            status=self.outcome[0],
            message=self.outcome[1],
            rows=rows,
            model=model,
            normalizer=normalizer,
            layout=self.ckpt.layout,
            departed=departed,
            aggregation=self._aggregation_summary(),
            final=final,
        )

    def _aggregation_summary(self) -> dict[str, Any]:
        """How the run combined what silos sent, in words for the report's reader."""
        if self.plan.secure is None:
            return {"mode": "plain", "secure_metrics": False, "note": "the coordinator saw every silo's update"}
        learnt = "updates and evaluation scores" if self.machine.secure_metrics else "updates"
        return {
            "mode": "secure",
            "secure_metrics": self.machine.secure_metrics,
            "note": f"the coordinator learnt only sums of the silos' {learnt}",
        }

    def _tell_silos_done(self) -> None:
        """Keep answering until every connected silo has learnt the run is over, or the grace ends."""
        end = self.clock() + self.cfg.timeouts.done_grace_s
        with self._cond:
            while not self._stopping.is_set():
                now = self.clock()
                waiting = set(self.machine.alive(now)) - set(self.machine.told_done())
                if not waiting or now >= end:
                    break
                self._cond.wait(min(_DRIVER_PERIOD_S, end - now))
