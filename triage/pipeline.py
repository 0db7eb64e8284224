"""The steps every program composes, each small and, where it can be, pure.

    file -> bytes -> sha256 -> already decided? -> Radiograph -> model input     (``prepare_file``)
         -> ONNX logits (+ gate features) -> calibrated risk -> input gate       (``score_batch`` -> ``Draft``s)
         -> the patient id pseudonymized, once, where the secret is               (``finalize`` -> ``Decision``s)
         -> study risk -> flag (a ``Policy``: batch top-k or stream threshold)    (``decide``)

``prepare_file`` reads a file once (``prepare_bytes`` decodes those bytes) and runs in worker processes (it is picklable);
``score_batch`` runs the model; ``finalize`` runs in the process that owns the site
secret; ``decide`` applies the policy to a set of decisions. A file that cannot be
scored is a ``Prepared`` without model input, built from the one error type
(``BadInputError``, a reason from ``triage.errors.REASONS``) by ``unscorable``.
``triage_files`` chains the steps for callers that score a handful of files in one go.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Collection, Container, Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from .audit import Decision, os_path
from .bundle import Bundle
from .decode import decode_size
from .errors import BadInputError
from .inference import InferenceError, Model, calibrated_risk
from .ingest import MAX_FILE_BYTES, check_within, open_bounded, read_bytes, read_radiograph_bytes
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


@dataclass(frozen=True)
class Known:
    """A file skipped because it was already decided: its (path, sha256) is in the caller's resume keys."""

    path: str
    sha256: str


def unscorable(path: str, reason: str, problem: str, fix: str, sha256: str = "", meta: ImageMeta | None = None,
               decode_ms: float = 0.0) -> Prepared:
    """The human-review ``Prepared`` of a file that cannot be scored: ``reason`` (a code of ``REASONS``, else
    ``KeyError``), what was found and the fix, in ``BadInputError``'s words (the one error type)."""
    return from_error(BadInputError(path, reason, problem, fix, meta), sha256, decode_ms)


def from_error(error: BadInputError, sha256: str = "", decode_ms: float = 0.0) -> Prepared:
    """The human-review ``Prepared`` of a ``BadInputError``: its reason, its message as the detail, its tags."""
    return Prepared(error.path, sha256, error.meta, reason=error.reason, detail=str(error), decode_ms=decode_ms)


def prepare_file(name: str, spec: PreprocessSpec, reduced_decode: Collection[str] = (),
                 known: Container[tuple[str, str]] = frozenset(), path: str | None = None) -> Prepared | Known:
    """Read the file once: bytes -> sha256 -> ``Known`` when (``name``, sha256) is in ``known`` (already decided),
    else ``prepare_bytes`` from the same bytes. ``name`` is the text the file is listed and recorded by
    (``triage.audit.path_text``); the file is ``path``, by default ``os_path(name)``, so a name that is not UTF-8
    works."""
    start = time.perf_counter()
    try:
        data = read_bytes(os_path(name) if path is None else path)
    except BadInputError as error:
        if (name, "") in known:
            return Known(name, "")
        return from_error(replace_path(error, name), decode_ms=(time.perf_counter() - start) * 1000)
    digest = hashlib.sha256(data).hexdigest()
    if (name, digest) in known:
        return Known(name, digest)
    return prepare_bytes(name, data, spec, reduced_decode, start, digest)


def replace_path(error: BadInputError, name: str) -> BadInputError:
    """``error`` naming the file by ``name`` (the recorded text of its path)."""
    if error.path == name:
        return error
    return BadInputError(name, error.reason, error.detail, error.fix, error.meta)


