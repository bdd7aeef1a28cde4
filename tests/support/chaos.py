"""The crash test: senders stream series while the relay is killed with SIGKILL at random moments.

Both modes. `isdr run`: the one relay process is killed and started again. Kubernetes (on the
test control plane): `isdr scp`, `isdr operator` and the Jobs' pods are killed (the Job
controller starts a new pod by its own rules). Then a settle phase lets everything finish, and
the evidence is counted where it is, never from the relay's own say-so:

- acknowledged instances: every C-STORE answer the senders got (pynetdicom SCUs that record
  every answer, and resend what was not acknowledged, as scanners do);
- lost: acknowledged, but neither in any submit the InferenceServer received nor in storage;
- duplicate submits: submits the InferenceServer (the emulator, as a process) received for the
  same series, model and instances, beyond the first; read from its data folder;
- submits the relay never learnt of: their uid never reached the relay's records, which only a
  kill inside the accept-to-record window (or an answer lost on the wire) can cause; the kills
  that landed there are counted, and the window itself is measured on every other submit;
- tasks Failed, series stuck (not finished when everything settled), duplicates at the
  destination (dcmtk's storescp, keeping every copy it is sent).

    report = run_chaos(ChaosConfig(mode="run", kills=10, series=30, workdir=tmp_path))
    print(report.table()); assert not report.violations()

scripts/chaos.py is the command line (long runs); tests/integration/test_chaos.py and
tests/kube/test_operator_chaos.py run short ones as part of the suite.
"""

from __future__ import annotations

import io
import json
import logging
import os
import queue
import random
import re
import signal
import statistics
import sys
import tarfile
import threading
import time
import zipfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pydicom
import yaml

from tests.support.dicom_peers import StoreSCP
from tests.support.emulator import EmulatorProcess
from tests.support.processes import ManagedProcess, free_port, wait_for_port, wait_until
from tests.support.relay_process import RelayProcess

log = logging.getLogger("chaos")

REPO_ROOT = Path(__file__).resolve().parents[2]
SUCCESS = 0x0000


@dataclass
class ChaosConfig:
    mode: str  # "run" (isdr run) or "kube" (isdr scp + isdr operator + Jobs)
    kills: int
    series: int
    workdir: Path
    senders: int = 3
    instances: tuple[int, int] = (2, 6)  # per series, inclusive
    kill_every: tuple[float, float] = (1.0, 4.0)  # seconds between kills
    seed: int = 0
    emulator_delay: float = 0.5
    settle_timeout: float = 300.0
    post_after: float = 1.5


# --------------------------------------------------------------------------------------------------
# The senders


@dataclass(frozen=True)
class SeriesFiles:
    series_uid: str
    study_uid: str  # one study per series: a prediction names its study, so its series
    protocol: str  # which fingerprint matches it: "v1" or "v2"
    files: tuple[Path, ...]


