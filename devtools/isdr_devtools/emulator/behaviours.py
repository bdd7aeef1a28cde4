"""What a task does, chosen by the model name it was submitted with.

Tests pick a behaviour simply by the model in their fingerprint, so the emulator needs no control
channel: `toy` produces real predictions, `fail` crashes, `evil-*` returns hostile archives, the
download quirks (`drip`, `gzip-bomb`, `endless`) send a valid output in a hostile way, and any
name not listed here is an unknown model. What the whole server does (its queue being down, a
redirect, the uids it makes) is chosen by command-line switches instead (config.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Outcome(str, Enum):
    OUTPUT = "output"  # finished with an output archive (200)
    EMPTY = "empty"  # finished, the model wrote nothing (200: v1 says no_output_files_found.error)
    FAILED = "failed"  # the model failed (552)
    MISSING = "missing"  # finished, but the output is missing (553)


class Delivery(str, Enum):
    """How the output archive is sent (the headers of each protocol aside)."""

    NORMAL = "normal"
    DRIP = "drip"  # at --drip-rate bytes per second
    GZIP_BOMB = "gzip-bomb"  # Content-Encoding: gzip; decodes to the archive padded with zeros to --bomb-bytes
    ENDLESS = "endless"  # the archive, then zeros without end (chunked)


class Evil(str, Enum):
    """Hostile additions to an otherwise valid output archive."""

    DOTDOT = "dotdot"  # entries named ../../escaped.dcm and /tmp/isdr-absolute-escape.dcm
    SYMLINK = "symlink"  # a symlink to /etc/passwd, a link-then-write-through pair, a hardlink
    BOMB = "bomb"  # one entry of --bomb-bytes zeros, highly compressed


@dataclass(frozen=True)
class Behaviour:
    name: str
    summary: str
    outcome: Outcome = Outcome.OUTPUT
    delay_factor: float = 1.0
    # The first this many polls (once the task is visible) answer 500 internal error.
    poll_errors: int = 0
    evil: Evil | None = None
    failure_message: str = ""
    delivery: Delivery = Delivery.NORMAL


TOY = Behaviour("toy", "real predictions: one RTSTRUCT per input series (or a secondary capture)")

_BEHAVIOURS = {
    b.name: b
    for b in (
        TOY,
        Behaviour(
            "fail",
            "the model crashes: 552 'model crashed (emulated)'",
            outcome=Outcome.FAILED,
            failure_message="model crashed (emulated)",
        ),
        Behaviour(
            "missing-output",
            "finishes but its output is missing: 553",
            outcome=Outcome.MISSING,
            failure_message="task finished but its output is missing (emulated)",
        ),
        Behaviour(
            "no-output",
            "finishes without writing anything: v1 sends a zip holding only no_output_files_found.error, "
            "v2 a tar holding only the empty container.log",
            outcome=Outcome.EMPTY,
        ),
        Behaviour(
            "internal-error",
            "the first 2 polls answer 500, then like toy",
            poll_errors=2,
        ),
        Behaviour("drip", "like toy, the output sent at --drip-rate bytes per second", delivery=Delivery.DRIP),
        Behaviour(
            "gzip-bomb",
            "like toy, the output sent with Content-Encoding: gzip, decoding to the archive padded "
            "with zeros to --bomb-bytes",
            delivery=Delivery.GZIP_BOMB,
        ),
        Behaviour("endless", "like toy, the output followed by zeros without end", delivery=Delivery.ENDLESS),
        Behaviour("slow", "like toy, with three times the delay", delay_factor=3.0),
        Behaviour(
            "evil-dotdot",
            "valid RTSTRUCT plus entries ../../escaped.dcm and /tmp/isdr-absolute-escape.dcm",
            evil=Evil.DOTDOT,
        ),
        Behaviour(
            "evil-symlink",
            "valid RTSTRUCT plus a symlink to /etc/passwd, a link to /tmp with a file through it, "
            "and (tar only) a hardlink",
            evil=Evil.SYMLINK,
        ),
        Behaviour(
            "evil-bomb",
            "valid RTSTRUCT plus one entry that expands to --bomb-bytes of zeros",
            evil=Evil.BOMB,
        ),
    )
}


def behaviour_for(model: str) -> Behaviour | None:
    """The behaviour of `model`, or None for an unknown model (550 in v1, 500 in v2)."""
    if model.startswith("toy"):
        return TOY
    return _BEHAVIOURS.get(model)


def catalogue() -> dict[str, str]:
    """Model name -> one-line summary, for --help and /_emulator/stats."""
    return {"toy*": TOY.summary, **{n: b.summary for n, b in _BEHAVIOURS.items() if n != "toy"}}