def prepare_bytes(name: str, data: bytes, spec: PreprocessSpec, reduced_decode: Collection[str] = (),
                  start: float | None = None, sha256: str | None = None) -> Prepared:
    """Check, decode and preprocess one file from its bytes; bad input becomes a human-review ``Prepared``.

    ``reduced_decode``: the codec families to decode at reduced resolution (a bundle's
    ``Bundle.reduced_decode``); other files are decoded at full size. ``start``: when reading began
    (``time.perf_counter``), so ``decode_ms`` includes it. ``sha256``: the hex digest of ``data`` when the caller
    has it (the bytes are hashed once per file, not once per use).
    """
    start = time.perf_counter() if start is None else start
    sha256 = sha256 or hashlib.sha256(data).hexdigest()
    try:
        radiograph = read_radiograph_bytes(name, data, sha256=sha256,
                                           reduce_to=decode_size(spec) if reduced_decode else None,
                                           reduce_codecs=reduced_decode)
        model_input = preprocess(radiograph, spec)
    except BadInputError as error:
        return from_error(error, sha256, (time.perf_counter() - start) * 1000)
    except Exception as error:  # noqa: BLE001 - one file must never stop a run: RecursionError, MemoryError, a bug
        first_line = f": {str(error).splitlines()[0][:200]}" if str(error) else ""
        return unscorable(name, "malformed_file", f"reading it raised {type(error).__name__}{first_line}",
                          "a person reads the study on the modality or PACS; ask the sender to re-export it "
                          "(a damaged or crafted file)", sha256,
                          decode_ms=(time.perf_counter() - start) * 1000)
    return Prepared(name, radiograph.sha256, radiograph.meta, model_input,
                    decode_ms=(time.perf_counter() - start) * 1000)


def prepare(path: str, spec: PreprocessSpec, reduced_decode: Collection[str] = ()) -> Prepared:
    """``prepare_file`` of the file at ``path`` (its name too) with nothing already decided: the one-call form."""
    prepared = prepare_file(str(path), spec, reduced_decode, path=str(path))
    assert isinstance(prepared, Prepared)  # nothing is known, so never Known
    return prepared


def sha256_or_empty(path: str, limit_bytes: int | None = None) -> str:
    """sha256 of a regular file of at most ``limit_bytes`` (default ``triage.ingest.MAX_FILE_BYTES``), streamed, or ""
    (the file is still recorded) when ``open_bounded`` refuses it or it grows past the limit while it is hashed."""
    digest, limit = hashlib.sha256(), MAX_FILE_BYTES if limit_bytes is None else limit_bytes
    try:
        with open_bounded(path, limit) as stream:
            while chunk := stream.read(min(HASH_CHUNK_BYTES, limit + 1 - stream.tell())):  # never past limit + 1
                digest.update(chunk)
                check_within(path, stream.tell(), limit)
    except (BadInputError, OSError):
        return ""
    return digest.hexdigest()


@dataclass(frozen=True)
class Draft:
    """An image-level decision before pseudonymization and the policy, with the raw Patient ID (0010,0020) that
    ``finalize`` turns into the pseudonym (None when no header could be read). Never stored as it is."""

    decision: Decision
    patient_id: str | None


def draft(prepared: Prepared, bundle: Bundle, risk: float | None = None, infer_ms: float | None = None,
          provider: str = "", run_id: str = "") -> Draft:
    """An image-level ``Draft`` (not flagged, no study risk, no pseudonym yet)."""
    meta = prepared.meta
    tags = {} if meta is None else {
        "study_uid": meta.study_uid, "series_uid": meta.series_uid, "sop_uid": meta.sop_uid,
        "patient_sex": meta.patient_sex, "patient_age": meta.patient_age, "modality": meta.modality,
        "body_part": meta.body_part, "view_position": meta.view_position, "manufacturer": meta.manufacturer,
    }
    decision = Decision(
        path=prepared.path, sha256=prepared.sha256,
        status=SCORED if risk is not None else HUMAN_REVIEW,
        reason=prepared.reason, detail=prepared.detail, **tags,
        bundle_name=bundle.name, bundle_version=bundle.version, bundle_sha256=bundle.sha256,
        finding=bundle.triage_finding, risk=risk, decode_ms=round(prepared.decode_ms, 3),
        infer_ms=None if infer_ms is None else round(infer_ms, 3), provider=provider, run_id=run_id,
    )
    return Draft(decision, None if meta is None else meta.patient_id)


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


