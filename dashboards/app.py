"""The review and audit dashboard: ``streamlit run dashboards/app.py`` (or ``cxr-triage dashboard``).

Pages: Worklist, Study, Audit, Active learning. Nothing is shown before a login. Values
from a study (tags, paths, details) are drawn as plain text (dataframes, ``st.text``,
``st.code``), never as Markdown: a DICOM tag is text anyone can write. Settings
come from the environment (the ``cxr-triage dashboard`` command sets them):
``CXR_DASHBOARD_AUDIT_DB``, ``CXR_DASHBOARD_BUNDLE``, ``CXR_DASHBOARD_CONFIG``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from dashboards import auth, data
from triage.audit import default_audit_db, is_url, open_store
from triage.bundle import default_bundle_dir, load_bundle
from triage.errors import TriageError
from triage.heatmap import overlay
from triage.inference import Model, load_model
from triage.preprocess import PreprocessSpec, unit_image
from triage.present import format_risk

PAGES = ("Worklist", "Study", "Audit", "Active learning")
VERDICT_LABELS = {"agree": "Agree", "disagree": "Disagree", "not_assessable": "Not assessable"}
DISPLAY_MAX_SIDE_PX = 1024


@dataclass(frozen=True)
class Settings:
    audit_db: Path | str  # a SQLite file, or a postgresql:// URL
    bundle_dir: Path
    config: Path


def settings_from_env() -> Settings:
    """Paths from the environment, with the CLI's defaults."""
    target = os.environ.get("CXR_DASHBOARD_AUDIT_DB") or default_audit_db()
    audit_db = str(target) if is_url(target) else Path(target)
    bundle_dir = Path(os.environ.get("CXR_DASHBOARD_BUNDLE") or default_bundle_dir())
    return Settings(audit_db, bundle_dir, auth.default_config_path(audit_db))


# -- cached loaders (keyed by the store's data version, so a new record invalidates them) ---

@st.cache_data(show_spinner=False, max_entries=4)
def load_decisions(audit_db: str, version: tuple[float, ...]) -> pd.DataFrame:
    return data.read_decisions(audit_db)


@st.cache_data(show_spinner=False, max_entries=4)
def load_reviews(audit_db: str, version: tuple[float, ...]) -> pd.DataFrame:
    return data.read_reviews(audit_db)


@st.cache_data(show_spinner=False, max_entries=4)
def load_worklist(audit_db: str, version: tuple[float, ...], chosen: data.WorklistFilter) -> pd.DataFrame:
    return data.worklist(load_decisions(audit_db, version), load_reviews(audit_db, version), chosen)


@st.cache_data(show_spinner=False, max_entries=2)
def load_verification(audit_db: str, version: tuple[float, ...]) -> tuple[bool, str]:
    result = data.verify_store(audit_db)
    return result.ok, result.message


@st.cache_resource(show_spinner=False)
def load_manifest(bundle_dir: str) -> tuple[dict[str, Any] | None, str]:
    """(manifest, "") of the verified bundle, or (None, why it could not be loaded)."""
    try:
        return load_bundle(bundle_dir).manifest, ""
    except TriageError as error:
        return None, str(error)


@st.cache_resource(show_spinner=False, max_entries=2)
def load_cam_model(bundle_dir: str, model_sha256: str) -> Model:
    """The bundle's ONNX model on CPU, for heatmaps (keyed by the model file's sha256, so a new bundle reloads)."""
    return load_model(load_bundle(bundle_dir), device="cpu")


@st.cache_data(show_spinner=False, max_entries=32)
def load_cam(path: str, sha256: str, bundle_dir: str, model_sha256: str) -> np.ndarray:
    """The triage finding's class activation map (h, w) of the decided file, recomputed with the bundle (no torch)."""
    return data.study_cam(load_cam_model(bundle_dir, model_sha256), data.read_study(path, sha256))


