"""The operator's long-lived parts, wired together: API, storage, fingerprints, driver, scheduler."""

from __future__ import annotations

import logging

from relay.storage import open_storage

from isdr_operator.conditions import same_conditions, set_condition
from isdr_operator.driver import SeriesDriver
from isdr_operator.fingerprints import FingerprintSet, evaluate, ready_condition
from isdr_operator.kube_api import OperatorApi
from isdr_operator.scheduler import Scheduler
from isdr_operator.settings import OperatorSettings

log = logging.getLogger("isdr_operator")


class Runtime:
    def __init__(self, api: OperatorApi, settings: OperatorSettings, clock=None):
        import time

        self.api = api
        self.settings = settings
        self.clock = clock or time.time
        self.storage = open_storage(settings.relay)
        self.fingerprints = FingerprintSet()
        self.driver = SeriesDriver(api, settings, self.storage, self.fingerprints, clock=self.clock)
        self.scheduler = Scheduler(self.driver.step)

    def start(self) -> None:
        # Fingerprints first: a complete series looked at before they are known would be
        # taken for unmatched and deleted.
        for body in self.api.list_fingerprints():
            self.fingerprint_event("ADDED", body)
        self.fingerprints.loaded.set()
        log.info("operator ready in namespace %s: %d fingerprints (%d Ready), storage %s",
                 self.settings.namespace, len(self.api.list_fingerprints()),
                 len(self.fingerprints.ready()), self.storage.describe())
        self.scheduler.start()
        for body in self.api.list_series():
            self.scheduler.poke(body["metadata"]["name"])

    def stop(self) -> None:
        self.scheduler.stop()

    def fingerprint_event(self, event_type: str | None, body: dict) -> None:
        name = body["metadata"]["name"]
        if event_type == "DELETED":
            self.fingerprints.remove(name)
            log.info("fingerprint %s deleted; its running tasks finish as dispatched", name)
            return
        evaluation = evaluate(body, self.api.key_problem)
        self.fingerprints.put(body, evaluation)
        status = body.get("status") or {}
        generation = body["metadata"].get("generation")
        new = ready_condition(evaluation, generation)
        conditions = set_condition(status.get("conditions"), new, self.clock())
        if same_conditions(conditions, status.get("conditions")) and status.get("observedGeneration") == generation:
            return
        try:
            # Not guarded by resourceVersion: the operator is the only writer of these fields.
            self.api.patch_fingerprint_status(body, {"conditions": conditions, "observedGeneration": generation},
                                              guarded=False)
        except Exception as exc:  # noqa: BLE001 - the next event retries
            log.warning("could not update fingerprint %s status: %s", name, exc)
            return
        if evaluation.ready:
            log.info("fingerprint %s Ready: %s", name, evaluation.message)
        else:
            log.warning("fingerprint %s not Ready (%s): %s", name, evaluation.reason, evaluation.message)
            self.api.event(body, evaluation.reason, evaluation.message, warning=True)
