"""The node agent's pod network: what a pod's own network namespace, kube-proxy and the cluster's
DNS give a real pod, for pods that run as local processes on the host's network.

* **Ports** (PodPorts). Every TCP port a pod's containers declare (`containerPort`) gets a free
  host port, as if the pod had an address of its own: two pods, or two tests running at once,
  can both listen on "11112". A container does not see its containerPort, just as it does not see
  its mount paths: in its env values and args, a declared port number that stands alone - the
  whole value, or after ':' or '=' (SCP_PORT=11112, --liveness=http://0.0.0.0:8080/healthz) - is
  rewritten to the host port. A port a program picks by itself (a default that no env value or
  arg names) is not moved and may collide. `<pod dir>/ports.json` records the mapping:
  127.0.0.1 plus the host port is what the pod's IP plus its containerPort is on a cluster
  (`pod_port()` reads it).
* **Services** (ServiceProxy, kube-proxy's job). Each Service with a selector gets an address of
  its own on the loopback network (in 127.64.0.0/10, chosen at random, so that several agents on
  one machine do not collide) and a TCP forwarder on each of its ports, to a Ready pod of this
  node that the selector matches, at the targetPort (a number or a port name), through the pod's
  port mapping; with no endpoint the connection is reset. `<work dir>/services.json` records the
  addresses (`service_address()` reads it).
* **Names** (the pod's hosts file, kubelet's job). Each container runs in a mount and UTS
  namespace of its own (as root; otherwise inside a user namespace of its own, where the kernel
  allows unprivileged ones) in which /etc/hosts is the pod's own
  file, as kubelet manages it: localhost, the pod's hostname, its hostAliases, and every Service
  as `<name>.<ns>.svc.cluster.local`, `<name>.<ns>.svc`, `<name>.<ns>` and, in the pod's own
  namespace, `<name>` (the names the cluster DNS and a pod's search domains resolve). The agent
  rewrites the files in place when Services come and go. The container's hostname is the pod's
  name. Where namespaces are not permitted, pods share the host's /etc/hosts and hostname and
  Service names do not resolve (`isolation_supported()`, and agent.json's "service_names").
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import itertools
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from tests.support.processes import free_port
from tests.support.tcp_proxy import TcpProxy

log = logging.getLogger("node-agent")

LOOPBACK_SERVICES = ipaddress.ip_network("127.64.0.0/10")
CLUSTER_DOMAIN = "cluster.local"

# --------------------------------------------------------------------------------------------------
# ports


class PodPorts:
    """The host ports that stand for a pod's declared container ports."""

    def __init__(self, containers: Iterable[dict] = (), allocate: Callable[[], int] = free_port,
                 host_ports: dict[int, int] | None = None, names: dict[str, int] | None = None):
        self.host_ports: dict[int, int] = dict(host_ports or {})
        self.names: dict[str, int] = dict(names or {})
        for container in containers:
            for port in container.get("ports") or []:
                if (port.get("protocol") or "TCP") != "TCP":
                    continue
                number = int(port["containerPort"])
                if number not in self.host_ports:
                    self.host_ports[number] = allocate()
                if port.get("name"):
                    self.names.setdefault(port["name"], number)
        self._pattern = None
        if self.host_ports:
            alternatives = "|".join(str(n) for n in sorted(self.host_ports, reverse=True))
            # The whole value, or after ':' or '=' up to a non-digit.
            self._pattern = re.compile(rf"^({alternatives})$|(?<=[:=])({alternatives})(?![0-9])")

    def container_port(self, port: int | str, container: dict | None = None) -> int | None:
        """A port number, or a port name resolved in `container` (else anywhere in the pod)."""
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        if container is not None:
            for item in container.get("ports") or []:
                if item.get("name") == port:
                    return int(item["containerPort"])
            return None
        return self.names.get(str(port))

    def host_port(self, port: int | str, container: dict | None = None) -> int | None:
        """Where the pod listens on the host for `port` (an undeclared number stays as it is)."""
        number = self.container_port(port, container)
        return None if number is None else self.host_ports.get(number, number)

    def rewrite(self, text: str) -> str:
        if self._pattern is None:
            return text
        return self._pattern.sub(lambda match: str(self.host_ports[int(match.group(1) or match.group(2))]), text)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps({"ports": {str(k): v for k, v in self.host_ports.items()},
                                          "names": self.names}))

    @classmethod
    def load(cls, path: Path) -> "PodPorts":
        data = json.loads(Path(path).read_text())
        return cls(host_ports={int(k): v for k, v in data["ports"].items()}, names=data["names"])


# --------------------------------------------------------------------------------------------------
# the pod's hosts file and namespaces


