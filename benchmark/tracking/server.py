"""A tracking server (`tracking.uri=http://...`) that does not answer is said at once, in one line.

MLflow's HTTP client retries a refused connection for about 4 minutes by default (7 retries,
backoff factor 2) and waits up to 120 s for each answer, so a cell pointed at a server that is
down would sit silent for minutes before failing with a retry trace. Here:

- MLflow's retries are bounded (`HTTP_DEFAULTS`, about 30 s for a refused connection), unless
  the user set `MLFLOW_HTTP_REQUEST_*` themselves;
- before a process uses the store, `check_reachable` refuses a URI MLflow cannot open (a
  misspelt scheme, a database driver that is not installed: `check_uri`), asks the server's
  `/health` once, with a short timeout, then its API once (`check_api`: an error page, an HTML
  page or no answer where MLflow's JSON should be), and raises `TrackingUnreachable` naming the
  URI and the fix;
- a cell whose server goes away mid-run (or answers errors, or pages that are not its API), or
  whose SQLite store stays locked by another process, fails with the same kind of one-line
  error (`explained`), and relaunching the sweep runs it again;
- the run such a cell could not end (the server was down) is ended FAILED, with the cell's error,
  instead of staying RUNNING (`benchmark.tracking.store.settle_failed_run`,
  `settle_abandoned_runs`).
"""

from __future__ import annotations

import difflib
import html
import importlib.metadata
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

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
API_TIMEOUT_S = 15.0  # one small search of the server's API (check_api)
FIX = "start the server or set tracking.uri / MLFLOW_TRACKING_URI to one that answers"


class TrackingUnreachable(RuntimeError):
    """The tracking server did not answer: the message names the URI and the fix."""


class BadTrackingUri(TrackingUnreachable):
    """`tracking.uri` names no store MLflow can open (a misspelt scheme, a database driver that
    is not installed): said at once, before anything waits on it."""


class StoreError(RuntimeError):
    """The tracking store cannot be used as given: the message names it and the fix.
    (benchmark.tracking.store raises most of them, and exports this class.)"""


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


# ---------------------------------------------------------------- the URI itself

# The stores MLflow's client opens: a database through SQLAlchemy (`postgresql+psycopg2://`: a
# driver after `+`), a server, a folder (`file:` or a bare path), Databricks.
DATABASES = ("sqlite", "postgresql", "mysql", "mssql")
SCHEMES = (*DATABASES, "http", "https", "file", "databricks")
ACCEPTED = (
    "sqlite:///<file>, postgresql://, mysql://, mssql:// (each with an optional +driver), "
    "http://, https://, file://"
)
# The pip package of a database driver SQLAlchemy imports, where its name is not the module's.
DRIVER_PACKAGES = {
    "psycopg": '"psycopg[binary]"',
    "psycopg2": "psycopg2-binary",
    "MySQLdb": "mysqlclient",
    "mysql": "mysql-connector-python",
    "pymysql": "PyMySQL",
}
# Other drivers of each database, offered when one of them is installed here.
DRIVERS = {
    "postgresql": ("psycopg", "psycopg2", "pg8000"),
    "mysql": ("mysqldb", "pymysql", "mysqlconnector"),
    "mssql": ("pyodbc", "pymssql"),
}


def check_uri(uri: str) -> None:
    """BadTrackingUri, in one line, if `uri_problem` finds one."""
    if (problem := uri_problem(uri)) is not None:
        raise BadTrackingUri(problem)


