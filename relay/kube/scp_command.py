"""`isdr scp`: the receiver of the Kubernetes mode.

The same C-STORE SCP as `isdr run` (relay.dicom.receiver), writing to the storage the settings
name (a shared folder or S3), with a SeriesPublisher as its sink: one DicomSeries custom resource
per series, kept up to date while instances arrive. SIGTERM/SIGINT stop accepting associations,
let running ones finish for a moment, and publish what is still pending before exiting.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from dataclasses import dataclass

from relay import health
from relay.cli_common import add_receiver_arguments, receiver_settings
from relay.config import ENV_VARIABLES

log = logging.getLogger("relay.scp")

# The settings that concern the receiver (the rest of ENV_VARIABLES is the operator's and Jobs').
_RECEIVER_VARIABLES = tuple(
    name for name in ENV_VARIABLES
    if name.startswith(("SCP_", "S3_")) or name in (
        "PYNETDICOM_LOG_LEVEL", "LOG_LEVEL", "INCOMING_DIR", "STORAGE", "MIN_FREE_BYTES", "METRICS_PORT",
        "HEALTH_PORT")
)

_EPILOG = """\
Kubernetes: inside a pod the pod's service account is used, elsewhere KUBECONFIG (or
~/.kube/config). The namespace is --namespace, else POD_NAMESPACE, else the service account's or
the kubeconfig context's namespace, else "default". POD_NAME names this replica in
status.receivedBy (default: the host name).

Storage (where Jobs find the instances; every replica must use the same one):
  STORAGE=local with INCOMING_DIR on a ReadWriteMany volume, or
  STORAGE=s3 with S3_BUCKET, S3_PREFIX, S3_ENDPOINT_URL and the AWS_* credentials.

Every DicomSeries is written at most about once a second while it is receiving, plus once when
an association that sent to it ends. If the API server is unreachable, instances are still
received and stored; their series are published when it is back.

