"""A local Kubernetes control plane for the tests: etcd, kube-apiserver and kube-controller-manager run
as processes on free 127.0.0.1 ports, with certificates and a service-account key generated per session
(what controller-runtime's envtest does, plus the controller-manager so that Jobs, TTL cleanup,
garbage collection, namespaces and service accounts behave as in a real cluster).

    cp = ControlPlane(assets_dir, work_dir); cp.start(); ...; cp.stop()

work_dir gets: pki/ (CA, serving and client certificates, SA key), etcd/ (data), logs/ (one file per
component) and admin.kubeconfig.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.support.kube import K8S_VERSION, write_kubeconfig
from tests.support.processes import ManagedProcess, free_port, wait_for_port

SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
KUBERNETES_SERVICE_IP = "10.0.0.1"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"


class ControlPlaneError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------------
# certificates


class PKI:
    """A CA, the API server's serving certificate, client certificates and the service-account key."""

    def __init__(self, directory: Path):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec, rsa
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        self._x509, self._hashes, self._serialization, self._ec = x509, hashes, serialization, ec
        self._eku, self._name_oid = ExtendedKeyUsageOID, NameOID
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.timezone.utc)
        self._not_before = now - datetime.timedelta(hours=1)
        self._not_after = now + datetime.timedelta(days=30)

        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "isdr-test-ca")])
        self.ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(self.ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._not_before)
            .not_valid_after(self._not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.ca_key.public_key()), critical=False)
            .sign(self.ca_key, hashes.SHA256())
        )
        self.ca_cert_pem = self.ca_cert.public_bytes(serialization.Encoding.PEM)
        self.ca_key_pem = self._key_pem(self.ca_key)
        self.ca_cert_file = self._write("ca.crt", self.ca_cert_pem)
        self.ca_key_file = self._write("ca.key", self.ca_key_pem)

        # The service-account token signing key (RS256, as kubeadm makes it).
        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.sa_key_file = self._write("sa.key", self._key_pem(sa_key))
        self.sa_pub_file = self._write("sa.pub", sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

    def _key_pem(self, key) -> bytes:
        s = self._serialization
        return key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption())

    def _write(self, name: str, data: bytes) -> Path:
        path = self.dir / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        return path

    def issue(self, name: str, common_name: str, organizations: tuple[str, ...] = (), *, server: bool = False,
              client: bool = False, dns_names: tuple[str, ...] = (), ips: tuple[str, ...] = ()):
        """Issue a certificate signed by the CA; returns (cert_path, key_path, cert_pem, key_pem)."""
        x509, NameOID = self._x509, self._name_oid
        key = self._ec.generate_private_key(self._ec.SECP256R1())
        attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org) for org in organizations]
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
        usages = ([self._eku.SERVER_AUTH] if server else []) + ([self._eku.CLIENT_AUTH] if client else [])
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attributes))
            .issuer_name(self.ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._not_before)
            .not_valid_after(self._not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()),
                           critical=False)
        )
        if dns_names or ips:
            alt_names = [x509.DNSName(n) for n in dns_names] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
            builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        cert = builder.sign(self.ca_key, self._hashes.SHA256())
        cert_pem = cert.public_bytes(self._serialization.Encoding.PEM)
        key_pem = self._key_pem(key)
        return self._write(f"{name}.crt", cert_pem), self._write(f"{name}.key", key_pem), cert_pem, key_pem


# --------------------------------------------------------------------------------------------------


