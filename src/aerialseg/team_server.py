"""A team's MLflow tracking server: `aerialseg server start --data DIR`.

One command, in the foreground (a terminal multiplexer, a systemd unit or a long Slurm job keeps it
up), sets up and runs on one host:

- PostgreSQL (the distribution's `initdb`/`pg_ctl`): a cluster in DIR/postgres, listening on a Unix
  socket in DIR/socket only (no TCP port, so no database password: only this account, and root, can
  reach the socket, mode 0700), with two databases: `mlflow` (runs, the model registry) and
  `mlflow_auth` (users and permissions);
- `mlflow server` on HOST:PORT with the backend store in PostgreSQL, artifacts **proxied**
  (`--serve-artifacts`, stored in DIR/artifacts: clients upload and download through the server and
  need no storage credentials), and MLflow's **basic authentication** (`--app-name basic-auth`):
  every request needs a user; the admin user is created at the first start with the password from
  MLFLOW_AUTH_ADMIN_PASSWORD (MLflow's variable; never from a file), and DIR/basic_auth.ini,
  written here, holds no password.

Ctrl-C or SIGTERM stops the MLflow server, then PostgreSQL. Clients set MLFLOW_TRACKING_URI,
MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD; the pipeline, `aerialseg leaderboard` and
`aerialseg predict -m models:/...` use it unchanged (aerialseg.tracking.tracking_uri).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer

ADMIN_PASSWORD_ENV = "MLFLOW_AUTH_ADMIN_PASSWORD"
"""MLflow's own variable: the admin's password, read by the auth app when it creates the admin."""
ADMIN_USERNAME_ENV = "MLFLOW_AUTH_ADMIN_USERNAME"
DEFAULT_ADMIN = "admin"
SECRET_KEY_ENV = "MLFLOW_FLASK_SERVER_SECRET_KEY"
"""MLflow's key for the auth app's CSRF tokens; generated per start when unset."""
PG_BIN_ENV = "AERIALSEG_PG_BIN"
"""The folder of PostgreSQL's initdb and pg_ctl, when they are neither on PATH nor in Debian's
/usr/lib/postgresql/<version>/bin."""
PG_USER = "mlflow"
"""The database role MLflow connects as (the cluster's superuser, reached through the socket)."""
DATABASES = ("mlflow", "mlflow_auth")
PERMISSIONS = ("READ", "EDIT", "MANAGE", "NO_PERMISSIONS")
"""MLflow's permissions (mlflow.server.auth.permissions), the choices of --default-permission."""
START_TIMEOUT = 120.0
"""Seconds PostgreSQL or the MLflow server may take to answer after starting."""


class ServerError(RuntimeError):
    """The server cannot be set up or started; the message names what and what was expected."""


@dataclass(frozen=True)
class ServerLayout:
    """Where the server keeps its state, all under one data folder."""

    data: Path

    @property
    def pgdata(self) -> Path:
        return self.data / "postgres"

    @property
    def socket_dir(self) -> Path:
        return self.data / "socket"

    @property
    def artifacts(self) -> Path:
        return self.data / "artifacts"

    @property
    def auth_config(self) -> Path:
        return self.data / "basic_auth.ini"

    @property
    def postgres_log(self) -> Path:
        return self.data / "postgres.log"

    def database_uri(self, database: str) -> str:
        """SQLAlchemy's URI of `database` through the socket (SQLAlchemy 2.1's default driver: psycopg 3)."""
        return f"postgresql://{PG_USER}@/{database}?host={self.socket_dir}"


def postgres_bin() -> Path:
    """The folder of initdb and pg_ctl: AERIALSEG_PG_BIN, else pg_ctl's folder on PATH, else the
    newest /usr/lib/postgresql/<version>/bin (Debian's packages put them there, not on PATH)."""
    configured = os.environ.get(PG_BIN_ENV, "").strip()
    if configured:
        folder = Path(configured)
        if not (folder / "pg_ctl").is_file():
            raise ServerError(f"{PG_BIN_ENV}={configured}: no pg_ctl there; expected PostgreSQL's bin folder")
        return folder
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).resolve().parent
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
    )
    if versions:
        return versions[-1].parent
    raise ServerError(
        "PostgreSQL's initdb and pg_ctl were not found (not on PATH, not in /usr/lib/postgresql/*/bin); "
        f"install PostgreSQL (Debian: apt-get install postgresql) or set {PG_BIN_ENV}"
    )


