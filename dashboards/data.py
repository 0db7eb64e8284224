"""Read-only views of the audit store and the bundle as pandas frames, and the figures the pages plot.

Everything here is plain Python (no Streamlit), so it is tested without a browser and the
pages only draw. Frames hold one row per decision (``decisions``) or per review (``reviews``).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from triage import ingest
from triage.audit import REVIEW_COLUMNS, VerifyResult, is_url, open_store, os_path
from triage.errors import TriageError
from triage.present import csv_cell, format_risk
from triage.pseudonym import default_secret_path, load_or_create_secret, pseudonymize
from triage.radiograph import Radiograph

PSI_ALERT = 0.2        # population stability index above this: the risk distribution has drifted
PSI_MIN_N = 100        # fewer scored studies than this: PSI is too noisy to raise an alert
PSI_EPS = 1e-4         # floor for empty bins, so log(0) never happens
# What the pseudonymized export may contain: no paths, UIDs or free-text details.
EXPORT_COLUMNS = ("id", "created_at", "patient_pseudo_id", "study_pseudo_id", "status", "reason", "patient_sex",
                  "patient_age", "modality", "view_position", "manufacturer", "bundle_name", "bundle_version",
                  "finding", "risk", "study_risk", "threshold", "flag_rate", "policy", "flagged", "run_id")
SUBGROUPS = ("patient_sex", "age_band", "view_position", "manufacturer")


def data_version(audit_db: str | Path) -> tuple[float, ...]:
    """A cache key that changes whenever a record lands: the chain heads of a PostgreSQL store, else the
    modification times of the SQLite file and its WAL."""
    if is_url(audit_db):
        with open_store(audit_db, create=False) as store:
            return tuple(float(head["last_id"]) for head in store.chain_heads().values())
    path = Path(audit_db)
    return tuple(p.stat().st_mtime_ns if p.exists() else 0 for p in (path, Path(f"{path}-wal")))


def read_decisions(audit_db: str | Path) -> pd.DataFrame:
    """Every decision, one row each, with ``created_at`` as UTC timestamps, ``day`` as dates, and ``current``: True
    for each file's current decision (the store's rule, ``AuditStore.current_decisions``)."""
    with open_store(audit_db, create=False) as store, store.transaction("cannot read", write=False):
        frame = pd.DataFrame(store.decisions())
        current = [row["id"] for row in store.current_decisions()]
    if frame.empty:
        return frame
    frame["current"] = frame["id"].isin(current)
    frame["created_at"] = pd.to_datetime(frame["created_at"], utc=True, format="ISO8601")
    frame["day"] = frame["created_at"].dt.date
    frame["age_band"] = frame["patient_age"].map(age_band)
    return frame


def read_reviews(audit_db: str | Path) -> pd.DataFrame:
    """Every review, oldest first, with ``created_at`` as UTC timestamps."""
    with open_store(audit_db, create=False) as store:
        frame = pd.DataFrame(store.reviews(), columns=list(REVIEW_COLUMNS))
    frame["created_at"] = pd.to_datetime(frame["created_at"], utc=True, format="ISO8601")
    return frame


def verify_store(audit_db: str | Path) -> VerifyResult:
    """The audit chains' verification result."""
    with open_store(audit_db, create=False) as store:
        return store.verify()


def age_band(dicom_age: str) -> str:
    """Patient's Age (0010,1010), e.g. '045Y' or '006M', as a band: '<18', '18-39', '40-64', '65+' or 'unknown'."""
    match = re.fullmatch(r"\s*(\d{1,3})\s*([DWMY]?)\s*", dicom_age or "")
    if not match:
        return "unknown"
    years = int(match.group(1)) / {"D": 365.25, "W": 52.18, "M": 12.0}.get(match.group(2), 1.0)
    return "<18" if years < 18 else "18-39" if years < 40 else "40-64" if years < 65 else "65+"


# -- the worklist ---------------------------------------------------------------------------

@dataclass(frozen=True)
class WorklistFilter:
    """The user's filters: inclusive date range (None = open), status, review state."""

    start: date | None = None
    end: date | None = None
    status: str = "all"          # "all" | "scored" | "human_review"
    reviewed: str = "all"        # "all" | "reviewed" | "unreviewed"
    flagged_only: bool = False


def current_decisions(decisions: pd.DataFrame) -> pd.DataFrame:
    """Each file's current decision (the ``current`` column that ``read_decisions`` takes from the store)."""
    return decisions if decisions.empty else decisions[decisions["current"]]