Readiness (HEALTH_PORT, e.g. 8080; 0 = off): GET /readyz answers 200 while the storage takes a
durable write and the API server answers a list of DicomSeries, else 503 naming what failed
(the chart's readinessProbe, so that a Service sends to receivers that can do their job).

Settings come from environment variables (the receiver's share of `isdr run`'s):
  {names}
  POD_NAME POD_NAMESPACE KUBECONFIG
Flags given here win over the environment.

example:
  POD_NAME=receiver-0 STORAGE=local INCOMING_DIR=/data isdr scp --namespace isdr --port 11112
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "scp",
        help="receive DICOM into shared storage and publish DicomSeries (Kubernetes mode)",
        description="Run the DICOM receiver (C-STORE SCP) of the Kubernetes mode: store every "
        "instance in the shared storage, then create or update one DicomSeries custom resource per "
        "series (its UIDs, the attributes fingerprints match on, where its instances are, the "
        "instance count and the last-received time) for the operator to act on.",
        epilog=_EPILOG.format(names=" ".join(_RECEIVER_VARIABLES)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--namespace", help="namespace of the DicomSeries (default: see below)")
    add_receiver_arguments(parser)
    parser.add_argument("--kubeconfig", help="use this kubeconfig file instead of KUBECONFIG / in-cluster")
    parser.add_argument("--drain-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="on SIGTERM, wait this long for running associations to finish, then "
                        "abort them (default: %(default)s)")
    parser.add_argument("--flush-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="on SIGTERM, keep trying this long to publish pending series "
                        "(default: %(default)s)")
    parser.set_defaults(func=run)
    return parser


def run(args) -> int:
    settings = receiver_settings("scp", args)
    if settings is None:
        return 2
    return serve(settings, namespace=args.namespace, kubeconfig=args.kubeconfig,
                 drain_timeout=args.drain_timeout, flush_timeout=args.flush_timeout)


def serve(settings, *, namespace: str | None = None, kubeconfig: str | None = None,
          drain_timeout: float = 10.0, flush_timeout: float = 10.0, stop: threading.Event | None = None) -> int:
    """Receive and publish until `stop` is set (by default: until SIGTERM or SIGINT)."""
    from relay import metrics
    from relay.dicom.receiver import Receiver
    from relay.kube.client import KubeConfigError, connect
    from relay.kube.api import RECEIVER_TIMEOUT, KubeApi
    from relay.kube.publisher import SeriesPublisher
    from relay.storage import StorageError, open_storage

    try:
        connection = connect(namespace, kubeconfig=kubeconfig)
    except KubeConfigError as exc:
        log.error("%s", exc)
        return 2
    try:
        storage = open_storage(settings, receiving=True)
    except (StorageError, OSError) as exc:
        log.error("cannot open the storage: %s", exc)
        return 1
    api = KubeApi(connection.api_client, connection.namespace, timeout=RECEIVER_TIMEOUT)
    publisher = SeriesPublisher(api, storage, settings, namespace=connection.namespace)
    receiver = Receiver(settings, storage, metrics.CountingSink(publisher))

    if stop is None:
        stop = threading.Event()

        def _signal(signum, _frame):
            log.info("received signal %d: stopping", signum)
            stop.set()

        signal.signal(signal.SIGTERM, _signal)
        signal.signal(signal.SIGINT, _signal)

    publisher.start()
    try:
        receiver.start()
    except OSError as exc:  # e.g. the port is taken
        log.error("cannot start: %s", exc)
        publisher.stop(timeout=0)
        connection.close()
        storage.close()
        return 1
    log.info("publishing DicomSeries to namespace %s at %s as %s", connection.namespace, connection.server,
             publisher.pod_name)
    endpoint = metrics.serve(settings.metrics_port, [metrics.StorageCollector(storage, settings.min_free_bytes)])
    readiness = health.Readiness([
        ("storage", health.storage_writable(storage, publisher.pod_name)),
        ("kubernetes-api", lambda: _raise_api_problem(api, connection)),
    ])
    health_endpoint = health.serve(settings.health_port, readiness)
    try:
        problem = api_problem(api, connection)  # after the receiver is up: a hanging API must not delay it
        if problem is not None:
            log.log(logging.WARNING if problem.transient else logging.ERROR, "%s", problem)
        while not stop.wait(1.0):
            pass
    finally:
        readiness.shutting_down()  # Services stop sending while running associations finish
        receiver.stop(drain_timeout)  # no new associations; let running ones finish
        publisher.stop(timeout=flush_timeout)
        storage.close()
        connection.close()
        for running in (endpoint, health_endpoint):
            if running is not None:
                running.stop()
        log.info("stopped (%d instances stored, %d refused)", receiver.stored, receiver.refused)
    return 0


@dataclass(frozen=True)
class ApiProblem:
    """Why the receiver cannot publish DicomSeries; `transient` when the API is only unreachable."""

    message: str
    transient: bool = False

    def __str__(self) -> str:
        return self.message


def api_problem(api, connection) -> ApiProblem | None:
    """What keeps this receiver from publishing series (unreachable API, no CRD, RBAC), or None.

    The receiver receives and stores either way; this is said at start-up and answers the
    readiness check."""
    from relay.kube.api import ApiUnavailable, NotFound, Rejected

    try:
        api.can_list_series()
    except ApiUnavailable as exc:
        return ApiProblem(f"cannot reach the Kubernetes API at {connection.server} ({exc}): receiving "
                          "anyway; series are published once it answers", transient=True)
    except NotFound:
        return ApiProblem(f"the API at {connection.server} does not serve dicomseries.isdr.io: "
                          "is the CRD installed?")
    except Rejected as exc:
        return ApiProblem(f"the API at {connection.server} refuses to list DicomSeries in namespace "
                          f"{connection.namespace}: check the RBAC rules ({exc})")
    return None


def _raise_api_problem(api, connection) -> None:
    problem = api_problem(api, connection)
    if problem is not None:
        raise health.NotReady(str(problem))