def uri_problem(uri: str) -> str | None:
    """What makes `uri` a store MLflow cannot open, with the fix, or None: a scheme MLflow does
    not know (it would fail after seconds, with tracebacks and "Model registry functionality is
    unavailable"), a SQLite URI with two slashes, a server URI without a host, a database
    driver that is not installed. Plain string work and SQLAlchemy's dialect table: nothing is
    connected to."""
    shown = redact(uri)
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if not scheme or re.fullmatch(r"[a-z]", scheme):  # a folder (MLflow's file store)
        return None
    base = scheme.split("+", 1)[0]
    if base not in SCHEMES and base not in _plugin_schemes():
        if re.fullmatch(r"\d+(/.*)?", parts.path) and not parts.netloc:  # host:port
            hint = f"; did you mean http://{shown}?"
        elif close := difflib.get_close_matches(base, SCHEMES, n=1, cutoff=0.6):
            hint = f"; did you mean {close[0]}{shown[len(scheme) :]}?"
        else:
            hint = "."
        return (
            f"tracking.uri {shown}: MLflow has no store for the scheme '{scheme}:' "
            f"(accepted: {ACCEPTED}){hint}"
        )
    if base == "sqlite" and parts.netloc:
        return (
            f"tracking.uri {shown}: a SQLite file takes three slashes: sqlite:///relative/"
            "mlflow.db or sqlite:////absolute/path/mlflow.db."
        )
    if base in ("http", "https") and not parts.hostname:
        return f"tracking.uri {shown}: no host in it; write {base}://<host>:<port>."
    if base in DATABASES:
        return _driver_problem(uri, shown, base)
    return None


def _plugin_schemes() -> set[str]:
    """Schemes that installed MLflow plugins register (entry points `mlflow.tracking_store`)."""
    return {point.name for point in importlib.metadata.entry_points(group="mlflow.tracking_store")}


def _driver_problem(uri: str, shown: str, base: str) -> str | None:
    """The database driver that SQLAlchemy would import for `uri`, if it is missing: the
    `pip install` that adds it, and the drivers of that database that are installed here."""
    from sqlalchemy.engine import make_url  # only for a database URI
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        make_url(uri).get_dialect().import_dbapi()
    except NoSuchModuleError:  # an ArgumentError too: first
        known = ", ".join(f"{base}+{d}://" for d in DRIVERS.get(base, ()))
        return (
            f"tracking.uri {shown}: SQLAlchemy has no driver '{urlsplit(uri).scheme}' "
            f"(for {base}: {known or base + '://'})."
        )
    except (ArgumentError, ValueError) as error:
        return f"tracking.uri {shown} is not a database URL SQLAlchemy reads ({error})."
    except ImportError as missing:
        module = (missing.name or "").split(".")[0] or str(missing)
        install = f"pip install {DRIVER_PACKAGES.get(module, module)} in this environment"
        here = [d for d in DRIVERS.get(base, ()) if _installed(f"{base}+{d}://")]
        if here:
            other = urlunsplit(urlsplit(uri)._replace(scheme=f"{base}+{here[0]}"))
            install += f", or use the driver installed here: {redact(other)}"
        return (
            f"tracking.uri {shown}: its database driver is not installed (No module named "
            f"'{module}'): {install}."
        )
    return None


def _installed(url: str) -> bool:
    from sqlalchemy.engine import make_url

    try:
        make_url(url).get_dialect().import_dbapi()
    except Exception:
        return False
    return True


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
    """Any URI: BadTrackingUri if MLflow cannot open it (check_uri). A server URI: bound
    MLflow's retries, then GET <uri>/health once (HEALTH_TIMEOUT_S); TrackingUnreachable if it
    cannot be reached or a gateway says it is down; then its API once (check_api). Other URIs
    (a SQLite file, a database) are left to MLflow."""
    check_uri(uri)
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
    check_api(uri)


# An API call every client may make: answered 401/403 by a server with authentication (MLflow's
# `--app-name basic-auth`), whose /health answers anyone.
PROBE = "api/2.0/mlflow/experiments/search?max_results=1"


