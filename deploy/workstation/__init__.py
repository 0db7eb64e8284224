"""The clinic workstation app: receive studies over DICOM, score them on arrival, send results back.

    C-STORE / dropped file -> inbox (atomic, UID-named) -> study assembler (quiet period)
    -> triage.pipeline -> stream decision (rolling per-site recalibration, starvation guard)
    -> audit record -> DICOM SR -> outbox (C-STORE with retries) + local notification
"""
