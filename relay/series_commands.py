"""`isdr series list|retry|rematch|cancel`: an administrator's view of, and hand on, a running
`isdr run`.

`list` reads the relay's storage (its state documents, the task records and the stored
instances), so it works whether or not the relay runs. `retry`, `rematch` and `cancel` leave a request in
that storage for the running relay (relay.admin_requests) and print its answer. Nothing printed
identifies a patient: series are named by their Series Instance UID, as in the relay's log.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from relay.admin_requests import BadRequest, Request, RequestStore
from relay.config import ConfigError, load_settings
from relay.dicom.identity import identify_part10
from relay.fingerprints.model import SeriesAttributes
from relay.lifecycle import AdminAction, SeriesPhase, SeriesState, TaskState, progress
from relay.state_store import SeriesStore, read_task
from relay.storage import Storage, StorageError, open_storage
from relay.uids import SeriesKey, parse_instance_key

EXIT_OK, EXIT_REFUSED, EXIT_UNUSABLE, EXIT_NO_ANSWER = 0, 1, 2, 3

SERIES_DESCRIPTION = """\
Look at the series of an `isdr run` relay; retry or cancel their inference tasks, rematch the
unmatched ones.

The relay is found through its storage: the same settings as `isdr run` (INCOMING_DIR, or
STORAGE=s3 with S3_BUCKET...), or --incoming-dir. `list` only reads; the others leave
a request there that the running relay carries out at its next look (POST_INTERVAL), and print
its answer. Reference: docs/administration.md"""

SERIES_EPILOG = """\
examples:
  isdr series list
  isdr series list --tasks
  isdr series retry 1.2.826.0.1.3680043.8.498.1
  isdr series rematch 1.2.826.0.1.3680043.8.498.2
  isdr series cancel 1.2.826.0.1.3680043.8.498.1 --task ct-thorax-0a1b2c3d4e-1"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("series", help="list the series of `isdr run`; retry, cancel or rematch them",
                                   description=SERIES_DESCRIPTION, epilog=SERIES_EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="series_command", metavar="COMMAND", required=True)

    listing = commands.add_parser(
        "list", help="phase, instances, tasks and age of every series (like kubectl get dicomseries)",
        description="One line per series the relay holds: Series Instance UID, modality, series "
        "description, stored instances, phase, tasks of the latest dispatch that succeeded out of "
        "all of them, and the time since its first instance arrived. No patient identifiers.")
    _storage_arguments(listing)
    listing.add_argument("--tasks", action="store_true",
                         help="also one line per task: its id (for --task), fingerprint, dispatch, phase, message")
    listing.add_argument("-o", "--output", choices=("table", "json"), default="table", help="output format")
    listing.set_defaults(func=list_series)

    for action, summary, more in (
        (AdminAction.RETRY, "run the failed tasks of a finished series again",
         "A new dispatch to each fingerprint whose latest task failed (or only --task's), with the "
         "instances still in storage, through the fingerprint as it is now. Refused for a series "
         "still receiving or running, with nothing failed, or whose instances were deleted."),
        (AdminAction.REMATCH, "match a kept unmatched series against the fingerprints as they are now",
         "For a series no fingerprint matched, kept for UNMATCHED_RETENTION seconds (default 0: not "
         "kept): once the right fingerprint is in FINGERPRINT_DIR, the series is dispatched to every "
         "fingerprint it matches now, with all its stored instances. Refused if it still matches none."),
        (AdminAction.CANCEL, "cancel the running tasks of a series",
         "Each running task (or only --task) stops at its next step, its task on the InferenceServer "
         "is deleted, and it is recorded as Failed ('cancelled by an administrator'); `retry` can "
         "run it again."),
    ):
        command = commands.add_parser(str(action), help=summary, description=f"{summary[0].upper()}{summary[1:]}. "
                                      f"{more}")
        command.add_argument("series", metavar="SERIES", help="the Series Instance UID (see `isdr series list`)")
        command.add_argument("--task", help="only this task of the series (see `isdr series list --tasks`)")
        command.add_argument("--wait", type=float, default=30.0, metavar="SECONDS",
                             help="how long to wait for the relay's answer (default 30); without one the "
                             "request is withdrawn")
        _storage_arguments(command)
        command.set_defaults(func=ask, action=action)
    return parser


def _storage_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--incoming-dir", type=Path, help="the relay's storage root for STORAGE=local (INCOMING_DIR)")


def _open(args) -> Storage | None:
    try:
        settings = load_settings(incoming_dir=args.incoming_dir)
    except ConfigError as exc:
        print(f"isdr series: {exc}", file=sys.stderr)
        return None
    if settings.storage == "local" and not settings.incoming_dir.is_dir():
        print(f"isdr series: {settings.incoming_dir} does not exist (set INCOMING_DIR or --incoming-dir)",
              file=sys.stderr)
        return None
    return open_storage(settings)


# --- list --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesRow:
    """What `isdr series list` shows of one series (the columns of `kubectl get dicomseries`)."""

    series: SeriesState
    instances: int
    first_seen: float

    def columns(self, now: float) -> tuple[str, ...]:
        s = self.series
        return (s.key.series_uid, s.attributes.modality or "-", s.attributes.series_description or "-",
                str(self.instances), str(s.phase), progress(s.tasks) or "-", age(now - self.first_seen))