class ControlPlane:
    def __init__(self, assets_dir: Path, work_dir: Path, log_level: int = 2):
        self.assets_dir = Path(assets_dir)
        self.work_dir = Path(work_dir)
        self.log_dir = self.work_dir / "logs"
        self.log_level = log_level
        self.processes: dict[str, ManagedProcess] = {}
        self.kubeconfig = self.work_dir / "admin.kubeconfig"
        self.server = ""
        self.timings: dict[str, float] = {}
        self.kubelet_tls: dict[str, str] | None = None  # the node agent's log endpoint certificates

    def binary(self, name: str) -> str:
        path = self.assets_dir / name
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ControlPlaneError(f"{path} is missing: run hack/k8s/ensure-binaries.sh")
        return str(path)

    # ---------------------------------------------------------------------------------------------
    def start(self, timeout: float = 90.0) -> None:
        started = time.monotonic()
        deadline = started + timeout
        self.pki = pki = PKI(self.work_dir / "pki")
        serving_cert, serving_key, _, _ = pki.issue(
            "apiserver", "kube-apiserver", server=True,
            dns_names=("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                       "kubernetes.default.svc.cluster.local"),
            ips=("127.0.0.1", KUBERNETES_SERVICE_IP))
        _, _, admin_cert, admin_key = pki.issue("admin", "isdr-admin", ("system:masters",), client=True)
        _, _, kcm_cert, kcm_key = pki.issue("controller-manager", "system:kube-controller-manager", client=True)
        # The aggregation layer's client certificate (kubeadm's front-proxy-client): with requestheader
        # configured, the controller-manager and aggregated API servers can authenticate proxied requests.
        proxy_cert, proxy_key, _, _ = pki.issue("front-proxy-client", "front-proxy-client", client=True)
        # kubectl logs: the API server calls the node's kubelet (the node agent's log endpoint) with a
        # client certificate and verifies the kubelet's serving certificate, as kubeadm sets it up.
        kubelet_client_cert, kubelet_client_key, _, _ = pki.issue(
            "apiserver-kubelet-client", "kube-apiserver-kubelet-client", ("kubeadm:cluster-admins",), client=True)
        kubelet_cert, kubelet_key, _, _ = pki.issue("kubelet", "isdr-node", server=True, dns_names=("localhost",),
                                                    ips=("127.0.0.1",))
        self.kubelet_tls = {"cert": str(kubelet_cert), "key": str(kubelet_key), "client_ca": str(pki.ca_cert_file)}
        self.admin_cert_file, self.admin_key_file = pki.dir / "admin.crt", pki.dir / "admin.key"
        self.timings["certificates"] = time.monotonic() - started

        # etcd
        etcd_port, peer_port = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{etcd_port}"
        etcd = self._spawn("etcd", [
            self.binary("etcd"),
            "--name=isdr-test",
            f"--data-dir={self.work_dir / 'etcd'}",
            f"--listen-client-urls={self.etcd_url}",
            f"--advertise-client-urls={self.etcd_url}",
            f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-cluster=isdr-test=http://127.0.0.1:{peer_port}",
            "--unsafe-no-fsync",  # test data: no need to survive a power cut
            "--log-level=warn",
        ])
        self._wait_port(etcd, etcd_port, deadline)
        self.timings["etcd"] = time.monotonic() - started

        # kube-apiserver
        port = free_port()
        self.server = f"https://127.0.0.1:{port}"
        apiserver = self._spawn("kube-apiserver", [
            self.binary("kube-apiserver"),
            f"--etcd-servers={self.etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={port}",
            f"--tls-cert-file={serving_cert}",
            f"--tls-private-key-file={serving_key}",
            f"--client-ca-file={pki.ca_cert_file}",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={pki.sa_pub_file}",
            f"--service-account-signing-key-file={pki.sa_key_file}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            "--authorization-mode=RBAC",
            f"--requestheader-client-ca-file={pki.ca_cert_file}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={proxy_cert}",
            f"--proxy-client-key-file={proxy_key}",
            f"--kubelet-client-certificate={kubelet_client_cert}",
            f"--kubelet-client-key={kubelet_client_key}",
            f"--kubelet-certificate-authority={pki.ca_cert_file}",
            # The node agent's Node has a Hostname address no resolver knows; its InternalIP is 127.0.0.1.
            "--kubelet-preferred-address-types=InternalIP",
            "--allow-privileged=true",
            # The "kubernetes" Service's endpoints would be 127.0.0.1, which Endpoints validation rejects.
            "--endpoint-reconciler-type=none",
            f"--cert-dir={self.work_dir / 'apiserver-certs'}",
            "--profiling=false",
            f"--v={self.log_level}",
        ])
        self._wait_port(apiserver, port, deadline)
        write_kubeconfig(self.kubeconfig, self.server, pki.ca_cert_pem, cert_pem=admin_cert, key_pem=admin_key,
                         user="isdr-admin")
        self._wait_ready(apiserver, deadline)
        self.timings["kube-apiserver"] = time.monotonic() - started

        # kube-controller-manager
        kcm_kubeconfig = write_kubeconfig(self.work_dir / "controller-manager.kubeconfig", self.server,
                                          pki.ca_cert_pem, cert_pem=kcm_cert, key_pem=kcm_key,
                                          user="system:kube-controller-manager")
        kcm_port = free_port()
        kcm = self._spawn("kube-controller-manager", [
            self.binary("kube-controller-manager"),
            f"--kubeconfig={kcm_kubeconfig}",
            f"--authentication-kubeconfig={kcm_kubeconfig}",
            f"--authorization-kubeconfig={kcm_kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={kcm_port}",
            f"--cert-dir={self.work_dir / 'controller-manager-certs'}",
            f"--service-account-private-key-file={pki.sa_key_file}",
            f"--root-ca-file={pki.ca_cert_file}",
            f"--cluster-signing-cert-file={pki.ca_cert_file}",
            f"--cluster-signing-key-file={pki.ca_key_file}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            "--controllers=*",
            "--leader-elect=false",
            "--use-service-account-credentials=true",
            "--profiling=false",
            f"--v={self.log_level}",
        ])
        self._wait_port(kcm, kcm_port, deadline)
        # The service-account controller makes "default" in every namespace: pods need it to be admitted.
        self._wait_api(kcm, "/api/v1/namespaces/default/serviceaccounts/default", deadline)
        self.timings["kube-controller-manager"] = time.monotonic() - started
        self.timings["total"] = time.monotonic() - started

    # ---------------------------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str]) -> ManagedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBE")}
        process = ManagedProcess(args, self.log_dir / f"{name}.log", env=env, cwd=self.work_dir)
        self.processes[name] = process
        return process

    def _fail(self, message: str, process: ManagedProcess | None = None):
        detail = ""
        if process is not None:
            detail = "\n--- last lines of " + str(process.log_path) + " ---\n" + "\n".join(
                process.output().splitlines()[-30:])
        raise ControlPlaneError(message + detail)

    def _wait_port(self, process: ManagedProcess, port: int, deadline: float) -> None:
        try:
            wait_for_port(port, timeout=max(1.0, deadline - time.monotonic()), process=process.popen)
        except (RuntimeError, TimeoutError) as exc:
            self._fail(f"{Path(process.args[0]).name}: {exc}", process)

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki.ca_cert_file))
        context.load_cert_chain(str(self.admin_cert_file), str(self.admin_key_file))
        return context

    def _get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.server + path, context=self._context, timeout=timeout) as response:
                return response.status, response.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def _wait_ready(self, process: ManagedProcess, deadline: float) -> None:
        self._context = self.ssl_context()
        self._wait_api(process, "/readyz", deadline)

    def _wait_api(self, process: ManagedProcess, path: str, deadline: float) -> None:
        last = ""
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self._fail(f"{Path(process.args[0]).name} exited with {process.returncode}", process)
            try:
                status, body = self._get(path)
                if status == 200:
                    return
                last = f"HTTP {status}: {body[-500:]}"
            except OSError as exc:
                last = repr(exc)
            time.sleep(0.1)
        self._fail(f"timed out waiting for {path} ({last})", process)

    def alive(self) -> dict[str, bool]:
        return {name: process.poll() is None for name, process in self.processes.items()}

    def stop(self) -> None:
        for name in ("kube-controller-manager", "kube-apiserver", "etcd"):
            process = self.processes.pop(name, None)
            if process is not None:
                process.stop(timeout=10)


