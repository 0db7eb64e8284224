"""The whole flow in a few readable functions.

    file -> Radiograph -> model input -> ONNX logits (+ gate features) -> calibrated risk
         -> input gate (view / distribution) -> study risk -> flag (policy) -> Decision (audit record)

``prepare`` (decode + preprocess) is pure and picklable so it can run in worker
processes; ``score_prepared`` runs the model in the main process; ``finalize``
applies the policy to the whole set. ``triage_files`` chains them for callers
that score a handful of files in one go.
"""

from __future__ import annotations

import hashlib
import math
import os
import stat
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from .audit import Decision
from .bundle import Bundle
from .decode import decode_size
from .errors import BadInputError
from .inference import InferenceError, Model, calibrated_risk
from .ingest import MAX_FILE_BYTES, read_radiograph
from .ood import VIEW_OUT
from .policy import Flags, flag_top_k, study_risks
from .preprocess import PreprocessSpec, preprocess
from .radiograph import ImageMeta
from .scope import FRONTAL_VIEWS

SCORED, HUMAN_REVIEW = "scored", "human_review"
HASH_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class Prepared:
    """One file after decode and preprocessing, or the reason it could not be.

    ``model_input``: (C, H, W) float32 when the file is scorable, else ``None`` and
    ``reason``/``detail`` say why.
    """

    path: str
    sha256: str
    meta: ImageMeta | None = None
    model_input: np.ndarray | None = None
    reason: str = ""
    detail: str = ""
    decode_ms: float = 0.0


def prepare(path: str, spec: PreprocessSpec, reduced_decode: Collection[str] = ()) -> Prepared:
    """Read, check and preprocess one file. Bad input becomes a ``Prepared`` with a reason.

    ``reduced_decode``: the codec families to decode at reduced resolution (a bundle's
    ``Bundle.reduced_decode``); other files are decoded at full size.
    """
    start = time.perf_counter()
    try:
        radiograph = read_radiograph(path, reduce_to=decode_size(spec) if reduced_decode else None,
                                     reduce_codecs=reduced_decode)
        model_input = preprocess(radiograph, spec)
    except BadInputError as error:
        elapsed_ms = (time.perf_counter() - start) * 1000
        return Prepared(str(path), sha256_or_empty(path), error.meta, reason=error.reason, detail=str(error),
                        decode_ms=elapsed_ms)
    except Exception as error:  # noqa: BLE001 - one file must never stop a run: RecursionError, MemoryError, a bug
        elapsed_ms = (time.perf_counter() - start) * 1000
        detail = (f"{path}: malformed_file: reading it raised {type(error).__name__}"
                  f"{': ' + str(error).splitlines()[0][:200] if str(error) else ''}. Fix: a person reads the study "
                  "on the modality or PACS; ask the sender to re-export it (a damaged or crafted file)")
        return Prepared(str(path), sha256_or_empty(path), reason="malformed_file", detail=detail, decode_ms=elapsed_ms)
    elapsed_ms = (time.perf_counter() - start) * 1000
    return Prepared(str(path), radiograph.sha256, radiograph.meta, model_input, decode_ms=elapsed_ms)


def sha256_or_empty(path: str, limit_bytes: int | None = None) -> str:
    """sha256 of a regular file of at most ``limit_bytes`` (default ``triage.ingest.MAX_FILE_BYTES``), or "" (the
    file is still recorded) when it is larger, not a regular file, or cannot be read.

    The size is checked before anything is read and at most ``limit_bytes`` are ever read (a file that grows past
    the limit while it is hashed gets ""), so a 40 GB file costs a ``stat``, not minutes of reading.
    """
    limit = MAX_FILE_BYTES if limit_bytes is None else limit_bytes
    try:
        handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: opening a FIFO must not wait for a writer
    except OSError:
        return ""
    with open(handle, "rb") as stream:
        try:
            status = os.fstat(handle)
            if not stat.S_ISREG(status.st_mode) or status.st_size > limit:
                return ""
            digest = hashlib.sha256()
            while chunk := stream.read(min(HASH_CHUNK_BYTES, limit + 1 - stream.tell())):
                digest.update(chunk)
            return "" if stream.tell() > limit else digest.hexdigest()
        except OSError:
            return ""


