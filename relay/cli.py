"""The `isdr` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import entry_points

from relay import __version__
from relay.cli_common import add_receiver_arguments, receiver_settings
from relay.config import ENV_VARIABLES

_RUN_EPILOG = """\
Settings come from environment variables, the original relay's among them:
  {names}
Flags given here win over the environment. See the README's configuration reference.
HEALTH_PORT (0 = off) serves GET /readyz: 200 while the storage takes a durable write, else 503.

example:
  FINGERPRINT_DIR=./fingerprints INCOMING_DIR=./data isdr run --port 11112
"""


def _cmd_run(args) -> int:
    import socket

    from relay import health, metrics
    from relay.runner import Relay

    settings = receiver_settings("run", args, fingerprint_dir=args.fingerprint_dir)
    if settings is None:
        return 2
    relay = Relay(settings)
    endpoint = metrics.serve(settings.metrics_port, [
        metrics.SeriesCollector(lambda: ((s.phase, (t.phase for t in s.tasks)) for s in relay.registry.snapshot())),
        metrics.StorageCollector(relay.storage, settings.min_free_bytes),
    ])
    health_endpoint = health.serve(settings.health_port, health.Readiness([
        ("storage", health.storage_writable(relay.storage, f"isdr-run-{socket.gethostname()}")),
    ]))
    try:
        relay.serve_forever()
    except OSError as exc:  # e.g. the port is taken
        logging.getLogger("relay").error("cannot start: %s", exc)
        return 1
    finally:
        for running in (endpoint, health_endpoint):
            if running is not None:
                running.stop()
    return 0


def _add_run(subparsers) -> None:
    from pathlib import Path

    parser = subparsers.add_parser(
        "run",
        help="run the whole relay in one process (no cluster)",
        description="Receive DICOM, match fingerprints, run inference tasks and deliver the "
        "predictions, all in one process. State is kept under the storage root, so a restart "
        "resumes every series and task.",
        epilog=_RUN_EPILOG.format(names=" ".join(ENV_VARIABLES)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_receiver_arguments(parser)
    parser.add_argument("--fingerprint-dir", type=Path, help="folder of fingerprints (FINGERPRINT_DIR)")
    parser.set_defaults(func=_cmd_run)


def _add_operator(subparsers) -> None:
    # The control plane lives in its own package (operator/isdr_operator); its heavier imports
    # (kopf) load only when the command runs.
    parser = subparsers.add_parser(
        "operator",
        help="run the Kubernetes operator (Fingerprints, DicomSeries, one Job per inference task)",
        description="Reconcile Fingerprint and DicomSeries resources in one namespace: decide when "
        "a series is complete, match it, run one Job per match, and report on the resources. "
        "Prometheus metrics are served on METRICS_PORT (default 9120; 0 turns them off).",
    )
    parser.add_argument("--namespace", help="namespace to operate in (default: POD_NAMESPACE, "
                        "the kubeconfig's context, or default)")
    parser.add_argument("--peering", default="isdr",
                        help="KopfPeering object that keeps a single operator active (default: isdr)")
    parser.add_argument("--standalone", action="store_true",
                        help="run without peering (development only: nothing stops a second operator)")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, KUBECONFIG or ~/.kube/config)")
    parser.add_argument("--liveness", metavar="URL",
                        help="serve kopf's liveness probe, e.g. http://0.0.0.0:8080/healthz")

    def run(args) -> int:
        from isdr_operator.command import run_operator

        return run_operator(args)

    parser.set_defaults(func=run)


# Subcommands that other distributions add (isdr-devtools: `emulator`, `sample`).
PLUGIN_GROUP = "isdr.commands"
# Named here so that asking for one where it is not installed says where it comes from.
DEVTOOLS_COMMANDS = {"emulator": "the InferenceServer emulator", "sample": "synthetic DICOM series"}


def _more_subcommands(subparsers) -> None:
    from relay.echo_command import add_parser as add_echo
    from relay.fingerprints.commands import add_parser as add_fingerprint
    from relay.kube.job_command import add_parser as add_job
    from relay.kube.scp_command import add_parser as add_scp
    from relay.series_commands import add_parser as add_series

    add_scp(subparsers)
    _add_operator(subparsers)
    add_job(subparsers)
    add_fingerprint(subparsers)
    add_series(subparsers)
    add_echo(subparsers)
    for entry_point in sorted(entry_points(group=PLUGIN_GROUP), key=lambda ep: ep.name):
        entry_point.load()(subparsers)


def _missing_devtool(argv: list[str]) -> str | None:
    """The hint for `isdr emulator|sample` where the development tools are not installed."""
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    if command not in DEVTOOLS_COMMANDS:
        return None
    if any(ep.name == command for ep in entry_points(group=PLUGIN_GROUP)):
        return None
    return (f"isdr {command} ({DEVTOOLS_COMMANDS[command]}) is a development tool and is not "
            "installed here: pip install ./devtools (make python-deps does it). The product image "
            "does not carry it.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="isdr",
        description="ISDR, the InferenceServer DICOM Relay: DICOM in, AI inference, DICOM out.",
    )
    parser.add_argument("--version", action="version", version=f"isdr {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_run(subparsers)
    _more_subcommands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    hint = _missing_devtool(sys.argv[1:] if argv is None else argv)
    if hint:
        print(f"isdr: {hint}", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
