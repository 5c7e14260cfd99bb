"""How many tasks each host of the Ray cluster ran, per job, from the task events the GCS keeps.

    python infra/box/ray_tasks.py            # every finished job of the cluster at $RAY_ADDRESS
    python infra/box/ray_tasks.py --last     # only the most recent job before this one

The state API (`ray list tasks`) reads the same events through the dashboard, which the box does not run.
Counts the tasks (`@ray.remote` functions: Ray Data's read / map / shuffle work) that reached FINISHED or
FAILED, by the node they ran on; actor method calls (Ray Data's 0-CPU bookkeeping actors) are counted
apart. `--require-hosts N`: exit 1 unless tasks ran on at least N hosts (per job shown).
"""

import argparse
import collections
import sys

import ray
from ray._private.state import state
from ray.core.generated import common_pb2, gcs_pb2

DONE = {common_pb2.TaskStatus.FINISHED, common_pb2.TaskStatus.FAILED}
KINDS = {common_pb2.TaskType.NORMAL_TASK: "tasks", common_pb2.TaskType.ACTOR_TASK: "actor calls"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--last", action="store_true", help="only the most recent job before this one")
    p.add_argument("--require-hosts", type=int, default=0, help="fail unless tasks ran on this many hosts")
    args = p.parse_args()
    ray.init(logging_level="ERROR")
    me = ray.get_runtime_context().get_job_id()
    ip = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    events = [gcs_pb2.TaskEvents.FromString(e) for e in state._connect_and_get_accessor().get_task_events()]

    node_of: dict[bytes, str] = {}  # task attempt -> node (the node id comes with a state update)
    done: set[bytes] = set()
    job_of: dict[bytes, tuple[str, str]] = {}
    for e in events:
        key = e.task_id + e.attempt_number.to_bytes(4, "little")
        if e.HasField("task_info"):
            if e.task_info.type not in KINDS:
                continue
            job_of[key] = (e.job_id.hex(), KINDS[e.task_info.type])
        if e.HasField("state_updates"):
            if e.state_updates.node_id:
                node_of[key] = ip.get(e.state_updates.node_id.hex(), e.state_updates.node_id.hex()[:8])
            if any(s in DONE for s in e.state_updates.state_ts_ns):
                done.add(key)

    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    calls: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for key, (job, kind) in job_of.items():
        if key in done and job != me:
            (counts if kind == "tasks" else calls)[job][node_of.get(key, "?")] += 1
    jobs = sorted(counts, key=lambda j: int(j, 16))
    if args.last:
        jobs = jobs[-1:]
    if not jobs:
        print("no finished tasks recorded", file=sys.stderr)
        return 1
    ok = True
    for job in jobs:
        per_host = ", ".join(f"{host}: {n}" for host, n in sorted(counts[job].items()))
        actor = ", ".join(f"{host}: {n}" for host, n in sorted(calls[job].items()))
        print(f"job {job}: {sum(counts[job].values())} tasks ({per_host}); actor calls ({actor or 'none'})")
        ok = ok and len(counts[job]) >= args.require_hosts
    if not ok:
        print(f"tasks ran on fewer than {args.require_hosts} hosts", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
