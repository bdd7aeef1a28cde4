"""What the receiving commands (`isdr run`, `isdr scp`) share on the command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from relay.config import ConfigError, Settings, load_settings


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def add_receiver_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that override the receiver's environment variables."""
    parser.add_argument("--host", help="address to listen on (SCP_HOSTNAME)")
    parser.add_argument("--port", type=int, help="DICOM port to listen on (SCP_PORT)")
    parser.add_argument("--tls-port", type=int,
                        help="DICOM TLS port, next to the plain one (SCP_TLS_PORT; needs SCP_TLS_CERT_FILE and "
                             "SCP_TLS_KEY_FILE, and SCP_TLS_CA_FILE for mutual TLS)")
    parser.add_argument("--ae-title", help="the relay's AE title (SCP_AE_TITLE)")
    parser.add_argument("--incoming-dir", type=Path, help="storage root for STORAGE=local (INCOMING_DIR)")


def receiver_settings(command: str, args, **overrides) -> Settings | None:
    """Settings from the environment and the flags, with logging set up; None (after saying why on
    stderr) when a setting is unusable."""
    try:
        settings = load_settings(scp_port=args.port, scp_tls_port=args.tls_port, scp_ae_title=args.ae_title,
                                 scp_hostname=args.host,
                                 incoming_dir=args.incoming_dir, **overrides)
    except ConfigError as exc:
        print(f"isdr {command}: {exc}", file=sys.stderr)
        return None
    setup_logging(settings.log_level)
    return settings
