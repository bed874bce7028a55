"""The MLflow UI as its users see it, in headless Chromium: a sweep's runs as a tree (the parent
expanded), and one cell's run page (datasets, logged model, system metrics). Screenshots go to
--out. Needs Debian's chromium and chromium-driver and `pip install selenium` (not project
dependencies: this is a check a developer runs, `make ui-check`).

    python scripts/mlflow_ui_check.py --tracking-uri sqlite:///$PWD/mlflow.db --out results/ui
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {seconds:.0f}s")


def browser() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1700,1000"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--experiment", default="benchmark")
    parser.add_argument("--out", type=Path, default=Path("results/ui"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    experiment = mlflow.MlflowClient(args.tracking_uri).get_experiment_by_name(args.experiment)
    cells = mlflow.MlflowClient(args.tracking_uri).search_runs(
        [experiment.experiment_id],
        "tags.`benchmark.kind` = 'cell'",
        max_results=1,
        order_by=["metrics.wall_time_s DESC"],  # the longest cell: the most system metrics
    )
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", args.tracking_uri,
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{base}/health")
        driver = browser()
        try:
            driver.get(f"{base}/#/experiments/{experiment.experiment_id}/runs")
            time.sleep(8)
            for close in driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
                if close.is_displayed():
                    close.click()  # the assistant's side panel
            expanders = driver.find_elements(
                By.CSS_SELECTOR, "button[data-component-id$='runnamecellrenderer.tsx_46']"
            )
            for button in expanders:  # open each sweep's parent run to show its cells
                button.click()
                time.sleep(1)
            time.sleep(3)
            driver.save_screenshot(str(args.out / "mlflow-ui-sweep.png"))
            run = cells[0].info.run_id
            driver.get(f"{base}/#/experiments/{experiment.experiment_id}/runs/{run}")
            time.sleep(8)
            driver.save_screenshot(str(args.out / "mlflow-ui-run.png"))
            driver.get(f"{base}/#/experiments/{experiment.experiment_id}/runs/{run}/system-metrics")
            time.sleep(8)
            driver.save_screenshot(str(args.out / "mlflow-ui-system-metrics.png"))
        finally:
            driver.quit()
    finally:
        server.terminate()
        server.wait(timeout=30)
    for name in ("sweep", "run", "system-metrics"):
        print(f"wrote {args.out / f'mlflow-ui-{name}.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
