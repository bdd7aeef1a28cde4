"""`isdr scp`'s /readyz (HEALTH_PORT): not ready while its storage cannot take a write or the API
server cannot be reached, ready again when they are back - and receiving goes on meanwhile.

The receiver runs as a process with a real API server (through a proxy the test can cut), real
storage (a folder; a real S3 server, moto_server, that the test stops) and dcmtk's storescu. The
chart's pods run the same endpoint as their readinessProbe: tests/kube/test_chart_journey.py.
"""

from __future__ import annotations

import sys
from urllib.parse import urlparse

import pytest
import requests

from isdr_devtools.synthetic import write_ct_series
from tests.kube.test_scp_publisher import _dcmtk, proxied_kubeconfig, start_scp  # noqa: F401 - fixtures
from tests.support.processes import ManagedProcess, free_port, missing, wait_for_port, wait_until
from tests.support.s3 import CREDENTIALS
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.kube


def readyz(port: int) -> tuple[int, str]:
    response = requests.get(f"http://127.0.0.1:{port}/readyz?verbose", timeout=10)
    return response.status_code, response.text


def wait_readiness(port: int, status: int, what: str) -> str:
    return wait_until(lambda: (answer := readyz(port))[0] == status and answer[1], 60, what=what)


def test_an_unreachable_api_server_makes_the_receiver_not_ready_while_it_still_receives(
        kube_cluster, kube_namespace, start_scp, tmp_path):
    server = urlparse(kube_cluster.server)
    health_port = free_port()
    with TcpProxy(server.hostname, server.port) as proxy:
        kubeconfig = proxied_kubeconfig(kube_cluster.kubeconfig, proxy.port, tmp_path / "proxied.kubeconfig")
        scp = start_scp(kubeconfig=kubeconfig, HEALTH_PORT=str(health_port))
        assert wait_readiness(health_port, 200, "ready") == "[+]storage ok\n[+]kubernetes-api ok\nreadyz check passed\n"

        proxy.pause("refuse")
        body = wait_readiness(health_port, 503, "not ready while the API server is away")
        assert "[+]storage ok" in body
        assert "[-]kubernetes-api failed: cannot reach the Kubernetes API at https://127.0.0.1:" in body
        scp.send(write_ct_series(tmp_path / "ct", count=3, rows=16, cols=16))  # acknowledged all the same

        proxy.resume()
        wait_readiness(health_port, 200, "ready again once the API server answers")
        log = scp.output()
    assert "not ready: kubernetes-api: cannot reach the Kubernetes API" in log
    assert "ready again: kubernetes-api is usable" in log


def test_storage_that_cannot_take_a_write_makes_the_receiver_not_ready(kube_namespace, start_scp, tmp_path):
    incoming = tmp_path / "incoming"
    health_port = free_port()
    scp = start_scp(incoming=incoming, HEALTH_PORT=str(health_port))
    wait_readiness(health_port, 200, "ready")

    incoming.rename(tmp_path / "incoming.away")
    incoming.write_text("the volume went away")  # writes below it fail (even for root)
    body = wait_readiness(health_port, 503, "not ready without its storage")
    assert f"[-]storage failed: cannot write to local directory {incoming}" in body
    assert "[+]kubernetes-api ok" in body

    incoming.unlink()
    (tmp_path / "incoming.away").rename(incoming)
    wait_readiness(health_port, 200, "ready again with its storage back")
    assert [path.name for path in incoming.iterdir()] == [".tmp-journal"], \
        "no probe object left behind (only the receiver's storage journal, STORAGE_JOURNAL)"
    assert "not ready: storage: cannot write to local directory" in scp.output()


def test_an_s3_server_that_is_down_makes_the_receiver_not_ready(kube_namespace, start_scp, tmp_path):
    try:
        import moto.server  # noqa: F401
    except ImportError:
        missing("moto_server (pip install 'moto[server]')")
    import boto3

    s3_port, health_port = free_port(), free_port()
    endpoint = f"http://127.0.0.1:{s3_port}"

    def start_s3() -> ManagedProcess:
        process = ManagedProcess([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)],
                                 tmp_path / "moto.log", env={**CREDENTIALS})
        wait_for_port(s3_port, process=process.popen)
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="isdr-test",
                     aws_secret_access_key="isdr-test-secret").create_bucket(Bucket="isdr")
        return process

    s3 = start_s3()
    try:
        scp = start_scp(HEALTH_PORT=str(health_port), STORAGE="s3", S3_BUCKET="isdr", S3_PREFIX="incoming",
                        S3_ENDPOINT_URL=endpoint, **CREDENTIALS)
        wait_readiness(health_port, 200, "ready")
        s3.stop()
        body = wait_readiness(health_port, 503, "not ready while the S3 server is down")
        assert "[-]storage failed: cannot write to S3 bucket isdr/incoming/ at http://127.0.0.1:" in body
        s3 = start_s3()  # moto keeps nothing: a fresh server with the bucket made again
        wait_readiness(health_port, 200, "ready again with the S3 server back")
        assert scp.process.poll() is None
    finally:
        s3.stop()
