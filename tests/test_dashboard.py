"""The dashboard's page logic (streamlit AppTest) and its figures (plain pandas)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("streamlit", reason="the dashboard extra is not installed: pip install -e '.[dashboard]'")
from streamlit.testing.v1 import AppTest  # noqa: E402

from dashboards import auth, data  # noqa: E402
from tests.pg import pg_server, pg_url  # noqa: E402,F401 (fixtures)
from tests.tiny_bundle import build_tiny_bundle  # noqa: E402
from triage.audit import AuditStore, Decision  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
APP = str(REPO / "dashboards" / "app.py")
SAMPLE = REPO / "samples" / "kermany"
PASSWORD = "correct horse battery staple"


def decision(i: int, risk: float | None, flagged: bool = False, **kwargs) -> Decision:
    """A scored decision on sample image ``kermany-NN.dcm`` (or a human-review one when risk is None)."""
    status = "scored" if risk is not None else "human_review"
    values = dict(path=str(SAMPLE / f"kermany-{(i % 12) + 1:02d}.dcm"), sha256=f"{i:064x}", status=status,
                  reason="" if risk is not None else "not_dicom", study_uid=f"1.2.3.{i}", patient_pseudo_id=f"p{i:04d}",
                  patient_sex="F" if i % 2 else "M", patient_age=f"{20 + i:03d}Y", view_position="AP",
                  manufacturer="Acme", bundle_name="cxr-pneumonia-demo", bundle_version="0.1.0",
                  bundle_sha256="b" * 64, finding="pneumonia", risk=risk, study_risk=risk, threshold=0.99,
                  flag_rate=0.05, policy="batch_top_k", flagged=flagged, run_id="run-1")
    return Decision(**{**values, **kwargs})


def build_store(folder: Path) -> Path:
    """An audit store with 6 decisions (2 flagged, 1 human review) and a login config with user 'alice'."""
    db = folder / "audit.sqlite"
    with AuditStore(db) as store:
        store.append_decisions([decision(0, 0.30), decision(1, 0.995, True), decision(2, None), decision(3, 0.80),
                                decision(4, 0.9995, True), decision(5, 0.05)])
    auth.add_user(folder / auth.CONFIG_FILENAME, "alice", PASSWORD)
    return db


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    db = build_store(tmp_path)
    monkeypatch.setenv("CXR_DASHBOARD_AUDIT_DB", str(db))
    monkeypatch.delenv(auth.CONFIG_ENV, raising=False)
    return db


def logged_in(app: AppTest) -> AppTest:
    app.run()
    app.text_input[0].input("alice")
    app.text_input[1].input(PASSWORD)
    app.button[0].click().run()
    return app


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
    with AuditStore(tmp_path / "a.sqlite") as s:
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
    with AuditStore(store, create=False) as s:
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
    rgb = data.overlay(grey, cam)
    assert rgb.shape == (64, 80, 3) and rgb.dtype == np.uint8
    change = np.abs(rgb.astype(int) - 100).sum(axis=2)
    assert np.unravel_index(np.argmax(change), change.shape)[0] < 16 and np.argmax(change.max(axis=0)) > 50
    assert change[-8:, :16].max() == change.min()  # far from the hot cell: the same as every cold pixel
    flat = data.overlay(grey, np.ones((8, 8)))
    assert np.array_equal(flat, np.repeat(grey[..., None], 3, axis=2))  # a flat map adds nothing


def test_study_cam_is_the_bundles_map_for_a_real_file(tmp_path: Path) -> None:
    from triage.bundle import load_bundle
    from triage.inference import load_model
    from triage.ingest import read_radiograph
    from triage.preprocess import preprocess

    model = load_model(load_bundle(build_tiny_bundle(tmp_path / "b", with_cam=True)), device="cpu")
    path = SAMPLE / "kermany-01.dcm"
    cam = data.study_cam(model, path)
    x = preprocess(read_radiograph(path), model.bundle.preprocessing)
    assert cam.shape == (8, 8)
    assert cam.mean() == pytest.approx(float(model.logits(x[None])[0, 0]), abs=1e-5)
    with pytest.raises(ValueError, match="no CAM output"):
        data.study_cam(load_model(load_bundle(build_tiny_bundle(tmp_path / "old")), device="cpu"), path)


def test_audit_and_active_learning_pages_render(store: Path) -> None:
    with AuditStore(store) as s:
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
    with AuditStore(store) as s:
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
    assert [(r["md5"], int(r["pneumonia"])) for r in rows] == [(f"{3:064x}", 1), (f"{4:064x}", 0)]
    labels_csv = tmp_path / "labels.csv"  # the site format reads the labelled export as is
    data.labelled_only(queue, "pneumonia").to_csv(labels_csv, index=False)
    from training.datasets import read_generic_csv

    records = read_generic_csv(labels_csv)
    assert [(r.md5, r.label("pneumonia"), r.extra["why"]) for r in records] == [
        (f"{3:064x}", 1.0, "clinician disagreed"), (f"{4:064x}", 0.0, "clinician disagreed")]
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

    with AuditStore(tmp_path / "a.sqlite") as s:
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
    with AuditStore(store) as s:
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
    with AuditStore(pg_url) as s:
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
    with AuditStore(pg_url, create=False) as s:
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