def score_batch(prepared: Sequence[Prepared], model: Model, run_id: str = "") -> list[Draft]:
    """Run the model once over the scorable files of ``prepared``; a ``Draft`` for each of them, in order. A batch
    that ONNX Runtime fails on is retried image by image; the images that still fail get ``inference_failed``."""
    scorable = [p for p in prepared if p.model_input is not None]
    infer_ms = 0.0
    results: list[Result | InferenceError] = []
    if scorable:
        start = time.perf_counter()
        results = forward_each(model, [p.model_input for p in scorable])
        infer_ms = (time.perf_counter() - start) * 1000 / len(scorable)
    result_of = {id(p): r for p, r in zip(scorable, results)}
    threshold = model.ood.threshold if model.ood is not None else math.inf

    def outcome(p: Prepared) -> Draft:
        if id(p) not in result_of:  # not scorable: the reason is already set
            return draft(p, model.bundle, provider=model.provider, run_id=run_id)
        result = result_of[id(p)]
        if isinstance(result, InferenceError):
            return draft(_inference_failed(p, str(result)), model.bundle, provider=model.provider, run_id=run_id)
        risk, reason, score = result
        if not math.isfinite(risk):
            return draft(_inference_failed(p, "the model returned a non-finite risk"), model.bundle,
                         provider=model.provider, run_id=run_id)
        gated = gate_outcome(p, reason, score, threshold)
        if gated.model_input is None:
            return draft(gated, model.bundle, infer_ms=infer_ms, provider=model.provider, run_id=run_id)
        return draft(gated, model.bundle, risk, infer_ms, model.provider, run_id)

    return [outcome(p) for p in prepared]


def finalize(drafts: Iterable[Draft], pseudonymize: Callable[[str], str]) -> list[Decision]:
    """The drafts' decisions with each Patient ID (0010,0020) replaced by its keyed pseudonym: the one place it is
    done, in the process that holds the site secret (``triage.pseudonym``)."""
    return [d.decision if d.patient_id is None else replace(d.decision, patient_pseudo_id=pseudonymize(d.patient_id))
            for d in drafts]


def score_prepared(model: Model, batch: Sequence[Prepared], pseudonymize: Callable[[str], str],
                   run_id: str = "") -> list[Decision]:
    """``score_batch`` then ``finalize``: decisions before the policy, for callers that hold the secret."""
    return finalize(score_batch(batch, model, run_id), pseudonymize)


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
        return routed(prepared, reason, f"{measured}: the image looks like a chest radiograph but not a frontal "
                      "(PA/AP) one (a lateral or other view), and its header names no view, so its risk would mean "
                      "nothing", "send the frontal image of the study; if this is a frontal chest, set View Position "
                      "(0018,5101) to PA or AP, and report the file to the model's maintainers")
    return routed(prepared, reason, f"{measured}: the image is unlike the frontal chest radiographs the model was "
                  "trained on (not a human chest radiograph, or a device or population the training data does not "
                  "cover), so its risk would mean nothing", "a person reads it; if it is a frontal human chest "
                  "radiograph, report it to the model's maintainers")


def _inference_failed(prepared: Prepared, problem: str) -> Prepared:
    """A scorable file the model could not score (ONNX Runtime failed on it, or a non-finite output): human review."""
    return routed(prepared, "inference_failed", problem,
                  "a person reads it; report this file and the bundle to the model's maintainers")


def routed(prepared: Prepared, reason: str, problem: str, fix: str) -> Prepared:
    """A prepared file sent to human review after all (its model input dropped), in ``unscorable``'s words; it
    keeps its sha256, tags and decode time."""
    record = unscorable(prepared.path, reason, problem, fix)
    return replace(prepared, model_input=None, reason=record.reason, detail=record.detail)


Policy = Callable[[dict[str, float]], Flags]
"""Study risks (study_uid -> risk) -> which studies are flagged: ``batch_top_k`` or a stream threshold."""


def batch_top_k(flag_rate: float, min_risk: float = 0.0) -> Policy:
    """The batch policy: the riskiest ``flag_rate`` of the studies, each at least ``min_risk``
    (``triage.policy.flag_top_k``)."""
    return lambda risks: flag_top_k(risks, flag_rate, min_risk)


def decide(decisions: Sequence[Decision], policy: Policy) -> list[Decision]:
    """Apply ``policy`` to the studies of ``decisions`` (study risk = max scored image risk): each decision stamped
    with its study's risk and flag, the threshold and the policy in force."""
    risks = scored_study_risks(decisions)
    return stamp(decisions, policy(risks), risks)


def stamp(drafts: Iterable[Decision], flags: Flags, risks: dict[str, float]) -> list[Decision]:
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
    """Score ``paths`` and flag the riskiest ``flag_rate`` of their studies (batch mode): the steps in a row."""
    prepared = [prepare(p, model.bundle.preprocessing, model.bundle.reduced_decode) for p in paths]
    return decide(finalize(score_batch(prepared, model, run_id), pseudonymize), batch_top_k(flag_rate))
