"""Container probes for the node agent, by kubelet's rules: startup, readiness and liveness.

One ContainerProber per container run, in a thread of its own:

* the startupProbe (if any) runs first; until it succeeds the container is neither started nor
  ready and no other probe runs; failureThreshold failures in a row kill the container;
* the readinessProbe decides `ready`: false at first, true after successThreshold successes in a
  row, false again after failureThreshold failures in a row. Without one, a started container is
  ready;
* the livenessProbe: failureThreshold failures in a row kill the container (the pod's
  restartPolicy then decides whether it starts again).

Each probe waits initialDelaySeconds after the container started, then runs every periodSeconds,
and fails when it takes longer than timeoutSeconds. httpGet (200-399 is success, HTTPS without
verifying the certificate, as kubelet does), tcpSocket and exec are supported; grpc is not (it
fails, saying so). Ports are resolved through the pod's port mapping (tests/support/pod_network.py):
a probe reaches the port the container really listens on. Failures are reported as kubelet words
them ("HTTP probe failed with statuscode: 503"), for the pod's Events.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Callable

DEFAULTS = {"initialDelaySeconds": 0, "periodSeconds": 10, "timeoutSeconds": 1, "successThreshold": 1,
            "failureThreshold": 3}


@dataclass
class Result:
    ok: bool
    message: str = ""


def http_get(probe: dict, host: str, port: int, timeout: float) -> Result:
    scheme = (probe.get("scheme") or "HTTP").upper()
    path = probe.get("path") or "/"
    host = probe.get("host") or host
    headers = {h["name"]: h["value"] for h in probe.get("httpHeaders") or []}
    headers.setdefault("User-Agent", "kube-probe/isdr-node-agent")
    url = f"{scheme.lower()}://{host}:{port}{path}"
    if scheme == "HTTPS":
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        connection = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
    else:
        connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        body = response.read(10 * 1024)
    except (OSError, http.client.HTTPException) as exc:
        return Result(False, f'Get "{url}": {_reason(exc)}')
    finally:
        connection.close()
    if 200 <= response.status < 400:
        return Result(True, body.decode(errors="replace"))
    return Result(False, f"HTTP probe failed with statuscode: {response.status}")


def tcp_socket(probe: dict, host: str, port: int, timeout: float) -> Result:
    host = probe.get("host") or host
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return Result(True)
    except OSError as exc:
        return Result(False, f"dial tcp {host}:{port}: {_reason(exc)}")


def _reason(exc: Exception) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connect: connection refused"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "context deadline exceeded (Client.Timeout exceeded while awaiting headers)"
    return str(exc) or type(exc).__name__


class ContainerProber:
    """Runs one container's probes until stop(); see the module's doc.

    resolve_port(port) -> the host port for a probe's port (number or name);
    run_exec(command, timeout) -> (exit code, output) in the container's environment;
    on_change() whenever `ready` or `started` changes;
    on_failure(kind, message) for every failed probe (kind: Startup, Readiness, Liveness);
    kill(message) when the startup or liveness probe gives up on the container."""

    def __init__(self, container: dict, *, resolve_port: Callable[[int | str], int | None],
                 run_exec: Callable[[list[str], float], tuple[int, str]], on_change: Callable[[], None],
                 on_failure: Callable[[str, str], None], kill: Callable[[str], None], host: str = "127.0.0.1",
                 clock: Callable[[], float] = time.monotonic):
        self.specs = {kind: container[f"{kind.lower()}Probe"] for kind in ("Startup", "Readiness", "Liveness")
                      if container.get(f"{kind.lower()}Probe")}
        self.resolve_port = resolve_port
        self.run_exec = run_exec
        self.on_change = on_change
        self.on_failure = on_failure
        self.kill = kill
        self.host = host
        self.clock = clock
        self.started = "Startup" not in self.specs
        self.ready = self.started and "Readiness" not in self.specs
        self._successes = dict.fromkeys(self.specs, 0)
        self._failures = dict.fromkeys(self.specs, 0)
        self._begin = clock()
        self._due = {kind: self._begin + self._setting(kind, "initialDelaySeconds") for kind in self.specs}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _setting(self, kind: str, name: str) -> float:
        value = self.specs[kind].get(name)
        return float(DEFAULTS[name] if value is None else value)

    def start(self) -> None:
        if self.specs:
            self._thread = threading.Thread(target=self._loop, name="prober", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            kinds = ["Startup"] if not self.started else [k for k in ("Readiness", "Liveness") if k in self.specs]
            now = self.clock()
            for kind in kinds:
                if now >= self._due[kind] and not self._stop.is_set():
                    self._due[kind] = now + max(self._setting(kind, "periodSeconds"), 0.05)
                    self._record(kind, self.probe(kind))
            self._stop.wait(0.05)

    def probe(self, kind: str) -> Result:
        spec = self.specs[kind]
        timeout = max(self._setting(kind, "timeoutSeconds"), 0.1)
        if "exec" in spec:
            try:
                code, output = self.run_exec(list(spec["exec"].get("command") or []), timeout)
            except subprocess.TimeoutExpired:
                return Result(False, f"command timed out after {timeout:g}s")
            return Result(code == 0, output if output or code == 0 else f"command exited with {code}")
        for handler_name, handler in (("httpGet", http_get), ("tcpSocket", tcp_socket)):
            if handler_name in spec:
                port = self.resolve_port(spec[handler_name].get("port"))
                if port is None:
                    return Result(False, f"the container has no port named {spec[handler_name].get('port')!r}")
                return handler(spec[handler_name], self.host, port, timeout)
        return Result(False, "this probe type is not supported by the isdr node agent")

    def _record(self, kind: str, result: Result) -> None:
        if result.ok:
            self._failures[kind] = 0
            self._successes[kind] += 1
        else:
            self._successes[kind] = 0
            self._failures[kind] += 1
            self.on_failure(kind, result.message)
        threshold_met = self._successes[kind] >= (1 if kind != "Readiness" else self._setting(kind, "successThreshold"))
        given_up = self._failures[kind] >= self._setting(kind, "failureThreshold")
        if kind == "Startup":
            if result.ok:
                self.started = True
                self.ready = "Readiness" not in self.specs
                now = self.clock()
                for other in ("Readiness", "Liveness"):
                    if other in self.specs:
                        self._due[other] = max(self._due[other], now)
                self.on_change()
            elif given_up:
                self._give_up("startup", result.message)
        elif kind == "Readiness":
            if threshold_met and not self.ready:
                self.ready = True
                self.on_change()
            elif given_up and self.ready:
                self.ready = False
                self.on_change()
        elif kind == "Liveness" and given_up:
            self._give_up("liveness", result.message)

    def _give_up(self, probe: str, message: str) -> None:
        self.stop()
        if self.ready:
            self.ready = False
            self.on_change()
        self.kill(f"failed {probe} probe, will be restarted ({message})")
