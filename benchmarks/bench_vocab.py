"""Build throughput with the item vocabulary against identity ids (ids are rows), on the same logs.

    .venv/bin/python benchmarks/bench_vocab.py [--events 2000000] [--repeats 2] [--out DIR]

Writes synthetic logs (`pipeline.data.synth_logs`), then runs `build_sequences` alternately in vocabulary
mode and with `identity_ids`, `--repeats` times each, and prints per mode: the best events/s, the ratio
vocab/identity (target >= 0.8), peak RSS of the driver and of the largest Ray worker process (sampled every
50 ms among this process's descendants), and for the vocabulary its rows and file size.
Results: printed, and written to <out>/bench_vocab.json (benchmarks/results/ is gitignored).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import threading
import time
from pathlib import Path

import psutil

from pipeline.data.build import BuildConfig, build_sequences, read_manifest
from pipeline.data.ingest import IngestRules
from pipeline.data.stream import ensure_ray
from pipeline.data.synth_logs import LogConfig, write_logs


class PeakWorkerRSS:
    """Largest RSS of any descendant process (the Ray workers of a local cluster), sampled in a thread."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            for child in me.children(recursive=True):
                try:
                    self.peak = max(self.peak, child.memory_info().rss)
                except psutil.Error:
                    pass
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakWorkerRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run(logs: Path, out: Path, identity: bool) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cfg = BuildConfig(rules=IngestRules(identity_ids=identity))
    with PeakWorkerRSS() as peak:
        t0 = time.perf_counter()
        report = build_sequences(logs, out, cfg, progress=False)
        sec = time.perf_counter() - t0
    result = {
        "seconds": sec,
        "events_per_s": report.ingest.rows_read / sec,
        "worker_peak_rss_mb": peak.peak / 2**20,
        "num_items": report.num_items,
    }
    if not identity:
        vocab = read_manifest(out)["vocab"]
        result.update(vocab_rows=vocab["rows"], vocab_bytes=(out / vocab["file"]).stat().st_size)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=2_000_000)
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--users", type=int, default=50_000)
    ap.add_argument("--days", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/bench_vocab")
    args = ap.parse_args()
    out = Path(args.out)
    logs = out / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    cfg = LogConfig(num_users=args.users, num_items=args.items, num_days=args.days, num_events=args.events)
    write_logs(cfg, logs, progress=False)
    ensure_ray()
    runs: dict[str, list[dict]] = {"vocab": [], "identity": []}
    for k in range(args.repeats):  # alternate the order so warm-up favours neither side
        order = ("vocab", "identity") if k % 2 == 0 else ("identity", "vocab")
        for mode in order:
            runs[mode].append(run(logs, out / f"seq-{mode}", identity=mode == "identity"))
    best = {m: max(r, key=lambda x: x["events_per_s"]) for m, r in runs.items()}
    driver_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ratio = best["vocab"]["events_per_s"] / best["identity"]["events_per_s"]
    print(f"{args.events:,} events, {args.days} days, {args.items:,} catalogue items, best of {args.repeats}")
    print(f"{'mode':<10}{'events/s':>14}{'seconds':>10}{'worker peak MB':>16}{'num_items':>12}")
    for m in ("vocab", "identity"):
        b = best[m]
        print(
            f"{m:<10}{b['events_per_s']:>14,.0f}{b['seconds']:>10.2f}{b['worker_peak_rss_mb']:>16.0f}"
            f"{b['num_items']:>12,}"
        )
    v = best["vocab"]
    print(f"ratio vocab/identity {ratio:.2f} (target >= 0.8); driver peak RSS {driver_mb:.0f} MB")
    print(f"vocabulary: {v['vocab_rows']:,} rows, {v['vocab_bytes'] / 2**20:.2f} MiB")
    out.mkdir(parents=True, exist_ok=True)
    result = {"events": args.events, "runs": runs, "ratio": ratio, "driver_peak_rss_mb": driver_mb}
    (out / "bench_vocab.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
