"""Socket and logging details shared by the relay's DICOM SCP and SCU."""

from __future__ import annotations

import logging
import socket

from pynetdicom import evt


def _set_nodelay(event) -> None:
    # DIMSE messages are written as several small PDUs; with Nagle's algorithm on, each reply
    # waits for the peer's delayed ACK (~40 ms on Linux), which caps a C-STORE stream at ~25/s.
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


NODELAY_HANDLER = (evt.EVT_CONN_OPEN, _set_nodelay)


def set_poll_interval(association, seconds: float) -> None:
    """How long the association's DUL thread sleeps when it finds nothing to do.

    pynetdicom polls its socket and queues; the sleep (1 ms by default, `_run_loop_delay`, which
    its maintainers describe as the knob trading idle CPU for latency) is paid several times per
    C-STORE. Left alone if a pynetdicom release no longer has it."""
    dul = getattr(association, "dul", None)
    if dul is not None and hasattr(dul, "_run_loop_delay"):
        dul._run_loop_delay = seconds


def configure_pynetdicom_logging(level: str) -> None:
    """PYNETDICOM_LOG_LEVEL as in the original relay: none, normal or debug."""
    logger = logging.getLogger("pynetdicom")
    if level == "debug":
        logger.setLevel(logging.DEBUG)
    elif level == "normal":
        logger.setLevel(logging.INFO)
    else:
        logger.setLevel(logging.CRITICAL + 1)