class Journal:
    """Every C-STORE answer every sender got: (time, series, SOP Instance UID, status or None)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.answers: list[tuple[float, str, str, int | None]] = []

    def record(self, series_uid: str, sop_uid: str, status: int | None) -> None:
        with self._lock:
            self.answers.append((time.time(), series_uid, sop_uid, status))

    def acknowledged(self) -> set[tuple[str, str]]:
        with self._lock:
            return {(series, sop) for _, series, sop, status in self.answers if status == SUCCESS}


class Sender(threading.Thread):
    """A scanner: sends its series one association each, resends what was not acknowledged (and
    now and then the whole series, as some senders do after a failure)."""

    def __init__(self, name: str, port: int, jobs: "queue.Queue[SeriesFiles]", journal: Journal,
                 rng: random.Random, called_ae: str = "ISDR"):
        super().__init__(name=name, daemon=True)
        self.port, self.jobs, self.journal, self.rng, self.called_ae = port, jobs, journal, rng, called_ae
        self.failures = 0

    def run(self) -> None:
        from pynetdicom import AE
        from pynetdicom.sop_class import CTImageStorage

        self.ae = AE(ae_title=self.name[:16])
        self.ae.add_requested_context(CTImageStorage)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = 30
        while True:
            try:
                series = self.jobs.get_nowait()
            except queue.Empty:
                return
            self.send_series(series)
            time.sleep(self.rng.uniform(0.0, 0.3))

    def send_series(self, series: SeriesFiles) -> None:
        datasets = {p: pydicom.dcmread(p) for p in series.files}
        pending = list(series.files)
        while pending:
            assoc = self.ae.associate("127.0.0.1", self.port, ae_title=self.called_ae)
            if not assoc.is_established:
                time.sleep(self.rng.uniform(0.3, 1.0))  # the relay is down: try again
                continue
            for path in list(pending):
                ds = datasets[path]
                answer = assoc.send_c_store(ds)
                status = int(answer.Status) if answer is not None and "Status" in answer else None
                self.journal.record(series.series_uid, str(ds.SOPInstanceUID), status)
                if status == SUCCESS:
                    pending.remove(path)
                elif not assoc.is_established:
                    break
            if assoc.is_established:
                assoc.release()
            if pending:
                self.failures += 1
                time.sleep(self.rng.uniform(0.2, 1.5))
                if self.rng.random() < 0.15:
                    pending = list(series.files)  # this sender resends the whole series


def make_series(folder: Path, count: int, instances: tuple[int, int], rng: random.Random) -> list[SeriesFiles]:
    from isdr_devtools.synthetic import write_ct_series

    made = []
    for index in range(count):
        protocol = "v1" if index % 2 else "v2"
        files = write_ct_series(folder / f"s{index:04d}", count=rng.randint(*instances), rows=8, cols=8,
                                series_description=f"chaos {protocol} {index}", patient_id=f"CHAOS{index:04d}")
        first = pydicom.dcmread(files[0], stop_before_pixels=True)
        made.append(SeriesFiles(str(first.SeriesInstanceUID), str(first.StudyInstanceUID), protocol, tuple(files)))
    return made


# --------------------------------------------------------------------------------------------------
# What the InferenceServer received


@dataclass
class Submit:
    uid: str
    model: str
    created_at: float
    series_uids: frozenset[str] = frozenset()
    sop_uids: frozenset[str] = frozenset()
    readable: bool = True


class SubmitRecorder(threading.Thread):
    """Reads each task the emulator accepted (its task.json and its input archive) from the
    emulator's data folder, before the relay's delete removes the archive."""

    def __init__(self, data_dir: Path, interval: float = 0.1):
        super().__init__(name="submit-recorder", daemon=True)
        self.tasks_dir = Path(data_dir) / "tasks"
        self.interval = interval
        self.submits: dict[str, Submit] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.scan()
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)
        self.scan()

    def scan(self) -> None:
        if not self.tasks_dir.is_dir():
            return
        for folder in self.tasks_dir.iterdir():
            if folder.name in self.submits:
                continue
            try:
                task = json.loads((folder / "task.json").read_text())
            except (OSError, ValueError):
                continue  # not written yet
            submit = Submit(task["uid"], task["model"], float(task["created_at"]))
            archive = next((p for p in folder.glob("input.*")), None)
            try:
                data = archive.read_bytes() if archive else None
            except OSError:
                data = None
            if data is None:
                submit.readable = False  # deleted before we could read it: reported, never guessed
            else:
                submit.series_uids, submit.sop_uids = _archive_uids(data)
            self.submits[folder.name] = submit


def _archive_uids(data: bytes) -> tuple[frozenset[str], frozenset[str]]:
    members = []
    if data[:2] == b"PK":
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = [archive.read(name) for name in archive.namelist() if not name.endswith("/")]
    else:
        with tarfile.open(fileobj=io.BytesIO(data)) as archive:
            members = [archive.extractfile(m).read() for m in archive.getmembers() if m.isfile()]
    series, sops = set(), set()
    for member in members:
        try:
            ds = pydicom.dcmread(io.BytesIO(member), stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not DICOM
            continue
        series.add(str(ds.SeriesInstanceUID))
        sops.add(str(ds.SOPInstanceUID))
    return frozenset(series), frozenset(sops)


# --------------------------------------------------------------------------------------------------
# The report


@dataclass
class Kill:
    at: float
    victim: str  # "relay", "scp", "operator", "job"


@dataclass
class ChaosReport:
    mode: str
    kills: list[Kill] = field(default_factory=list)
    series: int = 0
    acknowledged: int = 0
    lost: list[tuple[str, str]] = field(default_factory=list)
    submits: int = 0
    unreadable_submits: int = 0
    duplicate_submits: int = 0
    unrecorded_submits: int = 0  # accepted by the server, never known to the relay
    kills_in_window: int = 0  # kills that landed inside at least one submit's accept-to-record window
    submits_cut_by_a_kill: int = 0  # unrecorded submits with a kill inside their window (one kill can cut several)
    unrecorded_without_a_kill: int = 0
    windows: list[float] = field(default_factory=list)  # accept -> recorded, seconds
    tasks_failed: list[str] = field(default_factory=list)
    tasks_given_up: list[str] = field(default_factory=list)  # submit outcome unknown twice
    stuck: list[str] = field(default_factory=list)
    destination_duplicates: int = 0  # another prediction for a generation already delivered
    resent_copies: int = 0  # the same prediction (SOP Instance UID) stored again
    deliveries: int = 0
    settle_seconds: float = 0.0
    duration: float = 0.0

    def violations(self) -> list[str]:
        found = []
        if self.lost:
            found.append(f"{len(self.lost)} acknowledged instances lost")
        if self.tasks_failed:
            found.append(f"{len(self.tasks_failed)} tasks wrongly Failed")
        if self.stuck:
            found.append(f"{len(self.stuck)} series stuck")
        if self.destination_duplicates:
            found.append(f"{self.destination_duplicates} duplicates at the destination")
        if self.duplicate_submits > self.submits_cut_by_a_kill:
            found.append(f"{self.duplicate_submits} duplicate submits but only {self.submits_cut_by_a_kill} "
                         "submits cut by a kill inside their accept-to-record window")
        if self.unrecorded_without_a_kill:
            found.append(f"{self.unrecorded_without_a_kill} submits the relay never learnt of, with no kill "
                         "inside their window")
        if self.unreadable_submits:
            found.append(f"{self.unreadable_submits} submits could not be read at the emulator")
        return found

    def window_text(self) -> str:
        if not self.windows:
            return "-"
        ordered = sorted(self.windows)
        p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
        return (f"median {statistics.median(ordered) * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms, "
                f"max {ordered[-1] * 1000:.1f} ms (n={len(ordered)})")

    def table(self) -> str:
        victims = Counter(k.victim for k in self.kills)
        rows = [
            ("mode", self.mode),
            ("kills (SIGKILL)", f"{len(self.kills)} ({', '.join(f'{v} {n}' for v, n in sorted(victims.items()))})"),
            ("series sent", str(self.series)),
            ("acknowledged instances", str(self.acknowledged)),
            ("acknowledged instances lost", str(len(self.lost))),
            ("submits received by the InferenceServer", str(self.submits)),
            ("duplicate submits (same series, model and instances)", str(self.duplicate_submits)),
            ("submits the relay never learnt the uid of", str(self.unrecorded_submits)),
            ("kills inside an accept-to-record window", str(self.kills_in_window)),
            ("submits cut inside their window by those kills", str(self.submits_cut_by_a_kill)),
            ("submits the relay never learnt of without a kill", str(self.unrecorded_without_a_kill)),
            ("accept-to-record window", self.window_text()),
            ("tasks Failed (wrongly)", str(len(self.tasks_failed))),
            ("tasks Failed by the at-most-once rule", str(len(self.tasks_given_up))),
            ("series stuck", str(len(self.stuck))),
            ("predictions delivered", str(self.deliveries)),
            ("duplicates at the destination (a 2nd result of one generation)", str(self.destination_duplicates)),
            ("the same prediction stored again (same SOP Instance UID)", str(self.resent_copies)),
            ("settle time", f"{self.settle_seconds:.0f} s"),
            ("duration", f"{self.duration:.0f} s"),
        ]
        width = max(len(name) for name, _ in rows)
        lines = [f"| {'what'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
        lines += [f"| {name.ljust(width)} | {value} |" for name, value in rows]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Counting


_RUN_RECORD = re.compile(r"^(\S+ \S+) INFO +relay\.task: task \S+: submitted \d+ instances of series \S+ "
                         r"\(dispatch #\d+\) to model \S+ at \S+ as task (\S+)$", re.M)
_JOB_RECORD = re.compile(r"^(\S+) submitted \d+ instances of series \S+ \(dispatch #\d+\) to model \S+ at "
                         r"\S+ as task (\S+)$", re.M)
_RUN_FAILED = re.compile(r"relay\.task: task (\S+): task failed: (.*)$", re.M)


def _local_time(text: str, pattern: str) -> float:
    return datetime.strptime(text, pattern).timestamp()


def run_records(log_text: str) -> dict[str, float]:
    """uid -> when `isdr run` had recorded it (the log line is written right after the record)."""
    return {uid: _local_time(stamp, "%Y-%m-%d %H:%M:%S,%f") for stamp, uid in _RUN_RECORD.findall(log_text)}


def job_records(pod_logs: list[str]) -> dict[str, float]:
    found = {}
    for text in pod_logs:
        for stamp, uid in _JOB_RECORD.findall(text):
            found[uid] = _local_time(stamp, "%Y-%m-%dT%H:%M:%S.%f")
    return found


def task_records(storage_root: Path) -> dict[str, tuple[str, ...]]:
    """uid -> the instances it was sent, from the relay's task records (kept until a series is
    forgotten): the truth of what the relay knew, where a log line may be missing (a kill between
    the record and the line), and what a submit held when the emulator's copy was deleted before
    the recorder could read it."""
    found = {}
    for path in (Path(storage_root) / "state" / "tasks").glob("*.json"):
        try:
            document = json.loads(path.read_text())
            uid = document["task"].get("inference_uid")
        except (OSError, ValueError, KeyError):
            continue
        if uid:
            found[uid] = tuple(document.get("instances") or ())
    return found


def fill_from_records(submits: list[Submit], records: dict[str, tuple[str, ...]], journal: Journal) -> None:
    """Submits the recorder missed (the relay deleted the task first), told by the relay's records."""
    series_of = {sop: series for _, series, sop, _ in journal.answers}
    for submit in submits:
        if not submit.readable and records.get(submit.uid):
            submit.sop_uids = frozenset(records[submit.uid])
            submit.series_uids = frozenset(series_of[sop] for sop in submit.sop_uids if sop in series_of)
            submit.readable = True