@st.cache_data(show_spinner=False, max_entries=32)
def load_display_image(path: str, sha256: str, spec: dict[str, Any]) -> np.ndarray:
    """The decided file's image in [0, 1] (bundle VOI, bone bright), at most DISPLAY_MAX_SIDE_PX a side; loaded
    lazily. ``data.FileChangedError`` when the file is no longer the one decided on (its sha256 differs)."""
    unit = unit_image(data.read_study(path, sha256), PreprocessSpec.from_dict(spec))
    step = max(1, math.ceil(max(unit.shape) / DISPLAY_MAX_SIDE_PX))
    return unit[::step, ::step]


def windowed(unit: np.ndarray, level: float, width: float) -> np.ndarray:
    """uint8 display of a [0, 1] image through a linear window centred on ``level``."""
    low = level - width / 2
    return (np.clip((unit - low) / width, 0.0, 1.0) * 255).astype(np.uint8)


# -- login ----------------------------------------------------------------------------------

LOCAL_CLIENT = "localhost"  # st.context.ip_address is None for a browser on this machine (or a local proxy)


@st.cache_resource(show_spinner=False)
def login_guard() -> auth.LoginGuard:
    """The login rate limits, shared by every session of this server process."""
    return auth.LoginGuard()


def oidc_configured() -> bool:
    """True when .streamlit/secrets.toml has an [auth] section for st.login."""
    try:
        return "auth" in st.secrets
    except FileNotFoundError:
        return False


def login_view(settings: Settings) -> str | None:
    """The logged-in user's name, or draw the login form and return None."""
    if st.session_state.get("user"):
        return st.session_state["user"]
    if oidc_configured() and st.user.is_logged_in:
        return str(st.user.get("email") or st.user.get("name"))
    st.title("cxr-triage review")
    try:
        users = auth.load_users(settings.config)
    except auth.AuthConfigError as error:
        st.error(str(error))
        return None
    if oidc_configured():
        st.button("Log in with single sign-on", on_click=st.login)
    if not users:
        st.error(f"No dashboard users are configured in {settings.config}. "
                 "Fix: python -m dashboards.users --config <that file> add NAME")
        return None
    with st.form("login"):
        name = st.text_input("User name")
        password = st.text_input("Password", type="password")
        submitted = st.form_submit_button("Log in")
    if submitted:
        outcome = login_guard().attempt(users, name, password, st.context.ip_address or LOCAL_CLIENT)
        if outcome.ok:
            st.session_state["user"] = name.strip()
            st.rerun()
        if outcome.wait_s:
            st.error(f"Too many failed logins for this user name or from this address: try again in "
                     f"{math.ceil(outcome.wait_s)} s.")
        else:
            st.error("Unknown user name or wrong password.")
    return None


# -- sidebar --------------------------------------------------------------------------------

def sidebar_view(user: str, decisions: pd.DataFrame) -> tuple[str, data.WorklistFilter]:
    """The chosen page and worklist filters."""
    with st.sidebar:
        st.markdown(f"Logged in as **{user}**")
        if st.button("Log out"):
            st.session_state.clear()
            st.rerun()
        page = st.radio("Page", PAGES, key="page")
        st.divider()
        st.caption("Worklist filters")
        days = sorted(decisions["day"].unique()) if not decisions.empty else []
        start = end = None
        if days:
            chosen = st.date_input("Date range", value=(days[0], days[-1]), key="dates")
            if isinstance(chosen, (tuple, list)) and len(chosen) == 2:
                start, end = chosen
        status = st.selectbox("Status", ("all", "scored", "human_review"), key="status")
        reviewed = st.selectbox("Review", ("all", "unreviewed", "reviewed"), key="reviewed")
        flagged_only = st.checkbox("Flagged only", key="flagged_only")
    return page, data.WorklistFilter(start, end, status, reviewed, flagged_only)


# -- pages ----------------------------------------------------------------------------------

WORKLIST_COLUMNS = ["flagged", "study_risk", "risk", "status", "reason", "verdict", "n_reviews", "view_position",
                    "patient_sex", "patient_age", "created_at", "patient_pseudo_id", "id"]


def open_study(decision_id: int) -> None:
    st.session_state["decision_id"] = decision_id
    st.session_state["page"] = "Study"