def check_api(uri: str) -> None:
    """TrackingUnreachable in one line if the server's API, asked once (API_TIMEOUT_S), does
    not serve this client: it refuses its credentials (those MLflow's client sends:
    MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN), fails (HTTP 5xx: its backend
    store, most often), answers a page that is not MLflow's JSON (a login page, a proxy, the
    wrong path), or does not answer at all (MLflow would wait and retry for minutes)."""
    user, password = (os.environ.get(f"MLFLOW_TRACKING_{n}") for n in ("USERNAME", "PASSWORD"))
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    try:
        answer = requests.get(
            f"{uri.rstrip('/')}/{PROBE}",
            timeout=API_TIMEOUT_S,
            verify=_verify(),
            auth=(user, password) if user and password else None,
            headers={"Authorization": f"Bearer {token}"} if token and not user else None,
        )
    except requests.Timeout:
        raise TrackingUnreachable(
            f"MLflow tracking server {redact(uri)} answers /health but not its API (GET /"
            f"{PROBE.split('?')[0]}: no answer within {API_TIMEOUT_S:g} s): see the server's "
            f"log (its backend database may be down or locked), or {FIX}."
        ) from None
    except requests.RequestException:
        return  # /health answered: MLflow's own retries and errors take it from here
    if answer.status_code >= 500:
        raise TrackingUnreachable(
            f"MLflow tracking server {redact(uri)} answers /health but its API fails (GET /"
            f"{PROBE.split('?')[0]}: HTTP {answer.status_code}{_said(answer)}): see the "
            "server's log (often its backend store: the database, `mlflow db upgrade`), or "
            f"{FIX}."
        )
    if answer.status_code in (200, 404) and not _is_json(answer):
        raise TrackingUnreachable(
            f"MLflow tracking server {redact(uri)} answers its API with "
            f"{_page(answer)}, not MLflow's JSON (GET /{PROBE.split('?')[0]}: HTTP "
            f"{answer.status_code}): set tracking.uri to the MLflow server's own address (not "
            "a login page, a proxy's or another service's path)."
        )
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


def _said(answer: requests.Response) -> str:
    """`: <what the answer says>`: MLflow's error message, or the first line of a text answer;
    `` for a page or nothing."""
    text = answer.text.strip()
    if _is_json(answer) and isinstance(body := answer.json(), dict) and "message" in body:
        text = str(body["message"]).strip()
    if not text or text.startswith("<"):
        return ""
    return ": " + text.splitlines()[0][:200]


def _is_json(answer: requests.Response) -> bool:
    try:
        answer.json()
    except ValueError:
        return False
    return True


def _page(answer: requests.Response) -> str:
    """`an HTML page ('Sign in')`, `a text answer`...: what came instead of JSON."""
    text = answer.text.strip()
    if not text:
        return "an empty answer"
    if "html" in answer.headers.get("content-type", "").lower() or text.startswith("<"):
        title = re.search(r"<title[^>]*>([^<]*)</title>", text, re.IGNORECASE)
        named = f" ({html.unescape(title.group(1)).strip()[:80]!r})" if title else ""
        return f"an HTML page{named}"
    return f"a text answer ({text.splitlines()[0][:80]!r})"


@contextmanager
def explained(uri: str) -> Iterator[None]:
    """Around a cell: an error caused by the store mid-run becomes one line, cause kept: the
    server went away or kept failing (MLflow's "API request ... failed" after its retries),
    or answered a page that is not its API (TrackingUnreachable); a SQLite store stayed locked
    by another process longer than its busy timeout (StoreError)."""
    try:
        yield
    except Exception as error:
        if isinstance(error, TrackingUnreachable | StoreError):
            raise
        if (locked := store_locked(error, uri)) is not None:
            raise locked from error
        lost = _lost_connection(error, uri) if is_server(uri) else None
        if lost is None:
            if is_server(uri) and (status := _server_error_status(error)) is not None:
                raise TrackingUnreachable(
                    f"MLflow tracking server {redact(uri)} failed during the run (its API "
                    f"answered HTTP {status} every time, retried for about "
                    f"{retry_budget_s():.0f} s): see the server's log, then relaunch the same "
                    "command to run this cell again."
                ) from error
            if is_server(uri) and _not_json(error):
                raise TrackingUnreachable(
                    f"MLflow tracking server {redact(uri)} answered a page that is not its API "
                    "during the run (not MLflow's JSON: a login page or a proxy in front of "
                    "it?): set tracking.uri to the MLflow server's own address, then relaunch "
                    "the same command to run this cell again."
                ) from error
            raise
        if isinstance(lost, requests.exceptions.RetryError):
            raise TrackingUnreachable(
                f"MLflow tracking server {redact(uri)} failed during the run (its API answered "
                f"{_reason(lost, request_timeout_s())}, retried for about "
                f"{retry_budget_s():.0f} s): see the server's log, then relaunch the same "
                "command to run this cell again."
            ) from error
        raise TrackingUnreachable(
            f"MLflow tracking server {redact(uri)} stopped answering during the run "
            f"({_reason(lost, request_timeout_s())}, "
            f"retried for about {retry_budget_s():.0f} s): {FIX}, then relaunch the same "
            "command to run this cell again."
        ) from error