def draft(prepared: Prepared, bundle: Bundle, pseudonymize: Callable[[str], str], risk: float | None = None,
          infer_ms: float | None = None, provider: str = "", run_id: str = "") -> Decision:
    """An image-level Decision before the policy has run (not flagged, no study risk)."""
    meta = prepared.meta
    tags = {} if meta is None else {
        "study_uid": meta.study_uid, "series_uid": meta.series_uid, "sop_uid": meta.sop_uid,
        "patient_pseudo_id": pseudonymize(meta.patient_id), "patient_sex": meta.patient_sex,
        "patient_age": meta.patient_age, "modality": meta.modality, "body_part": meta.body_part,
        "view_position": meta.view_position, "manufacturer": meta.manufacturer,
    }
    return Decision(
        path=prepared.path, sha256=prepared.sha256,
        status=SCORED if risk is not None else HUMAN_REVIEW,
        reason=prepared.reason, detail=prepared.detail, **tags,
        bundle_name=bundle.name, bundle_version=bundle.version, bundle_sha256=bundle.sha256,
        finding=bundle.triage_finding, risk=risk, decode_ms=round(prepared.decode_ms, 3),
        infer_ms=None if infer_ms is None else round(infer_ms, 3), provider=provider, run_id=run_id,
    )


Result = tuple[float, str, float]  # calibrated risk of the triage finding, gate reason ("" accepted), gate score


def forward(model: Model, inputs: Sequence[np.ndarray]) -> list[Result]:
    """One ONNX Runtime call over model inputs (C, H, W): a ``Result`` each; ``InferenceError`` when it fails."""
    try:
        batch = np.stack(inputs)
    except ValueError as error:  # inputs of different shapes: ONNX Runtime would refuse them anyway
        raise InferenceError(f"model inputs of different shapes ({error})") from error
    outputs = model.run(batch, cams=False, features=model.ood is not None)
    column = model.bundle.findings.index(model.bundle.triage_finding)
    risks = calibrated_risk(outputs.logits, model.temperatures, model.biases)[:, column].tolist()
    if model.ood is None:
        return [(risk, "", math.nan) for risk in risks]
    verdict = model.ood.assess(outputs.features)
    return list(zip(risks, verdict.reasons, verdict.score.tolist()))


def forward_each(model: Model, inputs: Sequence[np.ndarray]) -> list[Result | InferenceError]:
    """``forward`` on the whole batch; when it fails, on each input alone, so only the inputs that fail get their
    ``InferenceError`` (and go to human review) while the rest of the batch is scored."""
    try:
        return list(forward(model, inputs))
    except InferenceError as error:
        if len(inputs) == 1:
            return [error]
    return [result for x in inputs for result in forward_each(model, [x])]


def score_prepared(model: Model, batch: Sequence[Prepared], pseudonymize: Callable[[str], str],
                   run_id: str = "") -> list[Decision]:
    """Run the model once over the scorable files of ``batch``; drafts for all of them, in order. A batch that
    ONNX Runtime fails on is retried image by image; the images that still fail get ``inference_failed``."""
    scorable = [p for p in batch if p.model_input is not None]
    infer_ms = 0.0
    results: list[Result | InferenceError] = []
    if scorable:
        start = time.perf_counter()
        results = forward_each(model, [p.model_input for p in scorable])
        infer_ms = (time.perf_counter() - start) * 1000 / len(scorable)
    result_of = {id(p): r for p, r in zip(scorable, results)}
    threshold = model.ood.threshold if model.ood is not None else math.inf

    def decide(p: Prepared) -> Decision:
        if id(p) not in result_of:  # not scorable: the reason is already set
            return draft(p, model.bundle, pseudonymize, provider=model.provider, run_id=run_id)
        result = result_of[id(p)]
        if isinstance(result, InferenceError):
            return draft(_inference_failed(p, str(result)), model.bundle, pseudonymize, provider=model.provider,
                         run_id=run_id)
        risk, reason, score = result
        if not math.isfinite(risk):
            return draft(_inference_failed(p, "the model returned a non-finite risk"), model.bundle, pseudonymize,
                         provider=model.provider, run_id=run_id)
        gated = gate_outcome(p, reason, score, threshold)
        if gated.model_input is None:
            return draft(gated, model.bundle, pseudonymize, infer_ms=infer_ms, provider=model.provider, run_id=run_id)
        return draft(gated, model.bundle, pseudonymize, risk, infer_ms, model.provider, run_id)

    return [decide(p) for p in batch]