def worklist_view(work: pd.DataFrame) -> None:
    """The filtered worklist; choosing a row opens it on the Study page."""
    st.header("Worklist")
    n_flagged = int(work["flagged"].sum()) if not work.empty else 0
    st.caption(f"{len(work)} studies, {n_flagged} flagged. Flagged first, then by study risk. Select a row to open it.")
    if work.empty:
        st.info("No decisions match the filters.")
        return
    shown = data.risks_as_text(work[WORKLIST_COLUMNS])

    def on_select() -> None:
        rows = st.session_state["worklist_table"]["selection"]["rows"]
        if rows:
            open_study(int(shown.iloc[rows[0]]["id"]))

    st.dataframe(shown, hide_index=True, on_select=on_select, selection_mode="single-row", key="worklist_table")
    first_flagged = work[work["flagged"]]
    if not first_flagged.empty:
        st.button("Open the first flagged study", on_click=open_study, args=(int(first_flagged.iloc[0]["id"]),))


def study_view(settings: Settings, user: str, work: pd.DataFrame, manifest: dict[str, Any] | None) -> None:
    """One study: image with window/level, model output, reviews, and the reviewer's actions."""
    st.header("Study")
    if work.empty:
        st.info("No decisions match the filters.")
        return
    ids = work["id"].tolist()
    current = st.session_state.get("decision_id")
    position = ids.index(current) if current in ids else 0
    row = work.iloc[position]
    st.session_state["decision_id"] = int(row["id"])
    nav = st.columns([1, 1, 6])
    nav[0].button("Previous", key="previous", disabled=position == 0, shortcut="p", on_click=open_study,
                  args=(int(ids[max(position - 1, 0)]),))
    nav[1].button("Next", key="next", disabled=position == len(ids) - 1, shortcut="n", on_click=open_study,
                  args=(int(ids[min(position + 1, len(ids) - 1)]),))
    nav[2].caption(f"{position + 1} of {len(ids)} · shortcuts: n next, p previous, a agree, d disagree")
    image_column, info_column = st.columns([3, 2])
    with image_column:
        image_panel(row, manifest, settings.bundle_dir)
    with info_column:
        metadata_panel(row)
        review_panel(settings, user, row)


def image_panel(row: pd.Series, manifest: dict[str, Any] | None, bundle_dir: Path) -> None:
    has_cam = bool(manifest and "cam" in manifest.get("model", {}).get("outputs", {}))
    show_heatmap = st.toggle("Heatmap overlay", value=False, disabled=not has_cam, key="heatmap",
                             help="Class activation map of the triage finding, computed by the bundle's ONNX model"
                             if has_cam else "This bundle has no CAM (heatmap) output, so there is no overlay to show.")
    if not has_cam:
        st.caption("Heatmap: not available, the bundle has no CAM output.")
    if manifest is None:
        st.warning("The bundle could not be loaded, so the image cannot be displayed with its preprocessing.")
        return
    try:
        unit = load_display_image(row["path"], row["sha256"], manifest["preprocessing"])
    except data.FileChangedError as error:
        plain_warning(f"The file of decision {row['id']} has changed since it was decided: its image is not shown.",
                      data.shown_text(str(error), row["path"]))
        return
    except (TriageError, OSError) as error:
        plain_warning("The image cannot be displayed.", data.shown_text(str(error), row["path"]))
        return
    controls = st.columns(2)
    level = controls[0].slider("Level", 0.0, 1.0, 0.5, 0.01, key="level")
    width = controls[1].slider("Width", 0.05, 1.0, 1.0, 0.01, key="width")
    shown, caption = windowed(unit, level, width), f"decision {row['id']}"
    if show_heatmap and has_cam:
        model_sha = manifest["files"][manifest["model"]["file"]]
        try:
            cam = load_cam(row["path"], row["sha256"], str(bundle_dir), model_sha)
        except (TriageError, OSError, ValueError) as error:
            plain_warning("The heatmap cannot be computed.", data.shown_text(str(error), row["path"]))
        else:
            shown = overlay(shown, cam)
            caption += (f" · heatmap of {manifest['operating_point']['finding']} ({cam.shape[0]}x{cam.shape[1]} class "
                        "activation map, scaled per image: bright = where the model found the most evidence; "
                        "not a segmentation)")
    st.image(shown, caption=caption, clamp=True, width="stretch")


