r"""The series life cycle, as plain functions over plain data: every rule of it lives here.

    Receiving --(quiet for POST_AFTER)--> dropped (no fingerprint matches: its instances deleted)
        |                             |     or kept as Unmatched for UNMATCHED_RETENTION, then dropped
        |                             \-> Dispatched #g (one task per matching fingerprint)
        |                                     |
        |                     (every task finished)
        |                                     v
        |                         Succeeded | Failed --> cleaned up --> forgotten (SERIES_RETENTION)
        |                                     |
        +<--- a new SOP Instance UID after a dispatch (LATE_INSTANCE_POLICY=reopen, the default),
              or any arrival (rerun): the series re-opens, and is dispatched again (#g+1, with all
              its instances) once it is quiet again

Storage is the truth. What the receiver acknowledged is in storage; counts and timestamps in a
state document or a custom resource are caches of it. When a decision needs the facts (which SOP
Instance UIDs are stored), the rules ask the driver to list them (`ListStorage`) instead of
trusting a count. Nothing acknowledged is deleted before it was part of a dispatch whose tasks all
finished, except by two rules that say so: an unmatched series, and instances kept by
LATE_INSTANCE_POLICY=ignore once SERIES_RETENTION has passed (logged at WARNING).

Nothing here does I/O or reads a clock: the drivers (`isdr run`'s runner, the Kubernetes
operator) read the state, ask `next_step`, persist what the matching `apply_*` returns, and carry
the step out. The rules of one task (submit at most once, a finished task stays finished) are
here too, for the task pipeline and the operator's view of Jobs.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Callable, Iterable, Sequence

from relay.fingerprints.matching import study_entry
from relay.fingerprints.model import Fingerprint, SeriesAttributes
from relay.uids import SeriesKey


# Times closer than this are the same time: custom resources keep microseconds, file systems
# nanoseconds, and a time that went through one of them must not look like a new arrival.
SAME_TIME = 0.001


class SeriesPhase(StrEnum):
    RECEIVING = "Receiving"
    DISPATCHED = "Dispatched"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    UNMATCHED = "Unmatched"  # kept for UNMATCHED_RETENTION (default 0: dropped at once)


class TaskPhase(StrEnum):
    WAITING = "Waiting"  # a series' share in a study task, waiting for the study's other series
    PENDING = "Pending"  # created, nothing sent yet
    SUBMITTING = "Submitting"  # a submit is under way; its outcome is unknown until the uid is recorded
    RUNNING = "Running"  # accepted by the InferenceServer (uid recorded), being polled
    DELIVERING = "Delivering"  # predictions received, being stored to the destinations
    SUCCEEDED = "Succeeded"  # every destination accepted the predictions: final, whatever happens next
    FAILED = "Failed"


TERMINAL_TASK_PHASES = frozenset({TaskPhase.SUCCEEDED, TaskPhase.FAILED})


class LatePolicy(StrEnum):
    """What instances that arrive after a dispatch do (LATE_INSTANCE_POLICY)."""

    REOPEN = "reopen"  # a new SOP Instance UID re-opens the series; a re-sent one is a duplicate
    IGNORE = "ignore"  # kept until SERIES_RETENTION, logged, never run
    RERUN = "rerun"  # any arrival, a re-sent instance too, re-opens the series


@dataclass(frozen=True)
class TaskState:
    task_id: str
    fingerprint: str
    generation: int
    phase: TaskPhase = TaskPhase.PENDING
    inference_uid: str | None = None
    submitted_at: float | None = None
    # Submits sent whose answer never came (a crash, a time-out after the upload): each may have
    # created a task on the server under a uid we never learnt. See submit_decision.
    unknown_submits: int = 0
    # Destination ("AE@host:port") -> SOP Instance UIDs it accepted; a retry skips those.
    delivered: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Succeeded, and the remote task is still to be deleted (best effort, resumed after a crash).
    remote_delete_pending: bool = False
    # Errors met on the way, by kind (relay.metrics.ERROR_KINDS): what a Kubernetes Job's pod
    # reports, since nobody scrapes it; the operator counts them (`isdr run` counts them itself).
    errors: dict[str, int] = field(default_factory=dict)
    message: str = ""
    updated_at: float = 0.0
    # A study-level fingerprint's task: the entry of spec.study.series this series fills ("" for
    # a series-level task). Every series of the study carries the study task, with the same id.
    entry: str = ""

    @property
    def finished(self) -> bool:
        return self.phase in TERMINAL_TASK_PHASES

    @property
    def needs_work(self) -> bool:
        """Something is left to do for it: running it, or the best-effort remote delete."""
        return not self.finished or self.remote_delete_pending


@dataclass(frozen=True)
class Dispatched:
    """One dispatch of a series: its generation, the SOP Instance UIDs it sent, and when."""

    generation: int
    instances: tuple[str, ...]
    at: float


@dataclass(frozen=True)
class SeriesState:
    key: SeriesKey
    attributes: SeriesAttributes
    phase: SeriesPhase = SeriesPhase.RECEIVING
    first_received: float = 0.0
    last_received: float = 0.0  # the newest arrival (the receiver's clock, or a stored file's time)
    instance_count: int = 0  # instances in storage, as last counted
    # SOP Instance UIDs in storage, when the driver knows them (None: not listed; see ListStorage).
    received: frozenset[str] | None = None
    generation: int = 0  # how many times the series was dispatched
    dispatches: tuple[Dispatched, ...] = ()
    # last_received up to which arrivals after a dispatch were looked at: a later one is news.
    arrivals_seen: float = 0.0
    late_instances: int = 0  # stored, never dispatched, kept (LATE_INSTANCE_POLICY=ignore)
    tasks: tuple[TaskState, ...] = ()
    finished_at: float | None = None
    cleaned: bool = False  # the dispatched instances were deleted (or kept, as the rules say)

    @property
    def active_tasks(self) -> tuple[TaskState, ...]:
        return tuple(task for task in self.tasks if not task.finished)

    @property
    def dispatched_uids(self) -> frozenset[str]:
        return frozenset(uid for dispatch in self.dispatches for uid in dispatch.instances)

    @property
    def undispatched(self) -> frozenset[str]:
        """Stored instances no dispatch sent (empty when the stored ones are not known)."""
        return (self.received or frozenset()) - self.dispatched_uids

    def instances_of(self, generation: int) -> tuple[str, ...]:
        """The SOP Instance UIDs dispatch #generation sent (its tasks send exactly these)."""
        for dispatch in self.dispatches:
            if dispatch.generation == generation:
                return dispatch.instances
        return ()

    def task(self, task_id: str) -> TaskState | None:
        return next((task for task in self.tasks if task.task_id == task_id), None)


