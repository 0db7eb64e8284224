"""The DICOM Storage SCP (pynetdicom): C-ECHO, and C-STORE of CR, DX and Secondary Capture.

Only allow-listed calling AE titles may associate (others get A-ASSOCIATE-RJ,
"calling AE title not recognised"); beyond ``max_associations`` at once a caller gets
A-ASSOCIATE-RJ "local limit exceeded" (transient: retry later); callers are told our
maximum PDU length (``max_pdu_bytes``). Other SOP classes have their presentation
context rejected ("abstract syntax not supported").

Exposure before anything is checked (SECURITY.md): a connection holds an association
slot from the moment it is accepted. One that has not completed its A-ASSOCIATE-RQ within
``acse_timeout_s`` (pynetdicom's ACSE/ARTIM timeout; also the socket timeout, so a peer
that stops in the middle of a PDU cannot block the reader) is closed; after acceptance
the socket timeout is pynetdicom's network timeout. Received data sets are written to a
temporary file as they arrive (pynetdicom's ``STORE_RECV_CHUNKED_DATASET``), never held
whole in memory, and a DIMSE message whose fragments exceed ``max_instance_bytes`` has its
association aborted (A-ABORT) during receipt: nothing over the limit is stored.

C-STORE status codes (PS3.4 B.2.3): 0x0000 success, 0xA700 out of resources (the file
could not be written), 0xA900 data set does not match the request, 0xC000 cannot
understand (invalid UIDs, unreadable header), 0xC010 the patient ((0010,0020) Patient ID,
(0010,0010) Patient's Name or (0010,0030) Birth Date) differs from the study's first
instance (the instance is not stored; Offending Element (0000,0901) lists the tags).
"""

from __future__ import annotations

import logging
import mmap
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from pydicom import Dataset, dcmread
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, evt
from pynetdicom.association import Association
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    Verification,
)

from triage.ingest import MAX_FILE_BYTES, PARSE_ERRORS

from .assembler import PATIENT_TAGS, PatientMismatchError, check_patient
from .config import ACSE_TIMEOUT_S, MAX_ASSOCIATIONS, MAX_PDU_BYTES
from .inbox import Arrival, check_uid, store_instance

STORAGE_CLASSES = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
)
STATUS_SUCCESS, STATUS_OUT_OF_RESOURCES, STATUS_MISMATCH, STATUS_CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xA900, 0xC000
STATUS_PATIENT_MISMATCH = 0xC010
NETWORK_TIMEOUT_S = 60.0  # silence within an association (pynetdicom's default)
HEADER_DEFER_BYTES = 1 << 16  # header values larger than this are not read when checking an instance
log = logging.getLogger("cxr_triage.workstation")


def message_bytes(received: int, fragments: Iterable[bytes], limit: int) -> int | None:
    """Bytes of the DIMSE message in progress after ``fragments`` (PDV values); None once over ``limit``.

    Each value starts with its Message Control Header (PS3.8 E.2): bit 1 set marks the
    last fragment of a command or data set, after which the count starts again.
    """
    for value in fragments:
        received += len(value) - 1
        if received > limit:
            return None
        if value[0] & 0b10:
            received = 0
    return received


