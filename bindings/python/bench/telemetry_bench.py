"""Rows per second from ``Client.telemetry`` into a ``pyarrow.Table``, side by side with
``pandas.read_sql`` reading the same rows from a plain SQLite table (a row per point, indexed as
a user would keep them: the peer is "put the points in SQLite and read them with pandas").

    python bench/telemetry_bench.py --rows 1000000 [--devices 10] [--runs 5] [--json out.json]

Both read the same points (device, metric, time, value) after ingest; the report gives the
median and min-max of `--runs` runs of each (they alternate, and each starts with the previous
results released), and the ratio. The peer table is written from the
first `Client.telemetry` result, into its own database file next to the server's.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import time

import pandas as pd

import fleetlink

SQL = "SELECT device, metric, time, value FROM points ORDER BY device, metric, time"


def write_peer(path: str, table) -> None:
    """The rows of ``table`` into a row-per-point SQLite table, as the peer reads them."""
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE points (device TEXT NOT NULL, metric TEXT NOT NULL, time INTEGER NOT NULL,"
            " value REAL, PRIMARY KEY (device, metric, time)) WITHOUT ROWID"
        )
        cols = [table.column(c).to_pylist() for c in ("device", "metric")]
        times = table.column("time").cast("int64").to_pylist()
        values = table.column("value").to_pylist()
        conn.executemany("INSERT INTO points VALUES (?, ?, ?, ?)", zip(cols[0], cols[1], times, values))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", help="also write the timings here (read by `cargo xtask bench --python`)")
    args = ap.parse_args()
    per_device = args.rows // args.devices
    with fleetlink.Server() as server:
        client = server.connect()
        start = time.perf_counter()
        t0 = 1_700_000_000_000_000
        for d in range(args.devices):
            dev = fleetlink.Device.connect(**client.provision(f"bench-{d:03}"))
            for i in range(0, per_device, 2):
                dev.send({"temp": 20.0 + (i % 100) / 10, "load": float(i % 7)}, ts=t0 + i * 1_000)
            dev.flush(timeout=600)
            dev.close()
        ingest = time.perf_counter() - start
        rows = args.devices * per_device
        print(f"ingested {rows} rows in {ingest:.1f} s ({rows / ingest:,.0f} rows/s through the device SDK)")

        peer = f"{server.data_dir}/peer.db"
        write_peer(peer, client.telemetry())
        ours, theirs = [], []
        for _ in range(args.runs):
            # Each timed read starts with the previous results let go, as a loop that processes
            # and drops each result would: neither read runs beside the other's (or its own
            # previous) gigabyte of live memory.
            table = frame = None
            s = time.perf_counter()
            table = client.telemetry()
            ours.append(time.perf_counter() - s)
            assert table.num_rows == rows, table.num_rows
            table = None
            s = time.perf_counter()
            with sqlite3.connect(peer) as conn:
                frame = pd.read_sql(SQL, conn)
            theirs.append(time.perf_counter() - s)
            assert len(frame) == rows, len(frame)
        client.close()

    def show(name: str, times: list[float]) -> float:
        med = statistics.median(times)
        print(f"{name:<42} median {med:6.3f} s  ({rows / med:>12,.0f} rows/s)  min-max {min(times):.3f}-{max(times):.3f} s")
        return med

    a = show("Client.telemetry -> pyarrow.Table", ours)
    b = show("pandas.read_sql (sqlite3, same rows)", theirs)
    print(f"ratio (read_sql time / telemetry time): {b / a:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"rows": rows, "ingest_s": ingest, "telemetry_s": ours, "read_sql_s": theirs},
                f,
            )


if __name__ == "__main__":
    main()