@dataclass(frozen=True)
class Rules:
    post_after: float = 10.0
    delete_on_post: bool = True
    late_instance_policy: LatePolicy = LatePolicy.REOPEN
    # How long a finished, cleaned-up series is remembered, so that an instance re-sent later is
    # recognised as a duplicate (and ignored late instances are kept).
    forget_after: float = 3600.0
    # How long a series no fingerprint matches is kept (a fingerprint applied meanwhile can take
    # it: `isdr series rematch`, isdr.io/rematch); 0: its instances are deleted at once.
    unmatched_retention: float = 0.0


# --- Steps the drivers carry out -------------------------------------------------------------


@dataclass(frozen=True)
class Wait:
    until: float | None = None  # None: nothing happens by itself; an event brings the series back


@dataclass(frozen=True)
class ListStorage:
    """The decision needs the facts: list the series' stored instances (`with_stored`), ask again."""


@dataclass(frozen=True)
class Dispatch:
    fingerprints: tuple[str, ...]
    generation: int
    instances: tuple[str, ...]  # every stored instance, all sent by each task of this generation
    # Study-level fingerprints among `fingerprints` -> the entry the series fills: their tasks
    # wait for the study's other series (study_step) instead of running at once.
    entries: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Reopen:
    """Instances arrived after the dispatch and the policy runs the series again when quiet."""

    new_instances: int  # of which never dispatched


@dataclass(frozen=True)
class NoteArrivals:
    """Instances arrived after the dispatch and run nothing: duplicates, or kept by `ignore`."""

    late_instances: int  # stored and never dispatched (kept by LATE_INSTANCE_POLICY=ignore)


@dataclass(frozen=True)
class DropUnmatched:
    """No fingerprint matches: delete these instances and forget the series."""

    instances: tuple[str, ...]


@dataclass(frozen=True)
class KeepUnmatched:
    """No fingerprint matches: keep the series (phase Unmatched) until `until`, then drop it."""

    until: float


@dataclass(frozen=True)
class Finish:
    phase: SeriesPhase  # SUCCEEDED or FAILED


@dataclass(frozen=True)
class Cleanup:
    delete: tuple[str, ...]  # instances to delete from storage (dispatched ones only; may be none)


@dataclass(frozen=True)
class Forget:
    """The series is done with: forget it. `delete` is what is left in storage: instances that
    arrived after the dispatch and were never run (LATE_INSTANCE_POLICY=ignore), or none."""

    delete: tuple[str, ...]


Step = (Wait | ListStorage | Dispatch | Reopen | NoteArrivals | DropUnmatched | KeepUnmatched | Finish | Cleanup
        | Forget)

Matcher = Callable[[Sequence[Fingerprint], SeriesAttributes], Sequence[Fingerprint]]


# --- Facts -----------------------------------------------------------------------------------


def new_series(key: SeriesKey, attributes: SeriesAttributes, now: float) -> SeriesState:
    return SeriesState(key=key, attributes=attributes, first_received=now, last_received=now,
                       received=frozenset())