# How long a SQLite store is waited on while another process holds its lock, per statement
# (benchmark.tracking.store sets it as SQLite's busy timeout, in place of MLflow's 20 s).
SQLITE_BUSY_S = 120.0


def store_locked(error: BaseException, uri: str) -> StoreError | None:
    """For a SQLite `uri`: the one-line StoreError for `error` when "database is locked" is
    behind it (another process held the store longer than SQLITE_BUSY_S), else None."""
    if not uri.startswith("sqlite:///") or not any(
        "database is locked" in str(e) for e in causes(error)
    ):
        return None
    return StoreError(
        f"the tracking store {uri.removeprefix('sqlite:///')} stayed locked by another process "
        f"for more than {SQLITE_BUSY_S:g} s: wait for that process to finish (a sweep writing "
        "to it, a sqlite3 shell or an `mlflow` command holding a transaction, a copy or a "
        "backup), then relaunch the same command."
    )


def causes(error: BaseException) -> list[BaseException]:
    """`error` and its causes and contexts (theirs too), each once."""
    seen: dict[int, BaseException] = {}
    stack: list[BaseException | None] = [error]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen[id(current)] = current
        stack += [current.__cause__, current.__context__]
    return list(seen.values())


def _server_error_status(error: BaseException) -> int | None:
    """The HTTP 5xx status behind `error` when MLflow gave up on its retries and returned the
    server's error answer (MLflow >= 3.18 lets the last 5xx answer through as "API request to
    endpoint ... failed with error code 500 != 200"; older versions raise requests' RetryError,
    which `_lost_connection` reads), else None."""
    for current in causes(error):
        if found := re.search(
            r"API request to endpoint \S+ failed with error code (5\d\d)\b", str(current)
        ):
            return int(found.group(1))
    return None


def _not_json(error: BaseException) -> bool:
    """MLflow's error for an answer of the server that is not JSON (an HTML page)."""
    return any("not in a valid JSON format" in str(e) for e in causes(error))


def _lost_connection(error: BaseException, uri: str) -> requests.RequestException | None:
    """The connection failure, timeout or exhausted retries (HTTP 5xx answers) behind `error`
    (its causes and contexts), if MLflow met it talking to the server at `uri` ("API request
    to <uri>/... failed"): a download that fails on its own network error is not the tracking
    server's."""
    lost, about_server = None, False
    for current in causes(error):
        failed = requests.ConnectionError | requests.Timeout | requests.exceptions.RetryError
        if isinstance(current, failed):
            lost = lost or current
        about_server = about_server or f"request to {uri.rstrip('/')}/" in str(current)
    return lost if about_server else None


def _reason(error: requests.RequestException, timeout_s: float) -> str:
    """`connection refused`, `no answer within 5 s`, `HTTP 500 too many times`...: the socket's
    words, not the URL again."""
    if isinstance(error, requests.Timeout):
        return f"no answer within {timeout_s:g} s"
    if found := re.search(r"too many (\d+) error responses", str(error)):
        return f"HTTP {found.group(1)} every time"
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