def _postgres_account() -> pwd.struct_passwd | None:
    """The account PostgreSQL runs as: None for this one, `postgres` when this one is root
    (PostgreSQL refuses to run as root)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise ServerError(
            "running as root, but PostgreSQL refuses to run as root and there is no `postgres` "
            "account to run it as; start the server as an ordinary user"
        ) from None


def _as_postgres(account: pwd.struct_passwd | None) -> dict[str, Any]:
    return {} if account is None else {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


def _check_reachable(data: Path, account: pwd.struct_passwd) -> None:
    """Every folder above `data` must be searchable by `account`, which PostgreSQL runs as."""
    for folder in data.parents:
        mode = folder.stat()
        searchable = (
            mode.st_mode & 0o001
            or (mode.st_uid == account.pw_uid and mode.st_mode & 0o100)
            or (mode.st_gid == account.pw_gid and mode.st_mode & 0o010)
        )
        if not searchable:
            raise ServerError(
                f"--data {data}: PostgreSQL runs as `{account.pw_name}` here (it refuses root), and "
                f"{folder} is not searchable by it (mode {mode.st_mode & 0o777:o}); choose a folder "
                "it can reach, or start the server as an ordinary user"
            )


def _own(path: Path, account: pwd.struct_passwd | None) -> None:
    if account is not None:
        os.chown(path, account.pw_uid, account.pw_gid)


def _pg(
    bin_dir: Path, tool: str, *args: str, account: pwd.struct_passwd | None, timeout: float = START_TIMEOUT
) -> None:
    """Run one PostgreSQL tool; its output in the error when it fails."""
    try:
        done = subprocess.run(
            [str(bin_dir / tool), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd="/",  # the postgres account may not enter the caller's folder
            **_as_postgres(account),
        )
    except subprocess.TimeoutExpired:
        raise ServerError(f"{tool} {' '.join(args)}: no result within {timeout:g} s") from None
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        raise ServerError(f"{tool} failed ({done.returncode}): {' / '.join(said[-3:]) or 'no output'}")


def init_cluster(layout: ServerLayout, bin_dir: Path, account: pwd.struct_passwd | None) -> bool:
    """Create the PostgreSQL cluster in layout.pgdata unless it exists; True when created.

    Written next to its final name and renamed, so a killed initdb never leaves a half cluster that
    a later start would take for a complete one."""
    if (layout.pgdata / "PG_VERSION").is_file():
        return False
    if layout.pgdata.exists() and any(layout.pgdata.iterdir()):
        raise ServerError(f"{layout.pgdata}: not empty and not a PostgreSQL cluster (no PG_VERSION)")
    partial = layout.pgdata.with_name(layout.pgdata.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(mode=0o700)
    _own(partial, account)
    # trust on the socket only: the socket's folder (0700) is the access control; TCP is off.
    _pg(
        bin_dir,
        "initdb",
        "-D",
        str(partial),
        "-U",
        PG_USER,
        "--auth-local=trust",
        "--auth-host=reject",
        "--encoding=UTF8",
        "--no-locale",
        account=account,
    )
    if layout.pgdata.exists():
        layout.pgdata.rmdir()
    partial.rename(layout.pgdata)
    return True


@contextlib.contextmanager
def running_postgres(
    layout: ServerLayout, bin_dir: Path, account: pwd.struct_passwd | None
) -> Iterator[None]:
    """PostgreSQL on layout.socket_dir (no TCP) for the duration of the block, then a fast stop."""
    layout.socket_dir.mkdir(mode=0o700, exist_ok=True)
    layout.socket_dir.chmod(0o700)
    _own(layout.socket_dir, account)
    if not layout.postgres_log.exists():
        layout.postgres_log.touch()
    _own(layout.postgres_log, account)
    options = f"-c listen_addresses='' -c unix_socket_directories='{layout.socket_dir}'"
    _pg(
        bin_dir,
        "pg_ctl",
        "start",
        "-D",
        str(layout.pgdata),
        "-l",
        str(layout.postgres_log),
        "-o",
        options,
        "-w",
        "-t",
        str(int(START_TIMEOUT)),
        account=account,
    )
    try:
        yield
    finally:
        _pg(bin_dir, "pg_ctl", "stop", "-D", str(layout.pgdata), "-m", "fast", "-w", account=account)


def create_databases(layout: ServerLayout) -> list[str]:
    """Create the DATABASES that do not exist yet; returns those created."""
    import psycopg

    created = []
    # autocommit: CREATE DATABASE cannot run in a transaction.
    with (
        psycopg.connect(
            host=str(layout.socket_dir), user=PG_USER, dbname="postgres", autocommit=True
        ) as conn,
        conn.cursor() as cursor,
    ):
        for name in DATABASES:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cursor.fetchone() is None:
                cursor.execute(f'CREATE DATABASE "{name}"')
                created.append(name)
    return created


def write_auth_config(layout: ServerLayout, default_permission: str) -> Path:
    """DIR/basic_auth.ini for MLflow's auth app (MLFLOW_AUTH_CONFIG_PATH): users in PostgreSQL, the
    permission every user has on what others created; no password (MLFLOW_AUTH_ADMIN_PASSWORD)."""
    from aerialseg.files import atomic_path

    if default_permission not in PERMISSIONS:
        raise ServerError(
            f"--default-permission {default_permission!r}: expected one of {', '.join(PERMISSIONS)}"
        )
    text = (
        "# Written by `aerialseg server start`; the admin's password comes from MLFLOW_AUTH_ADMIN_PASSWORD.\n"
        "[mlflow]\n"
        f"default_permission = {default_permission}\n"
        f"database_uri = {layout.database_uri('mlflow_auth')}\n"
        f"admin_username = {os.environ.get(ADMIN_USERNAME_ENV) or DEFAULT_ADMIN}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    with atomic_path(layout.auth_config) as tmp:
        tmp.write_text(text)
    return layout.auth_config


def allowed_hosts(host: str) -> str | None:
    """The Host headers the server accepts (its DNS-rebinding guard) when it listens on every
    interface: MLflow's default (localhost, private IPs) plus this host's names, so that clients
    can use http://<this host>:<port>; None (MLflow's default) otherwise."""
    if host not in ("0.0.0.0", "::", ""):
        return None
    from mlflow.server.security_utils import get_default_allowed_hosts

    names = sorted({socket.gethostname(), socket.getfqdn()})
    return ",".join(dict.fromkeys([*get_default_allowed_hosts(), *names, *(f"{n}:*" for n in names)]))


