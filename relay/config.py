"""Settings from environment variables, with the original relay's names and defaults.

The original relay (a Docker image) was configured only through environment variables; an
existing installation can keep its `.env` file. Where ISDR's default differs from the original
image's, the reason is given next to the field.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Mapping

TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off", ""}


class ConfigError(ValueError):
    """A setting has a value that cannot be used; the message names the variable."""


def _parse_bool(name: str, raw: str) -> bool:
    word = raw.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ConfigError(f"{name}={raw!r}: expected true or false")


def _parse_number(name: str, raw: str, kind, minimum=None):
    try:
        value = kind(raw.strip())
    except ValueError:
        expected = "a whole number" if kind is int else "a number"
        raise ConfigError(f"{name}={raw!r}: expected {expected}") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={raw!r}: must be at least {minimum}")
    return value


MIN_PDU, MAX_PDU_CEILING = 4096, 16 * 1024 * 1024


def _parse_max_pdu(name: str, raw: str) -> int:
    value = _parse_number(name, raw, int, 0)
    if value == 0:
        return MAX_PDU_CEILING
    if not MIN_PDU <= value <= MAX_PDU_CEILING:
        raise ConfigError(f"{name}={raw!r}: must be 0 (the ceiling) or {MIN_PDU}-{MAX_PDU_CEILING}")
    return value


def _parse_list(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.replace(";", ",").split(",") if part.strip())


@dataclass(frozen=True)
class Settings:
    # --- receiver (C-STORE SCP) ---
    scp_hostname: str = "0.0.0.0"  # original image: localhost (inside a container); we listen on all
    scp_port: int = 11112  # original image: 104, which needs root outside a container
    scp_ae_title: str = "ISDR"  # original image: DICOM_NODE
    pynetdicom_log_level: str = "none"  # none | normal | debug, as in the original
    log_level: str = "INFO"
    # Calling AE titles (and host addresses) allowed to associate; empty means anyone.
    allowed_calling_ae_titles: tuple[str, ...] = ()
    allowed_peer_addresses: tuple[str, ...] = ()
    # The longest PDU the receiver accepts (and announces): what one connection can make it
    # buffer. 128 KiB is what dcmtk's storescu sends at most, and large images arrive fastest.
    # 0 (the original's "unlimited") means the ceiling, MAX_PDU_CEILING.
    max_pdu_size: int = 128 * 1024
    # Seconds a new connection has to send its A-ASSOCIATE-RQ (TLS handshake included).
    scp_request_timeout: float = 10.0
    # Seconds an association may stay silent before it is aborted (pynetdicom's was 120).
    scp_idle_timeout: float = 60.0
    scp_max_associations: int = 100  # running at once (pynetdicom's fixed limit was 32)
    scp_max_connections: int = 1000  # open TCP connections, associated or not
    scp_max_connections_per_address: int = 32  # open TCP connections from one IP address
    # Private or unknown SOP classes: refused unless allowed (see README, conformance).
    scp_accept_unknown_sop_classes: bool = False
    # DICOM TLS: a port of its own (None: no TLS), the server's certificate and key (PEM), and
    # a CA bundle that client certificates must verify against (None: no client certificate).
    scp_tls_port: int | None = None
    scp_tls_cert_file: str | None = None
    scp_tls_key_file: str | None = None
    scp_tls_ca_file: str | None = None
    scp_tls_only: bool = False  # no plain port: every association over TLS

    # --- storage ---
    incoming_dir: Path = Path("./isdr-data")  # original image: /opt/app/data/INCOMING
    storage: str = "local"  # local | s3
    s3_endpoint_url: str | None = None
    s3_bucket: str | None = None
    s3_prefix: str = ""
    s3_region: str | None = None
    # Refuse instances (C-STORE status A700 "out of resources") when less is free on a local disk.
    min_free_bytes: int = 256 * 1024 * 1024
    # Local storage: the receiver makes instances durable through a write-ahead journal
    # (relay.storage.journal) rather than an fsync of each file and of its folder.
    storage_journal: bool = True

    # --- fingerprints ---
    fingerprint_dir: Path = Path("./fingerprints")

    # --- series life cycle (original names and defaults) ---
    post_interval: float = 1.0  # how often the scheduler looks at series, seconds
    post_after: float = 10.0  # a series is complete after this long without a new instance
    delete_on_post: bool = True  # delete a series' instances once its tasks are done
    # Instances after a dispatch: reopen (a new SOP Instance UID runs the series again, a re-sent
    # one is a duplicate) | ignore | rerun. The original's default was ignore, which left an
    # incomplete series' missing instances unrun (and deleted them with the rest).
    late_instance_policy: str = "reopen"
    # How long a finished series is remembered (so that a late instance is recognised as late).
    series_retention: float = 3600.0
    # How long a series no fingerprint matches is kept for `isdr series rematch` (0: deleted at once).
    unmatched_retention: float = 0.0

    # --- InferenceServer (original names and defaults) ---
    cert_file: str | None = None  # CA bundle (PEM); None: the system's trust store
    post_timeout: float = 60.0
    get_interval: float = 15.0
    get_timeout: float = 86400.0
    ask_inference_server_to_delete_task: bool = True
    not_found_grace: float = 60.0  # v1: 554 this soon after submit means "not stored yet"
    max_output_bytes: int = 2 * 1024**3  # an output archive may expand to at most this

    # --- delivery ---
    delivery_timeout: float = 3600.0  # keep retrying a destination for this long
    delivery_ae_title: str | None = None  # calling AE title towards destinations; default SCP_AE_TITLE

    # --- all-in-one runner ---
    workers: int = 4
    # Where tasks keep their working copies (fetched instances, archives, predictions); default
    # INCOMING_DIR/work. Never the system's temporary folder: it holds patient data.
    work_dir: Path | None = None

    # --- watching it run ---
    # Prometheus metrics at http://<host>:METRICS_PORT/metrics (isdr run, isdr scp, isdr operator);
    # 0 turns them off. `isdr job` (short-lived) never serves them.
    metrics_port: int = 9120
    # Readiness at http://<host>:HEALTH_PORT/readyz (isdr scp, isdr run): can the storage take a
    # write, can the API server be reached (isdr scp). 0 (the default outside the chart): off.
    health_port: int = 0

    extra: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def calling_ae_title(self) -> str:
        return self.delivery_ae_title or self.scp_ae_title

    @property
    def task_work_root(self) -> Path:
        """The folder holding one working folder per running task (WORK_DIR)."""
        return self.work_dir if self.work_dir is not None else self.incoming_dir / "work"


# Environment variable -> (field, parser). Parsers take (name, raw).
_ENV = {
    "SCP_HOSTNAME": ("scp_hostname", lambda n, v: v.strip()),
    "SCP_PORT": ("scp_port", lambda n, v: _parse_number(n, v, int, 1)),
    "SCP_AE_TITLE": ("scp_ae_title", lambda n, v: v.strip()),
    "PYNETDICOM_LOG_LEVEL": ("pynetdicom_log_level", lambda n, v: v.strip().lower()),
    "LOG_LEVEL": ("log_level", lambda n, v: v.strip().upper()),
    "SCP_ALLOWED_AE_TITLES": ("allowed_calling_ae_titles", lambda n, v: _parse_list(v)),
    "SCP_ALLOWED_ADDRESSES": ("allowed_peer_addresses", lambda n, v: _parse_list(v)),
    "SCP_MAX_PDU": ("max_pdu_size", lambda n, v: _parse_max_pdu(n, v)),
    "SCP_REQUEST_TIMEOUT": ("scp_request_timeout", lambda n, v: _parse_number(n, v, float, 0.1)),
    "SCP_IDLE_TIMEOUT": ("scp_idle_timeout", lambda n, v: _parse_number(n, v, float, 0.1)),
    "SCP_MAX_ASSOCIATIONS": ("scp_max_associations", lambda n, v: _parse_number(n, v, int, 1)),
    "SCP_MAX_CONNECTIONS": ("scp_max_connections", lambda n, v: _parse_number(n, v, int, 1)),
    "SCP_MAX_CONNECTIONS_PER_ADDRESS": ("scp_max_connections_per_address", lambda n, v: _parse_number(n, v, int, 1)),
    "SCP_ACCEPT_UNKNOWN_SOP_CLASSES": ("scp_accept_unknown_sop_classes", _parse_bool),
    "SCP_TLS_PORT": ("scp_tls_port", lambda n, v: _parse_number(n, v, int, 1) if v.strip() else None),
    "SCP_TLS_CERT_FILE": ("scp_tls_cert_file", lambda n, v: v.strip() or None),
    "SCP_TLS_KEY_FILE": ("scp_tls_key_file", lambda n, v: v.strip() or None),
    "SCP_TLS_CA_FILE": ("scp_tls_ca_file", lambda n, v: v.strip() or None),
    "SCP_TLS_ONLY": ("scp_tls_only", _parse_bool),
    "INCOMING_DIR": ("incoming_dir", lambda n, v: Path(v)),
    "STORAGE": ("storage", lambda n, v: v.strip().lower()),
    "S3_ENDPOINT_URL": ("s3_endpoint_url", lambda n, v: v.strip() or None),
    "S3_BUCKET": ("s3_bucket", lambda n, v: v.strip() or None),
    "S3_PREFIX": ("s3_prefix", lambda n, v: v.strip().strip("/")),
    "S3_REGION": ("s3_region", lambda n, v: v.strip() or None),
    "MIN_FREE_BYTES": ("min_free_bytes", lambda n, v: _parse_number(n, v, int, 0)),
    "STORAGE_JOURNAL": ("storage_journal", _parse_bool),
    "FINGERPRINT_DIR": ("fingerprint_dir", lambda n, v: Path(v)),
    "POST_INTERVAL": ("post_interval", lambda n, v: _parse_number(n, v, float, 0.05)),
    "POST_AFTER": ("post_after", lambda n, v: _parse_number(n, v, float, 0)),
    "DELETE_ON_POST": ("delete_on_post", _parse_bool),
    "LATE_INSTANCE_POLICY": ("late_instance_policy", lambda n, v: v.strip().lower()),
    "SERIES_RETENTION": ("series_retention", lambda n, v: _parse_number(n, v, float, 0)),
    "UNMATCHED_RETENTION": ("unmatched_retention", lambda n, v: _parse_number(n, v, float, 0)),
    "CERT_FILE": ("cert_file", lambda n, v: v.strip() or None),
    "POST_TIMEOUT": ("post_timeout", lambda n, v: _parse_number(n, v, float, 1)),
    "GET_INTERVAL": ("get_interval", lambda n, v: _parse_number(n, v, float, 0.05)),
    "GET_TIMEOUT": ("get_timeout", lambda n, v: _parse_number(n, v, float, 1)),
    "ASK_INFERENCE_SERVER_TO_DELETE_TASK": ("ask_inference_server_to_delete_task", _parse_bool),
    "NOT_FOUND_GRACE": ("not_found_grace", lambda n, v: _parse_number(n, v, float, 0)),
    "MAX_OUTPUT_BYTES": ("max_output_bytes", lambda n, v: _parse_number(n, v, int, 1)),
    "DELIVERY_TIMEOUT": ("delivery_timeout", lambda n, v: _parse_number(n, v, float, 1)),
    "DELIVERY_AE_TITLE": ("delivery_ae_title", lambda n, v: v.strip() or None),
    "WORKERS": ("workers", lambda n, v: _parse_number(n, v, int, 1)),
    "WORK_DIR": ("work_dir", lambda n, v: Path(v) if v.strip() else None),
    "METRICS_PORT": ("metrics_port", lambda n, v: _parse_number(n, v, int, 0)),
    "HEALTH_PORT": ("health_port", lambda n, v: _parse_number(n, v, int, 0)),
}

ENV_VARIABLES = tuple(_ENV)


def load_settings(environ: Mapping[str, str] | None = None, **overrides) -> Settings:
    """Read settings from `environ` (default: os.environ); `overrides` win (command-line flags)."""
    environ = os.environ if environ is None else environ
    values = {}
    for name, (attribute, parse) in _ENV.items():
        if name in environ:
            values[attribute] = parse(name, environ[name])
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(Settings)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown settings: {sorted(unknown)}")
    settings = Settings(**values)
    validate(settings)
    return settings


def lifecycle_rules(settings: Settings):
    """The life-cycle rules these settings ask for (shared by isdr run and the operator)."""
    from relay.lifecycle import LatePolicy, Rules

    return Rules(post_after=settings.post_after, delete_on_post=settings.delete_on_post,
                 late_instance_policy=LatePolicy(settings.late_instance_policy),
                 forget_after=settings.series_retention, unmatched_retention=settings.unmatched_retention)


def validate(settings: Settings) -> None:
    if not 1 <= settings.scp_port <= 65535:
        raise ConfigError(f"SCP_PORT={settings.scp_port}: must be 1-65535")
    if not 0 <= settings.metrics_port <= 65535:
        raise ConfigError(f"METRICS_PORT={settings.metrics_port}: must be 1-65535, or 0 for no metrics")
    if not 0 <= settings.health_port <= 65535:
        raise ConfigError(f"HEALTH_PORT={settings.health_port}: must be 1-65535, or 0 for no readiness endpoint")
    if not 1 <= len(settings.scp_ae_title) <= 16 or "\\" in settings.scp_ae_title:
        raise ConfigError(f"SCP_AE_TITLE={settings.scp_ae_title!r}: must be 1-16 characters, no backslash")
    if settings.storage not in ("local", "s3"):
        raise ConfigError(f"STORAGE={settings.storage!r}: expected local or s3")
    if settings.storage == "s3" and not settings.s3_bucket:
        raise ConfigError("STORAGE=s3 needs S3_BUCKET")
    if settings.late_instance_policy not in ("reopen", "ignore", "rerun"):
        raise ConfigError(
            f"LATE_INSTANCE_POLICY={settings.late_instance_policy!r}: expected reopen, ignore or rerun")
    if settings.pynetdicom_log_level not in ("none", "normal", "debug"):
        raise ConfigError(
            f"PYNETDICOM_LOG_LEVEL={settings.pynetdicom_log_level!r}: expected none, normal or debug"
        )
    if settings.cert_file is not None and not Path(settings.cert_file).is_file():
        raise ConfigError(f"CERT_FILE={settings.cert_file!r}: no such file")
    validate_receiver_tls(settings)


def validate_receiver_tls(settings: Settings) -> None:
    if settings.scp_tls_port is None:
        if settings.scp_tls_only:
            raise ConfigError("SCP_TLS_ONLY=true needs SCP_TLS_PORT")
        return
    if not 1 <= settings.scp_tls_port <= 65535 or settings.scp_tls_port == settings.scp_port:
        raise ConfigError(f"SCP_TLS_PORT={settings.scp_tls_port}: must be 1-65535 and differ from SCP_PORT")
    for name, value in (("SCP_TLS_CERT_FILE", settings.scp_tls_cert_file),
                        ("SCP_TLS_KEY_FILE", settings.scp_tls_key_file),
                        ("SCP_TLS_CA_FILE", settings.scp_tls_ca_file)):
        if value is None and name != "SCP_TLS_CA_FILE":
            raise ConfigError(f"SCP_TLS_PORT needs {name}")
        if value is not None and not Path(value).is_file():
            raise ConfigError(f"{name}={value!r}: no such file")
