"""The coordinator's round state machine, driven by hand with an explicit clock (no sockets, no tensors)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.rounds import (
    Aggregate,
    Evaluated,
    Failed,
    Finished,
    Persist,
    Phase,
    ProtocolError,
    Retry,
    RoundMachine,
    RoundPlan,
    RoundProgress,
)
from federation.proto_gen.condi.v1 import federation_pb2 as pb
from federation.stages import Stage, StageKey

SILOS = ("silo-1", "silo-2", "silo-3", "silo-4")
RUN = "run-a"
SHA0 = "0" * 64
SHA1 = "1" * 64


def _plan(**kw) -> RoundPlan:
    base = dict(
        allowed=SILOS,
        rounds=2,
        silos_per_round=3,
        min_silos=2,
        max_attempts=3,
        seed=7,
        gather_s=30.0,
        train_s=100.0,
        evaluate_s=50.0,
        liveness_s=10.0,
    )
    base.update(kw)
    return RoundPlan(**base)


def _machine(plan: RoundPlan | None = None) -> RoundMachine:
    plan = plan or _plan()
    return RoundMachine(plan, RUN, RoundProgress.start(plan.seed, statistics=False), SHA0, 0.0)


def _join_all(m: RoundMachine, now: float = 0.0, silos=SILOS) -> None:
    for s in silos:
        m.join(s, now)


def _upload(m: RoundMachine, silo: str, digest: str = "d", now: float = 1.0) -> bool:
    key = m.task_for(silo, now).key
    return m.accept_update(silo, key, SHA0, digest + silo, {"from": silo})


def _members(m: RoundMachine, now: float) -> list[str]:
    return [s for s in m.joined() if m.task_for(s, now).key.stage in (pb.STAGE_TRAIN, pb.STAGE_EVALUATE)]


def test_first_gather_waits_for_every_allowed_silo_then_selects_with_the_seed() -> None:
    m = _machine()
    _join_all(m, silos=SILOS[:3])
    assert m.tick(1.0) == []
    assert m.phase == Phase.GATHER
    assert m.task_for("silo-1", 1.0).key.stage == pb.STAGE_WAIT
    m.join("silo-4", 2.0)
    effects = m.tick(2.0)
    assert [type(e) for e in effects] == [Persist]
    assert m.phase == Phase.TRAIN and m.attempt == 0
    selected = _members(m, 2.0)
    assert len(selected) == 3
    task = m.task_for(selected[0], 2.0)
    assert task.key == StageKey(RUN, 0, 0, pb.STAGE_TRAIN)
    assert task.state_sha256 == SHA0 and task.selected == tuple(selected)
    assert task.settings.train_seed is not None
    left_out = next(s for s in SILOS if s not in selected)
    assert m.task_for(left_out, 2.0).key.stage == pb.STAGE_WAIT
    # The same seed and the same joins select the same silos.
    again = _machine()
    _join_all(again)
    again.tick(0.0)
    assert _members(again, 0.0) == selected


def test_training_tasks_carry_the_rounds_learning_rate_factor() -> None:
    m = _machine(_plan(lr_scales=(1.0, 0.5)))
    _join_all(m)
    m.tick(0.0)
    selected = _members(m, 0.0)
    assert m.task_for(selected[0], 0.0).settings.lr_scale == 1.0
    for s in selected:
        _upload(m, s)
    m.tick(1.0)
    m.aggregated(SHA1, 2.0)
    m.tick(2.0)
    for s in SILOS:
        m.accept_metrics(s, m.task_for(s, 3.0).key, "m" + s, {"s": s})
    m.tick(3.0)
    m.next_round(4.0)
    m.tick(4.0)
    assert m.round == 1 and m.task_for(_members(m, 4.0)[0], 4.0).settings.lr_scale == 0.5
    assert _plan().lr_scale(7) == 1.0  # no schedule: the full rate


def test_selection_rng_resumes_from_the_checkpointed_state() -> None:
    plan = _plan(rounds=5, silos_per_round=2, min_silos=1)
    straight = _machine(plan)
    _join_all(straight)
    straight.tick(0.0)
    first = _members(straight, 0.0)
    saved = straight.progress()
    resumed = RoundMachine(plan, RUN, saved, SHA0, 0.0)
    _join_all(resumed)
    resumed.tick(0.0)
    following_attempt = _members(resumed, 0.0)
    # The resumed machine draws a new attempt from where the RNG stood: the draw after ``first``.
    assert resumed.attempt == saved.attempt + 1
    reference = _machine(plan)
    _join_all(reference)
    reference.tick(0.0)
    assert _members(reference, 0.0) == first
    for s in first:
        _upload(reference, s)
    effects = reference.tick(1.0)
    assert isinstance(effects[0], Aggregate)
    reference.aggregated(SHA1, 1.0)
    reference.tick(1.0)
    for s in reference.joined():
        reference.accept_metrics(s, reference.task_for(s, 1.0).key, "m", {})
    reference.tick(1.0)
    reference.next_round(1.0)
    reference.tick(1.0)
    assert _members(reference, 1.0) == following_attempt


def test_all_updates_in_ends_the_stage_and_the_round_goes_on_to_evaluation() -> None:
    m = _machine()
    _join_all(m)
    m.tick(0.0)
    selected = _members(m, 0.0)
    for s in selected[:-1]:
        assert _upload(m, s) is False
        assert m.tick(1.0) == []
        assert m.task_for(s, 1.0).key.stage == pb.STAGE_WAIT
    _upload(m, selected[-1])
    (agg,) = m.tick(2.0)
    assert isinstance(agg, Aggregate)
    assert agg.round == 0 and agg.attempt == 0 and sorted(agg.updates) == selected
    assert agg.updates[selected[0]] == {"from": selected[0]}
    assert m.phase == Phase.AGGREGATE
    assert m.task_for(selected[0], 2.0).key.stage == pb.STAGE_WAIT
    m.aggregated(SHA1, 3.0)
    assert m.progress().pending == "evaluate"
    assert [type(e) for e in m.tick(3.0)] == [Persist]
    task = m.task_for("silo-4", 3.0)
    assert task.key == StageKey(RUN, 0, 1, pb.STAGE_EVALUATE)
    assert task.state_sha256 == SHA1
    assert task.settings.eval_splits == ("val",) and task.settings.eval_seed is not None
    for s in SILOS:
        m.accept_metrics(s, m.task_for(s, 4.0).key, "m" + s, {"s": s})
    (ev,) = m.tick(4.0)
    assert isinstance(ev, Evaluated) and sorted(ev.reports) == list(SILOS)
    assert m.next_round(5.0) == []
    assert m.round == 1 and m.attempt == -1 and m.progress().pending == "train"


def test_deadline_with_the_minimum_aggregates_the_silos_that_delivered() -> None:
    m = _machine()
    _join_all(m)
    m.tick(0.0)
    selected = _members(m, 0.0)
    for s in selected[:2]:
        _upload(m, s)
    # The third keeps sending signs of life, so only the deadline ends the stage.
    for t in (20.0, 40.0, 60.0, 80.0, 99.0):
        m.seen(selected[2], t)
        assert m.tick(t) == []
    m.seen(selected[2], 100.0)
    (agg,) = m.tick(100.0)
    assert isinstance(agg, Aggregate) and sorted(agg.updates) == selected[:2]


def test_a_silent_silo_ends_the_stage_early_when_the_minimum_holds() -> None:
    m = _machine()
    _join_all(m)
    m.tick(0.0)
    selected = _members(m, 0.0)
    for s in selected[:2]:
        _upload(m, s, now=5.0)
        m.seen(s, 5.0)
    assert m.tick(9.0) == []
    (agg,) = m.tick(10.5)  # selected[2] last heard of at 0.0, liveness 10 s
    assert isinstance(agg, Aggregate) and sorted(agg.updates) == selected[:2]


def test_too_few_updates_retry_the_round_with_a_new_attempt_and_selection() -> None:
    plan = _plan(min_silos=3)
    m = _machine(plan)
    _join_all(m)
    m.tick(0.0)
    selected = _members(m, 0.0)
    old_key = m.task_for(selected[0], 0.0).key
    _upload(m, selected[0])
    _upload(m, selected[1])
    for s in SILOS:
        if s != selected[2]:
            m.seen(s, 10.5)
    effects = m.tick(10.5)
    assert [type(e) for e in effects] == [Retry, Persist]
    assert "2 of the 3 required" in effects[0].message and selected[2] in effects[0].message
    assert m.failures == 1
    effects = m.tick(10.6)
    assert [type(e) for e in effects] == [Persist]
    assert m.attempt == 1 and m.phase == Phase.TRAIN
    retried = _members(m, 10.6)
    assert selected[2] not in retried and len(retried) == 3
    # The old attempt is over: a new upload for it is a stale request, a retried one a duplicate.
    with pytest.raises(ProtocolError) as err:
        m.accept_update(selected[2], old_key, SHA0, "x", {})
    assert err.value.code == "failed_precondition" and "stale or replayed" in err.value.message
    assert m.accept_update(selected[0], old_key, SHA0, "d" + selected[0], {}) is True
    with pytest.raises(ProtocolError) as err:
        m.accept_update(selected[0], old_key, SHA0, "x", {})
    assert err.value.code == "already_exists"


def test_the_run_fails_fast_after_max_attempts_naming_round_and_silos() -> None:
    plan = _plan(max_attempts=2, min_silos=3, silos_per_round=3)
    m = _machine(plan)
    _join_all(m, now=25.0, silos=SILOS[:2])
    effects = m.tick(30.0)  # gather deadline with 2 connected, 3 needed
    assert [type(e) for e in effects] == [Retry, Persist]
    assert "only 2 silos connected" in effects[0].message
    for s in SILOS[:2]:
        m.seen(s, 59.0)
    (failed,) = m.tick(60.0)
    assert isinstance(failed, Failed)
    assert "round 0" in failed.message and "silo-1, silo-2" in failed.message
    assert "giving up after 2 failed attempts" in failed.message
    assert m.phase == Phase.FAILED
    done = m.task_for("silo-1", 61.0)
    assert done.key.stage == pb.STAGE_DONE and "failed" in done.message
    assert m.told_done() == ("silo-1",)


def test_gather_deadline_starts_with_the_minimum_when_not_everyone_came() -> None:
    m = _machine()
    _join_all(m, silos=SILOS[:2])
    assert m.tick(29.0) == []
    for s in SILOS[:2]:
        m.seen(s, 29.0)
    assert [type(e) for e in m.tick(30.0)] == [Persist]
    assert m.phase == Phase.TRAIN and _members(m, 30.0) == list(SILOS[:2])


def test_requests_for_another_run_round_attempt_or_stage_are_refused() -> None:
    m = _machine()
    _join_all(m)
    m.tick(0.0)
    silo = _members(m, 0.0)[0]
    key = m.task_for(silo, 0.0).key
    cases = {
        "another run": dataclasses.replace(key, run_id="run-b"),
        "a later round": dataclasses.replace(key, round=1),
        "an earlier attempt": dataclasses.replace(key, attempt=5),
        "another stage": dataclasses.replace(key, stage=pb.STAGE_EVALUATE),
    }
    for what, bad in cases.items():
        with pytest.raises(ProtocolError) as err:
            m.accept_update(silo, bad, SHA0, "x", {})
        assert err.value.code == "failed_precondition", what
    with pytest.raises(ProtocolError, match="belongs to stage EVALUATE"):
        m.accept_metrics(silo, key, "x", {})


def test_stale_base_state_and_unselected_or_unjoined_silos_are_refused() -> None:
    m = _machine(_plan(silos_per_round=2))
    _join_all(m, now=25.0, silos=SILOS[:3])
    m.tick(30.0)
    selected = _members(m, 30.0)
    outsider = next(s for s in SILOS[:3] if s not in selected)
    key = m.task_for(selected[0], 30.0).key
    with pytest.raises(ProtocolError, match="trains from"):
        m.accept_update(selected[0], key, SHA1, "x", {})
    with pytest.raises(ProtocolError, match="not taking part"):
        m.accept_update(outsider, key, SHA0, "x", {})
    with pytest.raises(ProtocolError, match="has not joined"):
        m.accept_update("silo-4", key, SHA0, "x", {})
    with pytest.raises(ProtocolError) as err:
        m.join("silo-9", 30.0)
    assert err.value.code == "permission_denied"


def test_a_repeated_submission_is_a_duplicate_and_a_different_one_is_refused() -> None:
    m = _machine()
    _join_all(m)
    m.tick(0.0)
    silo = _members(m, 0.0)[0]
    key = m.task_for(silo, 0.0).key
    assert m.accept_update(silo, key, SHA0, "digest-a", {"v": 1}) is False
    assert m.accept_update(silo, key, SHA0, "digest-a", {"v": 1}) is True
    with pytest.raises(ProtocolError) as err:
        m.accept_update(silo, key, SHA0, "digest-b", {"v": 2})
    assert err.value.code == "already_exists"


def test_evaluation_ends_without_silos_that_went_silent() -> None:
    m = _machine(_plan(rounds=1))
    _join_all(m)
    m.tick(0.0)
    for s in _members(m, 0.0):
        _upload(m, s)
        m.seen(s, 1.0)
    m.tick(1.0)
    m.aggregated(SHA1, 1.0)
    m.tick(1.0)
    assert _members(m, 1.0) == list(SILOS)
    m.accept_metrics("silo-1", m.task_for("silo-1", 2.0).key, "m", {"a": 1})
    m.seen("silo-1", 11.5)
    (ev,) = m.tick(11.5)  # the other three last spoke at <= 1.0
    assert isinstance(ev, Evaluated) and list(ev.reports) == ["silo-1"]
    assert m.task_for("silo-1", 12.0).settings.eval_splits == ()
    (fin,) = m.next_round(12.0)
    assert isinstance(fin, Finished) and m.phase == Phase.DONE
    assert m.progress().pending == "done"
    assert m.task_for("silo-2", 12.0).key.stage == pb.STAGE_DONE


def test_the_last_round_evaluates_on_test_too() -> None:
    m = _machine(_plan(rounds=1))
    assert m.eval_splits(0) == ("val", "test")
    assert _machine(_plan(rounds=3)).eval_splits(0) == ("val",)


def test_resuming_a_round_that_awaits_evaluation_evaluates_it_again() -> None:
    plan = _plan()
    rng_state = RoundProgress.start(7, statistics=False).rng_state
    progress = RoundProgress(round=1, attempt=2, failures=0, pending="evaluate", rng_state=rng_state)
    m = RoundMachine(plan, RUN, progress, SHA1, 0.0)
    assert m.phase == Phase.GATHER
    _join_all(m)
    assert [type(e) for e in m.tick(0.0)] == [Persist]
    task = m.task_for("silo-2", 0.0)
    assert task.key == StageKey(RUN, 1, 3, pb.STAGE_EVALUATE)
    assert task.state_sha256 == SHA1 and task.settings.eval_splits == ("val", "test")
    finished = RoundMachine(plan, RUN, dataclasses.replace(progress, pending="done"), SHA1, 0.0)
    finished.join("silo-1", 0.0)
    assert finished.task_for("silo-1", 0.0).key.stage == pb.STAGE_DONE


def test_plan_rejects_inconsistent_numbers() -> None:
    with pytest.raises(ValueError):
        _plan(min_silos=4)
    with pytest.raises(ValueError):
        _plan(allowed=("a", "a"))


def _finish_round(m: RoundMachine, now: float) -> None:
    """Train, aggregate and evaluate the current round with every silo (to RECORD)."""
    for s in SILOS:
        m.seen(s, now)
    m.tick(now)
    for s in _members(m, now):
        m.accept_update(s, m.task_for(s, now).key, m.state_sha256, f"u{s}{now}", {"from": s})
    m.tick(now + 1)
    m.aggregated(SHA1, now + 2)
    m.tick(now + 2)
    for s in SILOS:
        m.accept_metrics(s, m.task_for(s, now + 3).key, f"m{s}{now}", {"s": s})
    (evaluated,) = m.tick(now + 3)
    assert isinstance(evaluated, Evaluated)


def test_with_a_final_test_the_rounds_see_validation_only_and_test_is_read_once_on_the_selected_model() -> None:
    m = _machine(_plan(final_test=True))
    _join_all(m)
    _finish_round(m, 0.0)
    assert m.eval_splits(0) == ("val",) and not m.final
    with pytest.raises(RuntimeError, match="select_state"):
        m.select_state(SHA0)  # not the last round yet
    assert m.next_round(4.0) == []
    _finish_round(m, 10.0)
    assert m.eval_splits(1) == ("val",)
    m.select_state(SHA0)  # the driver chose round 0's model
    assert m.next_round(14.0) == [] and m.final and m.progress().pending == "final"
    for s in SILOS:
        m.seen(s, 15.0)
    m.tick(15.0)
    task = m.task_for("silo-2", 15.0)
    assert task.key == StageKey(RUN, 2, 0, pb.STAGE_EVALUATE) and task.state_sha256 == SHA0
    assert task.settings.eval_splits == ("test",) and task.message == "the final test: evaluate"
    for s in SILOS:
        m.accept_metrics(s, m.task_for(s, 16.0).key, "final" + s, {"s": s})
    (evaluated,) = m.tick(16.0)
    assert isinstance(evaluated, Evaluated) and evaluated.round == 2
    assert m.next_round(17.0) == [Finished(2)] and m.phase == Phase.DONE
    # A coordinator restarted during the final test resumes it, not a round.
    resumed = RoundMachine(m.plan, RUN, dataclasses.replace(m.progress(), pending="final"), SHA0, 0.0)
    assert resumed.phase == Phase.GATHER and resumed.final and resumed.eval_splits(resumed.round) == ("test",)


def test_without_a_final_test_the_last_round_evaluates_test_and_the_run_ends_there() -> None:
    m = _machine()
    _join_all(m)
    _finish_round(m, 0.0)
    m.next_round(4.0)
    _finish_round(m, 10.0)
    assert m.eval_splits(1) == ("val", "test")
    assert m.next_round(14.0) == [Finished(2)]


_KEYS = st.one_of(
    # Most submissions name the running task, so repeats and conflicting results come up often.
    st.just((RUN, 0, 0, Stage.TRAIN)),
    st.tuples(st.sampled_from([RUN, "run-b"]), st.integers(0, 2), st.integers(0, 2), st.sampled_from(list(Stage))),
)
_SUBMISSIONS = st.lists(
    st.tuples(
        st.sampled_from([*SILOS, "stranger"]), _KEYS, st.sampled_from(["x", "y"]), st.sampled_from([SHA0, SHA1])
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(_SUBMISSIONS)
def test_admission_takes_exactly_the_first_submission_of_each_members_current_task(submissions) -> None:
    m = _machine()
    _join_all(m)
    m.tick(0.0)  # every allowed silo joined: round 0 attempt 0 TRAIN starts with a seeded selection
    members = set(_members(m, 0.0))
    current = (RUN, 0, 0, Stage.TRAIN)
    accepted: dict[str, str] = {}
    for silo, fields, digest, base in submissions:
        key = StageKey(*fields)
        own = silo in members and fields == current
        try:
            duplicate = m.accept_update(silo, key, base, digest, {"from": silo})
        except ProtocolError as exc:
            # Refused: not a member's current task, a stale base state, or a second, different result.
            assert not own or base != SHA0 or (silo in accepted and accepted[silo] != digest), exc.message
            continue
        assert own, (silo, key)
        if duplicate:
            assert accepted[silo] == digest
        else:
            assert silo not in accepted and base == SHA0
            accepted[silo] = digest
    # The machine holds exactly the admitted submissions: one per member at most, the first one.
    assert m.status(0.0)["done"] == sorted(accepted)