def on_instance(series: SeriesState | None, key: SeriesKey, attributes: SeriesAttributes,
                sop_instance_uid: str, received_at: float) -> SeriesState:
    """A durable instance arrived. Only a fact: what it means is next_step's business."""
    if series is None:
        series = new_series(key, attributes, received_at)
    received = (series.received or frozenset()) | {sop_instance_uid}
    return replace(series, received=received, instance_count=len(received),
                   first_received=min(series.first_received or received_at, received_at),
                   last_received=max(series.last_received, received_at))


def with_stored(series: SeriesState, instances: Iterable[str], newest: float | None) -> SeriesState:
    """The series with what storage holds: its SOP Instance UIDs and the newest one's time.

    A stored instance newer than anything the state knows (its receiver was killed before it
    could report it) counts as an arrival at that time."""
    received = frozenset(instances)
    last = series.last_received
    if newest is not None and newest > last + SAME_TIME:
        last = newest
    return replace(series, received=received, instance_count=len(received), last_received=last)


# --- The rules -------------------------------------------------------------------------------


def next_step(series: SeriesState, fingerprints: Sequence[Fingerprint], now: float, rules: Rules,
              matcher: Matcher) -> Step:
    """What should happen to `series` now. `matcher(fingerprints, attributes)` -> matching ones."""
    if series.phase == SeriesPhase.RECEIVING:
        return _receiving(series, fingerprints, now, rules, matcher)
    if series.last_received > series.arrivals_seen + SAME_TIME:
        return _arrivals_after_dispatch(series, rules)
    if series.phase == SeriesPhase.UNMATCHED:
        return _kept_unmatched(series, now, rules)
    if series.phase == SeriesPhase.DISPATCHED:
        return _finish_or_wait(series)
    if not series.cleaned:
        if series.received is None:
            return ListStorage()
        if rules.delete_on_post and series.phase == SeriesPhase.SUCCEEDED:
            return Cleanup(delete=tuple(sorted(series.received & series.dispatched_uids)))
        return Cleanup(delete=())  # a failed series keeps its instances, for a re-send or a look
    forget_at = _forget_at(series, rules)
    if forget_at is None:
        return Wait()
    if now < forget_at:
        return Wait(until=forget_at)
    if series.received is None:
        return ListStorage()
    return Forget(delete=tuple(sorted(series.received)))


def _receiving(series, fingerprints, now, rules, matcher) -> Step:
    complete_at = series.last_received + rules.post_after
    if now < complete_at:
        return Wait(until=complete_at)
    if series.received is None:
        return ListStorage()  # the dispatch sends what storage holds, not what a count says
    if not series.received:
        return Forget(delete=())  # nothing stored (deleted by hand?): nothing to run
    matches = matcher(fingerprints, series.attributes)
    if matches:
        entries = tuple(sorted((fp.name, entry) for fp in matches
                               if (entry := study_entry(fp, series.attributes)) is not None))
        return Dispatch(fingerprints=tuple(sorted(fp.name for fp in matches)),
                        generation=series.generation + 1, instances=tuple(sorted(series.received)),
                        entries=entries)
    if series.tasks:
        # Re-opened, but no fingerprint matches any more: its earlier tasks decide its end, and
        # the instances that re-opened it are kept like ignored late ones.
        if series.active_tasks:
            return Wait()
        return Finish(phase=_outcome(series.tasks))
    if rules.unmatched_retention > 0:
        return KeepUnmatched(until=now + rules.unmatched_retention)
    return DropUnmatched(instances=tuple(sorted(series.received)))


def _kept_unmatched(series: SeriesState, now: float, rules: Rules) -> Step:
    """A kept unmatched series is dropped when its time is up (UNMATCHED_RETENTION may have
    been shortened since it was kept: the shorter time counts)."""
    since = series.finished_at if series.finished_at is not None else now
    drop_at = since + rules.unmatched_retention
    if now < drop_at:
        return Wait(until=drop_at)
    if series.received is None:
        return ListStorage()
    return DropUnmatched(instances=tuple(sorted(series.received)))


def _arrivals_after_dispatch(series: SeriesState, rules: Rules) -> Step:
    if series.received is None:
        return ListStorage()
    new = series.undispatched
    policy = rules.late_instance_policy
    if policy == LatePolicy.RERUN or (policy == LatePolicy.REOPEN and new):
        return Reopen(new_instances=len(new))
    return NoteArrivals(late_instances=len(new))


def _finish_or_wait(series: SeriesState) -> Step:
    if series.active_tasks:
        return Wait()
    return Finish(phase=_outcome(series.tasks))