def hosts_file_text(namespace: str, hostname: str, aliases: list[dict], services: dict[tuple[str, str], str]) -> str:
    lines = ["# Kubernetes-managed hosts file (isdr node agent).",
             "127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback",
             f"127.0.0.1\t{hostname}"]
    for alias in aliases or []:
        if alias.get("ip") and alias.get("hostnames"):
            lines.append(f"{alias['ip']}\t{' '.join(alias['hostnames'])}")
    lines.append("# Services (the cluster DNS, for this pod)")
    for (service_namespace, name), address in sorted(services.items()):
        names = [f"{name}.{service_namespace}.svc.{CLUSTER_DOMAIN}", f"{name}.{service_namespace}.svc",
                 f"{name}.{service_namespace}"]
        if service_namespace == namespace:
            names.append(name)
        lines.append(f"{address}\t{' '.join(names)}")
    return "\n".join(lines) + "\n"


@dataclass
class _HostsFile:
    namespace: str
    hostname: str
    aliases: list[dict] = field(default_factory=list)


class HostsFiles:
    """Every running pod's hosts file, rewritten in place (a bind mount follows the inode) when the
    Services change."""

    def __init__(self):
        self._files: dict[Path, _HostsFile] = {}
        self._services: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def add(self, path: Path, namespace: str, hostname: str, aliases: list[dict] | None = None) -> None:
        with self._lock:
            entry = self._files[Path(path)] = _HostsFile(namespace, hostname, list(aliases or []))
            self._write(Path(path), entry)

    def remove(self, path: Path) -> None:
        with self._lock:
            self._files.pop(Path(path), None)

    def services_changed(self, services: dict[tuple[str, str], str]) -> None:
        with self._lock:
            self._services = dict(services)
            for path, entry in self._files.items():
                self._write(path, entry)

    def _write(self, path: Path, entry: _HostsFile) -> None:
        text = hosts_file_text(entry.namespace, entry.hostname, entry.aliases, self._services).encode()
        try:
            with open(path, "r+b" if path.exists() else "wb") as handle:  # same inode: mounts see it
                handle.write(text)
                handle.truncate()
        except OSError as exc:
            log.warning("cannot write the hosts file %s: %s", path, exc)


_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWUSER = 0x10000000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
PR_SET_PDEATHSIG = 1


def _enter_sandbox(hosts_file: bytes | None, hostname: bytes | None, uid: int, gid: int) -> None:
    """In the child between fork and exec: die with the agent; own mount and UTS namespaces with
    the pod's /etc/hosts and hostname. Raises OSError where namespaces are not permitted.

    As root the namespaces come as they are; otherwise inside a user namespace of the process's
    own, in which its user and group stay what they are (so it reaches the same files), where the
    kernel allows unprivileged user namespaces (Debian and most distributions do)."""
    if _libc is None:
        return
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if hosts_file is None:
        return
    if _libc.unshare(CLONE_NEWNS | CLONE_NEWUTS) != 0:
        if _libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWUTS) != 0:
            raise OSError(ctypes.get_errno(), "unshare")
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            fd = os.open(f"/proc/self/{name}", os.O_WRONLY)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
    if _libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        raise OSError(ctypes.get_errno(), "mount --make-rprivate /")
    if _libc.mount(hosts_file, b"/etc/hosts", None, MS_BIND, None) != 0:
        raise OSError(ctypes.get_errno(), "mount --bind /etc/hosts")
    if hostname and _libc.sethostname(hostname, len(hostname)) != 0:
        raise OSError(ctypes.get_errno(), "sethostname")


def sandbox_preexec(hosts_file: Path | None, hostname: str | None) -> Callable[[], None]:
    """A subprocess preexec_fn putting the process into the pod's sandbox (hosts_file None: only
    die with the agent)."""
    hosts = os.fsencode(hosts_file) if hosts_file is not None else None
    name = hostname.encode()[:63] if hostname else None
    uid, gid = os.getuid(), os.getgid()
    return lambda: _enter_sandbox(hosts, name, uid, gid)


