"""Carries out, on Kubernetes, what relay.lifecycle.study_step decides for the series of one study.

The series of a study are the DicomSeries that carry its label (relay.kube.resources.LABEL_STUDY,
a digest of the Study Instance UID, set by the receiver). When a series holds a Waiting share of a
study-level fingerprint, the operator reads every series of the study, asks study_step, and
carries the decision out in the same order as `isdr run`: the study task's record first (in
storage: the Job reads what it sends there), then each series' entry, guarded by its
resourceVersion. A series changed meanwhile is a Conflict: the study is looked at again, and a
share that missed a started task joins it (its record names it). The Job itself is created by
the series' own step, from its now Pending entry: one Job per study task, whichever series
creates it first (the others find it there).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

from relay.kube.api import Conflict, KubeApi, NotFound
from relay.kube.resources import EventReason, has_received, series_state, study_selector, study_share_status
from relay.lifecycle import (
    FailStudy,
    SeriesState,
    StartStudy,
    TaskPhase,
    Wait,
    study_note,
    study_shares,
    study_step,
)
from relay.state_store import DispatchStore, StudyStore
from relay.storage.base import Storage

from isdr_operator.fingerprints import FingerprintSet
from isdr_operator.notices import Notices

log = logging.getLogger("isdr_operator.studies")

SOON = 0.05  # a decision was carried out (or lost a race): look again at once


class StudyDriver:
    def __init__(self, api: KubeApi, storage: Storage, fingerprints: FingerprintSet, clock=time.time,
                 notices: Notices | None = None):
        self.api = api
        self.notices = notices or Notices(api, clock)
        self.dispatches = DispatchStore(storage)
        self.records = StudyStore(storage)
        self.fingerprints = fingerprints
        self.clock = clock

    def step(self, study_uid: str) -> float | None:
        """Decide for every study-level fingerprint that a series of the study waits for; returns
        seconds until the study needs another look (None: nothing waits)."""
        now = self.clock()
        bodies = {body["metadata"]["name"]: body for body in self.api.list_series(study_selector(study_uid))
                  if body["spec"].get("studyInstanceUID") == study_uid and has_received(body)}
        states = {name: self._state(body) for name, body in bodies.items()}
        waiting = sorted({task.fingerprint for state in states.values() for task in state.tasks
                          if task.phase == TaskPhase.WAITING})
        ready = {fp.name: fp for fp in self.fingerprints.ready()}
        delays = []
        for name in waiting:
            shares = study_shares(states.values(), name)
            decision = study_step(ready.get(name), study_uid, shares, now, self.records.started(shares))
            if isinstance(decision, Wait):
                if decision.until is not None:
                    delays.append(max(SOON, decision.until - now))
                continue
            if isinstance(decision, StartStudy) and not decision.joined:
                self.records.save(decision.task_id, decision.parts)  # first: what the Job sends
            self._tell(bodies, decision, study_uid, name, now)
            delays.append(SOON)
        return min(delays) if delays else None

    def _state(self, body: dict) -> SeriesState:
        state = series_state(body)
        return replace(state, dispatches=self.dispatches.load_all(state.key))

    def _tell(self, bodies: dict[str, dict], decision: StartStudy | FailStudy, study_uid: str, fingerprint: str,
              now: float) -> None:
        if isinstance(decision, StartStudy):
            note, reason, warning = study_note(decision), EventReason.STUDY_STARTED, bool(decision.missing)
        else:
            note, reason, warning = decision.message, EventReason.STUDY_FAILED, True
        log.info("study %s, fingerprint %s: %s", study_uid, fingerprint, note)
        for body in bodies.values():
            status = study_share_status(body, decision, now)
            if status is None:
                continue
            meta = body["metadata"]
            try:
                body = self.api.patch_series_status(meta["name"], status, meta["resourceVersion"])
            except (Conflict, NotFound):
                continue  # changed meanwhile: the study is looked at again (and the share joins)
            self.notices.event(body, reason, f"{fingerprint}: {note}", warning=warning)
