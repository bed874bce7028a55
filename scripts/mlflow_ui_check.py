"""The MLflow UI as its users see it, in headless Chromium: the runs table that `make ui` opens
(benchmark.tools.ui: the machine-learning view, the cells by test accuracy with the accuracy
columns shown; checked: not MLflow's GenAI overview, and test_acc a column), a sweep's runs as a
tree (the parent expanded), and one cell's run page (datasets, logged model, system metrics).
Screenshots go to --out. Needs Debian's chromium and chromium-driver and `pip install selenium`
(not project dependencies: this is a check a developer runs, `make ui-check`).

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

from benchmark.tools import ui


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


def load(driver: webdriver.Chrome, url: str, seconds: float = 8) -> None:
    """`url` in a fresh page (the UI's routes are after `#`: a plain `get` of another route
    would only move the page already open, from a saved view to a page still loading)."""
    driver.get("about:blank")
    driver.get(url)
    time.sleep(seconds)


def close_side_panels(driver: webdriver.Chrome) -> None:
    for close in driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
        if close.is_displayed():
            close.click()  # the assistant's side panel


def check_runs_table(driver: webdriver.Chrome) -> None:
    """The page `make ui` opens is the runs table with its saved view applied (sorted by
    test_acc, the accuracy columns shown), not MLflow's GenAI overview."""
    headers = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "[role='columnheader']")]
    shown = " ".join(headers)
    missing = [c for c in ("Run Name", *ui.METRIC_COLUMNS[:2], "strategy") if c not in shown]
    if missing or "orderByKey=metrics" not in driver.current_url:
        raise SystemExit(
            f"the page `make ui` opens is not the runs table of its view: columns {headers}, "
            f"{missing} missing; at {driver.current_url}"
        )


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
    ui.share_view(args.tracking_uri, args.experiment)  # the view `make ui` opens
    server = subprocess.Popen(
        ui.server_command(args.tracking_uri, "127.0.0.1", port),  # as `make ui` starts it
        env=ui.server_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    ml = "workflowType=machine_learning"
    try:
        wait_for(f"{base}/health")
        driver = browser()
        try:
            load(driver, ui.runs_url(base, experiment.experiment_id), 10)  # `make ui` prints it
            close_side_panels(driver)
            driver.save_screenshot(str(args.out / "mlflow-ui-cells.png"))
            check_runs_table(driver)
            load(driver, f"{base}/#/experiments/{experiment.experiment_id}/runs?{ml}")
            close_side_panels(driver)
            expanders = driver.find_elements(
                By.CSS_SELECTOR, "button[data-component-id$='runnamecellrenderer.tsx_46']"
            )
            for button in expanders:  # open each sweep's parent run to show its cells
                button.click()
                time.sleep(1)
            time.sleep(3)
            driver.save_screenshot(str(args.out / "mlflow-ui-sweep.png"))
            run = cells[0].info.run_id
            load(driver, f"{base}/#/experiments/{experiment.experiment_id}/runs/{run}?{ml}")
            driver.save_screenshot(str(args.out / "mlflow-ui-run.png"))
            load(
                driver,
                f"{base}/#/experiments/{experiment.experiment_id}/runs/{run}/system-metrics?{ml}",
            )
            driver.save_screenshot(str(args.out / "mlflow-ui-system-metrics.png"))
        finally:
            driver.quit()
    finally:
        server.terminate()
        server.wait(timeout=30)
    for name in ("cells", "sweep", "run", "system-metrics"):
        print(f"wrote {args.out / f'mlflow-ui-{name}.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