HEADERS = ("SERIES", "MODALITY", "DESCRIPTION", "INSTANCES", "PHASE", "TASKS", "AGE")
TASK_HEADERS = ("TASK", "FINGERPRINT", "DISPATCH", "PHASE", "MESSAGE")


def age(seconds: float) -> str:
    """kubectl's way: 42s, 5m, 3h, 12d."""
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size * (2 if unit != "m" else 1):
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def series_rows(storage: Storage) -> list[SeriesRow]:
    """Every series the relay holds: its state document (tasks as their own records say), or,
    for one still receiving, what storage holds."""
    stored: dict[SeriesKey, tuple[int, float, str]] = {}
    for info in storage.list("series/"):
        parsed = parse_instance_key(info.key)
        if parsed is not None:
            count, oldest, sample = stored.get(parsed[0], (0, info.modified, info.key))
            stored[parsed[0]] = (count + 1, min(oldest, info.modified), sample)
    rows = []
    for state in SeriesStore(storage).load_all():
        tasks = tuple(read_task(storage, task.task_id) or task for task in state.tasks)
        count, _oldest, _sample = stored.pop(state.key, (0, 0.0, ""))
        rows.append(SeriesRow(replace(state, tasks=tasks), count, state.first_received))
    for key, (count, oldest, sample) in stored.items():
        try:
            attributes = identify_part10(storage.get(sample)).attributes
        except Exception:  # an unreadable instance still counts; the relay reports it
            attributes = None
        state = SeriesState(key=key, attributes=attributes or SeriesAttributes())
        rows.append(SeriesRow(state, count, oldest))
    return sorted(rows, key=lambda row: (row.first_seen, row.series.key))


def _table(rows: list[tuple[str, ...]], headers: tuple[str, ...]) -> str:
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    return "\n".join("   ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in [headers, *rows])


def _task_line(task: TaskState) -> tuple[str, ...]:
    return (f"  {task.task_id}", task.fingerprint, f"#{task.generation}", str(task.phase),
            (task.message or "").replace("\n", " ")[:120])


def list_series(args) -> int:
    storage = _open(args)
    if storage is None:
        return EXIT_UNUSABLE
    try:
        rows = series_rows(storage)
    except StorageError as exc:
        print(f"isdr series: cannot read the relay's storage: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    finally:
        storage.close()
    now = time.time()
    if args.output == "json":
        print(json.dumps([_json_row(row, now) for row in rows], indent=2))
        return EXIT_OK
    if not rows:
        print("no series")
        return EXIT_OK
    if not args.tasks:
        print(_table([row.columns(now) for row in rows], HEADERS))
        return EXIT_OK
    for row in rows:
        print(_table([row.columns(now)], HEADERS))
        if row.series.tasks:
            print(_table([_task_line(task) for task in row.series.tasks], tuple(f"  {h}" if i == 0 else h
                                                                                for i, h in enumerate(TASK_HEADERS))))
        print()
    return EXIT_OK


def _json_row(row: SeriesRow, now: float) -> dict:
    s = row.series
    return {
        "seriesInstanceUID": s.key.series_uid, "sopClassUID": s.key.sop_class_uid,
        "modality": s.attributes.modality, "seriesDescription": s.attributes.series_description,
        "instances": row.instances, "phase": str(s.phase), "progress": progress(s.tasks),
        "ageSeconds": round(now - row.first_seen, 3), "generation": s.generation,
        "tasks": [{"taskId": t.task_id, "fingerprint": t.fingerprint, "generation": t.generation,
                   "phase": str(t.phase), "inferenceTaskUID": t.inference_uid, "message": t.message}
                  for t in s.tasks],
    }


# --- retry, cancel -------------------------------------------------------------------------------

ANSWER_POLL = 0.2


def ask(args) -> int:
    storage = _open(args)
    if storage is None:
        return EXIT_UNUSABLE
    try:
        try:
            request = Request.new(args.action, args.series, args.task, time.time())
        except BadRequest as exc:
            print(f"isdr series {args.action}: {exc}", file=sys.stderr)
            return EXIT_UNUSABLE
        requests = RequestStore(storage)
        requests.ask(request)
        deadline = time.monotonic() + max(0.0, args.wait)
        while True:
            answer = requests.answer_to(request.id)
            if answer is not None:
                print(("done: " if answer.accepted else "refused: ") + answer.message)
                return EXIT_OK if answer.accepted else EXIT_REFUSED
            if time.monotonic() >= deadline:
                break
            time.sleep(ANSWER_POLL)
        if requests.withdraw(request.id):
            print(f"no answer within {args.wait:g}s: is `isdr run` running on this storage? The request was "
                  "withdrawn.", file=sys.stderr)
        else:
            print(f"the relay took the request but gave no answer within {args.wait:g}s: see its log "
                  "and `isdr series list`", file=sys.stderr)
        return EXIT_NO_ANSWER
    except StorageError as exc:
        print(f"isdr series {args.action}: cannot reach the relay's storage: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    finally:
        storage.close()
