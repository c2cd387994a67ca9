"""The PKI's time arguments: the moment an operation happens at, whole-day periods, clock skew."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from federation.pki.store import PkiError

# Tolerate small clock differences between the CA host and the peers that check its certificates.
CLOCK_SKEW = timedelta(minutes=5)


def now_utc(now: datetime | None) -> datetime:
    """``now`` when given (it must be timezone-aware: tests and replays pass one), else the clock."""
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise PkiError("now must be timezone-aware")
    return now


def check_days(days: int, what: str) -> None:
    """Raise unless ``days`` (a validity or update interval, named by ``what``) is a whole number >= 1."""
    if not isinstance(days, int) or isinstance(days, bool) or days < 1:
        raise PkiError(f"{what} must be a whole number of days >= 1, got {days!r}")