def latest_verdicts(reviews: pd.DataFrame) -> pd.DataFrame:
    """Per decision: the latest verdict, its reviewer and time, and how many reviews it has."""
    if reviews.empty:
        return pd.DataFrame(columns=["decision_id", "verdict", "reviewer", "reviewed_at", "n_reviews"])
    ordered = reviews.sort_values("id")
    last = ordered.groupby("decision_id").tail(1).set_index("decision_id")
    out = pd.DataFrame({"verdict": last["verdict"], "reviewer": last["reviewer"], "reviewed_at": last["created_at"],
                        "n_reviews": ordered.groupby("decision_id").size()})
    return out.rename_axis("decision_id").reset_index()


def worklist(decisions: pd.DataFrame, reviews: pd.DataFrame, chosen: WorklistFilter = WorklistFilter()) -> pd.DataFrame:
    """Current decisions, filtered; flagged first, then by study risk (highest first), then by id.

    Studies without a risk (human review) come after every scored study of the same flag.
    """
    frame = current_decisions(decisions)
    if frame.empty:
        return frame
    frame = frame.merge(latest_verdicts(reviews), left_on="id", right_on="decision_id", how="left")
    frame["n_reviews"] = frame["n_reviews"].fillna(0).astype(int)
    keep = pd.Series(True, index=frame.index)
    if chosen.start is not None:
        keep &= frame["day"] >= chosen.start
    if chosen.end is not None:
        keep &= frame["day"] <= chosen.end
    if chosen.status != "all":
        keep &= frame["status"] == chosen.status
    if chosen.reviewed != "all":
        keep &= (frame["n_reviews"] > 0) == (chosen.reviewed == "reviewed")
    if chosen.flagged_only:
        keep &= frame["flagged"]
    frame = frame[keep]
    order = frame.assign(_risk=frame["study_risk"].fillna(-1.0))
    order = order.sort_values(["flagged", "_risk", "id"], ascending=[False, False, True], kind="stable")
    return order.drop(columns="_risk").reset_index(drop=True)


# -- audit figures --------------------------------------------------------------------------

def flag_rate_by_day(decisions: pd.DataFrame, target: float) -> pd.DataFrame:
    """Per day: scored decisions, flagged ones, realized flag rate, and the target rate."""
    scored = decisions[decisions["status"] == "scored"]
    if scored.empty:
        return pd.DataFrame(columns=["day", "n_scored", "n_flagged", "flag_rate", "target"])
    by_day = scored.groupby("day").agg(n_scored=("id", "size"), n_flagged=("flagged", "sum")).reset_index()
    by_day["flag_rate"] = by_day["n_flagged"] / by_day["n_scored"]
    by_day["target"] = target
    return by_day


def risk_histogram(risks: pd.Series | np.ndarray, bin_edges: list[float]) -> np.ndarray:
    """Counts of ``risks`` (NaN dropped) in the bins of ``bin_edges``; the last bin includes 1.0."""
    values = np.asarray(pd.Series(risks).dropna(), dtype=float)
    return np.histogram(np.clip(values, bin_edges[0], bin_edges[-1]), bins=bin_edges)[0]


def psi(reference_counts: np.ndarray | list[int], counts: np.ndarray | list[int]) -> float:
    """Population stability index sum((p - q) * ln(p / q)) of two histograms on the same bins; nan if either is empty."""
    ref, cur = np.asarray(reference_counts, dtype=float), np.asarray(counts, dtype=float)
    if ref.sum() == 0 or cur.sum() == 0:
        return math.nan
    q = np.maximum(ref / ref.sum(), PSI_EPS)
    p = np.maximum(cur / cur.sum(), PSI_EPS)
    return float(np.sum((p - q) * np.log(p / q)))


def reference_histogram(manifest: dict[str, Any]) -> tuple[list[float], list[int]] | None:
    """(bin edges, counts) of the bundle's validation risk histogram, or None when the bundle has none."""
    hist = manifest.get("metrics", {}).get("validation", {}).get("risk_histogram")
    if not hist or "bin_edges" not in hist or "counts" not in hist:
        return None
    return list(hist["bin_edges"]), list(hist["counts"])


