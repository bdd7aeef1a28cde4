r"""The series life cycle, as plain functions over plain data.

    Receiving --(quiet for POST_AFTER)--> Unmatched (forgotten, instances deleted)
                                      \-> Dispatched (one task per matching fingerprint)
    Dispatched --(every task finished)--> Succeeded | Failed --> cleaned up --> forgotten

Nothing here does I/O or reads a clock: the drivers (the all-in-one runner, the Kubernetes
operator) pass in the state, the fingerprints and the time, persist what comes back and carry out
the step. That keeps the rules identical in both modes and testable without a cluster.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field, replace
from typing import Iterable, Sequence

from relay.fingerprints.model import Fingerprint, SeriesAttributes
from relay.uids import SeriesKey

# Series phases.
RECEIVING = "Receiving"
DISPATCHED = "Dispatched"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
UNMATCHED = "Unmatched"

# Task phases.
TASK_PENDING = "Pending"  # created, nothing sent yet
TASK_SUBMITTING = "Submitting"  # the series is being posted; the outcome may be unknown after a crash
TASK_RUNNING = "Running"  # accepted by the InferenceServer (uid recorded), being polled
TASK_DELIVERING = "Delivering"  # predictions received, being stored to the destinations
TASK_SUCCEEDED = "Succeeded"
TASK_FAILED = "Failed"
TERMINAL_TASK_PHASES = frozenset({TASK_SUCCEEDED, TASK_FAILED})

# What to do with instances that arrive after a series was dispatched.
LATE_IGNORE = "ignore"  # keep the acknowledged instances, log them, do not run again
LATE_RERUN = "rerun"  # re-open the series; when quiet again it is matched and run again


@dataclass(frozen=True)
class TaskState:
    task_id: str
    fingerprint: str
    generation: int
    phase: str = TASK_PENDING
    inference_uid: str | None = None
    submitted_at: float | None = None
    # Destination ("AE@host:port") -> SOP Instance UIDs it accepted; a retry skips those.
    delivered: dict[str, tuple[str, ...]] = field(default_factory=dict)
    message: str = ""
    updated_at: float = 0.0

    @property
    def finished(self) -> bool:
        return self.phase in TERMINAL_TASK_PHASES


@dataclass(frozen=True)
class SeriesState:
    key: SeriesKey
    attributes: SeriesAttributes
    phase: str = RECEIVING
    first_received: float = 0.0
    last_received: float = 0.0
    instance_count: int = 0  # instances received (a re-sent instance counts once per arrival)
    generation: int = 0  # how many times the series was dispatched
    dispatched_instances: tuple[str, ...] = ()  # SOP Instance UIDs in the latest dispatch
    late_instances: int = 0
    tasks: tuple[TaskState, ...] = ()
    finished_at: float | None = None
    cleaned: bool = False  # instances deleted from storage

    @property
    def active_tasks(self) -> tuple[TaskState, ...]:
        return tuple(task for task in self.tasks if not task.finished)


@dataclass(frozen=True)
class Rules:
    post_after: float = 10.0
    delete_on_post: bool = True
    late_instance_policy: str = LATE_IGNORE
    # How long a finished, cleaned-up series is remembered, so that a late instance is recognised.
    forget_after: float = 3600.0


# --- Steps the drivers carry out -------------------------------------------------------------


@dataclass(frozen=True)
class Wait:
    until: float | None = None  # None: nothing will happen by itself


@dataclass(frozen=True)
class Dispatch:
    fingerprints: tuple[str, ...]
    generation: int


@dataclass(frozen=True)
class DropUnmatched:
    """No fingerprint matches: delete the instances and forget the series."""


@dataclass(frozen=True)
class Finish:
    phase: str  # SUCCEEDED or FAILED


@dataclass(frozen=True)
class Cleanup:
    delete_instances: bool


Step = Wait | Dispatch | DropUnmatched | Finish | Cleanup


# --- Rules -----------------------------------------------------------------------------------


def on_instance(
    series: SeriesState | None,
    key: SeriesKey,
    attributes: SeriesAttributes,
    sop_instance_uid: str,
    now: float,
    rules: Rules,
) -> tuple[SeriesState, str | None]:
    """A durable instance arrived. Returns the new state and, for a late instance, a note why."""
    if series is None:
        return (
            SeriesState(key=key, attributes=attributes, phase=RECEIVING, first_received=now,
                        last_received=now, instance_count=1),
            None,
        )
    if series.phase == RECEIVING:
        return replace(series, instance_count=series.instance_count + 1, last_received=now), None
    return on_late_instances(series, 1, now, rules)


def on_late_instances(series: SeriesState, count: int, now: float, rules: Rules
                      ) -> tuple[SeriesState, str]:
    """`count` instances arrived after the series was dispatched (or finished)."""
    counted = replace(series, instance_count=series.instance_count + count, last_received=now,
                      late_instances=series.late_instances + count, cleaned=False)
    if rules.late_instance_policy == LATE_RERUN:
        reopened = replace(counted, phase=RECEIVING, finished_at=None)
        return reopened, (
            f"{count} instance(s) arrived after dispatch #{series.generation}: series re-opened "
            "(LATE_INSTANCE_POLICY=rerun), it will be matched again when quiet"
        )
    return counted, (
        f"{count} instance(s) arrived after dispatch #{series.generation}: kept but not run again "
        "(LATE_INSTANCE_POLICY=ignore)"
    )


def next_step(series: SeriesState, fingerprints: Sequence[Fingerprint], now: float,
              rules: Rules, matcher) -> Step:
    """What should happen to `series` now. `matcher(fingerprints, attributes)` -> matching ones."""
    if series.phase == RECEIVING:
        complete_at = series.last_received + rules.post_after
        if now < complete_at:
            return Wait(until=complete_at)
        matches = matcher(fingerprints, series.attributes)
        if matches:
            return Dispatch(fingerprints=tuple(sorted(fp.name for fp in matches)),
                            generation=series.generation + 1)
        if series.active_tasks or series.tasks:
            # A re-opened series that no longer matches: its earlier tasks decide its end.
            return _finish_or_wait(series, rules, now)
        return DropUnmatched()
    if series.phase == DISPATCHED:
        return _finish_or_wait(series, rules, now)
    if series.phase in (SUCCEEDED, FAILED):
        if not series.cleaned:
            return Cleanup(delete_instances=rules.delete_on_post and series.phase == SUCCEEDED)
        return Wait()
    return Wait()


def _finish_or_wait(series: SeriesState, rules: Rules, now: float) -> Step:
    if series.active_tasks:
        return Wait()
    failed = any(task.phase == TASK_FAILED for task in _latest_tasks(series.tasks))
    return Finish(phase=FAILED if failed else SUCCEEDED)


def _latest_tasks(tasks: Iterable[TaskState]) -> list[TaskState]:
    """The newest task of each fingerprint: a re-run that succeeded supersedes a failed one."""
    latest: dict[str, TaskState] = {}
    for task in tasks:
        if task.fingerprint not in latest or task.generation >= latest[task.fingerprint].generation:
            latest[task.fingerprint] = task
    return list(latest.values())


def apply_dispatch(series: SeriesState, step: Dispatch, instance_uids: Iterable[str],
                   now: float) -> SeriesState:
    """The series after a dispatch: one new Pending task per fingerprint."""
    new_tasks = tuple(
        TaskState(task_id=task_id(series.key, name, step.generation), fingerprint=name,
                  generation=step.generation, updated_at=now)
        for name in step.fingerprints
    )
    return replace(series, phase=DISPATCHED, generation=step.generation,
                   dispatched_instances=tuple(sorted(instance_uids)),
                   tasks=series.tasks + new_tasks, finished_at=None, cleaned=False)


def apply_finish(series: SeriesState, step: Finish, now: float) -> SeriesState:
    return replace(series, phase=step.phase, finished_at=now)


def apply_cleanup(series: SeriesState) -> SeriesState:
    return replace(series, cleaned=True)


def can_forget(series: SeriesState, now: float, rules: Rules) -> bool:
    """A finished series whose instances were deleted can be forgotten after a while; one whose
    instances are kept cannot, or a restart would find them and take them for a new series."""
    return (
        series.phase == SUCCEEDED
        and series.cleaned
        and rules.delete_on_post
        and not series.active_tasks
        and series.finished_at is not None
        and now - series.finished_at >= rules.forget_after
    )


def update_task(series: SeriesState, task: TaskState) -> SeriesState:
    tasks = tuple(task if existing.task_id == task.task_id else existing for existing in series.tasks)
    return replace(series, tasks=tasks)


_NOT_LABEL = re.compile(r"[^a-z0-9-]+")


def task_id(key: SeriesKey, fingerprint: str, generation: int) -> str:
    """Deterministic, DNS-1123-label task id (it names Kubernetes Jobs): same inputs, same id."""
    digest = hashlib.sha256(f"{key.slug}|{fingerprint}|{generation}".encode()).hexdigest()[:10]
    stem = _NOT_LABEL.sub("-", fingerprint.lower()).strip("-")[:40].strip("-") or "task"
    return f"{stem}-{digest}-{generation}"
