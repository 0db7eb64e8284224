"""``cxr-triage workstation [status]``: run the clinic service, or print its status."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from triage.errors import TriageError

from .config import ConfigError, check_can_serve, load_config

_OVERRIDES = ("port", "ae_title", "allow_ae", "inbox", "audit_db", "destinations", "flag_rate", "quiet_period_s",
              "max_wait_s", "bundle", "expect_bundle_sha256", "device", "notify_command", "max_associations",
              "max_pdu_bytes", "decode_timeout_s")


def _config(args: argparse.Namespace):
    return load_config(args.config, {key: getattr(args, key, None) for key in _OVERRIDES})


def workstation_command(args: argparse.Namespace) -> int:
    """Run the service (SIGTERM/SIGINT stop it cleanly), or print the status; 1, with one line naming the
    problem and the fix, when the config, the bundle, the port or the audit store cannot be used."""
    try:
        config = _config(args)
        if args.action == "status":
            from .status import status_lines

            print("\n".join(status_lines(config)))
            return 0
        from .service import Workstation

        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
        station = Workstation(check_can_serve(config))
    except (ConfigError, TriageError, OSError, ValueError) as error:
        return _fail(error)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        station.run(stop)
    except (ConfigError, TriageError, OSError) as error:  # the port, the audit store, the inbox folders
        return _fail(error)
    return 0


def _fail(error: Exception) -> int:
    print(f"cxr-triage workstation: error: {error}", file=sys.stderr)
    return 1


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``workstation`` on the main CLI."""
    parser = subparsers.add_parser(
        "workstation", help="clinic service: receive studies over DICOM, score them on arrival, send reports back",
        description="Run the DICOM Storage SCP + watched folder, score each study when it is complete, audit it and "
                    "send a DICOM SR to the destinations. 'status' prints the queue, last decisions, realized flag "
                    "rate and provider. Flags override the --config file (see deploy/workstation/README.md).",
    )
    parser.add_argument("action", nargs="?", choices=("run", "status"), default="run", help="run (default) or status")
    parser.add_argument("--config", help="TOML config file")
    parser.add_argument("--port", type=int, help="DICOM port to listen on (0 = any free port; default 11112)")
    parser.add_argument("--ae-title", dest="ae_title", help="our AE title (default CXR_TRIAGE)")
    parser.add_argument("--allow-ae", dest="allow_ae", nargs="+", metavar="AE", help="calling AE titles allowed to send")
    parser.add_argument("--inbox", help="working folder: incoming/, studies/, outbox/ (default ./cxr-triage-inbox)")
    parser.add_argument("--audit-db", dest="audit_db",
                        help="SQLite file or postgresql:// URL (default ./cxr-triage-audit.sqlite)")
    parser.add_argument("--max-associations", dest="max_associations", type=int,
                        help="concurrent DICOM associations; the next caller is rejected (default 10)")
    parser.add_argument("--max-pdu", dest="max_pdu_bytes", type=int, metavar="BYTES",
                        help="maximum PDU length we accept (default 16382)")
    parser.add_argument("--decode-timeout", dest="decode_timeout_s", type=float, metavar="SECONDS",
                        help="a file still decoding after this goes to human review as decode_timeout (default 60)")
    parser.add_argument("--destination", dest="destinations", nargs="+", metavar="AE@HOST:PORT|URL[,heatmap]",
                        help="where reports are sent: a C-STORE SCP or a DICOMweb (STOW-RS) URL; ',heatmap' also "
                             "sends the heatmap Secondary Captures there")
    parser.add_argument("--flag-rate", dest="flag_rate", type=float, help="target fraction of studies flagged (default 0.05)")
    parser.add_argument("--quiet-period", dest="quiet_period_s", type=float, metavar="SECONDS",
                        help="a study is complete after this long without a new instance (default 5)")
    parser.add_argument("--max-wait", dest="max_wait_s", type=float, metavar="SECONDS",
                        help="starvation guard: flag an unreviewed study after this long (default 14400)")
    parser.add_argument("--bundle", help="model bundle folder (default: the bundled demo model)")
    parser.add_argument("--expect-bundle-sha256", dest="expect_bundle_sha256", metavar="SHA256",
                        help="refuse to start unless the bundle's identity (sha256 of its manifest.json) is this one")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="ONNX Runtime device (default auto)")
    parser.add_argument("--notify-command", dest="notify_command", nargs="+", metavar="ARG",
                        help="command run for each flagged study (env CXR_STUDY_UID, CXR_RISK as shown to people, "
                             "CXR_RISK_VALUE full precision, CXR_POLICY)")
    parser.set_defaults(func=workstation_command)