def plain_warning(message: str, detail: str) -> None:
    """A warning in our own words, then ``detail`` (which quotes a study's file or tags) as plain text."""
    st.warning(message)
    st.code(detail, language=None, wrap_lines=True)


def study_fields(row: pd.Series) -> pd.DataFrame:
    """The decision's fields as a two-column text table (no server path: the file name only)."""
    fields = {
        "Threshold": format_risk(row["threshold"]) or "—", "Finding": row["finding"] or "—",
        "Status": row["status"], "Reason": row["reason"] or "—",
        "Model": f"{row['bundle_name']} {row['bundle_version']}".strip() or "—", "Policy": row["policy"] or "—",
        "View / sex / age": f"{row['view_position'] or '?'} / {row['patient_sex'] or '?'} / {row['patient_age'] or '?'}",
        "Manufacturer": row["manufacturer"] or "—", "Patient (pseudonym)": row["patient_pseudo_id"] or "—",
        "Study UID": row["study_uid"], "File": Path(row["path"]).name or "—",
        "Scored at": str(row["created_at"])[:19],
    }
    return pd.DataFrame({"field": list(fields), "value": [str(v) for v in fields.values()]})


def metadata_panel(row: pd.Series) -> None:
    st.metric("Study risk" + (" · FLAGGED" if row["flagged"] else ""), format_risk(row["study_risk"]) or "—")
    st.dataframe(study_fields(row), hide_index=True, width="stretch")
    if row["detail"]:
        st.caption("Detail")
        st.code(data.shown_text(row["detail"], row["path"]), language=None, wrap_lines=True)


def review_panel(settings: Settings, user: str, row: pd.Series) -> None:
    st.subheader("Review")
    finding = st.text_input("Finding (optional)", key=f"finding-{row['id']}")
    note = st.text_area("Note (optional)", key=f"note-{row['id']}", height=80)
    buttons = st.columns([1, 1, 1.6])
    shortcuts = {"agree": "a", "disagree": "d", "not_assessable": None}
    for column, (verdict, label) in zip(buttons, VERDICT_LABELS.items()):
        if column.button(label, key=f"{verdict}-{row['id']}", shortcut=shortcuts[verdict],
                         type="primary" if verdict == "agree" else "secondary"):
            with open_store(settings.audit_db, create=False) as store:
                review_id = store.append_review(int(row["id"]), user, verdict, finding, note)
            st.session_state["last_review"] = f"Review {review_id} recorded: {label} by {user}."
            st.rerun()
    if st.session_state.get("last_review"):
        st.success(st.session_state.pop("last_review"))
    version = data.data_version(settings.audit_db)
    reviews = load_reviews(str(settings.audit_db), version)
    mine = reviews[reviews["decision_id"] == row["id"]]
    if not mine.empty:
        st.caption("Reviews of this decision (oldest first; never overwritten)")
        st.dataframe(mine[["created_at", "reviewer", "verdict", "finding", "note"]], hide_index=True)


def line_with_rule(frame: pd.DataFrame, column: str, level: float, level_name: str) -> alt.LayerChart:
    """``column`` per day as a line with points (one day still shows), and a dashed rule at ``level``."""
    days = frame.assign(day=pd.to_datetime(frame["day"]))
    line = alt.Chart(days).mark_line(point=True).encode(x=alt.X("day:T", title="day"),
                                                          y=alt.Y(f"{column}:Q", title=column.replace("_", " ")),
                                                          tooltip=list(frame.columns))
    rule = alt.Chart(pd.DataFrame({"level": [level], "name": [level_name]})).mark_rule(strokeDash=[6, 4], color="red")
    return (line + rule.encode(y=alt.Y("level:Q", title=column.replace("_", " ")),
                               tooltip=["name", "level"])).properties(height=220)


