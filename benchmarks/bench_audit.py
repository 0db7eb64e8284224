"""Audit store inserts per second: SQLite vs PostgreSQL, one transaction per record vs batched, side by side.

    .venv/bin/python benchmarks/bench_audit.py [--records 400] [--batch 100] [--rounds 3] [--writers 4]
                                               [--pg-url postgresql://...]

Without ``--pg-url`` a throwaway PostgreSQL server is started (initdb + pg_ctl, fsync on, as
the tests do; needs Debian ``postgresql``). Both backends are durable: SQLite WAL with
synchronous=FULL, PostgreSQL with fsync and synchronous_commit on. Rounds interleave the
backends so a busy shared CPU or disk slows both alike; the ratios are the robust figures.
``--writers N`` also times N processes appending single records at once (the Dask-worker case).
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from triage.audit import Decision, open_store  # noqa: E402


def decision(i: int) -> Decision:
    """A realistic scored decision (every column filled)."""
    return Decision(path=f"/archive/2026/11/28/study{i // 2:07d}/img{i:07d}.dcm", sha256=f"{i:064x}", status="scored",
                    study_uid=f"1.2.826.0.1.3680043.8.498.{i // 2}", series_uid=f"1.2.826.0.1.3680043.8.499.{i}",
                    sop_uid=f"1.2.826.0.1.3680043.8.500.{i}", patient_pseudo_id=f"{i * 7919:016x}", patient_sex="F",
                    patient_age="054Y", modality="CR", body_part="CHEST", view_position="PA", manufacturer="FUJIFILM",
                    bundle_name="pneumonia-demo", bundle_version="1.0.0", bundle_sha256="b" * 64, finding="pneumonia",
                    risk=(i % 997) / 997, study_risk=(i % 997) / 997, threshold=0.71, flag_rate=0.05,
                    policy="batch_top_k", flagged=i % 20 == 0, run_id="bench", decode_ms=61.2, infer_ms=7.1,
                    provider="CPUExecutionProvider")


def time_inserts(target: str, records: int, batch: int) -> float:
    """Records per second appending ``records`` decisions to a new store at ``target``, ``batch`` per transaction."""
    with open_store(target) as store:
        start = time.perf_counter()
        for first in range(0, records, batch):
            store.append_decisions([decision(i) for i in range(first, min(first + batch, records))])
        seconds = time.perf_counter() - start
        assert store.verify().ok
    return records / seconds


def _writer(target: str, worker: int, records: int, ready, go) -> None:
    with open_store(target) as store:
        ready.wait()
        go.wait()
        for i in range(records):
            store.append_decisions([decision(worker * 1_000_000 + i)])


def time_concurrent(target: str, writers: int, records: int) -> float:
    """Records per second with ``writers`` processes each appending ``records`` single-record transactions at once."""
    open_store(target).close()
    context = multiprocessing.get_context("fork")
    ready, go = context.Barrier(writers + 1), context.Event()
    processes = [context.Process(target=_writer, args=(target, w, records, ready, go)) for w in range(writers)]
    for process in processes:
        process.start()
    ready.wait()
    start = time.perf_counter()
    go.set()
    for process in processes:
        process.join()
    seconds = time.perf_counter() - start
    with open_store(target) as store:
        result = store.verify()
    assert all(p.exitcode == 0 for p in processes) and result.ok and result.n_records == writers * records
    return writers * records / seconds


def new_pg_database(server: str) -> str:
    import psycopg

    name = f"bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    return f"{server}/{name}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=400, help="records per measurement (default 400)")
    parser.add_argument("--batch", type=int, default=100, help="records per transaction when batched (default 100)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported (default 3)")
    parser.add_argument("--writers", type=int, default=4, help="concurrent writer processes (default 4; 0 skips)")
    parser.add_argument("--pg-url", help="an existing PostgreSQL server (URL without a database; one is created)")
    args = parser.parse_args()

    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        server = args.pg_url
        if server is None:
            from tests.pg import temporary_server, unavailable_reason

            reason = unavailable_reason()
            if reason:
                sys.exit(f"bench_audit: {reason}")
            server = stack.enter_context(temporary_server(durable=True))
        targets: dict[str, Callable[[], str]] = {
            "sqlite": lambda: str(Path(tmp) / f"{uuid.uuid4().hex}.sqlite"),
            "postgresql": lambda: new_pg_database(server),
        }
        modes = {"single": 1, f"batched x{args.batch}": args.batch}
        rates: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for mode, batch in modes.items():
                for backend, make in targets.items():
                    rates.setdefault((backend, mode), []).append(time_inserts(make(), args.records, batch))
            if args.writers:
                for backend, make in targets.items():
                    mode = f"{args.writers} writers, single"
                    per_writer = max(args.records // args.writers, 1)
                    rates.setdefault((backend, mode), []).append(time_concurrent(make(), args.writers, per_writer))

    median = {key: statistics.median(values) for key, values in rates.items()}
    print(f"audit inserts/s, median of {args.rounds} interleaved rounds, {args.records} records each "
          "(durable: SQLite WAL synchronous=FULL; PostgreSQL fsync on, loopback)")
    print(f"{'mode':<24}{'SQLite':>12}{'PostgreSQL':>14}{'PG/SQLite':>12}")
    for mode in dict.fromkeys(m for _, m in rates):
        sqlite_rate, pg_rate = median[("sqlite", mode)], median[("postgresql", mode)]
        print(f"{mode:<24}{sqlite_rate:>12.0f}{pg_rate:>14.0f}{pg_rate / sqlite_rate:>11.2f}x")
    batch_mode = f"batched x{args.batch}"
    for backend in targets:
        gain = median[(backend, batch_mode)] / median[(backend, "single")]
        print(f"{backend}: batched / single = {gain:.1f}x")
    print("Absolute figures were measured on a CPU and disk shared with other jobs; compare the ratios.")


if __name__ == "__main__":
    main()