def _outcome(tasks: Iterable[TaskState]) -> SeriesPhase:
    """Failed if the newest task of any fingerprint failed: a re-run that succeeded supersedes an
    earlier failure of the same fingerprint."""
    latest = _latest_of_each_fingerprint(tasks)
    failed = any(task.phase == TaskPhase.FAILED for task in latest.values())
    return SeriesPhase.FAILED if failed else SeriesPhase.SUCCEEDED


def _forget_at(series: SeriesState, rules: Rules) -> float | None:
    """When a finished series may be forgotten (None: never, its instances are kept). Only a
    succeeded series whose instances are deleted once done is forgotten: one whose instances are
    kept is remembered, or a restart would find them and take them for a new series."""
    if (series.phase != SeriesPhase.SUCCEEDED or not rules.delete_on_post or not series.cleaned
            or series.finished_at is None or any(task.needs_work for task in series.tasks)):
        return None
    return series.finished_at + rules.forget_after


# --- The state after each step ---------------------------------------------------------------


def apply_dispatch(series: SeriesState, step: Dispatch, now: float) -> SeriesState:
    """One new Pending task per series-level fingerprint, sending `step.instances`; one Waiting
    share per study-level one (it replaces a share of the same fingerprint still waiting: the
    series is sent once, with all its instances)."""
    entries = dict(step.entries)
    new_tasks = tuple(
        TaskState(task_id=task_id(series.key, name, step.generation), fingerprint=name,
                  generation=step.generation, updated_at=now, entry=entries.get(name, ""),
                  phase=TaskPhase.WAITING if name in entries else TaskPhase.PENDING)
        for name in step.fingerprints
    )
    kept = tuple(task for task in series.tasks
                 if not (task.phase == TaskPhase.WAITING and task.fingerprint in entries))
    return replace(series, phase=SeriesPhase.DISPATCHED, generation=step.generation,
                   dispatches=series.dispatches + (Dispatched(step.generation, step.instances, now),),
                   tasks=kept + new_tasks, arrivals_seen=series.last_received,
                   late_instances=0, finished_at=None, cleaned=False)


def apply_reopen(series: SeriesState, step: Reopen) -> SeriesState:
    return replace(series, phase=SeriesPhase.RECEIVING, arrivals_seen=series.last_received,
                   late_instances=0, finished_at=None, cleaned=False)


def apply_note_arrivals(series: SeriesState, step: NoteArrivals) -> SeriesState:
    # A re-sent instance of a cleaned-up series is in storage again: clean up again.
    return replace(series, arrivals_seen=series.last_received, late_instances=step.late_instances,
                   cleaned=False)


def apply_keep_unmatched(series: SeriesState, step: KeepUnmatched, now: float) -> SeriesState:
    """Unmatched since `now` (finished_at); arrivals up to now were looked at."""
    return replace(series, phase=SeriesPhase.UNMATCHED, finished_at=now, arrivals_seen=series.last_received)


def unmatched_note(step: KeepUnmatched, now: float) -> str:
    return (f"no fingerprint matches: kept for {step.until - now:.0f}s (UNMATCHED_RETENTION) so that a fingerprint "
            "applied meanwhile can take it (rematch), then its instances are deleted")


def apply_finish(series: SeriesState, step: Finish, now: float) -> SeriesState:
    return replace(series, phase=step.phase, finished_at=now)


def apply_cleanup(series: SeriesState, step: Cleanup) -> SeriesState:
    received = None if series.received is None else series.received - frozenset(step.delete)
    count = series.instance_count - len(step.delete) if received is None else len(received)
    return replace(series, cleaned=True, received=received, instance_count=max(0, count))


def update_task(series: SeriesState, task: TaskState) -> SeriesState:
    tasks = tuple(task if existing.task_id == task.task_id else existing for existing in series.tasks)
    return replace(series, tasks=tasks)


# --- What the drivers say about a step (one wording in both modes) ------------------------------


def arrivals_note(series: SeriesState, step: Reopen | NoteArrivals, rules: Rules) -> str:
    policy = rules.late_instance_policy
    after = f"after dispatch #{series.generation}"
    if isinstance(step, Reopen):
        if step.new_instances:
            what = f"{step.new_instances} new instance(s) arrived {after}"
        else:
            what = f"instance(s) were sent again {after}"
        return (f"{what}: series re-opened (LATE_INSTANCE_POLICY={policy}); it is dispatched again, "
                "with all its instances, once quiet")
    if step.late_instances:
        return (f"{step.late_instances} instance(s) arrived {after}: kept but not run "
                f"(LATE_INSTANCE_POLICY={policy}); deleted {rules.forget_after:.0f}s after the series "
                "finished (SERIES_RETENTION)")
    return f"instance(s) sent again {after} were already dispatched: duplicates, nothing runs again"


def forget_note(step: Forget) -> str:
    return (f"deleted {len(step.delete)} instance(s) that arrived after the dispatch and were never run "
            "(LATE_INSTANCE_POLICY=ignore), SERIES_RETENTION after the series finished")