def audit_view(settings: Settings, decisions: pd.DataFrame, reviews: pd.DataFrame,
               manifest: dict[str, Any] | None) -> None:
    """How the model behaves on this site's studies, for the hospital's audit."""
    st.header("Audit")
    ok, message = load_verification(str(settings.audit_db), data.data_version(settings.audit_db))
    if ok:
        st.success(f"Audit chain: {message}")  # counts only
    else:
        st.error("Audit chain: BROKEN. A record was changed or removed after it was written:")
        st.code(message, language=None, wrap_lines=True)  # quotes a study UID from the store
    if decisions.empty:
        st.info("The audit store has no decisions yet.")
        return
    target = float(manifest["operating_point"]["flag_rate"]) if manifest else float(decisions["flag_rate"].median())

    st.subheader("Realized flag rate vs target")
    by_day = data.flag_rate_by_day(decisions, target)
    st.altair_chart(line_with_rule(by_day, "flag_rate", target, "target flag rate"), width="stretch")

    st.subheader("Risk distribution vs the bundle's validation reference")
    references = data.reference_histograms(manifest) if manifest else {}
    if not references:
        st.info("The bundle has no reference risk histogram, so drift cannot be measured.")
    else:
        scored_risks = decisions.loc[decisions["status"] == "scored", "risk"]
        if len(references) > 1:
            choice = st.selectbox("Reference population", list(references),
                                  help="the bundle's validation images of all its training sources, or of one source")
            st.caption("PSI against each training population (lowest: the population this site's scores resemble)")
            st.dataframe(data.psi_by_reference(scored_risks, references), hide_index=True)
        else:
            choice = next(iter(references))
        edges, ref_counts = references[choice]
        counts = data.risk_histogram(decisions.loc[decisions["status"] == "scored", "risk"], edges)
        value = data.psi(ref_counts, counts)
        alert = not math.isnan(value) and value > data.PSI_ALERT and counts.sum() >= data.PSI_MIN_N
        st.metric("PSI (all scored studies)", "—" if math.isnan(value) else f"{value:.3f}",
                  delta=f"alert above {data.PSI_ALERT}", delta_color="inverse" if alert else "off")
        if counts.sum() < data.PSI_MIN_N:
            st.info(f"Only {counts.sum()} scored studies: PSI alerts start at {data.PSI_MIN_N}.")
        if alert:
            st.error(f"Drift alert: PSI {value:.3f} > {data.PSI_ALERT}. The studies differ from the model's validation data.")
        bins = [f"{lo:.2f}" for lo in edges[:-1]]
        shares = pd.DataFrame({"reference": np.asarray(ref_counts) / max(sum(ref_counts), 1),
                               "this site": counts / max(counts.sum(), 1)}, index=bins)
        st.bar_chart(shares, stack=False)
        st.caption("PSI per day")
        st.altair_chart(line_with_rule(data.drift_by_day(decisions, edges, ref_counts), "psi", data.PSI_ALERT,
                                       "alert threshold"), width="stretch")

    st.subheader("Human review by reason")
    reasons = data.review_rates_by_reason(decisions)
    if reasons.empty:
        st.caption("No study was routed to human review.")
    else:
        st.bar_chart(reasons.set_index("reason")[["share"]], horizontal=True)
        st.caption("Refusal rate by reason per day (share of the day's decisions): a rise of view_out_of_scope or "
                   "out_of_distribution means images the input gate does not recognise, e.g. a new device or protocol")
        by_day = data.refusal_rate_by_day(decisions)
        st.altair_chart(alt.Chart(by_day).mark_line(point=True).encode(
            x=alt.X("day:T", title="day"), y=alt.Y("rate:Q", title="refusal rate", axis=alt.Axis(format="%")),
            color=alt.Color("reason:N", title="reason"), tooltip=["day:T", "reason:N", "n:Q", "n_day:Q"]),
            width="stretch")

    st.subheader("Agreement with clinicians")
    figures = data.agreement(decisions, reviews)
    cols = st.columns(3)
    cols[0].metric("Reviewed decisions", figures["n_reviewed"])
    cols[1].metric("Agreement", "—" if math.isnan(figures["agreement"]) else f"{figures['agreement']:.0%}")
    cols[2].metric("PPV among flagged", "—" if math.isnan(figures["ppv_flagged"]) else f"{figures['ppv_flagged']:.0%}")
    curve = data.reliability(decisions, reviews)
    if curve.empty:
        st.caption("Reliability plot: appears once clinicians agree or disagree with scored studies.")
    else:
        st.caption("Reliability: clinician-confirmed rate vs model risk (diagonal = calibrated; point size = reviews)")
        diagonal = alt.Chart(pd.DataFrame({"x": [0.0, 1.0]})).mark_line(strokeDash=[4, 4], color="grey").encode(
            x="x:Q", y="x:Q")
        points = alt.Chart(curve).mark_line(point=True).encode(
            x=alt.X("mean_risk:Q", title="mean model risk", scale=alt.Scale(domain=[0, 1])),
            y=alt.Y("observed_rate:Q", title="clinician-confirmed rate", scale=alt.Scale(domain=[0, 1])),
            size="n:Q", tooltip=["mean_risk", "observed_rate", "n"])
        st.altair_chart((diagonal + points).properties(height=260), width="stretch")
    waits = data.waiting_times(decisions, reviews)
    if not waits.empty:
        st.caption("Minutes from decision to first review")
        st.dataframe(waits, hide_index=True)

    st.subheader("Subgroups")
    st.dataframe(data.risks_as_text(data.subgroup_table(decisions), ("mean_risk",)), hide_index=True)
    st.subheader("Model / bundle versions")
    st.dataframe(data.bundle_history(decisions), hide_index=True)
    st.subheader("Export")
    export = data.pseudonymized_export(decisions, data.site_secret(settings.audit_db))
    st.download_button("Download decisions (pseudonymized CSV)", data.csv_bytes(export),
                       file_name="decisions-pseudonymized.csv", mime="text/csv")


