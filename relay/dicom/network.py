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


def configure_pynetdicom_logging(level: str) -> None:
    """PYNETDICOM_LOG_LEVEL as in the original relay: none, normal or debug."""
    logger = logging.getLogger("pynetdicom")
    if level == "debug":
        logger.setLevel(logging.DEBUG)
    elif level == "normal":
        logger.setLevel(logging.INFO)
    else:
        logger.setLevel(logging.CRITICAL + 1)
