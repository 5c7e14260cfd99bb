"""Checks of a `fuxi nightly` date run on the box with its workdir on the object store (box-test step 4).

    python infra/box/nightly_checks.py date WORKDIR MODEL DATE [PREV_DATE]   # after a date's run
    python infra/box/nightly_checks.py facts MODEL                           # versions and alias, one line

Runs inside the box (`box.sh exec head ...`: the tracking server and the S3 endpoint in its environment).
`date` reads the date's state file from WORKDIR (s3://...) and the tracking server, and checks:
  * every step of the date is done;
  * the sequences, the training run directory, its checkpoint, the registered version's checkpoint and
    the MLflow artifacts (the run's and the logged model's) are all under s3:// (nothing on a local disk);
  * with PREV_DATE: the train step warm-started from the version PREV_DATE registered (the state's
    `init_version`, and the trainer's own `init_checkpoint` tag on its MLflow run);
  * the promotion rule: the version is `champion` iff there was none or its validation metric beats the
    champion's, both measured by `evaluate` on the same window; otherwise the alias stays where it was.
It prints one line of facts, or one line naming the failed check (exit 1).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import storage
from jobs.nightly import STEPS


class CheckFailed(Exception):
    pass


def state(workdir: str, date: str) -> dict[str, Any]:
    uri = storage.join(workdir, "state", f"{date}.json")
    if not storage.exists(uri):
        raise CheckFailed(f"{date}: no state file {uri}")
    return json.loads(storage.read_bytes(uri))


def outputs(st: dict[str, Any], step: str) -> dict[str, Any]:
    rec = st["steps"].get(step, {})
    if rec.get("status") != "done":
        raise CheckFailed(f"{st['date']}: step {step} is {rec.get('status', 'missing')}, not done")
    return rec["outputs"]


def on_store(what: str, uri: str | None, prefix: str) -> None:
    if not str(uri or "").startswith(prefix):
        raise CheckFailed(f"{what} is {uri!r}, not under {prefix}")


def champion_version(client: Any, model: str) -> str | None:
    from serving import registry

    champ = registry.champion(client, model)
    return None if champ is None else str(champ.version)


def check_date(workdir: str, model: str, date: str, prev: str | None) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    st = state(workdir, date)
    for step in STEPS:
        outputs(st, step)
    seq, trained = outputs(st, "update_sequences"), outputs(st, "train")
    measured, promoted = outputs(st, "evaluate"), outputs(st, "register_promote")
    on_store("the sequences", seq["sequences"], workdir)
    on_store("the trained checkpoint", trained["checkpoint"], storage.join(workdir, "runs", date))
    run = client.get_run(trained["run_id"])
    on_store("the run's run_dir", run.data.params.get("run_dir"), storage.join(workdir, "runs", date))
    on_store("the run's data.source", run.data.params.get("data.source"), workdir)
    on_store("the run's artifacts", run.info.artifact_uri, "s3://")
    version = client.get_model_version(model, promoted["version"])
    on_store(f"v{version.version}'s checkpoint tag", version.tags.get("checkpoint"), workdir)
    logged = client.get_logged_model(str(version.source).removeprefix("models:/"))
    on_store(f"v{version.version}'s model artifacts", logged.artifact_location, "s3://")

    if prev is not None:
        prev_version = outputs(state(workdir, prev), "register_promote")["version"]
        if trained.get("init_version") != prev_version:
            cold = trained.get("cold_start_reason")
            raise CheckFailed(
                f"{date}: warm start from v{trained.get('init_version')} (cold start: {cold}),"
                f" not from {prev}'s v{prev_version}"
            )
        tag = run.data.tags.get("init_checkpoint", "")
        on_store(
            f"{date}'s init_checkpoint tag", tag, storage.join(workdir, "runs", date, f"v{prev_version}")
        )

    key = measured["metric"]
    before = measured["champion_version"]  # the champion `evaluate` measured against (None: none yet)
    better = before is None or measured["candidate"][key] > measured["champion"][key]
    expected = promoted["version"] if better else before
    alias = champion_version(client, model)
    against = f"champion v{before} {measured['champion'][key]:.4f}" if before else "no champion"
    candidate = f"v{promoted['version']} {key} {measured['candidate'][key]:.4f}"
    if bool(promoted["decision"]["promoted"]) != better or alias != expected:
        raise CheckFailed(
            f"{date}: candidate {candidate} vs {against}: champion should be v{expected}, is v{alias}"
            f" (decision: {promoted['decision']['reason']})"
        )
    start = f"warm from v{trained['init_version']}" if trained.get("init_version") else "cold start"
    return (
        f"{date}: {start}, Slurm job {trained['seconds']} s; candidate {candidate} vs {against}:"
        f" champion v{alias}"
    )


def facts(model: str) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{model}'"))
    return f"versions {versions}, champion v{champion_version(client, model)}"


def main(argv: list[str]) -> int:
    try:
        if argv[:1] == ["date"] and len(argv) in (4, 5):
            print(check_date(argv[1], argv[2], argv[3], argv[4] if len(argv) == 5 else None))
        elif argv[:1] == ["facts"] and len(argv) == 2:
            print(facts(argv[1]))
        else:
            print(__doc__.split("\n\n")[1], file=sys.stderr)
            return 2
    except CheckFailed as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