def progress(tasks: Iterable[TaskState]) -> str:
    """'<succeeded>/<total>' tasks of the latest dispatch (the Tasks printer column)."""
    tasks = list(tasks)
    if not tasks:
        return ""
    latest = max(task.generation for task in tasks)
    current = [task for task in tasks if task.generation == latest]
    return f"{sum(task.phase == TaskPhase.SUCCEEDED for task in current)}/{len(current)}"


# --- Studies: the series of one study, posted together by a study-level fingerprint -----------
#
# A series that fills an entry of a study-level fingerprint takes, when it is dispatched, a
# Waiting share in the study's task (apply_dispatch). The study decision looks at every share of
# one (study, fingerprint): once every entry has a series, or `timeoutSeconds` after the first
# share was taken, the waiting shares become one task (StartStudy: one id, one record of what it
# sends, Pending on every series) or fail together (FailStudy, onTimeout: fail). From then on each
# series follows its own life cycle: it finishes when its tasks do, late instances re-open it, and
# its next dispatch takes a new share, which waits for the study's next task.


@dataclass(frozen=True)
class StudyShare:
    """One series' share in a study task, as the study decision sees it."""

    key: SeriesKey
    task: TaskState
    since: float  # when the series was complete and took the share (its dispatch's time)
    instances: tuple[str, ...]  # what the series' dispatch sent


@dataclass(frozen=True)
class StudyPart:
    """One series of a study task: the folder it is posted in (its entry's name; `-2`, `-3` when
    several series fill one entry), and the instances its dispatch `generation` sent."""

    folder: str
    key: SeriesKey
    generation: int
    instances: tuple[str, ...]


@dataclass(frozen=True)
class StartStudy:
    """Post the study: record `parts` under `task_id` (first: the task's own record of what it
    sends), then make each share in `shares` ((series, its share's task id)) Pending as `task_id`."""

    task_id: str
    parts: tuple[StudyPart, ...]
    shares: tuple[tuple[SeriesKey, str], ...]
    missing: tuple[str, ...] = ()  # entries without a series (onTimeout: run)
    joined: bool = False  # the task was started before (a crash in between): only the shares change


@dataclass(frozen=True)
class FailStudy:
    """The study's missing series did not come in time (onTimeout: fail): its shares fail."""

    shares: tuple[tuple[SeriesKey, str], ...]
    message: str


StudyStep = Wait | StartStudy | FailStudy


def study_shares(members: Iterable[SeriesState], fingerprint: str) -> list[StudyShare]:
    """Every share of `fingerprint` that the series of one study hold, waiting or not."""
    shares = []
    for series in members:
        for task in series.tasks:
            if task.entry and task.fingerprint == fingerprint:
                at = next((d.at for d in series.dispatches if d.generation == task.generation), task.updated_at)
                shares.append(StudyShare(series.key, task, at, series.instances_of(task.generation)))
    return shares


def study_step(fingerprint: Fingerprint | None, study_uid: str, shares: Sequence[StudyShare], now: float,
               started: dict[str, tuple[StudyPart, ...]] | None = None) -> StudyStep:
    """What the waiting shares of one (study, study-level fingerprint) do now (`fingerprint`
    None: it was deleted meanwhile).

    `started`: the recorded parts of the study's tasks already started (by task id), for a share
    whose task was started but that was not told yet (a driver stopped in between)."""
    waiting = [share for share in shares if share.task.phase == TaskPhase.WAITING]
    if not waiting:
        return Wait()
    for recorded_id, parts in (started or {}).items():
        recorded = {(part.key, part.generation) for part in parts}
        joining = [share for share in waiting if (share.key, share.task.generation) in recorded]
        if joining:
            return StartStudy(task_id=recorded_id, parts=parts, joined=True,
                              shares=tuple((share.key, share.task.task_id) for share in joining))
    if fingerprint is None or fingerprint.study is None:  # nothing to wait for any more
        what = "is gone (deleted, or no longer valid)" if fingerprint is None else "is no longer study-level"
        return FailStudy(_share_ids(waiting), f"fingerprint {waiting[0].task.fingerprint} {what}")
    study = fingerprint.study
    filled = {share.task.entry for share in waiting}
    missing = tuple(name for name in study.names if name not in filled)
    first = min(share.since for share in waiting)
    deadline = first + study.timeout_seconds
    if missing and now < deadline:
        return Wait(until=deadline)
    if missing and study.on_timeout == "fail":
        return FailStudy(_share_ids(waiting), f"study incomplete {study.timeout_seconds:.0f}s after its first "
                         f"series: no series for {', '.join(missing)} (onTimeout: fail)")
    earlier = {share.task.task_id for share in shares if share.task.phase != TaskPhase.WAITING}
    return StartStudy(task_id=study_task_id(study_uid, fingerprint.name, len(earlier) + 1),
                      parts=_parts(study.names, waiting), shares=_share_ids(waiting), missing=missing)


