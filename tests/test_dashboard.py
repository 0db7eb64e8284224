"""The dashboard's page logic (streamlit AppTest) and its figures (plain pandas)."""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

st = pytest.importorskip("streamlit", reason="the dashboard extra is not installed: pip install -e '.[dashboard]'")
import pydicom  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

from dashboards import auth, data  # noqa: E402
from tests.pg import pg_server, pg_url  # noqa: E402,F401 (fixtures)
from tests.tiny_bundle import build_tiny_bundle  # noqa: E402
from triage.audit import Decision, open_store, path_text  # noqa: E402
from triage.errors import OutOfScopeError  # noqa: E402
from triage.heatmap import overlay  # noqa: E402
from triage.ingest import read_radiograph  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
APP = str(REPO / "dashboards" / "app.py")
SAMPLE = REPO / "samples" / "kermany"
PASSWORD = "correct horse battery staple"


@functools.cache
def file_sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def sample(i: int) -> str:
    return str(SAMPLE / f"kermany-{(i % 12) + 1:02d}.dcm")


def decision(i: int, risk: float | None, flagged: bool = False, **kwargs) -> Decision:
    """A scored decision on sample image ``kermany-NN.dcm`` (or a human-review one when risk is None)."""
    status = "scored" if risk is not None else "human_review"
    path = kwargs.pop("path", sample(i))
    values = dict(path=path, sha256=file_sha256(path) if os.path.isfile(path) else "", status=status,
                  reason="" if risk is not None else "not_dicom", study_uid=f"1.2.3.{i}", patient_pseudo_id=f"p{i:04d}",
                  patient_sex="F" if i % 2 else "M", patient_age=f"{20 + i:03d}Y", view_position="AP",
                  manufacturer="Acme", bundle_name="cxr-pneumonia-demo", bundle_version="0.1.0",
                  bundle_sha256="b" * 64, finding="pneumonia", risk=risk, study_risk=risk, threshold=0.99,
                  flag_rate=0.05, policy="batch_top_k", flagged=flagged, run_id="run-1")
    return Decision(**{**values, **kwargs})


def build_store(folder: Path, extra: tuple[Decision, ...] = ()) -> Path:
    """An audit store with 6 decisions (2 flagged, 1 human review), then ``extra``, and a login config with user
    'alice'."""
    db = folder / "audit.sqlite"
    with open_store(db) as store:
        store.append_decisions([decision(0, 0.30), decision(1, 0.995, True), decision(2, None), decision(3, 0.80),
                                decision(4, 0.9995, True), decision(5, 0.05), *extra])
    auth.add_user(folder / auth.CONFIG_FILENAME, "alice", PASSWORD)
    return db


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    db = build_store(tmp_path)
    monkeypatch.setenv("CXR_DASHBOARD_AUDIT_DB", str(db))
    monkeypatch.delenv(auth.CONFIG_ENV, raising=False)
    return db


@pytest.fixture(autouse=True)
def fresh_login_limits() -> None:
    """Each test starts with no failed logins: the limits live in st.cache_resource, shared by the whole process."""
    st.cache_resource.clear()


def logged_in(app: AppTest, password: str = PASSWORD) -> AppTest:
    app.run()
    app.text_input[0].input("alice")
    app.text_input[1].input(password)
    app.button[0].click().run()
    return app


def open_page(folder: Path, monkeypatch: pytest.MonkeyPatch, decisions: list[Decision], page: str) -> AppTest:
    """The app logged in as alice on ``page``, over a new store of ``decisions`` and a tiny bundle."""
    db = folder / "audit.sqlite"
    with open_store(db) as store:
        store.append_decisions(decisions)
    auth.add_user(folder / auth.CONFIG_FILENAME, "alice", PASSWORD)
    monkeypatch.setenv("CXR_DASHBOARD_AUDIT_DB", str(db))
    monkeypatch.setenv("CXR_DASHBOARD_BUNDLE", str(build_tiny_bundle(folder / "bundle")))
    monkeypatch.delenv(auth.CONFIG_ENV, raising=False)
    app = logged_in(AppTest.from_file(APP, default_timeout=30))
    app.sidebar.radio(key="page").set_value(page).run()
    assert not app.exception
    return app


