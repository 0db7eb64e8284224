"""The workstation's result objects for one decided study.

The TID 1500 SR (``deploy.results.sr.build_study_report``, which refuses instances of two
patients) for every destination, and a heatmap Secondary Capture per scored image
(``deploy.results.sc``) for destinations configured with ``,heatmap`` when the bundle has
a CAM output. See deploy/workstation/README.md "Result objects".
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
from pydicom import Dataset
from pydicom.uid import generate_uid

from triage.audit import Decision
from triage.errors import TriageError
from triage.inference import Model
from triage.pipeline import SCORED

from ..results.sc import build_heatmap
from ..results.sr import NOT_FOR_DIAGNOSTIC_USE, build_study_report, check_one_patient

__all__ = ["NOT_FOR_DIAGNOSTIC_USE", "build_heatmaps", "build_study_report", "check_one_patient"]
log = logging.getLogger("cxr_triage.workstation")

HeatmapInput = Callable[[str], tuple[np.ndarray, np.ndarray]]  # path -> (uint8 display, model input)


def build_heatmaps(final: Sequence[Decision], headers: Sequence[Dataset], model: Model,
                   heatmap_input: HeatmapInput) -> list[Dataset]:
    """One SC per scored image of the study, in one new series. ``heatmap_input`` decodes a file (the service
    runs ``triage.heatmap.heatmap_input`` in its decode process); a file that fails now is logged and skipped
    (its SR is sent regardless). Call after ``check_one_patient(headers)``."""
    by_sop = {str(h.SOPInstanceUID): h for h in headers}
    bundle, series_uid, heatmaps = model.bundle, generate_uid(), []
    finding = bundle.findings.index(bundle.triage_finding)
    for decision in (d for d in final if d.status == SCORED and d.sop_uid in by_sop):
        try:
            display, model_input = heatmap_input(decision.path)
        except (TriageError, OSError) as error:
            log.warning("study %s: no heatmap for %s (%s)", decision.study_uid, decision.sop_uid, error)
            continue
        cam = model.run(model_input[None], features=False).cams[0, finding]
        heatmaps.append(build_heatmap(by_sop[decision.sop_uid], headers[0], display, cam, series_uid,
                                      len(heatmaps) + 1, bundle.name, bundle.version, bundle.sha256))
    return heatmaps