def _share_ids(shares: Iterable[StudyShare]) -> tuple[tuple[SeriesKey, str], ...]:
    return tuple(sorted((share.key, share.task.task_id) for share in shares))


def _parts(names: Sequence[str], waiting: Sequence[StudyShare]) -> tuple[StudyPart, ...]:
    """The waiting shares as parts, in the entries' order; a second series of one entry is
    posted too, in `<entry>-2` (nothing received is left out; the model picks)."""
    order = {name: index for index, name in enumerate(names)}
    parts, used = [], {}
    for share in sorted(waiting, key=lambda s: (order.get(s.task.entry, len(order)), s.since, s.key)):
        used[share.task.entry] = used.get(share.task.entry, 0) + 1
        count = used[share.task.entry]
        folder = share.task.entry if count == 1 else f"{share.task.entry}-{count}"
        parts.append(StudyPart(folder, share.key, share.task.generation, share.instances))
    return tuple(parts)


def apply_start_study(series: SeriesState, step: StartStudy, now: float) -> SeriesState:
    """The series' shares of `step` become the study task, Pending."""
    mine = {old for key, old in step.shares if key == series.key}
    tasks = tuple(replace(task, task_id=step.task_id, phase=TaskPhase.PENDING, updated_at=now)
                  if task.task_id in mine else task for task in series.tasks)
    return replace(series, tasks=tasks)


def apply_fail_study(series: SeriesState, step: FailStudy, now: float) -> SeriesState:
    mine = {old for key, old in step.shares if key == series.key}
    tasks = tuple(replace(task, phase=TaskPhase.FAILED, message=step.message, updated_at=now)
                  if task.task_id in mine else task for task in series.tasks)
    return replace(series, tasks=tasks)


def study_shares_note(step: Dispatch) -> str:
    """What a driver adds about a dispatch's study shares ("" when it has none)."""
    if not step.entries:
        return ""
    shares = ", ".join(f"{name} (as {entry})" for name, entry in step.entries)
    return f"; waiting for the rest of its study for {shares}"


def study_note(step: StartStudy) -> str:
    """What a driver says when a study task starts."""
    folders = ", ".join(f"{part.folder} ({len(part.instances)} instances)" for part in step.parts)
    missing = f"; posted without {', '.join(step.missing)} (onTimeout: run)" if step.missing else ""
    return f"study task {step.task_id}: {folders}{missing}"


def study_task_id(study_uid: str, fingerprint: str, number: int) -> str:
    """The id of a study's `number`th task for a fingerprint (a DNS-1123 label, like task_id)."""
    digest = hashlib.sha256(f"study|{study_uid}|{fingerprint}|{number}".encode()).hexdigest()[:10]
    stem = _NOT_LABEL.sub("-", fingerprint.lower()).strip("-")[:40].strip("-") or "task"
    return f"{stem}-{digest}-s{number}"


# --- One task ----------------------------------------------------------------------------------


class SubmitDecision(StrEnum):
    SUBMIT = "submit"  # nothing was sent, or every earlier submit certainly failed
    REPEAT = "repeat"  # one submit's outcome is unknown: send once more, as a possible duplicate
    GIVE_UP = "give-up"  # two outcomes unknown: a third submit is not worth a third GPU run


MAX_SUBMITS_OF_UNKNOWN_OUTCOME = 2  # the first submit and its one repeat


def submit_decision(task: TaskState) -> SubmitDecision:
    """Submit at most once more after an unknown outcome (a crash after the upload, an answer
    that timed out). The InferenceServer has no idempotency key: a repeat may run the model
    twice, never repeating may never run it. One repeat, flagged, is the compromise."""
    if task.unknown_submits <= 0:
        return SubmitDecision.SUBMIT
    if task.unknown_submits < MAX_SUBMITS_OF_UNKNOWN_OUTCOME:
        return SubmitDecision.REPEAT
    return SubmitDecision.GIVE_UP


def repeat_warning(task: TaskState) -> str:
    return (f"possible duplicate: the outcome of submit #{task.unknown_submits} is unknown (the relay "
            "stopped, or the answer never came, after the upload); the InferenceServer may already "
            "run it under a uid we never learnt. Submitting once more, and never again")


def possible_duplicate_note(task: TaskState) -> str:
    """For a task that got its uid after submits of unknown outcome (an Event, a report)."""
    return (f"possible duplicate: {task.unknown_submits} earlier submit(s) of this task had an unknown outcome; "
            f"the InferenceServer may have run it up to {task.unknown_submits + 1} times (uid "
            f"{task.inference_uid} is the one polled and delivered)")


