"""`isdr run`'s study decisions: the series of one study that study-level fingerprints post together.

Each tick, after every series took its own step, the shares still waiting are grouped by (study,
fingerprint) and relay.lifecycle.study_step decides for each group. Carrying a decision out
follows the runner's order: what a study task sends is recorded first (relay.state_store.
StudyStore), then each series is told, revision-guarded, and persisted. A stop in between leaves
shares still Waiting that the record names: the next tick joins them to the task it started.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Callable, Sequence

from relay.fingerprints.model import Fingerprint
from relay.lifecycle import (
    FailStudy,
    SeriesState,
    StartStudy,
    TaskPhase,
    Wait,
    apply_fail_study,
    apply_start_study,
    study_note,
    study_shares,
    study_step,
)
from relay.registry import SeriesRegistry
from relay.state_store import StudyStore
from relay.storage import Storage
from relay.uids import SeriesKey

log = logging.getLogger("relay.studies")


def waiting_studies(series: Sequence[SeriesState]) -> dict[tuple[str, str], list[SeriesState]]:
    """(study UID, fingerprint) -> the study's series, for every study with a share waiting."""
    by_study: dict[str, list[SeriesState]] = defaultdict(list)
    for state in series:
        if state.attributes.study_uid:
            by_study[state.attributes.study_uid].append(state)
    groups: dict[tuple[str, str], list[SeriesState]] = {}
    for state in series:
        for task in state.tasks:
            if task.phase == TaskPhase.WAITING and state.attributes.study_uid:
                groups[(state.attributes.study_uid, task.fingerprint)] = by_study[state.attributes.study_uid]
    return groups


class StudyScheduler:
    def __init__(self, storage: Storage, registry: SeriesRegistry, persist: Callable[[SeriesState], bool],
                 started: Callable[[SeriesState], object]):
        self.registry = registry
        self.records = StudyStore(storage)
        self._persist = persist
        self._started = started  # the runner's _ensure_running

    def tick(self, fingerprints: Sequence[Fingerprint], now: float) -> None:
        by_name = {fp.name: fp for fp in fingerprints}
        for (study_uid, name), members in sorted(waiting_studies(self.registry.snapshot()).items()):
            try:
                self.look_at(study_uid, name, by_name.get(name), members, now)
            except Exception:  # one bad study must not stop the others
                log.exception("study %s: its next step for %s failed; it is looked at again", study_uid, name)

    def look_at(self, study_uid: str, name: str, fingerprint: Fingerprint | None, members: list[SeriesState],
                now: float) -> None:
        shares = study_shares(members, name)
        step = study_step(fingerprint, study_uid, shares, now, self.records.started(shares))
        if isinstance(step, Wait):
            return
        if isinstance(step, StartStudy):
            if not step.joined:
                self.records.save(step.task_id, step.parts)  # first: what the task sends
            log.info("study %s, fingerprint %s: %s", study_uid, name, study_note(step))
            self._tell(step, lambda state: apply_start_study(state, step, now))
        elif isinstance(step, FailStudy):
            log.warning("study %s, fingerprint %s: %s", study_uid, name, step.message)
            self._tell(step, lambda state: apply_fail_study(state, step, now))

    def _tell(self, step: StartStudy | FailStudy, change: Callable[[SeriesState], SeriesState]) -> None:
        """Each series of the step, changed, committed if it did not change meanwhile (else the
        next tick decides again), persisted, and its tasks started."""
        keys: list[SeriesKey] = sorted({key for key, _ in step.shares})
        for key in keys:
            read = self.registry.read(key)
            if read is None:
                continue
            state, revision = read
            after = change(state)
            if after == state or not self.registry.commit(key, revision, after):
                continue
            if self._persist(after):
                self._started(after)
