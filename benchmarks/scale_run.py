"""Scale run: synthetic interactions -> sequence shards -> one full streamed pass, at growing sizes.

    nohup .venv/bin/python benchmarks/scale_run.py --sizes 10M,100M,1B \\
        > benchmarks/results/scale_run.log 2>&1 &

Each stage runs in its own process (`scale_run.py stage ...`) so that its wall time, its peak memory and
its disk can be measured alone. Memory is sampled every 0.5 s over the stage's whole process tree (the Ray
head processes and workers included): peak summed PSS (shared pages split between processes, the honest
total) and peak summed RSS (counts shared object-store pages once per process: an upper bound). Disk is the
size of the stage's output, plus its peak while running (the build's temporary partition files).
Sizes: users = events / 50 (mean length 50, log-normal tail), catalogue = max(100k, events / 100), 10 days.
Results: benchmarks/results/scale_run.json (one record per size, rewritten after each stage) and the log.
A size whose logs + temporaries + shards would not fit in the free disk is skipped and extrapolated.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]

BYTES_PER_EVENT_PEAK = (
    30  # logs (~6) + scatter temporaries (~12) + shards (~7) + margin, measured at 10M/100M
)


def parse_size(text: str) -> int:
    mult = {"K": 10**3, "M": 10**6, "B": 10**9}
    return int(float(text[:-1]) * mult[text[-1].upper()]) if text[-1].upper() in mult else int(text)


def dir_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


class Sampler(threading.Thread):
    """Peak summed PSS / RSS of a process tree, and the peak size of a folder."""

    def __init__(self, pid: int, folder: Path | None):
        super().__init__(daemon=True)
        self.pid, self.folder = pid, folder
        self.peak_pss = self.peak_rss = self.peak_disk = 0
        self.stop = threading.Event()

    def run(self) -> None:
        tick = 0
        while not self.stop.is_set():
            try:
                root = psutil.Process(self.pid)
                procs = [root] + root.children(recursive=True)
            except psutil.NoSuchProcess:
                break
            rss = pss = 0
            for p in procs:
                try:
                    rss += p.memory_info().rss
                    pss += _pss(p.pid)
                except psutil.NoSuchProcess:
                    pass
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            if self.folder is not None and tick % 10 == 0 and self.folder.exists():
                self.peak_disk = max(self.peak_disk, dir_bytes(self.folder))
            tick += 1
            self.stop.wait(0.5)


def run_stage(name: str, args: list[str], folder: Path | None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "stage", name, *args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    sampler = Sampler(proc.pid, folder)
    sampler.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    if proc.returncode:
        raise RuntimeError(f"stage {name} failed with exit code {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    result.update(
        wall_seconds=round(wall, 2),
        peak_pss_gb=round(sampler.peak_pss / 1e9, 3),
        peak_rss_gb=round(sampler.peak_rss / 1e9, 3),
    )
    if folder is not None:
        size = dir_bytes(folder)
        result.update(disk_gb=round(size / 1e9, 3), peak_disk_gb=round(max(size, sampler.peak_disk) / 1e9, 3))
    return result


# ------------------------------------------------------------------------------------------------------------
# the stages (run in a child process)


def stage(name: str, argv: list[str]) -> dict:
    if name == "synth":
        from pipeline.data.synth_logs import LogConfig, write_logs

        out, events, seed = Path(argv[0]), int(argv[1]), 0
        cfg = LogConfig(
            num_users=events // 50,
            num_items=max(100_000, events // 100),
            num_days=10,
            num_events=events,
            seed=seed,
            bad_fraction=1e-5,
        )
        write_logs(cfg, out, overwrite=True, progress=False)
        return {
            "events": events,
            "users": cfg.num_users,
            "items": cfg.num_items,
            "events_per_s": None,
            "files": len(list(out.glob("date=*/*.parquet"))),
        }
    from pipeline.data.stream import ensure_ray

    ensure_ray(num_cpus=os.cpu_count(), object_store_memory=2 << 30)
    if name == "build":
        from pipeline.data.build import BuildConfig, build_sequences

        logs, out = Path(argv[0]), Path(argv[1])
        report = build_sequences(logs, out, BuildConfig(max_length=200), progress=False)
        return {
            "rows_read": report.ingest.rows_read,
            "quarantined": report.ingest.rows_quarantined,
            "reasons": report.ingest.reasons,
            "users": report.users,
            "interactions": report.interactions,
            "duplicates": report.duplicates_dropped,
            "truncated": report.truncated,
            "partitions": report.partitions,
            "build_seconds": round(report.seconds, 2),
        }
    if name == "stream":
        from pipeline.data.schema import ITEM_FEATURE
        from pipeline.data.stream import Backend, ShardBatches

        seq = Path(argv[0])
        s = ShardBatches(
            seq,
            batch_size=256,
            max_sequence_length=200,
            drop_last_items=0,
            shuffle=True,
            seed=0,
            backend=Backend.RAY,
        )
        t0 = time.perf_counter()
        batches = inter = 0
        for b in s.epoch(0):
            batches += 1
            inter += int(b.seq[ITEM_FEATURE].lengths().sum())
        sec = time.perf_counter() - t0
        return {
            "batches": batches,
            "sequences": s.num_rows(),
            "interactions": inter,
            "interactions_per_s": round(inter / sec),
            "driver_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3),
        }
    raise ValueError(f"unknown stage {name}")


# ------------------------------------------------------------------------------------------------------------


def extrapolate(records: list[dict], events: int) -> dict:
    """Linear growth per stage from the two largest measured sizes (time, disk, memory)."""
    a, b = records[-2], records[-1]
    scale = (events - b["events"]) / (b["events"] - a["events"])
    out = {}
    for st in ("synth", "build", "stream"):
        out[st] = {
            k: round(b[st][k] + scale * (b[st][k] - a[st][k]), 2)
            for k in ("wall_seconds", "peak_pss_gb", "peak_rss_gb", "disk_gb", "peak_disk_gb")
            if k in b[st] and k in a[st]
        }
    return {"events": events, "extrapolated_from": [a["events"], b["events"]], **out}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "stage":
        print(json.dumps(stage(sys.argv[2], sys.argv[3:])))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10M,100M,1B")
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "results" / "scale"))
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "scale_run.json"))
    ap.add_argument("--keep", action="store_true", help="keep the logs and shards of each size")
    args = ap.parse_args()
    work, results = Path(args.work), Path(args.results)
    work.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    for text in args.sizes.split(","):
        events = parse_size(text)
        free = shutil.disk_usage(work).free
        if events * BYTES_PER_EVENT_PEAK > free * 0.8:
            print(
                f"[{text}] skipped: needs ~{events * BYTES_PER_EVENT_PEAK / 1e9:.0f} GB, "
                f"{free / 1e9:.0f} GB free"
            )
            if len(records) >= 2:
                records.append({"extrapolated": extrapolate(records, events)})
            continue
        logs, seq = work / f"logs-{text}", work / f"seq-{text}"
        rec: dict = {"size": text, "events": events, "cpus": os.cpu_count()}
        for name, stage_args, folder in (
            ("synth", [str(logs), str(events)], logs),
            ("build", [str(logs), str(seq)], seq),
            ("stream", [str(seq)], None),
        ):
            print(f"[{text}] {name} ...", flush=True)
            rec[name] = run_stage(name, stage_args, folder)
            if name == "synth":
                rec[name]["events_per_s"] = round(events / rec[name]["wall_seconds"])
            if name == "build":
                rec[name]["events_per_s"] = round(events / rec[name]["wall_seconds"])
            print(f"[{text}] {name}: {json.dumps(rec[name])}", flush=True)
            results.write_text(json.dumps(records + [rec], indent=1))
        rec["total_wall_seconds"] = round(
            sum(rec[s]["wall_seconds"] for s in ("synth", "build", "stream")), 1
        )
        records.append(rec)
        results.write_text(json.dumps(records, indent=1))
        if not args.keep:
            shutil.rmtree(logs, ignore_errors=True)
            shutil.rmtree(seq, ignore_errors=True)
    print_table(records)


def print_table(records: list[dict]) -> None:
    print(
        f"\n{'size':>6s} {'stage':8s} {'wall s':>9s} {'rate/s':>12s} {'peak PSS GB':>12s} "
        f"{'peak RSS GB':>12s} "
        f"{'disk GB':>8s} {'peak disk':>10s}"
    )
    for r in records:
        if "extrapolated" in r:
            e = r["extrapolated"]
            for st in ("synth", "build", "stream"):
                v = e[st]
                print(
                    f"{e['events'] / 1e9:5.1f}B {st:8s} {v['wall_seconds']:9.0f} {'(extrap.)':>12s} "
                    f"{v['peak_pss_gb']:12.2f} {v['peak_rss_gb']:12.2f} {v.get('disk_gb', 0):8.2f} "
                    f"{v.get('peak_disk_gb', 0):10.2f}"
                )
            continue
        for st in ("synth", "build", "stream"):
            v = r[st]
            rate = v.get("events_per_s") or v.get("interactions_per_s") or 0
            print(
                f"{r['size']:>6s} {st:8s} {v['wall_seconds']:9.1f} {rate:12,.0f} {v['peak_pss_gb']:12.2f} "
                f"{v['peak_rss_gb']:12.2f} {v.get('disk_gb', 0):8.2f} {v.get('peak_disk_gb', 0):10.2f}"
            )


if __name__ == "__main__":
    main()