def give_up_message(task: TaskState) -> str:
    return (f"the outcome of {task.unknown_submits} submits is unknown (each may have created a task "
            "on the InferenceServer under a uid the relay never learnt); not submitting a third time")


def start_order(priority: int, queued: int) -> tuple[int, int]:
    """Which waiting task a free worker takes first: the highest fingerprint priority, then the
    one that has waited longest (`queued`: its place in the queue)."""
    return (-priority, queued)


CANCEL_PRIORITY = 1 << 30  # a cancelled task's worker goes before any waiting work: it only ends it


class JobOutcome(StrEnum):
    """What a Kubernetes Job's conditions say (the operator's adapter reads them)."""

    RUNNING = "Running"  # no final condition yet
    COMPLETE = "Complete"
    FAILED = "Failed"


def task_phase_from_job(outcome: JobOutcome, job_message: str,
                        record: TaskState | None) -> tuple[TaskPhase, str]:
    """A Job's task phase and message, from its conditions and the task's own record.

    The record wins where it is final: a task whose predictions were delivered is Succeeded even
    if its Job later failed (a pod killed during the remote delete, a deadline)."""
    recorded = record.message if record else ""
    if record is not None and record.phase == TaskPhase.SUCCEEDED:
        return TaskPhase.SUCCEEDED, recorded
    if outcome == JobOutcome.COMPLETE:
        return TaskPhase.SUCCEEDED, recorded
    if outcome == JobOutcome.FAILED or (record is not None and record.phase == TaskPhase.FAILED):
        if job_message and job_message not in recorded:
            recorded = f"{recorded} ({job_message})" if recorded else job_message
        return TaskPhase.FAILED, recorded
    return (record.phase if record else TaskPhase.PENDING), recorded


class PendingTaskAction(StrEnum):
    """What the operator does with a task its DicomSeries shows as Pending."""

    CREATE_JOB = "create-job"  # (again: AlreadyExists means it is there)
    ASK_FOR_JOB = "ask-for-job"  # its fingerprint is gone: whether its Job exists decides
    LEAVE = "leave"  # its Job exists and carries the fingerprint as dispatched: it runs on
    FAIL = "fail"  # no Job, and no fingerprint to make one from


def pending_task_action(fingerprint_known: bool, job_exists: bool | None = None) -> PendingTaskAction:
    """A Pending task is not a task without a Job: Pending is also what a Job whose pod has not
    recorded anything yet reports (task_phase_from_job). So a deleted fingerprint fails a Pending
    task only when its Job does not exist; a Job that does exists carries a snapshot of the
    fingerprint and runs to its end. `job_exists` is asked for (ASK_FOR_JOB) only when it matters."""
    if fingerprint_known:
        return PendingTaskAction.CREATE_JOB
    if job_exists is None:
        return PendingTaskAction.ASK_FOR_JOB
    return PendingTaskAction.LEAVE if job_exists else PendingTaskAction.FAIL


def accept_task_phase(before: str | None, after: TaskPhase) -> bool:
    """A finished task stays finished: a stale event (an older record, a Job event delivered
    late) never moves a task out of Succeeded or Failed, nor between them."""
    return before not in TERMINAL_TASK_PHASES or before == after


_NOT_LABEL = re.compile(r"[^a-z0-9-]+")


def task_id(key: SeriesKey, fingerprint: str, generation: int) -> str:
    """Deterministic, DNS-1123-label task id (it names Kubernetes Jobs): same inputs, same id."""
    digest = hashlib.sha256(f"{key.slug}|{fingerprint}|{generation}".encode()).hexdigest()[:10]
    stem = _NOT_LABEL.sub("-", fingerprint.lower()).strip("-")[:40].strip("-") or "task"
    return f"{stem}-{digest}-{generation}"


# --- An administrator's requests (`isdr series retry|cancel`, the isdr.io/* annotations) ---------


class AdminAction(StrEnum):
    RETRY = "retry"  # run the failed tasks of a finished series again, from what storage still holds
    REMATCH = "rematch"  # match a kept unmatched series again (a fingerprint was applied since)
    CANCEL = "cancel"  # stop running tasks: their work (Job, remote task) is ended, they fail


@dataclass(frozen=True)
class Refused:
    """An administrator's request that cannot be carried out, and why (said to whoever asked)."""

    reason: str


@dataclass(frozen=True)
class CancelTasks:
    task_ids: tuple[str, ...]


def _latest_of_each_fingerprint(tasks: Iterable[TaskState]) -> dict[str, TaskState]:
    latest: dict[str, TaskState] = {}
    for task in tasks:
        if task.fingerprint not in latest or task.generation >= latest[task.fingerprint].generation:
            latest[task.fingerprint] = task
    return latest


