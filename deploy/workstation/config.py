"""Workstation settings: a TOML file, then command-line flags on top.

Every key of the file has a flag of the same name (``allow_ae`` -> ``--allow-ae``);
a flag given on the command line wins over the file.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from triage.audit import is_url
from triage.ingest import MAX_FILE_BYTES
from triage.policy import DEFAULT_FLAG_RATE, check_flag_rate

from ..isolation import DEFAULT_DECODE_TIMEOUT_S
from ..results.send import Destination, DestinationError

MAX_ASSOCIATIONS = 10            # pynetdicom's default; a clinic's modalities rarely send at once
MAX_PDU_BYTES = 16382            # pynetdicom's default maximum PDU length
ACSE_TIMEOUT_S = 5.0             # connect -> A-ASSOCIATE-RQ received; modalities send it at once
PDU_BYTES_RANGE = (4096, 1 << 24)
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: 16 chars, no backslash/control


class ConfigError(ValueError):
    """A workstation setting that cannot be used; the message names the key and the fix."""


@dataclass(frozen=True)
class Config:
    """Everything the service needs; ``load_config`` builds and validates it."""

    port: int = 11112
    host: str = "127.0.0.1"
    ae_title: str = "CXR_TRIAGE"
    allow_ae: tuple[str, ...] = ()          # empty: refuse every caller (safe default)
    max_associations: int = MAX_ASSOCIATIONS  # concurrent associations; the next caller gets A-ASSOCIATE-RJ
    max_pdu_bytes: int = MAX_PDU_BYTES      # largest P-DATA PDU we accept (sent to callers in A-ASSOCIATE-AC)
    max_instance_bytes: int = MAX_FILE_BYTES  # largest command or data set one C-STORE may carry (aborted past it)
    acse_timeout_s: float = ACSE_TIMEOUT_S  # connect -> association request, and any pause inside a PDU before it
    inbox: Path = Path("cxr-triage-inbox")
    audit_db: Path | str = Path("cxr-triage-audit.sqlite")  # a postgresql:// URL stays text
    bundle: Path | None = None              # None: the bundled demo model
    expect_bundle_sha256: str | None = None  # the bundle's identity a site approved; another one refuses to start
    destinations: tuple[Destination, ...] = ()  # C-STORE AE@HOST:PORT or DICOMweb URL; ',heatmap' adds the SCs
    flag_rate: float = DEFAULT_FLAG_RATE
    quiet_period_s: float = 5.0
    max_wait_s: float = 4 * 3600.0          # starvation guard
    window: int = 200                       # studies per site in the rolling recalibration window
    min_history: int = 20                   # studies before the site's own quantile replaces the bundle threshold
    poll_s: float = 0.5                     # watched-folder poll interval
    retry_base_s: float = 2.0
    retry_max_s: float = 300.0
    audit_retry_base_s: float = 1.0         # audit store locked or failing: first wait before retrying, doubling
    audit_retry_max_s: float = 60.0         # ... up to this (the studies stay queued meanwhile)
    notify_command: tuple[str, ...] = ()    # argv run for each flagged study (no shell)
    device: str = "auto"
    decode_timeout_s: float = DEFAULT_DECODE_TIMEOUT_S  # a file still decoding after this goes to human review

    @property
    def incoming_dir(self) -> Path:
        return self.inbox / "incoming"

    @property
    def studies_dir(self) -> Path:
        return self.inbox / "studies"

    @property
    def outbox_dir(self) -> Path:
        return self.inbox / "outbox"

    @property
    def rejected_dir(self) -> Path:
        return self.inbox / "rejected"

    @property
    def state_file(self) -> Path:
        return self.inbox / "workstation.json"


_PATHS = {"inbox", "audit_db", "bundle"}
_TUPLES = {"allow_ae", "notify_command"}


def _coerce(key: str, value: Any) -> Any:
    """A raw file/flag value -> the type ``Config`` holds for ``key``."""
    if key == "audit_db" and is_url(value):
        return str(value)
    if key in _PATHS:
        return None if value is None else Path(value)
    if key in _TUPLES:
        return (value,) if isinstance(value, str) else tuple(str(v) for v in value)
    if key == "destinations":
        try:
            return tuple(Destination.parse(v) for v in ([value] if isinstance(value, str) else value))
        except DestinationError as error:
            raise ConfigError(f"destinations: {error}") from error
    return value


def recordable_audit_db(audit_db: Path | str) -> str:
    """``audit_db`` as text safe to write in ``workstation.json``: a ``postgresql://`` URL without its password (in
    the user part or a ``password=`` parameter), so that whoever reads the file, and ``status``, connect with their
    own (libpq reads ``PGPASSWORD`` or ``~/.pgpass``)."""
    if not is_url(audit_db):
        return str(audit_db)
    parts = urlsplit(str(audit_db))
    user, at, host = parts.netloc.rpartition("@")
    query = "&".join(q for q in parts.query.split("&") if q and not q.lower().startswith("password="))
    return urlunsplit(parts._replace(netloc=f"{user.split(':', 1)[0]}{at}{host}", query=query))


def validate(config: Config) -> Config:
    """Return ``config`` if every value is usable, else raise ConfigError naming the key."""
    for ae in (config.ae_title, *config.allow_ae):
        if not _AE_TITLE.match(ae) or not ae.strip():
            raise ConfigError(f"AE title {ae!r} is not 1-16 printable characters without backslash. Fix: e.g. CXR_TRIAGE")
    if not 0 <= config.port < 65536:
        raise ConfigError(f"port {config.port} is not in 0..65535 (0 picks a free port)")
    try:
        check_flag_rate(config.flag_rate)
    except ValueError as error:
        raise ConfigError(f"flag_rate: {error}") from error
    for key in ("quiet_period_s", "max_wait_s", "poll_s", "retry_base_s", "retry_max_s", "audit_retry_base_s",
                "audit_retry_max_s"):
        if getattr(config, key) < 0:
            raise ConfigError(f"{key} is {getattr(config, key)}; it must be >= 0 seconds")
    if not config.decode_timeout_s > 0:
        raise ConfigError(f"decode_timeout_s is {config.decode_timeout_s}; it must be > 0 seconds. Fix: e.g. 60")
    if config.max_associations < 1:
        raise ConfigError(f"max_associations is {config.max_associations}; it must be >= 1. Fix: e.g. 4")
    if not PDU_BYTES_RANGE[0] <= config.max_pdu_bytes <= PDU_BYTES_RANGE[1]:
        raise ConfigError(f"max_pdu_bytes is {config.max_pdu_bytes}; it must be in {PDU_BYTES_RANGE[0]}.."
                          f"{PDU_BYTES_RANGE[1]}. Fix: e.g. {MAX_PDU_BYTES} (the default)")
    if not 0 < config.max_instance_bytes <= MAX_FILE_BYTES:
        raise ConfigError(f"max_instance_bytes is {config.max_instance_bytes}; it must be in 1..{MAX_FILE_BYTES} (the "
                          f"largest file triage.ingest reads). Fix: e.g. {MAX_FILE_BYTES} (the default)")
    if not config.acse_timeout_s > 0:
        raise ConfigError(f"acse_timeout_s is {config.acse_timeout_s}; it must be > 0 seconds. Fix: e.g. "
                          f"{ACSE_TIMEOUT_S} (the default)")
    if config.window < 1 or config.min_history < 1:
        raise ConfigError("window and min_history must be >= 1 study")
    if config.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device {config.device!r} is not one of auto, cpu, cuda")
    return config


def check_can_serve(config: Config) -> Config:
    """``config`` if the service can accept studies with it, else ConfigError with the fix (``status`` needs none of it)."""
    if not config.allow_ae:
        raise ConfigError("no calling AE title is allowed, so every modality would be refused. Fix: pass --allow-ae "
                          "with the AE titles of the modalities that send (e.g. --allow-ae CR_ROOM1 DX_ROOM2), or set "
                          "allow_ae in the config file")
    return config


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the TOML file at ``path`` (when given), then ``overrides`` whose value is not None."""
    known = {f.name for f in fields(Config)}
    values: dict[str, Any] = {}
    if path is not None:
        try:
            values = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise ConfigError(f"{path}: cannot read the config file ({error}). Fix: see deploy/workstation/README.md") from error
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
    values.update({k: v for k, v in (overrides or {}).items() if v is not None and k in known})
    return validate(replace(Config(), **{k: _coerce(k, v) for k, v in values.items()}))