def gate_outcome(prepared: Prepared, reason: str, score: float, threshold: float) -> Prepared:
    """The input gate's verdict on a scorable file: unchanged when accepted; routed to human review (model input
    dropped) with ``view_out_of_scope`` or ``out_of_distribution``; except that a valid frontal View Position
    (0018,5101) in the header wins over the gate's view judgement (the file is scored and its detail says so)."""
    if not reason:
        return prepared
    measured = f"the input gate's score is {score:.2f}, over the bundle's threshold {threshold:.2f}"
    view = prepared.meta.view_position.strip().upper() if prepared.meta else ""
    if reason == VIEW_OUT and view in FRONTAL_VIEWS:
        return replace(prepared, detail=f"{prepared.path}: View Position (0018,5101) is {view!r} and the header wins: "
                       f"scored, although {measured} and the image looks like a chest radiograph in another view")
    if reason == VIEW_OUT:
        detail = (f"{prepared.path}: view_out_of_scope: {measured}: the image looks like a chest radiograph but not a "
                  "frontal (PA/AP) one (a lateral or other view), and its header names no view, so its risk would mean "
                  "nothing. Fix: send the frontal image of the study; if this is a frontal chest, set View Position "
                  "(0018,5101) to PA or AP, and report the file to the model's maintainers")
    else:
        detail = (f"{prepared.path}: out_of_distribution: {measured}: the image is unlike the frontal chest radiographs "
                  "the model was trained on (not a human chest radiograph, or a device or population the training "
                  "data does not cover), so its risk would mean nothing. Fix: a person reads it; if it is a frontal "
                  "human chest radiograph, report it to the model's maintainers")
    return replace(prepared, model_input=None, reason=reason, detail=detail)


def _inference_failed(prepared: Prepared, problem: str) -> Prepared:
    """A scorable file the model could not score (ONNX Runtime failed on it, or a non-finite output): human review."""
    detail = (f"{prepared.path}: inference_failed: {problem}. Fix: a person reads it; report this file and the "
              "bundle to the model's maintainers")
    return replace(prepared, model_input=None, reason="inference_failed", detail=detail)


def finalize(drafts: Iterable[Decision], flags: Flags, risks: dict[str, float]) -> list[Decision]:
    """Stamp every draft with its study's risk and flag and the policy in force."""
    return [
        replace(d, study_risk=risks.get(d.study_uid), flagged=d.study_uid in flags.flagged,
                threshold=flags.threshold, flag_rate=flags.flag_rate, policy=flags.policy)
        for d in drafts
    ]


def scored_study_risks(decisions: Iterable[Decision]) -> dict[str, float]:
    """study_uid -> max image risk, over scored images only."""
    return study_risks((d.study_uid, d.risk) for d in decisions if d.status == SCORED and d.risk is not None)


def triage_files(paths: Sequence[str], model: Model, pseudonymize: Callable[[str], str],
                 flag_rate: float, run_id: str = "") -> list[Decision]:
    """Score ``paths`` and flag the riskiest ``flag_rate`` of their studies (batch mode)."""
    drafts = score_prepared(model, [prepare(p, model.bundle.preprocessing, model.bundle.reduced_decode) for p in paths], pseudonymize, run_id)
    risks = scored_study_risks(drafts)
    return finalize(drafts, flag_top_k(risks, flag_rate), risks)
