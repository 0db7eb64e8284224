"""The DICOM Storage SCP (pynetdicom): C-ECHO, and C-STORE of CR, DX and Secondary Capture.

Only allow-listed calling AE titles may associate (others get A-ASSOCIATE-RJ,
"calling AE title not recognised"); beyond ``max_associations`` at once a caller gets
A-ASSOCIATE-RJ "local limit exceeded" (transient: retry later); callers are told our
maximum PDU length (``max_pdu_bytes``). pynetdicom reads a whole PDU of the length the
peer announces before it checks anything, so the port must be reachable only from the
modalities' network (SECURITY.md). Other SOP classes have their presentation
context rejected ("abstract syntax not supported"). C-STORE status codes (PS3.4 B.2.3):
0x0000 success, 0xA700 out of resources (the file could not be written),
0xA900 data set does not match the request, 0xC000 cannot understand (invalid UIDs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    Verification,
)

from .config import MAX_ASSOCIATIONS, MAX_PDU_BYTES
from .inbox import Arrival, InvalidUIDError, check_uid, instance_path, write_atomic

STORAGE_CLASSES = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
)
STATUS_SUCCESS, STATUS_OUT_OF_RESOURCES, STATUS_MISMATCH, STATUS_CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xA900, 0xC000
log = logging.getLogger("cxr_triage.workstation")


class StorageSCP:
    """Receive instances into ``studies_dir`` and hand each ``Arrival`` to ``on_arrival``.

    ``start`` binds (port 0 picks a free one; ``port`` holds the bound port); ``stop`` closes it.
    """

    def __init__(self, ae_title: str, allow_ae: Sequence[str], studies_dir, on_arrival: Callable[[Arrival], None],
                 host: str = "127.0.0.1", port: int = 11112, max_associations: int = MAX_ASSOCIATIONS,
                 max_pdu_bytes: int = MAX_PDU_BYTES) -> None:
        self.ae_title, self.allow_ae, self.studies_dir = ae_title, tuple(allow_ae), studies_dir
        self.on_arrival, self.host, self.port = on_arrival, host, port
        self.max_associations, self.max_pdu_bytes = max_associations, max_pdu_bytes
        self._server = None

    def _application_entity(self) -> AE:
        ae = AE(ae_title=self.ae_title)
        ae.require_calling_aet = list(self.allow_ae) or ["\x00refuse-all"]  # empty list would mean "anyone"
        ae.maximum_associations = self.max_associations
        ae.maximum_pdu_size = self.max_pdu_bytes
        ae.add_supported_context(Verification)
        for sop_class in STORAGE_CLASSES:
            ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
        return ae

    def start(self) -> int:
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, lambda event: STATUS_SUCCESS)]
        self._server = self._application_entity().start_server((self.host, self.port), block=False, evt_handlers=handlers)
        self.port = self._server.server_address[1]
        log.info("DICOM SCP %s listening on %s:%d; allowed callers: %s; at most %d associations, PDU %d bytes",
                 self.ae_title, self.host, self.port, ", ".join(self.allow_ae) or "none", self.max_associations,
                 self.max_pdu_bytes)
        return self.port

    def active_associations(self) -> int:
        """Associations open now (0 when stopped)."""
        return 0 if self._server is None else len(self._server.active_associations)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_store(self, event: evt.Event) -> int:
        """EVT_C_STORE: validate the UIDs, write the file atomically, then report the arrival."""
        caller = event.assoc.requestor.ae_title.strip()
        try:
            ds = event.dataset
            sop_uid = check_uid(ds.get("SOPInstanceUID"), "SOP Instance UID (0008,0018)")
            study_uid = check_uid(ds.get("StudyInstanceUID"), "Study Instance UID (0020,000D)")
        except (InvalidUIDError, ValueError, TypeError, AttributeError) as error:
            log.warning("C-STORE from %s refused: %s", caller, error)
            return STATUS_CANNOT_UNDERSTAND
        if sop_uid != str(event.request.AffectedSOPInstanceUID):
            log.warning("C-STORE from %s refused: data set SOP Instance UID differs from the request's", caller)
            return STATUS_MISMATCH
        path = instance_path(self.studies_dir, study_uid, sop_uid)
        try:
            write_atomic(path, event.encoded_dataset(include_meta=True))
        except OSError as error:
            log.error("C-STORE from %s: cannot write %s (%s)", caller, path, error)
            return STATUS_OUT_OF_RESOURCES
        self.on_arrival(Arrival(study_uid, path, caller))
        return STATUS_SUCCESS
