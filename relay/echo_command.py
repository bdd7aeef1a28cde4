"""`isdr echo HOST PORT AET`: is a DICOM peer there, and does it accept us? (C-ECHO)

For administrators checking the receiver or a destination, and for the chart's `helm test`.
"""

from __future__ import annotations

import argparse
import re
import sys

# As the Fingerprint CRD's aeTitle: printable ASCII but backslash, 1-16, no edge spaces.
AE_TITLE = re.compile(r"[\x21-\x5B\x5D-\x7E]([\x20-\x5B\x5D-\x7E]{0,14}[\x21-\x5B\x5D-\x7E])?")

EXIT_OK = 0
EXIT_REFUSED = 1  # a DICOM peer answered, but rejected, aborted or failed the echo
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3  # nothing answered at that address

DESCRIPTION = """\
Send a DICOM C-ECHO (Verification) to AET at HOST:PORT and say whether it answered.

Exit codes:
  0  the peer answered the C-ECHO with Success
  1  a DICOM peer answered, but rejected the association (e.g. an unknown called AE title, or
     a calling AE title it does not allow), aborted it, or answered with a failure status
  2  bad arguments
  3  nothing answered: connection refused, name not resolved, or timed out"""

EPILOG = """\
examples:
  isdr echo isdr-receiver.isdr.svc 11112 ISDR        # the relay's receiver, from inside the cluster
  isdr echo tps.example.org 104 TPS_IMPORT --calling-ae ISDR   # a destination, as the relay calls it"""


def _ae_title(value: str) -> str:
    if not AE_TITLE.fullmatch(value):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not an AE title: 1 to 16 printable ASCII characters, no backslash, "
            "not starting or ending with a space")
    return value


def _within(parse, low: float, high: float, what: str):
    """An argparse type: `parse(value)` between low and high, else an error naming `what`."""
    def check(value: str):
        try:
            number = parse(value)
        except ValueError:
            number = None
        if number is None or not low <= number <= high:
            raise argparse.ArgumentTypeError(f"{value!r} is not {what}")
        return number
    return check


_port = _within(int, 1, 65535, "a TCP port (1-65535)")
_timeout = _within(float, 0.001, 3600, "a timeout in seconds (0.001 to 3600)")


def add_parser(subparsers) -> argparse.ArgumentParser:
    from relay.dicom.echo import DEFAULT_CALLING_AE

    parser = subparsers.add_parser(
        "echo",
        help="send a DICOM C-ECHO to a peer (the receiver, a destination) and report the answer",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("host", metavar="HOST", help="the peer's host name or address")
    parser.add_argument("port", metavar="PORT", type=_port, help="the peer's DICOM port")
    parser.add_argument("called_ae", metavar="AET", type=_ae_title, help="the peer's AE title (called AE)")
    parser.add_argument("--calling-ae", type=_ae_title, default=DEFAULT_CALLING_AE,
                        help="our AE title (calling AE; default: %(default)s)")
    parser.add_argument("--timeout", type=_timeout, default=10.0, metavar="SECONDS",
                        help="for connecting and for each answer (default: %(default)s)")
    parser.set_defaults(func=run)
    return parser


def run(args) -> int:
    from relay.dicom.echo import Refused, Unreachable, echo
    from relay.dicom.network import configure_pynetdicom_logging

    configure_pynetdicom_logging("none")  # the outcome is said once, below
    try:
        result = echo(args.host, args.port, args.called_ae, calling_ae=args.calling_ae, timeout=args.timeout)
    except Unreachable as exc:
        print(f"isdr echo: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except Refused as exc:
        print(f"isdr echo: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    print(f"{result.peer}: C-ECHO Success in {result.seconds * 1000:.0f} ms")
    return EXIT_OK
