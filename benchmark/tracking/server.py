"""A tracking server (`tracking.uri=http://...`) that does not answer is said at once, in one line.

MLflow's HTTP client retries a refused connection for about 4 minutes by default (7 retries,
backoff factor 2) and waits up to 120 s for each answer, so a cell pointed at a server that is
down would sit silent for minutes before failing with a retry trace. Here:

- MLflow's retries are bounded (`HTTP_DEFAULTS`, about 30 s for a refused connection), unless
  the user set `MLFLOW_HTTP_REQUEST_*` themselves;
- before a process uses the store, `check_reachable` asks the server's `/health` once, with a
  short timeout, and raises `TrackingUnreachable` naming the URI and the fix;
- a cell whose server goes away mid-run fails with the same kind of one-line error
  (`explained`), and relaunching the sweep runs it again;
- the run such a cell could not end (the server was down) is ended FAILED, with the cell's error,
  instead of staying RUNNING (`benchmark.tracking.store.settle_failed_run`,
  `settle_abandoned_runs`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import requests

from benchmark.tracking.identity import redact

# Bounded defaults for MLflow's HTTP client: a refused connection is retried after 0, 4, 8 and
# 16 s (about 30 s in all), which rides out a quick restart of the server; an answer may take
# 60 s. A value the user set in the environment is kept.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}
HEALTH_TIMEOUT_S = 5.0
FIX = "start the server or set tracking.uri / MLFLOW_TRACKING_URI to one that answers"


class TrackingUnreachable(RuntimeError):
    """The tracking server did not answer: the message names the URI and the fix."""


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def bound_http_retries() -> None:
    """MLflow reads these at each request; the cells a launcher starts inherit them."""
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)


def retry_budget_s(env: Mapping[str, str] = os.environ) -> float:
    """How long MLflow keeps retrying a refused connection with the settings in `env` (urllib3:
    no wait before the first retry, then factor x 2^(n-1), at most 120 s each; without jitter)."""
    retries = int(env.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7"))
    factor = float(env.get("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "2"))
    return sum(min(120.0, factor * 2 ** (n - 1)) for n in range(2, retries + 1))


def request_timeout_s() -> float:
    return float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "120"))


def check_reachable(uri: str) -> None:
    """For a server URI: bound MLflow's retries, then GET <uri>/health once (HEALTH_TIMEOUT_S);
    TrackingUnreachable if it cannot be reached or a gateway says it is down. Other URIs (a
    SQLite file, a database) are left to MLflow."""
    if not is_server(uri):
        return
    bound_http_retries()
    try:
        answer = requests.get(
            f"{uri.rstrip('/')}/health", timeout=HEALTH_TIMEOUT_S, verify=_verify(), auth=_auth()
        )
    except requests.RequestException as error:
        raise TrackingUnreachable(
            f"MLflow tracking server {redact(uri)} is unreachable "
            f"({_reason(error, HEALTH_TIMEOUT_S)}): {FIX}."
        ) from None
    if answer.status_code in (502, 503, 504):  # a proxy in front of a server that is down
        raise TrackingUnreachable(
            f"MLflow tracking server {redact(uri)} is unavailable (GET /health: HTTP "
            f"{answer.status_code}): {FIX}."
        )
    check_authorised(uri)


# An API call every client may make: answered 401/403 by a server with authentication (MLflow's
# `--app-name basic-auth`), whose /health answers anyone.
PROBE = "api/2.0/mlflow/experiments/search?max_results=1"


def check_authorised(uri: str) -> None:
    """TrackingUnreachable in one line if the server refuses this client's credentials (those
    MLflow's client sends: MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN)."""
    user, password = (os.environ.get(f"MLFLOW_TRACKING_{n}") for n in ("USERNAME", "PASSWORD"))
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    try:
        answer = requests.get(
            f"{uri.rstrip('/')}/{PROBE}",
            timeout=HEALTH_TIMEOUT_S,
            verify=_verify(),
            auth=(user, password) if user and password else None,
            headers={"Authorization": f"Bearer {token}"} if token and not user else None,
        )
    except requests.RequestException:
        return  # /health answered: MLflow's own retries and errors take it from here
    if answer.status_code == 401:
        given = "were refused" if user or token else "are not set"
        raise TrackingUnreachable(
            f"MLflow tracking server {uri} requires a login (HTTP 401) and the credentials "
            f"{given}: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
            "MLFLOW_TRACKING_TOKEN) in the environment."
        )
    if answer.status_code == 403:
        said = answer.text.strip().splitlines()[0][:200] if answer.text.strip() else "forbidden"
        raise TrackingUnreachable(
            f"MLflow tracking server {uri} refuses this client (HTTP 403: {said}): "
            + (
                "start the server with --allowed-hosts naming this host name"
                if "host" in said.lower()
                else "ask its admin for permission on the experiments"
            )
            + "."
        )


@contextmanager
def explained(uri: str) -> Iterator[None]:
    """Around a cell: an error caused by the server going away mid-run (MLflow's "API request
    ... failed" after its retries) becomes one TrackingUnreachable line, cause kept."""
    try:
        yield
    except Exception as error:
        lost = _lost_connection(error, uri) if is_server(uri) else None
        if lost is None or isinstance(error, TrackingUnreachable):
            raise
        raise TrackingUnreachable(
            f"MLflow tracking server {redact(uri)} stopped answering during the run "
            f"({_reason(lost, request_timeout_s())}, "
            f"retried for about {retry_budget_s():.0f} s): {FIX}, then relaunch the same "
            "command to run this cell again."
        ) from error


def _lost_connection(error: BaseException, uri: str) -> requests.RequestException | None:
    """The connection failure or timeout behind `error` (its causes and contexts), if MLflow
    met it talking to the server at `uri` ("API request to <uri>/... failed"): a download
    that fails on its own network error is not the tracking server's."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [error]
    lost, about_server = None, False
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, requests.ConnectionError | requests.Timeout):
            lost = lost or current
        about_server = about_server or f"request to {uri.rstrip('/')}/" in str(current)
        stack += [current.__cause__, current.__context__]
    return lost if about_server else None


def _reason(error: requests.RequestException, timeout_s: float) -> str:
    """`connection refused`, `no answer within 5 s`...: the socket's words, not the URL again."""
    if isinstance(error, requests.Timeout):
        return f"no answer within {timeout_s:g} s"
    if found := re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(error)):
        return found.group(1).strip().lower()
    return type(error).__name__


def _auth() -> tuple[str, str] | None:
    """The login MLflow's client sends (MLFLOW_TRACKING_USERNAME / _PASSWORD), if any."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    return (user, os.environ.get("MLFLOW_TRACKING_PASSWORD", "")) if user else None


def _verify() -> bool | str:
    """TLS as MLflow's client does it (MLFLOW_TRACKING_INSECURE_TLS, ..._SERVER_CERT_PATH)."""
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        return False
    return os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or True
