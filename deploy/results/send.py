"""Destinations of result objects and their delivery: DIMSE C-STORE or DICOMweb STOW-RS.

A destination is written ``AE@HOST:PORT`` (a C-STORE SCP) or ``http(s)://HOST[:PORT]/PATH``
(a DICOMweb service root, e.g. ``http://pacs:8042/dicom-web``; STOW-RS posts to
``<root>/studies``). ``,heatmap`` after either also sends the heatmap Secondary Captures there.
``send_results`` is the batch scorer's path: one SR per decided study, sent at once.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset
from pynetdicom import AE

from triage.audit import Decision, os_path

log = logging.getLogger("cxr_triage.results")

HEATMAP_OPTION = ",heatmap"
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: 16 chars, no backslash/control
_DIMSE = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[A-Za-z0-9.\-:\[\]]+):(?P<port>\d{1,5})$")
_URL = re.compile(r"^https?://[^\s/?#]+(/[^\s?#]*)?$")


class DestinationError(ValueError):
    """A destination that cannot be parsed; the message says what and gives an example."""


@dataclass(frozen=True)
class Destination:
    """A C-STORE SCP (``ae_title``, ``host``, ``port``) or a DICOMweb service root (``url``) that receives our
    result objects; ``heatmap``: also send the heatmap Secondary Captures there."""

    ae_title: str = ""
    host: str = ""
    port: int = 0
    url: str = ""
    heatmap: bool = False

    @classmethod
    def parse(cls, text: str) -> "Destination":
        """``AE@HOST:PORT`` or ``http(s)://...``, optionally followed by ``,heatmap``; DestinationError otherwise."""
        text = text.strip()
        heatmap = text.endswith(HEATMAP_OPTION)
        address = text.removesuffix(HEATMAP_OPTION) if heatmap else text
        if _URL.match(address):
            return cls(url=address.rstrip("/"), heatmap=heatmap)
        match = _DIMSE.match(address)
        if match is None or not _AE_TITLE.match(match["ae"]) or not 0 < int(match["port"]) < 65536:
            raise DestinationError(f"destination {text!r} is neither AE@HOST:PORT nor an http(s):// DICOMweb URL. "
                                   "Fix: e.g. PACS@10.0.0.5:104 or http://10.0.0.5:8042/dicom-web (add ,heatmap to "
                                   "send heatmaps too)")
        return cls(match["ae"].strip(), match["host"].strip("[]"), int(match["port"]), heatmap=heatmap)

    @property
    def is_dicomweb(self) -> bool:
        return bool(self.url)

    def __str__(self) -> str:
        return self.url or f"{self.ae_title}@{self.host}:{self.port}"


def send(dataset: Dataset, destination: Destination, calling_ae: str, timeout_s: float = 10.0) -> str:
    """Deliver ``dataset``; "" on success, else what went wrong (for the log; the caller retries)."""
    if destination.is_dicomweb:
        return stow(dataset, destination.url, timeout_s)
    return c_store(dataset, destination, calling_ae, timeout_s)


def c_store(dataset: Dataset, destination: Destination, calling_ae: str, timeout_s: float) -> str:
    """C-STORE over a new association; "" when the status is Success (0x0000)."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        return "no association"
    try:
        status = assoc.send_c_store(dataset)
        code = int(status.Status) if "Status" in status else None
    finally:
        assoc.release()
    return "" if code == 0 else "no C-STORE response" if code is None else f"status 0x{code:04X}"


def stow(dataset: Dataset, url: str, timeout_s: float) -> str:
    """STOW-RS ``dataset`` to the DICOMweb service root ``url``; "" when the store response lists no failure."""
    client = DICOMwebClient(url, session=requests.Session())
    client.set_http_retry_params(retry=False)
    client._session.request = _with_timeout(client._session.request, timeout_s)  # noqa: SLF001 - see _with_timeout
    try:
        response = client.store_instances([dataset])
    except (requests.RequestException, OSError) as error:
        return f"STOW-RS failed: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
    failed = response.get("FailedSOPSequence") if response is not None else None
    return f"STOW-RS refused it (Failure Reason {failed[0].get('FailureReason', '?')})" if failed else ""


def _with_timeout(request, timeout_s: float):
    """``requests.Session.request`` with a default timeout: dicomweb-client passes none, so a stalled server
    would hang the sender thread for ever."""
    def timed(method, url, **kwargs):
        kwargs.setdefault("timeout", timeout_s)
        return request(method, url, **kwargs)
    return timed


def send_results(decisions: Sequence[Decision], destinations: Sequence[Destination], calling_ae: str,
                 timeout_s: float = 30.0) -> dict[str, str]:
    """The batch scorer's sending: one SR per study of ``decisions`` (the final records of a run) to every
    destination, built from the files' headers. Returns {study UID: problem} for the studies not sent everywhere
    ("" = sent); a study whose files are no longer readable, or of two patients, is reported, never raised."""
    from .sr import build_study_report
    from .headers import readable_headers

    problems: dict[str, str] = {}
    for study_uid, final in by_study(decisions).items():
        headers = readable_headers(Path(os_path(d.path)) for d in final)
        if not headers:
            problems[study_uid] = "no file of the study has a readable DICOM header with its UIDs"
            continue
        try:
            report = build_study_report(final, headers)
        except ValueError as error:  # PatientMismatchError (a ValueError): never file one patient's result as another's
            problems[study_uid] = str(error)
            continue
        failures = [f"{d}: {p}" for d in destinations if (p := send(report, d, calling_ae, timeout_s))]
        problems[study_uid] = "; ".join(failures)
        log.info("study %s: report %s", study_uid, "sent" if not failures else "NOT sent: " + problems[study_uid])
    return problems


def by_study(decisions: Iterable[Decision]) -> dict[str, list[Decision]]:
    """DICOM decisions grouped by (0020,000D) Study Instance UID, in order of first appearance."""
    studies: dict[str, list[Decision]] = {}
    for decision in decisions:
        if decision.study_uid and decision.sop_uid:
            studies.setdefault(decision.study_uid, []).append(decision)
    return studies