def active_learning_view(decisions: pd.DataFrame, reviews: pd.DataFrame, manifest: dict[str, Any] | None) -> None:
    """Studies worth labelling next, as a CSV that training reads."""
    st.header("Active learning")
    finding = manifest["operating_point"]["finding"] if manifest else "finding"
    size = st.number_input("Queue size", 10, 5000, 200, 10)
    queue = data.active_learning_queue(decisions, reviews, finding, int(size))
    st.caption("Clinician disagreements first, then the studies the model is least sure of (risk nearest 0.5).")
    shown = queue.assign(path=queue["path"].map(lambda path: Path(path).name)).rename(columns={"path": "file"})
    st.dataframe(data.risks_as_text(shown), hide_index=True)  # the file name on screen; the CSVs keep the path
    labelled = data.labelled_only(queue, finding)
    cols = st.columns(2)
    cols[0].download_button(f"Download labelled CSV ({len(labelled)} rows, for training)",
                            data.csv_bytes(labelled), file_name="active-learning-labelled.csv",
                            mime="text/csv", disabled=labelled.empty)
    cols[1].download_button(f"Download the queue to label ({len(queue)} rows)", data.csv_bytes(queue),
                            file_name="active-learning-queue.csv", mime="text/csv")
    st.caption("The labelled CSV is in the site format that train, evaluate, calibrate and finetune read (save it as "
               "labels.csv): path, the finding as 1/0, patient_id (pseudonym), md5 (here the file's sha256, compared "
               "only for equality); other columns are kept as extra.")


def main() -> None:
    st.set_page_config(page_title="cxr-triage review", layout="wide")
    settings = settings_from_env()
    user = login_view(settings)
    if user is None:
        return
    if not is_url(settings.audit_db) and not settings.audit_db.is_file():
        st.error(f"{settings.audit_db}: no audit store here. Fix: pass --audit-db the store the scorer wrote")
        return
    version = data.data_version(settings.audit_db)
    decisions = load_decisions(str(settings.audit_db), version)
    reviews = load_reviews(str(settings.audit_db), version)
    manifest, problem = load_manifest(str(settings.bundle_dir))
    page, chosen = sidebar_view(user, decisions)
    if problem:
        st.sidebar.warning(f"Bundle: {problem}")
    st.caption("Demonstration triage model: it orders the worklist, it does not diagnose.")
    if page in ("Worklist", "Study"):
        work = load_worklist(str(settings.audit_db), version, chosen) if not decisions.empty else pd.DataFrame()
        if page == "Worklist":
            worklist_view(work)
        else:
            study_view(settings, user, work, manifest)
    elif page == "Audit":
        audit_view(settings, decisions, reviews, manifest)
    else:
        active_learning_view(decisions, reviews, manifest)


main()