def retry_decision(series: SeriesState, task_id: str | None,
                   fingerprints: Iterable[str]) -> Dispatch | ListStorage | Refused:
    """What retrying `series` (or only its task `task_id`) means: a new dispatch (#g+1) to the
    fingerprints whose latest task failed, with every instance storage still holds.

    Only a finished series is retried (a running task is cancelled first; a receiving one is
    dispatched anyway once quiet), only failed tasks (a succeeded one delivered its predictions),
    only through a fingerprint that still exists, and only when every instance the failed
    dispatch sent is still stored: a model is never run on part of what it failed on."""
    if series.phase in (SeriesPhase.RECEIVING, SeriesPhase.DISPATCHED):
        what = "receiving (it is dispatched when quiet)" if series.phase == SeriesPhase.RECEIVING else \
            f"running {len(series.active_tasks)} task(s) (cancel them first, or wait for them to end)"
        return Refused(f"the series is {what}: only a finished series is retried")
    latest = _latest_of_each_fingerprint(series.tasks)
    if task_id is not None:
        task = series.task(task_id)
        if task is None:
            return Refused(f"the series has no task {task_id}")
        if latest[task.fingerprint].task_id != task_id:
            return Refused(f"task {task_id} was retried already, as task {latest[task.fingerprint].task_id}")
        failed = [task]
    else:
        failed = list(latest.values())
    failed = [task for task in failed if task.phase == TaskPhase.FAILED]
    if not failed:
        return Refused("no failed task to retry (a succeeded task delivered its predictions already)")
    known = set(fingerprints)
    gone = sorted(task.fingerprint for task in failed if task.fingerprint not in known)
    if gone:
        return Refused(f"fingerprint(s) {', '.join(gone)} no longer exist (or are not Ready)")
    if series.received is None:
        return ListStorage()
    needed = {uid for task in failed for uid in series.instances_of(task.generation)}
    missing = needed - series.received
    if missing or not series.received:
        return Refused(f"{len(missing)} of the {len(needed)} instance(s) the failed task(s) sent are no longer "
                       "in storage: send the series again instead")
    return Dispatch(fingerprints=tuple(sorted(task.fingerprint for task in failed)),
                    generation=series.generation + 1, instances=tuple(sorted(series.received)))


def rematch_decision(series: SeriesState, fingerprints: Sequence[Fingerprint],
                     matcher: Matcher) -> Dispatch | ListStorage | Refused:
    """Match a kept unmatched series again (a fingerprint was applied since): dispatched to the
    fingerprints it matches now, with every stored instance; refused if it still matches none."""
    if series.phase != SeriesPhase.UNMATCHED:
        return Refused(f"the series is {series.phase}, not Unmatched: only a kept unmatched series is "
                       "matched again (UNMATCHED_RETENTION)")
    if series.received is None:
        return ListStorage()
    if not series.received:
        return Refused("no instance of the series is left in storage")
    matches = matcher(fingerprints, series.attributes)
    if not matches:
        return Refused("it still matches no fingerprint (`isdr fingerprint test` says why)")
    return Dispatch(fingerprints=tuple(sorted(fp.name for fp in matches)), generation=series.generation + 1,
                    instances=tuple(sorted(series.received)))


def request_note(action: AdminAction, step: Dispatch) -> str:
    """What a retry or rematch dispatched (said to whoever asked, and in the log or an Event)."""
    return (f"{action} requested: dispatch #{step.generation} to {', '.join(step.fingerprints)} with the "
            f"{len(step.instances)} instance(s) in storage")


def cancel_decision(series: SeriesState, task_id: str | None) -> CancelTasks | Refused:
    """Which tasks cancelling `series` (or only its task `task_id`) stops: the unfinished ones."""
    if task_id is not None:
        task = series.task(task_id)
        if task is None:
            return Refused(f"the series has no task {task_id}")
        if task.finished:
            return Refused(f"task {task_id} has already finished ({task.phase})")
        return CancelTasks((task_id,))
    active = series.active_tasks
    if not active:
        return Refused("the series has no running task")
    return CancelTasks(tuple(task.task_id for task in active))


CANCELLED = "cancelled by an administrator"


def cancelled_remote(inference_uid: str | None, unknown_submits: int, delete_error: str | None) -> str:
    """What became of a cancelled task's remote task (`delete_error`: why deleting it failed)."""
    if inference_uid and delete_error is None:
        return f"remote task {inference_uid} deleted"
    if inference_uid:
        return f"remote task {inference_uid} could not be deleted (it may run on): {delete_error}"
    if unknown_submits:
        return "a submit of unknown outcome may have created a remote task the relay never learnt of"
    return "nothing had been submitted"


def apply_cancel(task: TaskState, now: float, remote: str) -> TaskState:
    """A cancelled task: Failed, and saying so (`remote`: what became of its remote task)."""
    return replace(task, phase=TaskPhase.FAILED, updated_at=now, remote_delete_pending=False,
                   message=f"{CANCELLED}; {remote}" if remote else CANCELLED)