def reference_histograms(manifest: dict[str, Any]) -> dict[str, tuple[list[float], list[int]]]:
    """Every reference the bundle carries: "all validation images" and, for a bundle trained on several sources,
    one per source (``metrics.validation_by_source``): {label: (bin edges, counts)}; empty when it has none."""
    out = {}
    overall = reference_histogram(manifest)
    if overall is not None:
        out["all validation images"] = overall
    for name, figures in manifest.get("metrics", {}).get("validation_by_source", {}).items():
        hist = figures.get("risk_histogram") or {}
        if "bin_edges" in hist and "counts" in hist:
            out[f"source {name}"] = (list(hist["bin_edges"]), list(hist["counts"]))
    return out


def psi_by_reference(risks: pd.Series | np.ndarray, references: dict[str, tuple[list[float], list[int]]]) -> pd.DataFrame:
    """PSI of ``risks`` against each reference, closest first: which training population this site resembles."""
    rows = [{"reference": label, "psi": psi(counts, risk_histogram(risks, edges))}
            for label, (edges, counts) in references.items()]
    return pd.DataFrame(rows, columns=["reference", "psi"]).sort_values("psi").reset_index(drop=True)


def drift_by_day(decisions: pd.DataFrame, bin_edges: list[float], reference_counts: list[int]) -> pd.DataFrame:
    """Per day: number of scored risks and the PSI of that day's risk histogram against the reference."""
    scored = decisions[decisions["status"] == "scored"]
    rows = [{"day": day, "n_scored": len(group), "psi": psi(reference_counts, risk_histogram(group["risk"], bin_edges))}
            for day, group in scored.groupby("day")]
    return pd.DataFrame(rows, columns=["day", "n_scored", "psi"])


def review_rates_by_reason(decisions: pd.DataFrame) -> pd.DataFrame:
    """Per human-review reason: count and share of all decisions."""
    routed = decisions[decisions["status"] == "human_review"]
    counts = routed.groupby("reason").size().rename("n").reset_index().sort_values("n", ascending=False)
    counts["share"] = counts["n"] / max(len(decisions), 1)
    return counts.reset_index(drop=True)


def refusal_rate_by_day(decisions: pd.DataFrame) -> pd.DataFrame:
    """Per day and human-review reason: the routed decisions and their share of that day's decisions (rows only
    where a reason occurred). A rise of ``view_out_of_scope`` or ``out_of_distribution`` is a drift signal: a new
    device, protocol or population the input gate does not recognise."""
    columns = ["day", "reason", "n", "n_day", "rate"]
    if decisions.empty:
        return pd.DataFrame(columns=columns)
    per_day = decisions.groupby("day").size().rename("n_day")
    routed = decisions[decisions["status"] == "human_review"]
    counts = routed.groupby(["day", "reason"]).size().rename("n").reset_index()
    counts = counts.join(per_day, on="day")
    counts["rate"] = counts["n"] / counts["n_day"]
    return counts[columns].sort_values(["day", "reason"]).reset_index(drop=True)


def agreement(decisions: pd.DataFrame, reviews: pd.DataFrame) -> dict[str, float | int]:
    """Clinician agreement from each decision's latest verdict; PPV among flagged = agree / (agree + disagree)."""
    verdicts = latest_verdicts(reviews).merge(decisions[["id", "flagged"]], left_on="decision_id", right_on="id")
    assessed = verdicts[verdicts["verdict"] != "not_assessable"]
    flagged = assessed[assessed["flagged"]]
    return {
        "n_reviewed": len(verdicts),
        "n_assessed": len(assessed),
        "agreement": float((assessed["verdict"] == "agree").mean()) if len(assessed) else math.nan,
        "n_flagged_assessed": len(flagged),
        "ppv_flagged": float((flagged["verdict"] == "agree").mean()) if len(flagged) else math.nan,
    }


def clinician_labels(decisions: pd.DataFrame, reviews: pd.DataFrame) -> pd.DataFrame:
    """Scored decisions with a settling verdict: ``label`` 1/0 (agree keeps the model's flag, disagree reverses it)."""
    verdicts = latest_verdicts(reviews)
    joined = decisions[decisions["status"] == "scored"].merge(verdicts, left_on="id", right_on="decision_id")
    joined = joined[joined["verdict"].isin(["agree", "disagree"])]
    return joined.assign(label=np.where(joined["verdict"] == "agree", joined["flagged"], ~joined["flagged"]).astype(int))