def kubelet_args(tls: dict[str, str] | None) -> list[str]:
    """The node agent's flags for serving kubelet's log endpoint with these certificates."""
    if not tls:
        return []
    return ["--kubelet-cert", tls["cert"], "--kubelet-key", tls["key"], "--kubelet-client-ca", tls["client_ca"]]


__all__ = ["ControlPlane", "ControlPlaneError", "PKI", "K8S_VERSION", "kubelet_args"]


def main(argv: list[str] | None = None) -> int:
    """Run the control plane (and optionally the node agent) until Ctrl-C, to poke at it by hand:
    python -m tests.support.controlplane --work-dir /tmp/kube [--node-agent]"""
    import argparse
    import signal
    import sys
    import tempfile

    from tests.support.kube import KubeCluster, assets_dir

    parser = argparse.ArgumentParser(prog="python -m tests.support.controlplane", description=main.__doc__)
    parser.add_argument("--work-dir", help="default: a new temporary folder")
    parser.add_argument("--node-agent", action="store_true", help="also run the local node agent")
    args = parser.parse_args(argv)
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="isdr-kube-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    control_plane = ControlPlane(assets_dir(), work_dir)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    agent = None
    try:
        control_plane.start()
        cluster = KubeCluster(control_plane.kubeconfig, existing=False, work_dir=work_dir)
        cluster.install_crds()
        if args.node_agent:
            from tests.support.node_agent import NodeAgentProcess

            agent = NodeAgentProcess(control_plane.kubeconfig, work_dir / "node-agent",
                                     log_path=work_dir / "logs" / "node-agent.log",
                                     extra_args=kubelet_args(control_plane.kubelet_tls))
            agent.start()
        print(f"control plane up in {control_plane.timings['total']:.1f}s; logs in {control_plane.log_dir}")
        print(f"export KUBECONFIG={control_plane.kubeconfig}")
        if agent is not None:
            print(f"export ISDR_NODE_AGENT_WORK_DIR={agent.work_dir}")
        sys.stdout.flush()
        while not stop:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        if agent is not None:
            agent.stop()
        control_plane.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
