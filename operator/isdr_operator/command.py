"""`isdr operator`: start kopf with ISDR's handlers for one namespace."""

from __future__ import annotations

import logging
import os

from relay.config import ConfigError
from relay.kube.client import KubeConfigError, connect

log = logging.getLogger("isdr_operator")


def run_operator(args) -> int:
    import kopf

    from relay.cli_common import setup_logging
    from relay.kube.api import KubeApi

    from isdr_operator import handlers, observability
    from isdr_operator.peering import Gate, own_identity
    from isdr_operator.runtime import Runtime
    from isdr_operator.settings import load_operator_settings

    try:
        connection = connect(args.namespace, kubeconfig=args.kubeconfig)
        settings = load_operator_settings(connection.namespace)
    except (ConfigError, KubeConfigError, ValueError) as exc:
        print(f"isdr operator: {exc}")
        return 2
    setup_logging(settings.relay.log_level)
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig  # kopf logs in through the same kubeconfig
    api = KubeApi(connection.api_client, settings.namespace, component="isdr-operator")
    identity = own_identity()
    if args.standalone:
        gate = Gate.standalone(identity)
    else:
        gate = Gate(read_status=lambda: api.get_peering_status(args.peering), identity=identity)
    handlers.RUNTIME = Runtime(api, settings, gate=gate)
    observability.start(settings.relay, handlers.RUNTIME)  # /metrics; kopf's success lines quiet
    log.info("starting in namespace %s as %s (API %s, %s)", settings.namespace, identity, connection.server,
             "standalone" if args.standalone else f"peering {args.peering}")
    kopf.run(
        namespaces=[settings.namespace],
        standalone=args.standalone,
        peering_name=None if args.standalone else args.peering,
        liveness_endpoint=args.liveness,
        identity=identity,  # the name kopf's keep-alive announces is the one the gate looks for
    )
    return 0