class StorageSCP:
    """Receive instances into ``studies_dir`` and hand each ``Arrival`` to ``on_arrival``.

    ``start`` binds (port 0 picks a free one; ``port`` holds the bound port); ``stop`` closes it.
    ``max_instance_bytes`` bounds one received command or data set (default: the size
    ``triage.ingest`` reads at most); ``acse_timeout_s`` bounds connect -> association request.
    """

    def __init__(self, ae_title: str, allow_ae: Sequence[str], studies_dir: Path,
                 on_arrival: Callable[[Arrival], None], host: str = "127.0.0.1", port: int = 11112,
                 max_associations: int = MAX_ASSOCIATIONS, max_pdu_bytes: int = MAX_PDU_BYTES,
                 max_instance_bytes: int = MAX_FILE_BYTES, acse_timeout_s: float = ACSE_TIMEOUT_S) -> None:
        self.ae_title, self.allow_ae, self.studies_dir = ae_title, tuple(allow_ae), Path(studies_dir)
        self.on_arrival, self.host, self.port = on_arrival, host, port
        self.max_associations, self.max_pdu_bytes = max_associations, max_pdu_bytes
        self.max_instance_bytes, self.acse_timeout_s = max_instance_bytes, acse_timeout_s
        self._server = None
        self._received: weakref.WeakKeyDictionary[Association, int | None] = weakref.WeakKeyDictionary()

    def _application_entity(self) -> AE:
        ae = AE(ae_title=self.ae_title)
        ae.require_calling_aet = list(self.allow_ae) or ["\x00refuse-all"]  # empty list would mean "anyone"
        ae.maximum_associations = self.max_associations
        ae.maximum_pdu_size = self.max_pdu_bytes
        ae.acse_timeout, ae.network_timeout = self.acse_timeout_s, NETWORK_TIMEOUT_S
        ae.add_supported_context(Verification)
        for sop_class in STORAGE_CLASSES:
            ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
        return ae

    def start(self) -> int:
        _config.STORE_RECV_CHUNKED_DATASET = True  # data sets go to a temporary file as they arrive
        handlers = [(evt.EVT_CONN_OPEN, self._on_connect), (evt.EVT_ACCEPTED, self._on_accepted),
                    (evt.EVT_PDU_RECV, self._on_pdu), (evt.EVT_CONN_CLOSE, self._on_close),
                    (evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, lambda event: STATUS_SUCCESS)]
        self._server = self._application_entity().start_server((self.host, self.port), block=False, evt_handlers=handlers)
        self.port = self._server.server_address[1]
        log.info("DICOM SCP %s listening on %s:%d; allowed callers: %s; at most %d associations, PDU %d bytes, "
                 "instance %d bytes, %.1f s to associate", self.ae_title, self.host, self.port,
                 ", ".join(self.allow_ae) or "none", self.max_associations, self.max_pdu_bytes,
                 self.max_instance_bytes, self.acse_timeout_s)
        return self.port

    def active_associations(self) -> int:
        """Associations open now, requested or not yet (0 when stopped)."""
        return 0 if self._server is None else len(self._server.active_associations)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    # -- before and around the data: timeouts, size limit, leftovers --------------------------

    def _on_connect(self, event: evt.Event) -> None:
        """EVT_CONN_OPEN: bound every read, so a peer that stops inside a PDU is dropped after
        ``acse_timeout_s`` (pynetdicom leaves accepted sockets blocking without a timeout)."""
        event.assoc.dul.socket.socket.settimeout(self.acse_timeout_s)

    def _on_accepted(self, event: evt.Event) -> None:
        """EVT_ACCEPTED: an allowed caller; a pause inside a PDU may now last the network timeout."""
        event.assoc.dul.socket.socket.settimeout(NETWORK_TIMEOUT_S)

    def _on_pdu(self, event: evt.Event) -> None:
        """EVT_PDU_RECV: count each P-DATA-TF's fragments; abort the association past ``max_instance_bytes``."""
        assoc = event.assoc
        if not isinstance(event.pdu, P_DATA_TF) or self._received.get(assoc, 0) is None:
            return
        fragments = (item.presentation_data_value for item in event.pdu.presentation_data_value_items)
        self._received[assoc] = message_bytes(self._received.get(assoc, 0), fragments, self.max_instance_bytes)
        if self._received[assoc] is None:
            log.warning("C-STORE from %s aborted: the instance exceeds the %d-byte limit (max_instance_bytes); "
                        "nothing was stored", assoc.requestor.ae_title.strip(), self.max_instance_bytes)
            assoc.abort(block=False)  # queued: this handler runs in pynetdicom's reader thread

    def _on_close(self, event: evt.Event) -> None:
        """EVT_CONN_CLOSE: remove the temporary file of a C-STORE cut short (our abort, the peer's, a
        dropped connection): pynetdicom deletes it only after EVT_C_STORE has run."""
        message = event.assoc.dimse.message  # the DIMSE message still being received, if any
        partial = getattr(message, "_data_set_path", None)  # private in pynetdicom 3.0 dimse_messages.py
        if isinstance(partial, Path):
            partial.unlink(missing_ok=True)

    # -- the instance ---------------------------------------------------------------------------

    def _on_store(self, event: evt.Event) -> int | Dataset:
        """EVT_C_STORE: check the header (UIDs, request, patient), store the file in the inbox (atomically,
        named by its UIDs and sha256), then report the arrival."""
        caller = event.assoc.requestor.ae_title.strip()
        received = Path(event.dataset_path)
        try:
            header = dcmread(received, stop_before_pixels=True, defer_size=HEADER_DEFER_BYTES)
            sop_uid = check_uid(header.get("SOPInstanceUID"), "SOP Instance UID (0008,0018)")
            study_uid = check_uid(header.get("StudyInstanceUID"), "Study Instance UID (0020,000D)")
        except (*PARSE_ERRORS, RecursionError, MemoryError) as error:  # sender-made header: sequences nested
            # hundreds deep raise RecursionError; InvalidUIDError is a ValueError
            log.warning("C-STORE from %s refused: %s (%s)", caller, type(error).__name__, error)
            return STATUS_CANNOT_UNDERSTAND
        if sop_uid != str(event.request.AffectedSOPInstanceUID):
            log.warning("C-STORE from %s refused: data set SOP Instance UID differs from the request's", caller)
            return STATUS_MISMATCH
        try:
            check_patient(self.studies_dir / study_uid, header)
        except PatientMismatchError as error:
            log.warning("C-STORE from %s refused: %s", caller, error)
            return patient_mismatch_status(error)
        try:
            path = store_received(received, self.studies_dir, study_uid, sop_uid)
        except OSError as error:
            log.error("C-STORE from %s: cannot store instance %s of study %s (%s)", caller, sop_uid, study_uid, error)
            return STATUS_OUT_OF_RESOURCES
        self.on_arrival(Arrival(study_uid, path, caller))
        return STATUS_SUCCESS


def patient_mismatch_status(error: PatientMismatchError) -> Dataset:
    """The C-STORE response for ``error``: status 0xC010, Offending Element (0000,0901), Error Comment (0000,0902)."""
    status = Dataset()
    status.Status = STATUS_PATIENT_MISMATCH
    status.OffendingElement = [PATIENT_TAGS[keyword] for keyword in error.keywords]
    status.ErrorComment = "Patient differs from the study's; not stored"
    return status


def store_received(source: Path, studies_dir: Path, study_uid: str, sop_uid: str) -> Path:
    """Store the received file ``source`` with ``inbox.store_instance`` (named by its UIDs and sha256; identical
    bytes already there are a no-op) through a read-only memory map: page cache, not a copy in this process's memory."""
    with open(source, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
        return store_instance(studies_dir, study_uid, sop_uid, view)