def reliability(decisions: pd.DataFrame, reviews: pd.DataFrame, n_bins: int = 10) -> pd.DataFrame:
    """Per risk bin of equal width: mean risk, clinician-label positive rate, and n (bins without reviews left out)."""
    labelled = clinician_labels(decisions, reviews)
    if labelled.empty:
        return pd.DataFrame(columns=["bin", "mean_risk", "observed_rate", "n"])
    bins = np.minimum((labelled["risk"] * n_bins).astype(int), n_bins - 1)
    table = labelled.groupby(bins).agg(mean_risk=("risk", "mean"), observed_rate=("label", "mean"), n=("id", "size"))
    return table.rename_axis("bin").reset_index()


def subgroup_table(decisions: pd.DataFrame) -> pd.DataFrame:
    """Per subgroup value (sex, age band, view, manufacturer): counts, human-review share, flag rate, mean risk."""
    frames = []
    for column in SUBGROUPS:
        values = decisions[column].replace("", "unknown")
        grouped = decisions.assign(value=values, scored=decisions["status"] == "scored").groupby("value")
        table = grouped.agg(n=("id", "size"), n_scored=("scored", "sum"), n_flagged=("flagged", "sum"),
                            mean_risk=("risk", "mean")).reset_index()
        table.insert(0, "subgroup", column)
        frames.append(table)
    table = pd.concat(frames, ignore_index=True)
    table["human_review_share"] = 1 - table["n_scored"] / table["n"]
    table["flag_rate"] = table["n_flagged"] / table["n_scored"].where(table["n_scored"] > 0)
    return table


def bundle_history(decisions: pd.DataFrame) -> pd.DataFrame:
    """Each bundle that made decisions: name, version, sha256 prefix, first and last use, decisions made."""
    used = decisions[decisions["bundle_sha256"] != ""]
    table = used.groupby(["bundle_name", "bundle_version", "bundle_sha256"]).agg(
        first_used=("created_at", "min"), last_used=("created_at", "max"), n_decisions=("id", "size")).reset_index()
    table["bundle_sha256"] = table["bundle_sha256"].str[:12]
    return table.sort_values("first_used").reset_index(drop=True)


def waiting_times(decisions: pd.DataFrame, reviews: pd.DataFrame) -> pd.DataFrame:
    """Median and count of minutes from decision to first review, for flagged and unflagged studies."""
    if reviews.empty:
        return pd.DataFrame(columns=["flagged", "n_reviewed", "median_wait_min"])
    first = reviews.groupby("decision_id")["created_at"].min().rename("first_review")
    joined = decisions.join(first, on="id", how="inner")
    joined["wait_min"] = (joined["first_review"] - joined["created_at"]).dt.total_seconds() / 60
    return joined.groupby("flagged").agg(n_reviewed=("id", "size"), median_wait_min=("wait_min", "median")).reset_index()


def pseudonymized_export(decisions: pd.DataFrame, secret: bytes) -> pd.DataFrame:
    """Decisions with identifiers replaced: no path, UIDs or detail; the study as a keyed pseudonym."""
    out = decisions.assign(study_pseudo_id=decisions["study_uid"].map(lambda uid: pseudonymize(uid, secret)))
    out = out[list(EXPORT_COLUMNS)].copy()
    out["created_at"] = out["created_at"].map(lambda t: t.isoformat())
    out["flagged"] = out["flagged"].astype(int)
    return out


def site_secret(audit_db: str | Path) -> bytes:
    """The site's pseudonym secret (created beside the store on first use, as the scorer does)."""
    return load_or_create_secret(default_secret_path(audit_db))


def csv_bytes(frame: pd.DataFrame) -> bytes:
    """``frame`` as a CSV download, every cell through ``triage.present.csv_cell`` (tags and paths come from files,
    so a value like ``=HYPERLINK(...)`` must reach a spreadsheet as text, not as a formula)."""
    return frame.map(csv_cell).to_csv(index=False).encode()


def risks_as_text(frame: pd.DataFrame, columns: tuple[str, ...] = ("risk", "study_risk")) -> pd.DataFrame:
    """``frame`` for display, its risk ``columns`` (those present) as ``triage.present.format_risk`` text."""
    return frame.assign(**{c: frame[c].map(format_risk) for c in columns if c in frame.columns})


# -- active learning ------------------------------------------------------------------------