def isolation_supported(scratch: Path) -> bool:
    """Whether processes can get the pod's own /etc/hosts and hostname here (root: yes)."""
    if _libc is None or not os.path.exists("/etc/hosts"):
        return False
    probe = Path(scratch) / "hosts-probe"
    probe.write_text("127.0.0.1\tlocalhost\n")
    try:
        subprocess.run([sys.executable, "-c", "pass"], preexec_fn=sandbox_preexec(probe, "isdr-probe"),
                       check=True, timeout=30, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return True
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        probe.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# Services


@dataclass
class Endpoint:
    """A Ready pod a Service may forward to."""

    name: str
    ports: PodPorts


def selects(selector: dict, labels: dict) -> bool:
    """Whether a Service's (non-empty) selector matches a pod's labels."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _shape(spec: dict) -> tuple:
    """What a Service's forwarders depend on: a change of it re-opens them."""
    return (json.dumps(spec.get("selector"), sort_keys=True), json.dumps(spec.get("ports"), sort_keys=True),
            bool(spec.get("publishNotReadyAddresses")))


class _Service:
    def __init__(self, namespace: str, name: str, address: str, spec: dict, endpoints):
        self.namespace, self.name, self.address = namespace, name, address
        self.spec = spec
        self.proxies: list[TcpProxy] = []
        self._endpoints = endpoints
        self._turn = itertools.count()

    @property
    def key(self) -> tuple[str, str]:
        return self.namespace, self.name

    def open(self) -> None:
        """Listen on every TCP port; raises OSError (EADDRINUSE: try another address)."""
        try:
            for port in self.spec.get("ports") or []:
                if (port.get("protocol") or "TCP") != "TCP":
                    continue
                target = port.get("targetPort", port["port"])
                proxy = TcpProxy(None, None, listen_host=self.address, listen_port=int(port["port"]),
                                 resolve=lambda target=target: self._pick(target))
                try:
                    proxy.start()
                except PermissionError:
                    log.warning("service %s/%s: cannot listen on port %s here (privileged)", self.namespace,
                                self.name, port["port"])
                    continue
                self.proxies.append(proxy)
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        for proxy in self.proxies:
            proxy.stop()
        self.proxies = []

    def _pick(self, target: int | str) -> tuple[str, int] | None:
        endpoints = self._endpoints(self.namespace, self.spec.get("selector") or {},
                                    bool(self.spec.get("publishNotReadyAddresses")))
        candidates = [(e, e.ports.host_port(target)) for e in endpoints]
        candidates = [(e, port) for e, port in candidates if port is not None]
        if not candidates:
            log.info("service %s/%s: no ready endpoint for port %s", self.namespace, self.name, target)
            return None
        _endpoint, port = candidates[next(self._turn) % len(candidates)]
        return "127.0.0.1", port


class ServiceProxy:
    """kube-proxy and the cluster DNS for this node: see the module's doc.

    endpoints(namespace, selector, include_not_ready) returns the pods a Service may forward to;
    on_change(services) gets {(namespace, name): address} whenever that changes."""

    def __init__(self, endpoints: Callable[[str, dict, bool], list[Endpoint]], state_file: Path,
                 on_change: Callable[[dict[tuple[str, str], str]], None] = lambda _services: None):
        self.endpoints = endpoints
        self.state_file = Path(state_file)
        self.on_change = on_change
        self.services: dict[str, _Service] = {}  # by uid
        self.lock = threading.Lock()

    def addresses(self) -> dict[tuple[str, str], str]:
        with self.lock:
            return {s.key: s.address for s in self.services.values()}

    def handle(self, event: str, service: dict) -> None:
        meta, spec = service["metadata"], service.get("spec") or {}
        uid = meta["uid"]
        wanted = event != "DELETED" and bool(spec.get("selector")) and spec.get("type") != "ExternalName"
        with self.lock:
            current = self.services.get(uid)
            if current is not None and (not wanted or _shape(current.spec) != _shape(spec)):
                current.close()
                del self.services[uid]
                address = current.address
            else:
                address = None
            if wanted and uid not in self.services:
                try:
                    self.services[uid] = self._open(meta["namespace"], meta["name"], spec, address)
                except OSError as exc:  # as kube-proxy: one Service that cannot be set up spares the others
                    log.warning("service %s/%s: cannot listen for it (%s; a process on this machine listening on "
                                "all addresses at one of its ports?); its name does not resolve in pods",
                                meta["namespace"], meta["name"], exc)
        self._changed()

    def forget_missing(self, present: set[str]) -> None:
        with self.lock:
            for uid in [uid for uid in self.services if uid not in present]:
                self.services.pop(uid).close()
        self._changed()

    def _open(self, namespace: str, name: str, spec: dict, address: str | None) -> _Service:
        for _attempt in range(32):
            address = address or str(LOOPBACK_SERVICES[random.randrange(2, LOOPBACK_SERVICES.num_addresses - 1)])
            service = _Service(namespace, name, address, spec, self.endpoints)
            try:
                service.open()
                log.info("service %s/%s at %s (ports %s)", namespace, name, address,
                         ", ".join(str(p.port) for p in service.proxies))
                return service
            except OSError as exc:
                if exc.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
                    raise
                address = None  # taken (another agent, another test): another address
        raise OSError(errno.EADDRINUSE, f"no free loopback address for service {namespace}/{name}")

    def _changed(self) -> None:
        addresses = self.addresses()
        self.state_file.write_text(json.dumps({f"{ns}/{name}": address for (ns, name), address in addresses.items()}))
        self.on_change(addresses)

    def stop(self) -> None:
        with self.lock:
            for service in self.services.values():
                service.close()
            self.services.clear()


# --------------------------------------------------------------------------------------------------
# reading what the agent recorded (tests)


def pod_port(pod_folder: Path, port: int | str) -> int:
    """The host port that stands for `port` (a number or a port name) of the pod in pod_folder."""
    ports = PodPorts.load(Path(pod_folder) / "ports.json")
    host_port = ports.host_port(port)
    if host_port is None:
        raise KeyError(f"the pod declares no port named {port!r}")
    return host_port


def service_address(work_dir: Path, namespace: str, name: str) -> str:
    """The loopback address that stands for the Service's cluster IP (its ports are the Service's)."""
    services = json.loads((Path(work_dir) / "services.json").read_text())
    try:
        return services[f"{namespace}/{name}"]
    except KeyError:
        raise KeyError(f"the node agent has no address for service {namespace}/{name}") from None