def count(report: ChaosReport, journal: Journal, submits: list[Submit], records: dict[str, float | None],
          stored: set[tuple[str, str]], pacs_files: list[Path], submit_killers: tuple[str, ...],
          series_of_study: dict[str, str]) -> None:
    acknowledged = journal.acknowledged()
    report.acknowledged = len(acknowledged)
    submitted = {(series, sop) for s in submits for series in s.series_uids for sop in s.sop_uids}
    report.lost = sorted(acknowledged - submitted - stored)
    report.submits = len(submits)
    report.unreadable_submits = sum(not s.readable for s in submits)
    groups = Counter((s.model, s.series_uids, s.sop_uids) for s in submits if s.readable)
    report.duplicate_submits = sum(n - 1 for n in groups.values())
    report.windows = [records[s.uid] - s.created_at for s in submits if records.get(s.uid) is not None]
    unrecorded = [s for s in submits if s.uid not in records]
    report.unrecorded_submits = len(unrecorded)
    kills = sorted((k for k in report.kills if k.victim in submit_killers), key=lambda k: k.at)
    matched = set()
    for submit in unrecorded:
        # The first kill after the server accepted it: the relay never recorded the uid, so that
        # kill landed inside the window (unless it came after a time-out, POST_TIMEOUT = 30 s).
        kill = next((k for k in kills if k.at >= submit.created_at), None)
        if kill is None or kill.at - submit.created_at > 30:
            report.unrecorded_without_a_kill += 1
        else:
            matched.add(id(kill))
            report.submits_cut_by_a_kill += 1
    report.kills_in_window = len(matched)
    # At the destination: each generation of a series that the relay ran (a recorded submit) gives
    # one prediction. A second distinct prediction for it would be a duplicate run delivered; the
    # same prediction stored twice is a delivery repeated after a kill between the destination's
    # answer and the relay's record (same SOP Instance UID: the destination's own identity).
    copies, predictions = Counter(), defaultdict(set)
    for path in pacs_files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - storescp's own files
            continue
        copies[str(ds.SOPInstanceUID)] += 1
        predictions[series_of_study.get(str(ds.StudyInstanceUID), "?")].add(str(ds.SOPInstanceUID))
    runs = Counter(series for s in submits if s.uid in records for series in s.series_uids)
    report.deliveries = sum(copies.values())
    report.resent_copies = sum(n - 1 for n in copies.values())
    report.destination_duplicates = sum(max(0, len(uids) - runs[series]) for series, uids in predictions.items())