def active_learning_queue(decisions: pd.DataFrame, reviews: pd.DataFrame, finding: str, size: int = 200) -> pd.DataFrame:
    """Studies worth labelling, as rows of the site format (``training.datasets.read_site``), plus why and the risk.

    First every scored decision whose latest verdict disagreed with the model, then the
    unreviewed ones the model is least sure of (risk nearest 0.5). The label column
    (named after ``finding``) is 1/0 where a clinician's verdict settles it (agree keeps the
    model's flag, disagree reverses it) and empty where it still needs a label. ``md5``
    holds the file's sha256: training only compares it for equality to keep duplicates together.
    """
    frame = current_decisions(decisions)
    frame = frame[frame["status"] == "scored"].merge(latest_verdicts(reviews), left_on="id", right_on="decision_id",
                                                     how="left")
    disagreed = frame[frame["verdict"] == "disagree"].assign(why="clinician disagreed")
    unsure = frame[frame["verdict"].isna()].assign(why="model unsure", _margin=lambda f: (f["risk"] - 0.5).abs())
    unsure = unsure.sort_values(["_margin", "id"]).drop(columns="_margin")
    queue = pd.concat([disagreed, unsure]).head(size)
    label = np.where(queue["verdict"] == "disagree", (~queue["flagged"]).astype(int).astype(str), "")
    return pd.DataFrame({"path": queue["path"], finding: label, "patient_id": queue["patient_pseudo_id"],
                         "md5": queue["sha256"], "why": queue["why"], "risk": queue["risk"],
                         "decision_id": queue["id"]}).reset_index(drop=True)


def labelled_only(queue: pd.DataFrame, finding: str) -> pd.DataFrame:
    """The rows of an active-learning queue whose label is settled: a site-format ``labels.csv`` as is (absolute
    paths; ``train``, ``evaluate``, ``calibrate`` and ``finetune`` read it with ``--dataset csv`` or saved as a
    folder's ``labels.csv``)."""
    return queue[queue[finding] != ""].reset_index(drop=True)


# -- what a person sees of a study: the audited file's own image, and no server path -----------

class FileChangedError(TriageError, ValueError):
    """The study file's bytes are not the ones its decision was made on (sha256 differs), so its image is not shown."""


def read_study(path: str, sha256: str) -> Radiograph:
    """The image decision ``sha256`` was made on, for a person to look at.

    The bytes are hashed before any decoding: ``FileChangedError`` when they are not the
    recorded ones (the file was replaced, e.g. its SOP Instance UID (0008,0018) sent again
    with other pixels). Then those same bytes are read by ``triage.ingest.read_radiograph_bytes``
    with its size limits and pixel checks, but with ``scope=False`` and no minimum size (no
    Modality (0008,0060), Body Part Examined (0018,0015), View Position (0018,5101) or UID check):
    a study the model refused is still one a clinician must be able to view.
    Raises ``BadInputError`` for a file no one can view (damaged, colour, multi-frame, too large).
    ``path`` is the decision's stored text (``triage.audit.path_text``): the file is opened by ``os_path``, so a name
    that is not UTF-8 is found, and every message names it by that text.
    """
    data = ingest.read_bytes(os_path(path))
    found = hashlib.sha256(data).hexdigest()
    if found != sha256:
        recorded = f"the recorded {sha256[:12]}…" if sha256 else "none recorded (unreadable when scored)"
        raise FileChangedError(f"{path}: the file's sha256 is {found[:12]}…, not {recorded}: it was replaced after "
                               "the decision was made, so its image is not the one decided on and is not shown")
    return ingest.read_radiograph_bytes(path, data, min_side_px=1, scope=False)


def shown_text(text: str, path: str) -> str:
    """``text`` (a decision's detail, an error message) with the study's server path replaced by its file name."""
    return text.replace(path, Path(path).name) if path else text


# -- heatmaps (class activation maps from the bundle's ONNX graph; drawn by triage.heatmap.overlay) -----

def study_cam(model: Any, radiograph: Radiograph) -> np.ndarray:
    """The triage finding's class activation map (h, w) float32 in logit units for one image, from ONNX Runtime.

    ``model`` is a ``triage.inference.Model`` whose bundle has a CAM output; preprocessing
    is triage's, exactly as when the study was scored.
    """
    from triage.preprocess import preprocess

    bundle = model.bundle
    if bundle.cam_output is None:
        raise ValueError(f"{bundle.path}: the bundle has no CAM output. Fix: re-export it with 'cxr-triage export'")
    x = preprocess(radiograph, bundle.preprocessing)[None]
    return model.run(x, features=False).cams[0, bundle.findings.index(bundle.triage_finding)]
