"""hydra/launcher=slurm: the grid as SLURM jobs through hydra-submitit-launcher, with the knobs a
cluster needs; hydra/launcher=slurm_local runs the same code path as local processes.

The end-to-end tests of `slurm` run against a real one-node cluster on 127.0.0.1: the one of
scripts/slurm.sh (`make slurm-up`; `.ci/run` starts it before the suite). The fixture starts it
when it is installed and down (seconds) and installs nothing; where it cannot start (not root,
not installed, another cluster's slurm.conf) those tests are skipped with one line saying why.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.experimental.callback import Callback
from hydra.utils import get_class
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher
from omegaconf import DictConfig

from benchmark.config.schema import register_configs
from benchmark.models.resume import LAST_FILE
from benchmark.orchestration.launcher import ReportsCellsHere
from benchmark.tracking.identity import RESUMED_FROM_TAG, RUN_FILE
from tests.conftest import CONF, PROJECT, TINY
from tests.test_e2e import benchmark, runs_in

KNOBS = {
    "partition": "gpu",
    "account": "vision",
    "timeout_min": 90,
    "nodes": 1,
    "gpus_per_node": 4,
    "tasks_per_node": 4,
    "cpus_per_task": 6,
    "mem_gb": 200,
    "array_parallelism": 8,
}


def launcher_config(name: str, *overrides: str) -> DictConfig:
    """hydra.launcher as `python -m benchmark -m hydra/launcher=NAME ...` composes it."""
    register_configs()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[f"hydra/launcher={name}", *overrides],
            return_hydra_config=True,
        )
    return cfg.hydra.launcher


def test_the_slurm_launcher_composes_with_its_knobs():
    defaults = launcher_config("slurm")
    assert defaults.tasks_per_node == 1 and defaults.gpus_per_node == 1
    assert defaults.submitit_folder.endswith("/.submitit/%j")
    launcher = launcher_config("slurm", *(f"hydra.launcher.{k}={v}" for k, v in KNOBS.items()))
    assert {key: launcher[key] for key in KNOBS} == KNOBS
    cls = get_class(launcher._target_)
    assert issubclass(cls, SlurmLauncher) and issubclass(cls, ReportsCellsHere)
    local = get_class(launcher_config("slurm_local")._target_)
    assert issubclass(local, LocalLauncher) and issubclass(local, ReportsCellsHere)


def test_the_slurm_launcher_refuses_a_misspelt_knob():
    with pytest.raises(Exception, match="partitoin"):
        launcher_config("slurm", "hydra.launcher.partitoin=gpu")


@pytest.mark.e2e
def test_a_grid_through_submitit_processes_finishes_and_is_summarised(
    tmp_path, shared_data, tmp_store
):
    swept = benchmark(
        "benchmark",
        "-m",
        "hydra/launcher=slurm_local",
        "seed=0,1",
        "strategy=finetune",
        *TINY,
        cwd=tmp_path,
        data_root=shared_data,
    )
    assert swept.returncode == 0, swept.stdout[-3000:] + swept.stderr[-3000:]
    assert "Submitit 'local' sweep output dir" in swept.stdout
    # Each cell's JobReturn came back to the sweep's process and was counted there.
    assert "Sweep done: 2 cells: 2 finished, 0 skipped, 0 failed." in swept.stdout
    # While submitit waited, each cell's end was said as it came: k/N, elapsed, time left.
    assert "[1/2 done, " in swept.stdout and "about" in swept.stdout
    assert "[2/2 done, " in swept.stdout
    runs = runs_in(tmp_path / "mlflow.db")
    assert sorted(runs.status) == ["FINISHED", "FINISHED"]
    assert sorted(runs["params.seed"]) == ["0", "1"] and runs["metrics.test_acc"].notna().all()
    assert runs["tags.sweep"].nunique() == 1
    assert len(list((tmp_path / "multirun").rglob("outcome.json"))) == 2


class ExitMidCell(Callback):
    """Test-only, through Hydra's callbacks (`+hydra.callbacks.exit._target_=tests.test_slurm.
    ExitMidCell +hydra.callbacks.exit.seed=1`): in the SLURM job of the cell with that seed, the
    process ends with os._exit(9) as soon as the cell's MLflow run is open. Nothing is written:
    no outcome, no submitit result, the run left RUNNING (a segfault, an OOM kill)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or config.seed != self.seed:
            return
        run_file = Path(config.hydra.runtime.output_dir) / RUN_FILE

        def exit_once_open() -> None:
            while not run_file.exists():
                time.sleep(0.05)
            os._exit(9)

        threading.Thread(target=exit_once_open, daemon=True).start()


# ---------------------------------------------------------------- on a real SLURM cluster

# The jobs' resources on the test cluster: one CPU each (two cells at once on two cores), no GPU.
ON_SLURM = [
    "hydra/launcher=slurm",
    "hydra.launcher.partition=debug",
    "hydra.launcher.gpus_per_node=null",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=2",
    "hydra.launcher.timeout_min=10",
]


@pytest.fixture(scope="module")
def slurm_cluster() -> str | None:
    """The one-node cluster of scripts/slurm.sh, up (started here if it is installed): None,
    else why not, for `on_the_cluster`."""
    up = subprocess.run(
        [str(PROJECT / "scripts" / "slurm.sh"), "up"],
        env={**os.environ, "SLURM_INSTALL": "0"},  # a test installs nothing
        capture_output=True,
        text=True,
        timeout=300,
    )
    if up.returncode == 0:
        return None
    said = (up.stderr.strip().splitlines() or ["no output"])[-1].removeprefix("slurm.sh: ")
    return f"no SLURM cluster ({said}); as root, `make slurm-up` starts one"


def on_the_cluster(why_not: str | None) -> None:
    """Skips a test of the cluster where there is none: raised here rather than in the fixture,
    so that every such test is skipped at this one place, said in one line by pytest -ra."""
    if why_not is not None:
        pytest.skip(why_not)


def sweep_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(PROJECT), **extra}
    env.pop("MLFLOW_TRACKING_URI", None)
    # benchmark.tracking.identity reads os.environ while MLflow's telemetry thread may unset its
    # session variable (KeyError '_MLFLOW_TELEMETRY_SESSION_ID' in a cell, now and then): not
    # what these tests are about.
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    return env


class Sweep:
    """`python -m benchmark -m <ON_SLURM> <args>`, started in `cwd`; its output in a file."""

    def __init__(self, *args: str, cwd: Path, data_root: Path, **env: str) -> None:
        self.log = cwd / f"sweep-{len(list(cwd.glob('sweep-*.log')))}.log"
        with self.log.open("w") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "benchmark", "-m", *ON_SLURM, *args],
                cwd=cwd,
                env=sweep_env(BENCHMARK_DATA_ROOT=str(data_root), **env),
                stdout=output,
                stderr=subprocess.STDOUT,
            )

    def output(self) -> str:
        return self.log.read_text()

    def end(self, timeout: float = 300) -> tuple[int, str]:
        """Its exit code and output, once it has ended (killed after `timeout`)."""
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            subprocess.run(["scancel", *self.jobs().values()], check=False)
            said = f"the sweep still waits after {timeout} s:\n{self.output()[-5000:]}"
            raise AssertionError(said) from None
        return code, self.output()

    def jobs(self) -> dict[int, str]:
        """The SLURM job of each cell, from its log (`#0 job 12_0: seed=0 ...`)."""
        return {int(n): job for n, job in re.findall(r"#(\d+) job (\S+):", self.output())}