def stored_instances(root: Path) -> set[tuple[str, str]]:
    """(SeriesInstanceUID, SOP Instance UID) of every instance in a storage root's series/."""
    found = set()
    for folder, _dirs, files in os.walk(Path(root) / "series"):
        series_uid = Path(folder).parent.name  # series/<series>/<sop class>/<instance>.dcm
        for name in files:
            if name.endswith(".dcm"):
                found.add((series_uid, name[: -len(".dcm")]))
    return found


# --------------------------------------------------------------------------------------------------
# The two modes


def _fingerprint_manifest(name: str, url: str, protocol: str, pacs: StoreSCP) -> dict:
    return {
        "apiVersion": "isdr.io/v1alpha1", "kind": "Fingerprint", "metadata": {"name": name},
        "spec": {"match": {"modality": "^CT$", "seriesDescription": f"^chaos {protocol} "},
                 "inferenceServer": {"url": url, "protocol": protocol, "model": f"toy-{protocol}"},
                 "destinations": [{"host": "127.0.0.1", "port": pacs.port, "aeTitle": pacs.ae_title}]},
    }


class Chaos:
    """What both modes share: series, senders, the emulator, the destination, the killer's clock."""

    def __init__(self, config: ChaosConfig):
        self.config = config
        self.rng = random.Random(config.seed)
        self.workdir = Path(config.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.report = ChaosReport(mode=config.mode, series=config.series)
        self.journal = Journal()
        self.emulator = EmulatorProcess(self.workdir, tls=False, delay=config.emulator_delay)
        self.pacs = StoreSCP(self.workdir / "pacs", ae_title="PACS", options=["--accept-all", "+uf"]).start()
        self.recorder = SubmitRecorder(self.emulator.data_dir)
        self.recorder.start()
        self.series = make_series(self.workdir / "series", config.series, config.instances, self.rng)

    def series_of_study(self) -> dict[str, str]:
        return {series.study_uid: series.series_uid for series in self.series}

    def fingerprints(self) -> list[dict]:
        return [_fingerprint_manifest("chaos-v1", self.emulator.v1_tasks_url, "v1", self.pacs),
                _fingerprint_manifest("chaos-v2", self.emulator.base_url, "v2", self.pacs)]

    def start_senders(self, port: int) -> list[Sender]:
        jobs: queue.Queue[SeriesFiles] = queue.Queue()
        for series in self.series:
            jobs.put(series)
        senders = [Sender(f"CHAOS{i}", port, jobs, self.journal, random.Random(self.rng.random()))
                   for i in range(self.config.senders)]
        for sender in senders:
            sender.start()
        return senders

    def kill_loop(self, kill_one, senders: list[Sender]) -> None:
        """`kills` random kills (`kill_one()` -> the victim's name, or None when there was none);
        if the senders finish first, the last kills hit dispatches, tasks and clean-ups."""
        while len(self.report.kills) < self.config.kills:
            time.sleep(self.rng.uniform(*self.config.kill_every))
            at = time.time()
            victim = kill_one()
            if victim:
                self.report.kills.append(Kill(at, victim))
        for sender in senders:
            sender.join()

    def save_evidence(self) -> None:
        """Everything counted, as raw data (evidence.json in the work folder), to look at later."""
        evidence = {
            "kills": [{"at": k.at, "victim": k.victim} for k in self.report.kills],
            "answers": self.journal.answers,
            "submits": [{"uid": s.uid, "model": s.model, "created_at": s.created_at, "readable": s.readable,
                         "series": sorted(s.series_uids), "instances": sorted(s.sop_uids)}
                        for s in self.recorder.submits.values()],
            "report": {k: v for k, v in self.report.__dict__.items() if k != "kills"},
        }
        (self.workdir / "evidence.json").write_text(json.dumps(evidence, default=str))

    def close(self) -> None:
        self.recorder.stop()
        self.pacs.stop()
        self.emulator.stop()


def run_chaos(config: ChaosConfig, cluster=None, agent=None, namespace: str | None = None) -> ChaosReport:
    started = time.monotonic()
    chaos = Chaos(config)
    try:
        if config.mode == "run":
            _run_mode(chaos)
        elif config.mode == "kube":
            _kube_mode(chaos, cluster, agent, namespace)
        else:
            raise ValueError(f"unknown mode {config.mode!r}")
    finally:
        chaos.close()
        chaos.save_evidence()
    chaos.report.duration = time.monotonic() - started
    return chaos.report


def _tally(chaos: "Chaos", storage_dir: Path, logged_records: dict[str, float],
           submit_killers: tuple[str, ...]) -> None:
    """Count the run into chaos.report: what the emulator received, what the relay recorded (task
    records in storage, times from its log), what storage and the destination hold."""
    chaos.recorder.scan()
    submits = list(chaos.recorder.submits.values())
    known = task_records(storage_dir)
    fill_from_records(submits, known, chaos.journal)
    records = {**{uid: None for uid in known}, **logged_records}
    count(chaos.report, chaos.journal, submits, records, stored_instances(storage_dir), chaos.pacs.files(),
          submit_killers, chaos.series_of_study())


# --- isdr run -------------------------------------------------------------------------------------


def _run_mode(chaos: Chaos) -> None:
    config = chaos.config
    relay = RelayProcess(chaos.workdir / "relay", env={
        "POST_AFTER": str(config.post_after), "POST_TIMEOUT": "30", "SERIES_RETENTION": "86400",
        "GET_INTERVAL": "0.3", "WORKERS": "4", "DELIVERY_TIMEOUT": "120",
    })
    for manifest in chaos.fingerprints():
        relay.add_manifest(manifest)
    relay.start()
    try:
        senders = chaos.start_senders(relay.port)

        def kill_relay() -> str:
            relay.kill()
            time.sleep(chaos.rng.uniform(0.0, 0.5))
            relay.start()
            return "relay"

        chaos.kill_loop(kill_relay, senders)
        settle_started = time.monotonic()
        _settle(lambda: _run_mode_idle(relay.data_dir), chaos)
        chaos.report.settle_seconds = time.monotonic() - settle_started
        log_text = relay.log()
    finally:
        relay.stop()
    report = chaos.report
    _tally(chaos, relay.data_dir, run_records(log_text), ("relay",))
    for task_id, message in _RUN_FAILED.findall(log_text):
        (report.tasks_given_up if "submits is unknown" in message else report.tasks_failed).append(
            f"{task_id}: {message}")
    report.stuck = _run_mode_stuck(relay.data_dir)


def _run_mode_stuck(data_dir: Path) -> list[str]:
    stuck = []
    documents = {}
    for path in (Path(data_dir) / "state" / "series").glob("*.json"):
        try:
            documents[path.stem] = json.loads(path.read_text())
        except (OSError, ValueError):
            stuck.append(f"{path.name}: unreadable")
    failed = set()
    for slug, doc in documents.items():
        if doc["phase"] == "Failed":
            failed.add(doc["key"]["series_uid"])
        elif doc["phase"] != "Succeeded" or not doc.get("cleaned"):
            stuck.append(f"{doc['key']['series_uid']}: {doc['phase']}")
    for series_uid, _sop in stored_instances(data_dir):
        if series_uid not in failed and not any(series_uid in s for s in stuck):
            stuck.append(f"{series_uid}: instances left in storage")
    return stuck


def _run_mode_idle(data_dir: Path) -> bool:
    return not _run_mode_stuck(data_dir)


def _settle(idle, chaos: Chaos, quiet: float = 8.0) -> None:
    """Until the relay is idle and the InferenceServer has seen nothing new for `quiet` seconds."""
    deadline = time.monotonic() + chaos.config.settle_timeout
    last_change, last_seen = time.monotonic(), None
    while time.monotonic() < deadline:
        seen = (len(chaos.recorder.submits), len(chaos.pacs.files()))
        if seen != last_seen:
            last_seen, last_change = seen, time.monotonic()
        if time.monotonic() - last_change >= quiet and idle():
            return
        time.sleep(1.0)


# --- Kubernetes -------------------------------------------------------------------------------------

CLAIM = "isdr-data"


def kube_relay_env(cluster, namespace: str, storage_dir: Path, scp_port: int, **overrides) -> dict[str, str]:
    """The environment of `isdr scp` and `isdr operator` (and, through the operator, the Jobs) on
    the test control plane: the PVC folder the node agent mounts as their storage, fast timing."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("KUBERNETES_SERVICE_HOST", "STORAGE", "S3_BUCKET", "INCOMING_DIR")}
    return {**base, "KUBECONFIG": str(cluster.kubeconfig), "POD_NAMESPACE": namespace,
            "INCOMING_DIR": str(storage_dir), "SCP_PORT": str(scp_port), "SCP_AE_TITLE": "ISDR",
            "POST_AFTER": "1", "GET_INTERVAL": "0.3", "NOT_FOUND_GRACE": "10", "DELIVERY_TIMEOUT": "60",
            "SERIES_RETENTION": "600", "STORAGE_PVC_CLAIM": CLAIM, "JOB_IMAGE": "isdr:test",
            "JOB_BACKOFF_LIMIT": "2", "JOB_TTL_SECONDS_AFTER_FINISHED": "600", "LOG_LEVEL": "INFO",
            # The operator's name in kopf's peering: a restarted operator is the same pod's container
            # starting again (a new name would wait for the old one's keep-alive to expire).
            "POD_ID": "isdr-operator-0",
            **{k: str(v) for k, v in overrides.items()}}


class KubeRelay:
    """isdr scp + isdr operator for one namespace, sharing the PVC folder the Jobs mount."""

    def __init__(self, cluster, agent, namespace: str, workdir: Path, post_after: float):
        self.cluster, self.agent, self.namespace, self.workdir = cluster, agent, namespace, workdir
        self.storage_dir = agent.pvc_path(CLAIM, namespace)
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self.scp_port = free_port()
        self.env = kube_relay_env(cluster, namespace, self.storage_dir, self.scp_port, POST_AFTER=post_after,
                                  DELIVERY_TIMEOUT=120, POST_TIMEOUT=30, SERIES_RETENTION=86400,
                                  JOB_BACKOFF_LIMIT=100, JOB_TTL_SECONDS_AFTER_FINISHED=86400)
        self.scp = self.operator = None
        self.starts = Counter()

    def _spawn(self, what: str, args: list[str]) -> ManagedProcess:
        self.starts[what] += 1
        return ManagedProcess([sys.executable, "-m", "relay.cli", *args],
                              self.workdir / f"{what}-{self.starts[what]}.log", env=self.env, cwd=REPO_ROOT)

    def start_scp(self) -> None:
        self.scp = self._spawn("scp", ["scp", "--namespace", self.namespace])
        wait_for_port(self.scp_port, process=self.scp.popen, timeout=60)

    def start_operator(self) -> None:
        self.operator = self._spawn("operator", ["operator", "--namespace", self.namespace, "--peering", "isdr"])
        path = self.operator.log_path
        wait_until(lambda: "operator ready" in path.read_text(errors="replace") or self.operator.poll() is not None,
                   60, "the operator to start")

    def stop(self) -> None:
        for process in (self.operator, self.scp):
            if process is not None:
                process.stop(timeout=20)

    def running_job_pods(self) -> list[str]:
        pods = self.cluster.core.list_namespaced_pod(self.namespace, label_selector="isdr.io/task").items
        return [p.metadata.name for p in pods if p.status.phase == "Running"]

    def pod_logs(self) -> list[str]:
        texts = []
        for path in (Path(self.agent.work_dir) / "pods").glob(f"{self.namespace}_*/logs/*/*.log"):
            texts.append(path.read_text(errors="replace"))
        return texts

    def series(self) -> list[dict]:
        return self.cluster.custom.list_namespaced_custom_object("isdr.io", "v1alpha1", self.namespace,
                                                                 "dicomseries")["items"]


def _kube_mode(chaos: Chaos, cluster, agent, namespace: str) -> None:
    config = chaos.config
    cluster.custom.create_namespaced_custom_object(
        "kopf.dev", "v1", namespace, "kopfpeerings",
        {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "isdr"}})
    relay = KubeRelay(cluster, agent, namespace, chaos.workdir / "relay", config.post_after)
    relay.workdir.mkdir(parents=True, exist_ok=True)
    relay.start_scp()
    relay.start_operator()
    for manifest in chaos.fingerprints():
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest))
    try:
        senders = chaos.start_senders(relay.scp_port)

        def kill_one() -> str | None:
            pods = relay.running_job_pods()
            victim = "job" if pods and chaos.rng.random() < 0.7 else chaos.rng.choice(["scp", "operator"])
            if victim == "job":
                pids = agent.pod_pids(namespace, chaos.rng.choice(pods))
                try:
                    os.kill(pids["task"], signal.SIGKILL)
                except (KeyError, ProcessLookupError):
                    return None  # it ended meanwhile
                return "job"
            (relay.scp if victim == "scp" else relay.operator).kill()
            time.sleep(chaos.rng.uniform(0.0, 0.5))
            (relay.start_scp if victim == "scp" else relay.start_operator)()
            return victim

        chaos.kill_loop(kill_one, senders)
        settle_started = time.monotonic()
        _settle(lambda: not _kube_stuck(relay), chaos)
        chaos.report.settle_seconds = time.monotonic() - settle_started
    finally:
        relay.stop()
    report = chaos.report
    _tally(chaos, relay.storage_dir, job_records(relay.pod_logs()), ("job",))
    for body in relay.series():
        for task in (body.get("status") or {}).get("tasks") or []:
            if task.get("phase") == "Failed":
                text = f"{task['taskId']}: {task.get('message', '')}"
                (report.tasks_given_up if "submits is unknown" in text else report.tasks_failed).append(text)
    report.stuck = _kube_stuck(relay)


def _kube_stuck(relay: KubeRelay) -> list[str]:
    stuck = []
    failed = set()
    for body in relay.series():
        status = body.get("status") or {}
        uid = body["spec"]["seriesInstanceUID"]
        if status.get("phase") == "Failed":
            failed.add(uid)
        elif status.get("phase") != "Succeeded" or not status.get("instancesDeleted"):
            stuck.append(f"{uid}: {status.get('phase')} ({status.get('progress', '')})")
    for series_uid, _sop in stored_instances(relay.storage_dir):
        if series_uid not in failed and not any(series_uid in s for s in stuck):
            stuck.append(f"{series_uid}: instances left in storage")
    return stuck
