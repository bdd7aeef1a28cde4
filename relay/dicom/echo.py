"""C-ECHO (DICOM Verification) as an SCU: does a DICOM peer answer, and does it accept us?

One association, one C-ECHO, a release. The outcome says which of three things happened, because
an administrator (or `helm test`) acts differently on each: nothing answered at that address
(`Unreachable`), a DICOM peer answered but would not talk to us or failed the echo (`Refused`), or
it answered with status Success (`echo()` returns).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from relay.dicom.network import NODELAY_HANDLER

log = logging.getLogger("relay.echo")

DEFAULT_CALLING_AE = "ISDR-ECHO"


class EchoFailed(Exception):
    """The base of the two ways a C-ECHO fails."""


class Unreachable(EchoFailed):
    """No DICOM peer answered: the connection was refused, timed out, or the name did not resolve."""


class Refused(EchoFailed):
    """A peer answered but rejected or aborted the association, or answered the C-ECHO with a failure."""


@dataclass(frozen=True)
class EchoResult:
    peer: str
    seconds: float  # from opening the connection to the C-ECHO response


def echo(host: str, port: int, called_ae: str, calling_ae: str = DEFAULT_CALLING_AE,
         timeout: float = 10.0) -> EchoResult:
    """C-ECHO `called_ae` at host:port; raises Unreachable or Refused, with a message saying why."""
    peer = f"{called_ae}@{host}:{port}"
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    ae.connection_timeout = timeout
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    seen: dict[str, object] = {}

    def connected(_event) -> None:
        seen["connected"] = True

    def acse_received(event) -> None:
        seen["response"] = event.primitive

    started = time.monotonic()
    association = ae.associate(host, port, ae_title=called_ae, evt_handlers=[
        NODELAY_HANDLER, (evt.EVT_CONN_OPEN, connected), (evt.EVT_ACSE_RECV, acse_received)])
    try:
        if association.is_established:
            status = association.send_c_echo()
            seconds = time.monotonic() - started
            if status is None or "Status" not in status:
                raise Refused(f"{peer} sent no C-ECHO response (aborted or timed out after {timeout:g}s)")
            if status.Status != 0x0000:
                raise Refused(f"{peer} answered the C-ECHO with status 0x{status.Status:04X}")
            return EchoResult(peer, seconds)
        if not seen.get("connected"):
            raise Unreachable(f"no connection to {host}:{port} (refused, unresolvable or timed out "
                              f"after {timeout:g}s)")
        response = seen.get("response")
        if association.is_rejected and response is not None:
            raise Refused(f"{peer} rejected the association: {response.result_str}, "
                          f"{response.source_str}: {response.reason_str}")
        if association.is_aborted:
            raise Refused(f"{peer} aborted the association (no Verification context accepted?)")
        raise Refused(f"{peer} did not answer the association request within {timeout:g}s")
    finally:
        if association.is_established:
            association.release()
        ae.shutdown()
