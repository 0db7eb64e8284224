"""Worklist render time with N audit records (default 10,000), server side, through Streamlit's AppTest.

Builds an audit store of N decisions (5% flagged, 3% human review, 500 reviews) spread
over 30 days, logs in, and times:
  query     read decisions + reviews from SQLite and order the worklist (no cache)
  cold      first Worklist page run after login (cached queries empty)
  warm      median of reruns of the Worklist page (cached queries hit)
  filtered  the run after changing a filter (unreviewed only: a cache miss, the worklist is re-ordered)
  study     one Study page run (decodes one image: images load lazily, only on this page)
The browser's own drawing time is not included.

Usage: python benchmarks/bench_dashboard.py [--n 10000] [--reruns 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from streamlit.testing.v1 import AppTest

from dashboards import auth, data
from triage.audit import Decision, open_store
REPO = Path(__file__).resolve().parents[1]
APP = str(REPO / "dashboards" / "app.py")
SAMPLES = sorted((REPO / "samples" / "kermany").glob("*.dcm"))


def build_store(folder: Path, n: int, seed: int = 0) -> Path:
    """N synthetic decisions on the sample images, 5% flagged by risk, plus 500 reviews."""
    rng = np.random.default_rng(seed)
    risks = rng.beta(0.6, 0.6, n)
    threshold = float(np.quantile(risks, 0.95))
    routed = rng.random(n) < 0.03
    decisions = []
    for i in range(n):
        scored = not routed[i]
        decisions.append(Decision(
            path=str(SAMPLES[i % len(SAMPLES)]), sha256=f"{i:064x}", status="scored" if scored else "human_review",
            reason="" if scored else "view_out_of_scope", study_uid=f"1.2.826.0.1.{i}", patient_pseudo_id=f"{i:016x}",
            patient_sex="FM"[i % 2], patient_age=f"{18 + i % 70:03d}Y", view_position="PA", manufacturer="Acme",
            bundle_name="cxr-pneumonia-demo", bundle_version="0.1.0", bundle_sha256="b" * 64, finding="pneumonia",
            risk=float(risks[i]) if scored else None, study_risk=float(risks[i]) if scored else None,
            threshold=threshold, flag_rate=0.05, policy="stream_threshold", flagged=scored and risks[i] >= threshold,
            run_id=f"day-{i * 30 // n}"))
    db = folder / "audit.sqlite"
    with open_store(db) as store:
        ids = store.append_decisions(decisions)
        for decision_id in ids[:: max(1, n // 500)][:500]:
            store.append_review(decision_id, "bench", "agree")
    auth.add_user(folder / auth.CONFIG_FILENAME, "bench", "bench-password")
    return db


def timed(action) -> float:
    start = time.perf_counter()
    action()
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--reruns", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        build_ms = timed(lambda: build_store(Path(tmp), args.n))
        db = Path(tmp) / "audit.sqlite"
        os.environ["CXR_DASHBOARD_AUDIT_DB"] = str(db)
        query_ms = timed(lambda: data.worklist(data.read_decisions(db), data.read_reviews(db)))
        app = AppTest.from_file(APP, default_timeout=120).run()
        app.text_input[0].input("bench")
        app.text_input[1].input("bench-password")
        cold_ms = timed(lambda: app.button[0].click().run())  # login + first Worklist page
        assert not app.exception, app.exception
        assert len(app.dataframe[0].value) == args.n
        warm_ms = statistics.median(timed(app.run) for _ in range(args.reruns))
        filtered_ms = timed(lambda: app.sidebar.selectbox(key="reviewed").set_value("unreviewed").run())
        app.sidebar.radio(key="page").set_value("Worklist")
        study_ms = timed(lambda: app.sidebar.radio(key="page").set_value("Study").run())
        assert not app.exception and len(app.get("image")) == 1
    print(f"audit store: {args.n} decisions + 500 reviews, built in {build_ms / 1000:.1f} s")
    print(f"query + order (no cache):          {query_ms:7.0f} ms")
    print(f"worklist, cold (login, first run): {cold_ms:7.0f} ms")
    print(f"worklist, warm rerun (median):     {warm_ms:7.0f} ms")
    print(f"worklist, filter changed (miss):   {filtered_ms:7.0f} ms")
    print(f"study page (one image decoded):    {study_ms:7.0f} ms")


if __name__ == "__main__":
    main()
