"""Command line of the emulator: `python -m isdr_devtools.emulator` and the `isdr emulator` subcommand."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from .behaviours import catalogue
from .config import DEFAULT_BOMB_BYTES, DEFAULT_DRIP_RATE, DEFAULT_MAX_UPLOAD_BYTES, EmulatorConfig

_DESCRIPTION = """\
Run an InferenceServer emulator: a real HTTP(S) server that speaks both InferenceServer
protocols on one port (v1: tasks URL <base>/api/tasks/, zip archives; v2: base URL, tar
archives) the way the real releases v1.2 and 2.0 do, their bugs included: task uids of
secrets.token_urlsafe() (some start with '-' or '_'), v1 answering a submit before the task is
stored (554 for a while) and every DELETE with 500, v1 outputs chunked with no Content-Type,
v2 answering 500 for an unknown model and for a poll of an unknown or deleted task. For tests
and the demo.

What a task does is chosen by its model name:
"""

_EPILOG = """\
Inspection for tests: GET /_emulator/stats (counters and tasks as JSON; each task, once its model
ran, with the DICOM instances it was sent per folder of the upload, input_folders, "" for the
archive's root, and their Series Instance UIDs, input_series), POST /_emulator/reset (forget tasks
and counters, re-arm --fail-submits and --queue-down-for).

Example:
  python -m isdr_devtools.emulator --port 0 --port-file /tmp/emulator.port --tls-dir /tmp/emulator-tls
  then use https://127.0.0.1:<port>/api/tasks/ (v1) or https://127.0.0.1:<port> (v2) with
  the CA bundle /tmp/emulator-tls/ca.pem.
"""


def _description() -> str:
    lines = [_DESCRIPTION]
    for name, summary in catalogue().items():
        lines.append(
            textwrap.fill(
                summary,
                width=92,
                break_on_hyphens=False,
                initial_indent=f"  {name:<15} ",
                subsequent_indent=" " * 18,
            )
        )
    lines.append("  any other name  unknown model: 550 at a v1 submit, 500 at a v2 submit")
    return "\n".join(lines)


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("must be between 0 and 65535")
    return value


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument(
        "--port", type=_port, default=8000, help="port to listen on; 0 picks a free one (default: %(default)s)"
    )
    parser.add_argument(
        "--port-file",
        type=Path,
        metavar="PATH",
        help="write the bound port to PATH (atomically) once listening; useful with --port 0",
    )
    parser.add_argument(
        "--tls-dir",
        type=Path,
        metavar="DIR",
        help="serve HTTPS; a CA (ca.pem, ca-key.pem) and a server certificate for localhost/127.0.0.1 "
        "signed by it (server.pem, server-key.pem) are generated in DIR unless present. "
        "Clients verify against DIR/ca.pem",
    )
    parser.add_argument(
        "--tls-san",
        action="append",
        default=[],
        metavar="NAME",
        help="an extra DNS name or IP address for the server certificate (repeatable)",
    )
    parser.add_argument(
        "--delay",
        type=_non_negative_float,
        default=2.0,
        metavar="SECONDS",
        help="how long a task stays pending/running before its output is ready (default: %(default)s)",
    )
    parser.add_argument(
        "--v1-register-delay",
        type=_non_negative_float,
        default=1.0,
        metavar="SECONDS",
        help="the v1 quirk: for this long after a v1 submit, polls and deletes of the task answer "
        "554 not found (default: %(default)s)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="where tasks are kept; a restarted emulator picks them up again "
        "(default: a temporary folder, removed on exit)",
    )
    parser.add_argument(
        "--max-upload-bytes",
        type=_non_negative_int,
        default=DEFAULT_MAX_UPLOAD_BYTES,
        metavar="N",
        help="larger uploads answer 413 (default: %(default)s)",
    )
    parser.add_argument(
        "--fail-submits",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="the first N submits answer 500, to exercise retries (default: %(default)s)",
    )
    parser.add_argument(
        "--bomb-bytes",
        type=_non_negative_int,
        default=DEFAULT_BOMB_BYTES,
        metavar="N",
        help="expanded size of the evil-bomb model's zero-filled entry, and of the gzip-bomb "
        "model's decoded download (default: %(default)s)",
    )
    parser.add_argument(
        "--drip-rate",
        type=_positive_float,
        default=DEFAULT_DRIP_RATE,
        metavar="BYTES",
        help="bytes per second at which the drip model's output is sent (default: %(default)s)",
    )
    parser.add_argument(
        "--uid-prefix",
        default="",
        metavar="CHARS",
        help="every new task uid starts with CHARS (A-Z a-z 0-9 - _), e.g. --uid-prefix=- for the "
        "3%% of real uids that start with '-'; default: random, as the real servers",
    )
    parser.add_argument(
        "--queue-down-for",
        type=_non_negative_float,
        default=0.0,
        metavar="SECONDS",
        help="v2's message queue is down for this long after start (and after a reset): a v2 submit "
        "stores the task, then hangs until the queue is back, and the task runs only then, as the "
        "2.0 server does (default: %(default)s)",
    )
    parser.add_argument(
        "--redirect-polls-to",
        metavar="URL",
        help="every poll (v1 and v2) answers 302 Found with Location URL + the poll's path and query",
    )


def config_from_args(args: argparse.Namespace) -> EmulatorConfig:
    return EmulatorConfig(
        host=args.host,
        port=args.port,
        port_file=args.port_file,
        tls_dir=args.tls_dir,
        tls_names=list(args.tls_san),
        delay=args.delay,
        v1_register_delay=args.v1_register_delay,
        data_dir=args.data_dir,
        max_upload_bytes=args.max_upload_bytes,
        fail_submits=args.fail_submits,
        bomb_bytes=args.bomb_bytes,
        drip_rate=args.drip_rate,
        uid_prefix=args.uid_prefix,
        queue_down_for=args.queue_down_for,
        redirect_polls_to=args.redirect_polls_to,
    )


def run(args: argparse.Namespace) -> int:
    """Run the emulator from parsed arguments until SIGTERM/SIGINT; return the exit code."""
    from .server import serve  # imported late: `--help` should not need pydicom or cryptography

    try:
        config = config_from_args(args)
        config.validate()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return serve(config)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the `emulator` subcommand on an argparse subparsers object; sets func=run."""
    parser = subparsers.add_parser(
        "emulator",
        help="run an InferenceServer emulator (both protocols, TLS, toy models) for tests and demos",
        description=_description(),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    configure_parser(parser)
    parser.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m isdr_devtools.emulator",
        description=_description(),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    configure_parser(parser)
    return run(parser.parse_args(argv))
