"""TorchX components: resources and the command line, nothing else.

    torchx run -s local_cwd jobs/components.py:train --preset cpu-demo --nproc_per_node 2
    torchx run -s kubernetes --dryrun jobs/components.py:train --preset ml-20m --nnodes 4 --gpu 8 ...
    torchx run -s slurm      --dryrun jobs/components.py:train ...

Each replica runs `torchrun ... -m jobs.cli train ...`; the trainer finds its rank from torchrun's
environment (gloo on CPU, nccl with `--gpu`). Every attempt of a job trains in the same run directory
(`run_dir`, default `runs/<name>`: stable per job name) with `resume=true`, so a retry, or the same job
submitted again, continues from the last complete checkpoint and the same MLflow run; the first attempt
finds none and starts fresh. On several nodes `run_dir` must be on storage every node mounts.

Retries, `max_retries` = N:
  - torchrun `--max-restarts N`: when a worker dies, torchrun stops the others and starts them all again
    (honoured by every scheduler, `local_cwd` included, which has no retries of its own);
  - the scheduler's own retry (Volcano `maxRetry`, Slurm requeue): a lost node or a failed torchrun.
A whole node lost: torchrun on the others restarts in place and waits `join_timeout` for the lost node's
agent to rejoin; when it does not, torchrun fails and the scheduler's retry starts the job on every node
again (on Slurm once the node is back in service).
"""

# No `from __future__ import annotations` here: TorchX reads the annotations at runtime to parse the
# component arguments (with string annotations every argument fails with "ValueError: Unknown").

from typing import Dict, Optional

import torchx.specs as specs
from torchx.components.dist import ddp

DEFAULT_IMAGE = "fuxi-pipeline:latest"  # built from infra/Dockerfile
RDZV_PORT = 29500  # ddp()'s default
# evaluated by the replica's shell (`$$` is TorchX's escape for `$`): 29500..30499 by Slurm job id
SLURM_RDZV_PORT = f"$$(({RDZV_PORT} + $${{SLURM_JOB_ID:-0}} % 1000))"


def train(
    *overrides: str,
    preset: str = "cpu-demo",
    data: Optional[str] = None,
    run_dir: Optional[str] = None,
    epochs: Optional[int] = None,
    nnodes: int = 1,
    nproc_per_node: int = 1,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    image: str = DEFAULT_IMAGE,
    tracking_uri: Optional[str] = None,
    parent_run_id: Optional[str] = None,
    max_retries: int = 0,
    join_timeout: int = 600,
    env: Optional[Dict[str, str]] = None,
    name: str = "fuxi-train",
) -> specs.AppDef:
    """Train FuXi-alpha (or a baseline) with `fuxi train`.

    Args:
        overrides: config overrides KEY=VALUE, e.g. model.num_layers=4 loss.num_negatives=256
        preset: named config (see `fuxi presets`)
        data: sequence Parquet file or shard directory (overrides data.source)
        run_dir: checkpoint/run directory shared by all replicas and by retries (default runs/<name>)
        epochs: number of epochs (overrides the preset)
        nnodes: number of nodes (replicas)
        nproc_per_node: processes per node (one per GPU on GPU nodes)
        cpu: CPUs per replica
        gpu: GPUs per replica
        memMB: memory per replica in MB
        image: container image (ignored by local_cwd)
        tracking_uri: MLflow tracking URI (else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)
        parent_run_id: MLflow parent run (sweeps)
        max_retries: restarts after a failure (torchrun's and the scheduler's); each resumes from the last
            complete checkpoint
        join_timeout: seconds torchrun waits for every node to join a rendezvous, the first one and the
            one after an in-place restart: a node lost for good fails the job this long after the loss,
            and the scheduler's retry takes over
        env: extra environment variables
        name: job name
    """
    args = ["train", "--preset", preset]
    if data:
        args += ["--data", data]
    args += ["--set", f"run_dir={run_dir or f'runs/{name}'}", "--set", "resume=true"]
    if gpu > 0:
        args += ["--device", "cuda"]
    if epochs is not None:
        args += ["--set", f"epochs={epochs}"]
    if parent_run_id:
        args += ["--set", f"tracking.parent_run_id={parent_run_id}"]
    for item in overrides:
        args += ["--set", item]
    job_env = {
        "OMP_NUM_THREADS": str(max(1, cpu // max(nproc_per_node, 1))),
        # each torchrun attempt gets a fresh store: with the rendezvous store shared (the default), the
        # workers of a restart can read the previous attempt's addresses and fail to connect (Gloo
        # connectFullMesh "Connection refused"; pytorch/pytorch#135712)
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
    }
    if tracking_uri:
        job_env["MLFLOW_TRACKING_URI"] = tracking_uri
    job_env.update(env or {})
    app = ddp(
        *args,
        m="jobs.cli",
        image=image,
        name=name,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=f"{nnodes}x{nproc_per_node}",
        env=job_env,
        max_retries=max_retries,
    )
    for role in app.roles:
        # the rendezvous port: on Slurm, two jobs can share a node (1 CPU a rank), and with ddp()'s fixed
        # 29500 the second job's rendezvous store fails to bind or joins the first one's; offset it by the
        # job id there (29500 elsewhere: the shell default when SLURM_JOB_ID is unset)
        role.args = [a.replace(f":{RDZV_PORT} ", f":{SLURM_RDZV_PORT} ") for a in role.args]
        # ddp() has no torchrun setting for restarts or the rendezvous wait: add them to the command it built
        torchrun = f"torchrun --rdzv_conf join_timeout={join_timeout} "
        if max_retries > 0:
            torchrun += f"--max-restarts {max_retries} "
        role.args = [a.replace("torchrun ", torchrun, 1) for a in role.args]
    return app