def server_command(
    layout: ServerLayout, host: str, port: int, workers: int, hosts: str | None = None
) -> list[str]:
    """`mlflow server` on PostgreSQL with proxied artifacts and basic authentication."""
    hosts = hosts or allowed_hosts(host)
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        layout.database_uri("mlflow"),
        "--serve-artifacts",
        "--artifacts-destination",
        str(layout.artifacts),
        "--app-name",
        "basic-auth",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
        *(["--allowed-hosts", hosts] if hosts else []),
    ]


def public_url(host: str, port: int) -> str:
    """The URL clients use: this host's name when the server listens on every interface."""
    name = socket.getfqdn() if host in ("0.0.0.0", "::", "") else host
    return f"http://{name}:{port}"


def _wait_until_up(url: str, server: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise ServerError(f"mlflow server exited with {server.returncode} before answering at {url}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise ServerError(f"mlflow server did not answer at {url}/health within {timeout:g} s")


def _signal_group(process: subprocess.Popen[bytes], sig: int) -> None:
    """Send `sig` to the process group `process` leads (started with start_new_session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def serve(
    data: Path, host: str, port: int, workers: int, default_permission: str, hosts: str | None = None
) -> int:
    """Set up (first time) and run PostgreSQL and the MLflow server until SIGINT/SIGTERM or until
    the MLflow server exits; returns its exit status (0 after a signal). Raises ServerError."""
    if not os.environ.get(ADMIN_PASSWORD_ENV):
        raise ServerError(
            f"{ADMIN_PASSWORD_ENV} is not set: the server's admin password comes from the environment, "
            f"never from a file (e.g. `read -rs {ADMIN_PASSWORD_ENV} && export {ADMIN_PASSWORD_ENV}`)"
        )
    layout = ServerLayout(data.absolute())
    layout.data.mkdir(parents=True, exist_ok=True)
    layout.artifacts.mkdir(exist_ok=True)
    bin_dir = postgres_bin()
    account = _postgres_account()
    if account is not None:  # the postgres account must reach its folders under DIR
        _check_reachable(layout.data, account)
        layout.data.chmod(layout.data.stat().st_mode | 0o711)
    if init_cluster(layout, bin_dir, account):
        print(f"PostgreSQL: new cluster in {layout.pgdata}", flush=True)
    with running_postgres(layout, bin_dir, account):
        created = create_databases(layout)
        if created:
            print(f"PostgreSQL: created database(s) {', '.join(created)}", flush=True)
        env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(write_auth_config(layout, default_permission))}
        # The auth app's CSRF key, the same for all workers: a new one per start unless one is set
        # (signed-in browser sessions then end with a restart; the API's basic auth is unaffected).
        env.setdefault(SECRET_KEY_ENV, secrets.token_hex(32))
        stopping: list[int] = []
        # Its own process group: `mlflow server` starts uvicorn's workers, which a signal must reach too.
        server = subprocess.Popen(
            server_command(layout, host, port, workers, hosts), env=env, start_new_session=True
        )

        def forward(signum: int, _frame: FrameType | None) -> None:
            stopping.append(signum)
            _signal_group(server, signal.SIGTERM)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            url = public_url(host, port)
            _wait_until_up(
                f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}", server, START_TIMEOUT
            )
            print(
                f"MLflow tracking server at {url} (PostgreSQL in {layout.pgdata}, artifacts in "
                f"{layout.artifacts}); clients: export MLFLOW_TRACKING_URI={url} "
                "MLFLOW_TRACKING_USERNAME=<user> MLFLOW_TRACKING_PASSWORD=<password>",
                flush=True,
            )
            status = server.wait()
        finally:
            if server.poll() is None:
                _signal_group(server, signal.SIGTERM)
                try:
                    server.wait(30)
                except subprocess.TimeoutExpired:
                    _signal_group(server, signal.SIGKILL)
                    server.wait()
            _signal_group(server, signal.SIGTERM)  # workers left behind by an exited `mlflow server`
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return 0 if stopping else status


server_app = typer.Typer(help="A team's MLflow tracking server (PostgreSQL, proxied artifacts, basic auth).")


@server_app.command("start")
def start_command(
    data: Annotated[
        Path, typer.Option(help="the server's folder: PostgreSQL cluster, artifacts, auth config (created)")
    ],
    host: Annotated[
        str, typer.Option(help="interface to listen on: 127.0.0.1 (this host only) or 0.0.0.0 (the network)")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 5000,
    workers: Annotated[int, typer.Option(min=1, help="MLflow server worker processes")] = 2,
    default_permission: Annotated[
        str,
        typer.Option(
            help="what every signed-in user may do with experiments and models others created: "
            "READ, EDIT (log runs and model versions into them), MANAGE or NO_PERMISSIONS"
        ),
    ] = "EDIT",
    allowed_hosts: Annotated[
        str | None,
        typer.Option(
            help="Host headers to accept, comma-separated, wildcards allowed (MLflow's --allowed-hosts); "
            "default with --host 0.0.0.0: localhost, private IPs and this host's names"
        ),
    ] = None,
) -> None:
    """Run a tracking server in the foreground (Ctrl-C stops it): PostgreSQL in DATA/postgres, MLflow
    with proxied artifacts in DATA/artifacts and basic authentication; the admin's password from
    MLFLOW_AUTH_ADMIN_PASSWORD."""
    try:
        status = serve(data, host, port, workers, default_permission.upper(), allowed_hosts)
    except ServerError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(status)
