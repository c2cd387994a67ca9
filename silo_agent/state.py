"""The silo agent's state directory: which tasks it finished, and the last global state it downloaded.

``agent.json`` records the run the agent belongs to and the tasks (round, attempt, stage) whose
result the coordinator acknowledged, so a restarted agent does not train a round again whose
update already arrived. ``cache/`` keeps the most recent global state in the wire format
(manifest JSON plus raw payload, checked against its SHA-256 when read), so a state the agent
already holds, e.g. the one it just evaluated and then trains from, is not downloaded twice.
Every write is atomic.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from condi_models.checkpoint import atomic_write_bytes
from federation import wire
from federation.stages import StageKey
from federation.untrusted import shown

log = logging.getLogger(__name__)

# The DP budget's ledger and the secret keying the noise, beside agent.json.
LEDGER_FILE = "privacy-ledger.json"
SECRET_FILE = "dp.secret"

_KEEP_DONE = 64
_SHA256 = re.compile("[0-9a-f]{64}")


class AgentState:
    """Reads and writes one state directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / "agent.json"
        self.cache = self.root / "cache"
        self._doc = self._read()

    def _read(self) -> dict[str, Any]:
        if not self.path.is_file():
            return {"run_id": None, "done": []}
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("state file %s is unreadable (%s); starting afresh", self.path, exc)
            return {"run_id": None, "done": []}
        if not isinstance(doc, dict) or not isinstance(doc.get("done"), list):
            log.warning("state file %s has an unexpected shape; starting afresh", self.path)
            return {"run_id": None, "done": []}
        return doc

    def _write(self) -> None:
        atomic_write_bytes(self.path, (json.dumps(self._doc, indent=1) + "\n").encode("utf-8"))

    @property
    def run_id(self) -> str | None:
        """The run this directory belongs to."""
        return self._doc.get("run_id")

    def enter_run(self, run_id: str) -> None:
        """Belong to ``run_id``; a different run forgets the finished tasks of the old one."""
        if self._doc.get("run_id") != run_id:
            if self._doc.get("run_id") is not None:
                log.info("new run %s (was %s): forgetting finished tasks", run_id, self._doc["run_id"])
            self._doc = {"run_id": run_id, "done": []}
            self._write()

    def is_done(self, key: StageKey) -> bool:
        """True when the coordinator acknowledged this task's result."""
        return [key.round, key.attempt, key.stage] in self._doc["done"]

    def mark_done(self, key: StageKey) -> None:
        """Record an acknowledged task (the last few are kept)."""
        entry = [key.round, key.attempt, key.stage]
        if entry not in self._doc["done"]:
            self._doc["done"] = [*self._doc["done"], entry][-_KEEP_DONE:]
            self._doc["last_done"] = {"round": key.round, "attempt": key.attempt, "stage": key.stage}
            self._write()

    def cached_state(self, sha256: str) -> wire.EncodedState | None:
        """The cached global state with this SHA-256, or None (also when the cache is damaged); a
        ``sha256`` that is not 64 lowercase hex characters (it names files here) is an error."""
        if not _SHA256.fullmatch(sha256):
            raise wire.WireError(f"task.state_sha256: expected 64 lowercase hex characters, got {shown(sha256, 80)}")
        manifest_path = self.cache / f"{sha256}.manifest.json"
        payload_path = self.cache / f"{sha256}.bin"
        if not manifest_path.is_file() or not payload_path.is_file():
            return None
        try:
            manifest = wire.Manifest.from_json(manifest_path.read_text(encoding="utf-8"))
            payload = payload_path.read_bytes()
            wire.decode_state(manifest, payload)
        except (OSError, wire.WireError) as exc:
            log.warning("cached state %s is damaged (%s); downloading again", sha256[:12], exc)
            return None
        if manifest.payload_sha256 != sha256:
            return None
        return wire.EncodedState(manifest=manifest, payload=payload)

    def keep_state(self, encoded: wire.EncodedState) -> None:
        """Cache ``encoded`` as the most recent global state, dropping older ones."""
        sha = encoded.manifest.payload_sha256
        atomic_write_bytes(self.cache / f"{sha}.bin", encoded.payload)
        atomic_write_bytes(self.cache / f"{sha}.manifest.json", encoded.manifest.to_json().encode("utf-8"))
        for old in self.cache.iterdir():
            if not old.name.startswith(sha):
                old.unlink(missing_ok=True)