PLAIN_TEXT_ELEMENTS = ("dataframe", "text", "code")


def page_text(app: AppTest, markdown_only: bool = False) -> str:
    """Every element of the page as protobuf text; ``markdown_only``: only those Streamlit may render as Markdown
    (all but dataframes, st.text and st.code: markdown, captions, alerts, labels, help, image captions)."""
    nodes = [*app.main, *app.sidebar]
    return "\n".join(str(n.proto) for n in nodes if not (markdown_only and n.type in PLAIN_TEXT_ELEMENTS))


# -- auth ---------------------------------------------------------------------------------

def test_password_hash_is_salted_and_checked(tmp_path: Path) -> None:
    first, second = auth.hash_password("s3cret"), auth.hash_password("s3cret")
    assert first != second and first.startswith("scrypt$")
    assert auth.check_password("s3cret", first) and not auth.check_password("s3cre", first)
    assert not auth.check_password("s3cret", "garbage")
    config = tmp_path / "users.json"
    auth.add_user(config, "bob", "pw1")
    assert (config.stat().st_mode & 0o777) == 0o600
    assert "pw1" not in config.read_text()
    assert auth.authenticate(auth.load_users(config), "bob", "pw1")
    assert not auth.authenticate(auth.load_users(config), "eve", "pw1")


def test_users_helper_adds_from_stdin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dashboards import users
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("hunter22\n"))
    config = tmp_path / "u.json"
    assert users.main(["--config", str(config), "add", "carol", "--password-stdin"]) == 0
    assert auth.authenticate(auth.load_users(config), "carol", "hunter22")


def test_malformed_config_says_how_to_fix(tmp_path: Path) -> None:
    config = tmp_path / "users.json"
    config.write_text('{"users": ["alice"]}')
    with pytest.raises(auth.AuthConfigError, match="dashboards.users add NAME"):
        auth.load_users(config)


# -- page logic -----------------------------------------------------------------------------

def test_login_required_before_any_identifier(store: Path) -> None:
    app = AppTest.from_file(APP, default_timeout=30).run()
    assert not app.exception
    shown = " ".join(str(e.value) for e in app.markdown) + " ".join(str(e.value) for e in app.caption)
    assert "1.2.3." not in shown and "p0001" not in shown
    assert not app.dataframe and not app.sidebar.radio
    app.text_input[0].input("alice")
    app.text_input[1].input("wrong")
    app.button[0].click().run()
    assert [e.value for e in app.error] == ["Unknown user name or wrong password."]
    assert not app.dataframe


def test_no_users_configured_explains_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open_store(tmp_path / "a.sqlite") as s:
        s.append_decisions([decision(0, 0.5)])
    monkeypatch.setenv("CXR_DASHBOARD_AUDIT_DB", str(tmp_path / "a.sqlite"))
    monkeypatch.delenv(auth.CONFIG_ENV, raising=False)
    app = AppTest.from_file(APP, default_timeout=30).run()
    assert "dashboards.users" in app.error[0].value and not app.text_input


def test_worklist_flagged_first_then_by_risk(store: Path) -> None:
    app = logged_in(AppTest.from_file(APP, default_timeout=30))
    assert not app.exception
    table = app.dataframe[0].value
    assert table["id"].tolist() == [5, 2, 4, 1, 6, 3]  # flagged by risk, unflagged by risk, no risk last
    assert "Logged in as **alice**" in app.sidebar.markdown[0].value


