"""Locust client of `benchmarks/bench_serving.py --part http` (a subprocess of it: locust needs gevent's
monkey patching before anything else is imported, which the benchmark's own process must not get).

    .venv/bin/python benchmarks/locust_serving.py --host http://127.0.0.1:5000 --users 8 --seconds 20 \
        --bodies bodies.json --out stats.json

Headless, in-process locust (`Environment` + local runner): `--users` concurrent users, each POSTing one
of the request bodies (JSON list in `--bodies`) to /invocations with no wait between requests. The first
`--warmup` seconds are dropped (the users spawn at once, then the stats are reset). Writes requests,
non-2xx count, requests/s, p50/p99 latency (ms) to `--out`.

The lock pins urllib3 1.26, whose `urllib3.util` lacks `create_urllib3_context`, which locust 2.47's
`locust.clients` imports (for HttpUser); the name exists in `urllib3.util.ssl_` and is aliased before
locust is imported. FastHttpUser (geventhttpclient) does not use urllib3.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
import urllib3.util  # noqa: E402
import urllib3.util.ssl_  # noqa: E402

if not hasattr(urllib3.util, "create_urllib3_context"):
    urllib3.util.create_urllib3_context = urllib3.util.ssl_.create_urllib3_context

from locust import FastHttpUser, constant, task  # noqa: E402
from locust.env import Environment  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", required=True)
    ap.add_argument("--users", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--warmup", type=float, default=2)
    ap.add_argument("--bodies", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    bodies = [json.dumps(b) for b in json.loads(Path(args.bodies).read_text())]

    class Recommend(FastHttpUser):
        host = args.host
        wait_time = constant(0)

        @task
        def invocations(self) -> None:
            with self.client.post(
                "/invocations",
                data=random.choice(bodies),
                headers={"Content-Type": "application/json"},
                catch_response=True,
            ) as r:
                if not 200 <= r.status_code < 300:
                    r.failure(f"HTTP {r.status_code}")

    env = Environment(user_classes=[Recommend])
    runner = env.create_local_runner()
    runner.start(args.users, spawn_rate=args.users)
    gevent.sleep(args.warmup)
    env.stats.reset_all()
    gevent.sleep(args.seconds)
    total = env.stats.total
    result = {
        "users": args.users,
        "seconds": args.seconds,
        "requests": total.num_requests,
        "non_2xx": total.num_failures,
        "rps": total.num_requests / args.seconds,
        "p50_ms": total.get_response_time_percentile(0.5),
        "p99_ms": total.get_response_time_percentile(0.99),
        "mean_ms": total.avg_response_time,
    }
    runner.quit()
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