def accounted(job: str, fields: str = "State") -> str:
    """What SLURM's accounting (sacct) says of a job."""
    said = subprocess.run(
        ["sacct", "--noheader", "--parsable2", "--allocations", f"--jobs={job}",
         f"--format={fields}"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return said.stdout.strip()


def squeued(job: str) -> str:
    """squeue's state of a job ("" once it is no longer listed)."""
    said = subprocess.run(["squeue", "--noheader", "--states=all", f"--jobs={job}", "--format=%T"],
                          capture_output=True, text=True, check=False)  # fmt: skip
    return said.stdout.strip()


def wait_until(condition: Any, what: str, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"still no {what} after {timeout} s"
        time.sleep(0.2)
    return value


@pytest.mark.e2e
def test_a_grid_on_slurm_runs_each_cell_as_a_job(tmp_path, shared_data, tmp_store, slurm_cluster):
    """Three cells, three jobs of the real scheduler: FINISHED runs under the sweep's parent
    run, COMPLETED in sacct, with the resources asked for in hydra.launcher."""
    on_the_cluster(slurm_cluster)
    sweep = Sweep("seed=0,1,2", "strategy=finetune", *TINY, cwd=tmp_path, data_root=shared_data)
    code, output = sweep.end()
    assert code == 0, output[-5000:]
    assert "Sweep done: 3 cells: 3 finished, 0 skipped, 0 failed." in output, output[-3000:]
    assert "[3/3 done, " in output  # each cell's end, said as it came
    jobs = sweep.jobs()
    assert sorted(jobs) == [0, 1, 2] and len(set(jobs.values())) == 3, output
    for job in jobs.values():  # partition, CPUs, memory (MB) and time limit as configured
        assert accounted(job, "State,Partition,ReqCPUS,ReqMem,Timelimit") == (
            "COMPLETED|debug|1|2G|00:10:00"
        ), job
    runs = runs_in(tmp_path / "mlflow.db")
    assert sorted(runs.status) == ["FINISHED"] * 3
    assert sorted(runs["params.seed"]) == ["0", "1", "2"]
    (parent,) = runs_in(tmp_path / "mlflow.db", kind="sweep").itertuples()
    assert parent.status == "FINISHED"
    assert set(runs["tags.mlflow.parentRunId"]) == {parent.run_id}
    assert len(list((tmp_path / "multirun").rglob("outcome.json"))) == 3


@pytest.mark.e2e
def test_jobs_the_scheduler_refuses_stop_the_sweep_in_one_line(
    tmp_path, shared_data, tmp_store, slurm_cluster
):
    """More CPUs per job than the node has: sbatch refuses the jobs (the cluster enforces the
    partition's limits), and the sweep stops at once with its message, no cell run."""
    on_the_cluster(slurm_cluster)
    sweep = Sweep("seed=0,1", *TINY, "hydra.launcher.cpus_per_task=512", cwd=tmp_path,
                  data_root=shared_data)  # fmt: skip
    code, output = sweep.end(timeout=120)
    assert code == 1, output[-3000:]
    assert "The scheduler refused the sweep's jobs: sbatch: error: " in output, output[-3000:]
    assert "Traceback" not in output and not sweep.jobs()
    assert runs_in(tmp_path / "mlflow.db").empty


@pytest.mark.e2e
def test_jobs_the_scheduler_ends_fail_their_cells_and_a_relaunch_completes_them(
    tmp_path, shared_data, tmp_store, slurm_cluster
):
    """Cell 0's job is cancelled (scancel) in the middle of its fit; cell 1's process ends with
    os._exit(9) once its run is open, writing nothing (ExitMidCell). Each is one failed cell,
    its run FAILED with the scheduler's word, while the sweep neither stops at the first nor
    waits forever for the second; it exits non-zero. Relaunched, both cells run again and
    finish."""
    on_the_cluster(slurm_cluster)
    longer = ("trainer.max_epochs", "trainer.limit_train_batches")
    cells = ["seed=0,1", "strategy=finetune", *(o for o in TINY if not o.startswith(longer))]
    cells += ["trainer.max_epochs=3", "trainer.limit_train_batches=2"]
    exit_mid_cell = [
        "+hydra.callbacks.exit._target_=tests.test_slurm.ExitMidCell",
        "+hydra.callbacks.exit.seed=1",
    ]
    sweep = Sweep(*cells, *exit_mid_cell, cwd=tmp_path, data_root=shared_data)
    folder = wait_until(lambda: next((tmp_path / "multirun").glob("*/*/0_*"), None), "folder")
    run_file = folder / RUN_FILE
    wait_until(run_file.exists, "run for cell 0")
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = json.loads(run_file.read_text())["run_id"]
    # Mid-fit: its first epoch logged and kept (the last checkpoint), two to go.
    wait_until(lambda: "train_loss" in client.get_run(run_id).data.metrics, "epoch of cell 0")
    wait_until((folder / "checkpoints" / LAST_FILE).exists, "last checkpoint of cell 0")
    subprocess.run(["scancel", sweep.jobs()[0]], check=True)
    code, output = sweep.end()
    assert code != 0, output[-5000:]
    assert "Sweep done: 2 cells: 0 finished, 0 skipped, 2 failed." in output, output[-5000:]
    jobs = sweep.jobs()
    assert accounted(jobs[0]).startswith("CANCELLED") and accounted(jobs[1]) == "FAILED"
    runs = runs_in(tmp_path / "mlflow.db")  # cell 1 died before it logged its params
    # (tags.cell ends with the seed; the run name goes on with the overrides)
    runs = runs.set_index(runs["tags.cell"].str.extract(r"seed=(\d)$")[0])
    assert set(runs.status) == {"FAILED"}, runs.status
    cancelled, died = runs.loc["0", "tags.error"], runs.loc["1", "tags.error"]
    assert f"SLURM job {jobs[0]} CANCELLED by 0 (scancel" in cancelled, cancelled
    assert "terminated by signal 15 (SIGTERM)" in cancelled, cancelled  # the cell's own word
    assert f"SLURM job {jobs[1]} FAILED (exit code 9)" in died, died
    assert "Failed: seed=1 " in output and f"SLURM job {jobs[1]} FAILED" in output

    again = Sweep(*cells, cwd=tmp_path, data_root=shared_data)
    code, output = again.end()
    assert code == 0, output[-5000:]
    assert "Sweep done: 2 cells: 2 finished, 0 skipped, 0 failed." in output, output[-3000:]
    assert {accounted(job) for job in again.jobs().values()} == {"COMPLETED"}
    runs = runs_in(tmp_path / "mlflow.db")
    assert sorted(runs.status) == ["FAILED", "FAILED", "FINISHED", "FINISHED"]
    # The cancelled cell resumed from its last checkpoint (its epochs go on, not restart); the
    # one that died before its fit began runs from its start.
    finished = runs[runs.status == "FINISHED"]
    finished = finished.set_index(finished["tags.cell"].str.extract(r"seed=(\d)$")[0])
    assert finished.loc["0", f"tags.{RESUMED_FROM_TAG}"] == run_id
    assert finished.loc["0", "metrics.resumed_at_epoch"] >= 1
    assert finished.loc["0", "metrics.epochs_run"] == 3
    assert pd.isna(finished.loc["1"].get(f"tags.{RESUMED_FROM_TAG}"))


@pytest.mark.e2e
def test_a_job_the_scheduler_warns_is_requeued_and_its_cell_resumes(
    tmp_path, shared_data, tmp_store, slurm_cluster
):
    """SLURM's warning (SIGUSR2, as before a time limit or for a preemption) mid-fit: the job is
    requeued through submitit, its cell's run ends FAILED `Requeued: preempted ...`, and the job,
    started again under the same id, resumes the cell from its last checkpoint; the sweep waits
    for it and ends with the cell finished."""
    on_the_cluster(slurm_cluster)
    longer = ("trainer.max_epochs", "trainer.limit_train_batches")
    cells = ["strategy=finetune", *(o for o in TINY if not o.startswith(longer))]
    sweep = Sweep(*cells, "trainer.max_epochs=12", "trainer.limit_train_batches=2",
                  "hydra.launcher.timeout_min=30",  # far from its limit: a preemption's warning
                  cwd=tmp_path, data_root=shared_data)  # fmt: skip
    folder = wait_until(lambda: next((tmp_path / "multirun").glob("*/*/0_*"), None), "folder")
    wait_until((folder / "checkpoints" / LAST_FILE).exists, "last checkpoint of the cell")
    run_id = json.loads((folder / RUN_FILE).read_text())["run_id"]
    job = sweep.jobs()[0]
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    # Requeued, the job waits about two minutes before SLURM starts it again: start it now.
    wait_until(lambda: "PENDING" in squeued(job), "the job pending again")
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    code, output = sweep.end()
    assert "cell failed" not in output, output[-3000:]  # the sweep waited for the requeued job
    assert code == 0, output[-5000:]
    assert "Sweep done: 1 cells: 1 finished, 0 skipped, 0 failed." in output, output[-3000:]
    states = subprocess.run(
        ["sacct", "--noheader", "--allocations", "--duplicates", f"--jobs={job}", "--format=State"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert states == ["REQUEUED", "COMPLETED"], states  # one job, started twice
    runs = runs_in(tmp_path / "mlflow.db").sort_values("start_time")
    assert list(runs.status) == ["FAILED", "FINISHED"]
    cut, resumed = runs.iloc[0], runs.iloc[1]
    assert cut.run_id == run_id
    assert cut["tags.error"].startswith("Requeued: preempted: SLURM signalled the job"), cut
    assert "the job is requeued (requeue 1)" in cut["tags.error"]
    assert resumed[f"tags.{RESUMED_FROM_TAG}"] == run_id
    assert resumed["metrics.resumed_at_epoch"] >= 1
    assert resumed["metrics.epochs_run"] == 12


@pytest.mark.e2e
@pytest.mark.slow  # 40-70 s, most of it waiting for slurmctld's signal: out of the default suite
def test_a_job_past_its_time_limit_says_so_even_without_accounting(
    tmp_path, shared_data, tmp_store, slurm_cluster
):
    """A cell longer than its job's time limit (1 minute). SLURM signals the job
    signal_delay_s before the limit (slurmctld looks every 30 s, 30 s ahead: with 10, between 20
    and 50 s after the start, once the cell's run is open): the cell ends FAILED, its run's
    error says timed out. `sacct` fails here (no accounting, as without slurmdbd): the sweep
    still ends, with the cell failed, instead of waiting for a result that never comes."""
    on_the_cluster(slurm_cluster)
    no_accounting = tmp_path / "bin"
    no_accounting.mkdir()
    (no_accounting / "sacct").write_text("#!/bin/sh\necho 'sacct: no accounting' >&2\nexit 1\n")
    (no_accounting / "sacct").chmod(0o755)
    sweep = Sweep(
        "strategy=finetune",
        *(o for o in TINY if not o.startswith("trainer.max_epochs")),
        "trainer.max_epochs=1000",
        "hydra.launcher.timeout_min=1",
        "hydra.launcher.signal_delay_s=10",
        "hydra.launcher.max_num_timeout=0",  # not requeued: it says timed out
        cwd=tmp_path,
        data_root=shared_data,
        PATH=f"{no_accounting}:{os.environ['PATH']}",
    )
    code, output = sweep.end(timeout=240)
    assert code != 0, output[-5000:]
    assert "Sweep done: 1 cells: 0 finished, 0 skipped, 1 failed." in output, output[-5000:]
    (error,) = runs_in(tmp_path / "mlflow.db").loc[lambda r: r.status == "FAILED", "tags.error"]
    assert "timed out: the SLURM job neared its time limit" in error, error
    assert "(hydra.launcher.timeout_min=1)" in error, error
    assert f"SLURM job {sweep.jobs()[0]} FAILED" in error, error  # squeue's word, not sacct's