def test_review_is_appended_with_the_logged_in_reviewer(store: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_DASHBOARD_BUNDLE", str(build_tiny_bundle(tmp_path / "old-bundle")))  # no CAM output
    app = logged_in(AppTest.from_file(APP, default_timeout=30))
    app.sidebar.radio(key="page").set_value("Study").run()
    assert not app.exception
    assert app.metric[0].label.endswith("FLAGGED") and app.metric[0].value == "0.9995"
    heatmap = app.toggle[0]
    assert heatmap.disabled and "no CAM" in heatmap.help
    assert len(app.get("image")) == 1  # the image was decoded and drawn
    app.text_input(key="finding-5").input("consolidation")
    app.button(key="agree-5").click().run()
    app.button(key="disagree-5").click().run()
    assert not app.exception
    with open_store(store, create=False) as s:
        rows = s.reviews_for("1.2.3.4")
        assert s.verify().ok
    assert [(r["decision_id"], r["reviewer"], r["verdict"]) for r in rows] == [(5, "alice", "agree"),
                                                                               (5, "alice", "disagree")]
    assert rows[0]["finding"] == "consolidation"
    app.button(key="next").click().run()
    assert app.metric[0].value == "0.9950"


def image_captions(app: AppTest) -> list[str]:
    return [img.caption for element in app.get("image") for img in element.proto.imgs]


def test_study_image_with_its_heatmap_from_the_bundle(store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bundle with a CAM output: the toggle is enabled and shows the real study image with its heatmap."""
    monkeypatch.setenv("CXR_DASHBOARD_BUNDLE", str(build_tiny_bundle(tmp_path / "cam-bundle", with_cam=True)))
    app = logged_in(AppTest.from_file(APP, default_timeout=30))
    app.sidebar.radio(key="page").set_value("Study").run()
    assert not app.exception
    assert not app.toggle(key="heatmap").disabled and not app.toggle(key="heatmap").value
    assert image_captions(app) == ["decision 5"]
    app.toggle(key="heatmap").set_value(True).run()
    assert not app.exception and not app.warning
    [caption] = image_captions(app)
    assert caption.startswith("decision 5 · heatmap of pneumonia (8x8 class activation map")


def test_overlay_puts_colour_where_the_map_is_high() -> None:
    grey = np.full((64, 80), 100, np.uint8)
    cam = np.zeros((8, 8), np.float32)
    cam[1, 6] = 5.0  # one hot cell, top right
    rgb = overlay(grey, cam)
    assert rgb.shape == (64, 80, 3) and rgb.dtype == np.uint8
    change = np.abs(rgb.astype(int) - 100).sum(axis=2)
    assert np.unravel_index(np.argmax(change), change.shape)[0] < 16 and np.argmax(change.max(axis=0)) > 50
    assert change[-8:, :16].max() == change.min()  # far from the hot cell: the same as every cold pixel
    flat = overlay(grey, np.ones((8, 8)))
    assert np.array_equal(flat, np.repeat(grey[..., None], 3, axis=2))  # a flat map adds nothing


def test_study_cam_is_the_bundles_map_for_a_real_file(tmp_path: Path) -> None:
    from triage.bundle import load_bundle
    from triage.inference import load_model
    from triage.ingest import read_radiograph
    from triage.preprocess import preprocess

    model = load_model(load_bundle(build_tiny_bundle(tmp_path / "b", with_cam=True)), device="cpu")
    radiograph = read_radiograph(SAMPLE / "kermany-01.dcm")
    cam = data.study_cam(model, radiograph)
    x = preprocess(radiograph, model.bundle.preprocessing)
    assert cam.shape == (8, 8)
    assert cam.mean() == pytest.approx(float(model.logits(x[None])[0, 0]), abs=1e-5)
    with pytest.raises(ValueError, match="no CAM output"):
        data.study_cam(load_model(load_bundle(build_tiny_bundle(tmp_path / "old")), device="cpu"), radiograph)


def test_audit_and_active_learning_pages_render(store: Path) -> None:
    with open_store(store) as s:
        s.append_review(5, "alice", "agree")
        s.append_review(4, "alice", "disagree")
    app = logged_in(AppTest.from_file(APP, default_timeout=30))
    app.sidebar.radio(key="page").set_value("Audit").run()
    assert not app.exception
    assert app.success[0].value.startswith("Audit chain: audit chain OK: 6 decisions, 2 reviews")
    assert [m.value for m in app.metric][1:4] == ["2", "50%", "100%"]  # reviewed, agreement, PPV among flagged
    assert any(c.value.startswith("Refusal rate by reason per day") for c in app.caption)
    app.sidebar.radio(key="page").set_value("Active learning").run()
    assert not app.exception
    queue = app.dataframe[0].value
    assert queue["decision_id"].tolist()[:2] == [4, 1]  # the disagreement, then risk 0.30: nearest 0.5


# -- figures --------------------------------------------------------------------------------

def test_a_multi_source_bundle_gives_a_reference_per_source_and_the_closest_comes_first() -> None:
    edges = [0.0, 0.25, 0.5, 0.75, 1.0]
    manifest = {"metrics": {"validation": {"risk_histogram": {"bin_edges": edges, "counts": [5, 5, 5, 5]}},
                            "validation_by_source": {
                                "children": {"risk_histogram": {"bin_edges": edges, "counts": [1, 1, 2, 16]}},
                                "adults": {"risk_histogram": {"bin_edges": edges, "counts": [12, 4, 2, 2]}}}}}
    references = data.reference_histograms(manifest)
    assert list(references) == ["all validation images", "source children", "source adults"]
    site = np.array([0.05] * 60 + [0.3] * 20 + [0.6] * 10 + [0.9] * 10)  # mostly low risks: adult-like
    table = data.psi_by_reference(site, references)
    assert table["reference"].tolist()[0] == "source adults" and table["psi"].is_monotonic_increasing
    assert data.reference_histograms({"metrics": {}}) == {}


def test_psi_zero_for_same_distribution_and_large_for_shifted() -> None:
    ref = [10, 20, 30, 40]
    assert data.psi(ref, [1, 2, 3, 4]) == pytest.approx(0.0)
    assert data.psi(ref, [40, 30, 20, 10]) > data.PSI_ALERT
    assert math.isnan(data.psi(ref, [0, 0, 0, 0]))


def test_age_band() -> None:
    assert [data.age_band(a) for a in ("045Y", "006M", "070Y", "", "abc", "018Y")] == [
        "40-64", "<18", "65+", "unknown", "unknown", "18-39"]


def test_export_has_no_paths_or_uids(store: Path) -> None:
    frame = data.read_decisions(store)
    export = data.pseudonymized_export(frame, b"k" * 32)
    text = export.to_csv(index=False)
    assert "kermany" not in text and "1.2.3." not in text and "path" not in export.columns
    assert export["study_pseudo_id"].str.fullmatch("[0-9a-f]{16}").all()


def test_agreement_and_active_learning_labels(store: Path, tmp_path: Path) -> None:
    with open_store(store) as s:
        s.append_review(2, "alice", "agree")      # flagged, agreed
        s.append_review(5, "alice", "disagree")   # flagged, disagreed
        s.append_review(4, "bob", "disagree")     # unflagged, disagreed -> label 1
    decisions, reviews = data.read_decisions(store), data.read_reviews(store)
    figures = data.agreement(decisions, reviews)
    assert figures["ppv_flagged"] == pytest.approx(0.5) and figures["n_reviewed"] == 3
    queue = data.active_learning_queue(decisions, reviews, "pneumonia")
    assert queue.loc[queue["decision_id"] == 4, "pneumonia"].item() == "1"
    assert queue.loc[queue["decision_id"] == 5, "pneumonia"].item() == "0"
    assert set(queue.columns) >= {"path", "pneumonia", "patient_id", "md5"}
    rows = list(csv.DictReader(io.StringIO(data.labelled_only(queue, "pneumonia").to_csv(index=False))))
    assert [(r["md5"], int(r["pneumonia"])) for r in rows] == [(file_sha256(sample(3)), 1), (file_sha256(sample(4)), 0)]
    labels_csv = tmp_path / "labels.csv"  # the site format reads the labelled export as is
    data.labelled_only(queue, "pneumonia").to_csv(labels_csv, index=False)
    from training.datasets import read_generic_csv

    records = read_generic_csv(labels_csv)
    assert [(r.md5, r.label("pneumonia"), r.extra["why"]) for r in records] == [
        (file_sha256(sample(3)), 1.0, "clinician disagreed"), (file_sha256(sample(4)), 0.0, "clinician disagreed")]
    curve = data.reliability(decisions, reviews)  # 0.995 agreed -> 1, 0.9995 disagreed -> 0, 0.80 disagreed -> 1
    assert curve["n"].sum() == 3 and curve.set_index("bin").loc[9, "observed_rate"] == pytest.approx(0.5)
    assert curve.set_index("bin").loc[8, "observed_rate"] == 1.0
    assert data.subgroup_table(decisions).query("subgroup == 'age_band'")["n"].sum() == 6
    assert np.isfinite(data.flag_rate_by_day(decisions, 0.05)["flag_rate"]).all()
    assert isinstance(data.bundle_history(decisions), pd.DataFrame) and len(data.bundle_history(decisions)) == 1


def test_refusal_rate_by_reason_per_day_shows_a_rise_of_gate_refusals() -> None:
    import datetime as dt

    day1, day2 = dt.date(2026, 12, 1), dt.date(2026, 12, 2)
    rows = ([(day1, "scored", "")] * 18 + [(day1, "human_review", "not_dicom")] * 2
            + [(day2, "scored", "")] * 6 + [(day2, "human_review", "view_out_of_scope")] * 3
            + [(day2, "human_review", "out_of_distribution")])
    frame = pd.DataFrame(rows, columns=["day", "status", "reason"]).reset_index(names="id")
    table = data.refusal_rate_by_day(frame)
    got = {(r.day, r.reason): (r.n, r.n_day, r.rate) for r in table.itertuples()}
    assert got == {(day1, "not_dicom"): (2, 20, 0.1), (day2, "out_of_distribution"): (1, 10, 0.1),
                   (day2, "view_out_of_scope"): (3, 10, 0.3)}
    assert data.refusal_rate_by_day(frame.iloc[:0]).empty


# -- the command ----------------------------------------------------------------------------

def test_dashboard_command_binds_localhost_and_refuses_open_address_without_logins(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from deploy import cli, dashboard_cmd

    with open_store(tmp_path / "a.sqlite") as s:
        s.append_decisions([decision(0, 0.5)])
    args = cli.build_parser().parse_args(["dashboard", "--audit-db", str(tmp_path / "a.sqlite"), "--port", "8600"])
    command = dashboard_cmd.streamlit_command(args)
    assert command[command.index("--server.address") + 1] == "127.0.0.1"
    assert command[command.index("--server.port") + 1] == "8600"
    args = cli.build_parser().parse_args(["dashboard", "--audit-db", str(tmp_path / "a.sqlite"), "--address", "0.0.0.0",
                                          "--config", str(tmp_path / "none.json")])
    assert args.func(args) == 1
    assert "refusing to listen on 0.0.0.0" in capsys.readouterr().err


def test_worklist_filters(store: Path) -> None:
    with open_store(store) as s:
        s.append_review(2, "alice", "agree")
    decisions, reviews = data.read_decisions(store), data.read_reviews(store)
    today = decisions["day"].iloc[0]
    ids = lambda chosen: data.worklist(decisions, reviews, chosen)["id"].tolist()  # noqa: E731
    assert ids(data.WorklistFilter(reviewed="reviewed")) == [2]
    assert ids(data.WorklistFilter(reviewed="unreviewed")) == [5, 4, 1, 6, 3]
    assert ids(data.WorklistFilter(status="human_review")) == [3]
    assert ids(data.WorklistFilter(flagged_only=True)) == [5, 2]
    assert ids(data.WorklistFilter(start=today, end=today)) == [5, 2, 4, 1, 6, 3]
    assert ids(data.WorklistFilter(start=today + pd.Timedelta(days=1))) == []


def test_worklist_and_reviews_on_a_postgresql_store(pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same pages on a postgresql:// store: worklist order, a review recorded in the server's chain."""
    with open_store(pg_url) as s:
        s.append_decisions([decision(0, 0.30), decision(1, 0.995, True), decision(2, 0.80)])
    users = tmp_path / auth.CONFIG_FILENAME
    auth.add_user(users, "alice", PASSWORD)
    monkeypatch.setenv("CXR_DASHBOARD_AUDIT_DB", pg_url)
    monkeypatch.setenv(auth.CONFIG_ENV, str(users))
    monkeypatch.setenv("CXR_TRIAGE_SECRET", str(tmp_path / "site-secret.key"))
    app = logged_in(AppTest.from_file(APP, default_timeout=30))
    assert not app.exception
    assert app.dataframe[0].value["id"].tolist() == [2, 3, 1]
    app.sidebar.radio(key="page").set_value("Study").run()
    app.button(key="agree-2").click().run()
    assert not app.exception
    with open_store(pg_url, create=False) as s:
        assert [(r["decision_id"], r["reviewer"]) for r in s.reviews_for("1.2.3.1")] == [(2, "alice")]
        assert s.verify().ok


def test_users_helper_with_a_postgresql_store_and_no_config_says_what_to_pass(monkeypatch, capsys) -> None:
    from dashboards import users
    from triage.audit import AUDIT_DB_ENV

    monkeypatch.setenv(AUDIT_DB_ENV, "postgresql://cxr@db.example/audit")
    monkeypatch.delenv(auth.CONFIG_ENV, raising=False)
    assert users.main(["list"]) == 1
    error = capsys.readouterr().err
    assert "postgresql" in error.lower() and auth.CONFIG_ENV in error


# -- hardening (issue 14) -----------------------------------------------------------------

IMG_TAG, LINK_PATH, MD_IMAGE = "<img src=http://x/>", "[re-login](http://evil)", "![x](http://x/m.png)"


def test_values_from_a_study_never_reach_markdown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 16: a Manufacturer (0008,0070) ``<img src=...>`` and a path written as a Markdown link are drawn as plain
    text on every page, never as Markdown (where the browser would fetch the image or show the link)."""
    rigged = decision(0, 0.7, manufacturer=IMG_TAG, path=LINK_PATH, study_uid="[uid](http://evil)",
                      view_position=MD_IMAGE, detail=f"{LINK_PATH}: View Position (0018,5101) is 'AP', the header wins")
    app = open_page(tmp_path, monkeypatch, [rigged], "Worklist")
    for page in ("Worklist", "Audit", "Active learning", "Study"):
        app.sidebar.radio(key="page").set_value(page).run()
        assert not app.exception
        shown = page_text(app, markdown_only=True)
        for value in (IMG_TAG, LINK_PATH, "[uid](http://evil)", MD_IMAGE):
            assert value not in shown, f"{value} reached a Markdown element on the {page} page"
    assert IMG_TAG in app.dataframe[0].value["value"].tolist()  # shown on the Study page, as text


def test_out_of_scope_study_is_viewable_and_shows_no_server_path(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 25: a lateral view the model refused is drawn for the clinician; the page names its file, not the
    server folder it lies in."""
    folder = tmp_path / "srv" / "pacs-inbox"
    folder.mkdir(parents=True)
    lateral = pydicom.dcmread(sample(0))
    lateral.ViewPosition = "LL"
    path = folder / "lateral.dcm"
    lateral.save_as(path)
    with pytest.raises(OutOfScopeError) as refused:
        read_radiograph(path)
    assert refused.value.reason == "view_out_of_scope"
    app = open_page(tmp_path, monkeypatch, [decision(0, None, path=str(path), reason="view_out_of_scope",
                                                     detail=str(refused.value))], "Study")
    assert len(app.get("image")) == 1 and not app.warning
    shown = page_text(app)
    assert str(folder) not in shown and "lateral.dcm" in shown and "View Position (0018,5101)" in shown


def test_a_replaced_file_is_not_shown_for_the_decision_made_on_the_old_one(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 13 (display): the file of decision 1 is overwritten by other pixels under the same name (a resent SOP
    Instance UID): its image is not shown, and the page says why; the original bytes back, it is shown again."""
    path = tmp_path / "1.2.3.4.5.dcm"
    shutil.copy(sample(0), path)
    scored = decision(0, 0.7, path=str(path))
    shutil.copy(sample(1), path)
    app = open_page(tmp_path, monkeypatch, [scored], "Study")
    assert not app.get("image")
    assert "has changed since it was decided" in app.warning[0].value
    assert "sha256" in app.code[0].value and str(tmp_path) not in page_text(app)
    shutil.copy(sample(0), path)
    app.run()
    assert len(app.get("image")) == 1 and not app.warning


def test_a_risk_near_one_never_reads_as_certainty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 23 (dashboard): risks go through triage.present.format_risk on the worklist, the study and the queue."""
    app = open_page(tmp_path, monkeypatch, [decision(0, 0.99997, True, threshold=0.99992)], "Worklist")
    row = app.dataframe[0].value.iloc[0]
    assert (row["study_risk"], row["risk"]) == (">0.9999", ">0.9999")
    app.sidebar.radio(key="page").set_value("Study").run()
    assert app.metric[0].value == ">0.9999"
    assert dict(app.dataframe[0].value.values)["Threshold"] == ">0.9999"
    app.sidebar.radio(key="page").set_value("Active learning").run()
    queue = app.dataframe[0].value
    assert queue["risk"].tolist() == [">0.9999"] and queue["file"].tolist() == ["kermany-01.dcm"]  # no server path


def test_csv_downloads_neutralize_spreadsheet_formulas(tmp_path: Path) -> None:
    """Item 17 (dashboard): a tag or a path that a spreadsheet would run as a formula reaches the CSV as text."""
    db = tmp_path / "audit.sqlite"
    with open_store(db) as store:
        store.append_decisions([decision(0, 0.5, manufacturer='=HYPERLINK("http://evil","x")', path="@SUM(A1).dcm",
                                         patient_age="-1+1")])
    decisions, reviews = data.read_decisions(db), data.read_reviews(db)
    export = next(csv.DictReader(io.StringIO(data.csv_bytes(data.pseudonymized_export(decisions, b"k" * 32)).decode())))
    assert export["manufacturer"] == "\'=HYPERLINK(\"http://evil\",\"x\")" and export["patient_age"] == "\'-1+1"
    assert export["risk"] == "0.5" and export["flagged"] == "0"  # numbers stay numbers
    queue = data.active_learning_queue(decisions, reviews, "pneumonia")
    [row] = csv.DictReader(io.StringIO(data.csv_bytes(queue).decode()))
    assert row["path"] == "\'@SUM(A1).dcm" and row["risk"] == "0.5"


# -- login rate limit (item 20) ---------------------------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_failure_limiter_locks_a_key_and_doubles_the_lockout() -> None:
    clock = FakeClock()
    limiter = auth.FailureLimiter(3, window_s=600, lockout_s=60, max_lockout_s=100, clock=clock)
    assert [limiter.fail("alice") for _ in range(3)] == [0, 0, 60]
    assert limiter.wait_s("alice") == 60 and limiter.wait_s("bob") == 0
    clock.now += 60
    assert limiter.wait_s("alice") == 0
    assert [limiter.fail("alice") for _ in range(3)] == [0, 0, 100]  # doubled, capped at max_lockout_s
    limiter.clear("alice")
    assert limiter.wait_s("alice") == 0
    limiter.fail("carol")
    clock.now += 601  # outside the window: that failure no longer counts
    assert [limiter.fail("carol") for _ in range(3)] == [0, 0, 60]


def test_login_guard_refuses_a_locked_user_and_logs_failures_without_the_password(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    auth.add_user(tmp_path / "u.json", "alice", PASSWORD)
    accounts = auth.load_users(tmp_path / "u.json")
    guard = auth.LoginGuard()
    caplog.set_level(logging.INFO, logger="dashboards.auth")
    outcomes = [guard.attempt(accounts, "alice", f"guess-{i}", "10.0.0.9") for i in range(auth.MAX_FAILURES_PER_USER)]
    assert [o.wait_s > 0 for o in outcomes] == [False] * (auth.MAX_FAILURES_PER_USER - 1) + [True]
    assert guard.attempt(accounts, "alice", PASSWORD, "10.0.0.7") == auth.LoginOutcome(False, pytest.approx(
        auth.LOCKOUT_S, abs=1))  # locked from any address, however right the password
    assert guard.attempt(accounts, "bob", "x", "10.0.0.7").wait_s == 0  # another user from another address: not
    failures = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == auth.MAX_FAILURES_PER_USER + 1 and "'alice' from 10.0.0.9" in failures[0]
    assert not any("guess-" in r.getMessage() or PASSWORD in r.getMessage() for r in caplog.records)
    guard = auth.LoginGuard()
    for i in range(auth.MAX_FAILURES_PER_ADDRESS):  # one address trying many names
        guard.attempt(accounts, f"user{i}", "x", "10.0.0.66")
    assert guard.attempt(accounts, "alice", PASSWORD, "10.0.0.66").wait_s > 0
    assert guard.attempt(accounts, "alice", PASSWORD, "10.0.0.67").ok


def test_failed_logins_lock_the_user_across_sessions(store: Path) -> None:
    """50 wrong passwords in 16 s were possible: now the fifth locks the name, for every session of the server."""
    for _ in range(auth.MAX_FAILURES_PER_USER):
        attacker = logged_in(AppTest.from_file(APP, default_timeout=30), password="wrong")
    assert attacker.error[0].value.startswith("Too many failed logins")
    clinician = logged_in(AppTest.from_file(APP, default_timeout=30))  # another session, the right password
    assert clinician.error[0].value.startswith("Too many failed logins") and not clinician.dataframe


# -- the process (item 22) --------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def is_listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def start_dashboard(db: Path, port: int, log: Path) -> tuple[subprocess.Popen, int]:
    """``cxr-triage dashboard`` serving on ``port``, and the pid of its Streamlit child."""
    command = [sys.executable, "-c", "import sys; from deploy.cli import main; sys.exit(main())", "dashboard",
               "--audit-db", str(db), "--port", str(port)]
    env = {**os.environ, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false", "HOME": str(log.parent)}
    parent = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env,
                              start_new_session=True)
    deadline = time.monotonic() + 60
    while not is_listening(port):
        assert parent.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.2)
    [child] = [int(p) for p in Path(f"/proc/{parent.pid}/task/{parent.pid}/children").read_text().split()]
    return parent, child


def is_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_the_streamlit_child_dies_with_the_dashboard_command(store: Path, tmp_path: Path, signum: int) -> None:
    """``kill PID`` (or ``kill -9 PID``) of ``cxr-triage dashboard`` left Streamlit serving on the port."""
    port = free_port()
    parent, child = start_dashboard(store, port, tmp_path / "dashboard.log")
    try:
        os.kill(parent.pid, signum)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while (is_alive(child) or is_listening(port)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not is_alive(child) and not is_listening(port)
    finally:
        try:
            os.killpg(parent.pid, signal.SIGKILL)  # what is left of the group we started, if the test failed
        except ProcessLookupError:
            pass
        parent.wait()


def test_a_file_name_that_is_not_utf8_is_shown_by_its_stored_text(tmp_path, monkeypatch):
    latin1 = os.fsdecode(os.fsencode(tmp_path) + b"/M\xfcller.dcm")
    shutil.copy(sample(0), latin1)
    stored, sha = path_text(latin1), decision(0, 0.7).sha256
    assert data.read_study(stored, sha).path == stored
    app = open_page(tmp_path, monkeypatch, [decision(0, 0.7, path=stored, sha256=sha)], "Study")
    assert len(app.get("image")) == 1 and not app.warning and str(tmp_path) not in page_text(app)
