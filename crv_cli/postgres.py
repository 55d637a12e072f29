"""A local PostgreSQL of crv's own (`crv up --postgres`, and the tests): Debian's package, one
cluster per directory, listening on 127.0.0.1 only.

The first `start` runs initdb (UTF8; scram-sha-256 for TCP, peer on the unix socket, whose
directory is the data directory, 0700: only the cluster's owner reaches it), starts the server
and creates the role `crv` with a random password, its database `crv` and the `pg_trgm`
extension Prefect 3 needs. The password is kept in `<directory>/password` (0600) and goes to the
server on psql's stdin, never on a command line; `<directory>/port` keeps the port, picked free
on 127.0.0.1 the first time, so a restart gives the same URL. Later starts only start the
server. `start` returns once `SELECT 1` answers over TCP with the password.

initdb refuses to run as root, and the server's data directory must belong to `postgres` with
every parent directory traversable by it. Run as root, the programs run as `postgres`
(`runuser`), and a `directory` that user cannot reach (under /root, a pytest tmp dir) keeps the
cluster in /var/lib/crv-postgres/<sha256 of the directory, 16 hex> instead, named by
`<directory>/location`; the password and port files stay in `directory`, root's.

Measured on 2 cores (Debian 12, PostgreSQL 15.18, 5 clusters): a first start (initdb, role,
database, extension) takes 0.9 s on a quiet machine and 1.4-4.6 s (median 3.4 s) with other
tests running (load 3.5), initdb being most of it; a restart takes 0.14-0.35 s (median 0.17 s),
a stop 0.12 s (up to 1.2 s under that load).
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import secrets
import shlex
import shutil
import socket
import stat
import subprocess
import time
import urllib.parse
from pathlib import Path

from crv.base.errors import CrvError
from crv.base.flock import exclusive

PACKAGES = "postgresql postgresql-contrib"
ROOT_CLUSTERS = Path("/var/lib/crv-postgres")  # root's clusters for directories out of reach
START_SECONDS = 60


class PostgresError(CrvError):
    """The local PostgreSQL is missing, or would not start or answer."""


def postgres_binaries() -> Path:
    """The newest /usr/lib/postgresql/N/bin with initdb and pg_ctl (Debian's layout)."""
    found = [
        b
        for b in Path("/usr/lib/postgresql").glob("*/bin")
        if b.parent.name.isdigit() and (b / "initdb").exists() and (b / "pg_ctl").exists()
    ]
    if not found:
        raise PostgresError(
            "PostgreSQL's programs are not in /usr/lib/postgresql/N/bin: "
            f"install Debian's packages `{PACKAGES}`"
        )
    return max(found, key=lambda b: int(b.parent.name))


def redact(url: str) -> str:
    """The URL with its password replaced by *** (for logs and errors)."""
    try:
        parts = urllib.parse.urlsplit(url)
        password = parts.password
    except ValueError:
        return "<an invalid database URL>"
    if password is not None:
        user, _, host = parts.netloc.rpartition("@")
        parts = parts._replace(netloc=f"{user.partition(':')[0]}:***@{host}")
    query = re.sub(r"(^|&)password=[^&]*", r"\1password=***", parts.query)
    return urllib.parse.urlunsplit(parts._replace(query=query))


def _as_root() -> bool:
    return os.geteuid() == 0


def _postgres_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresError(f"no user `postgres`: install Debian's packages `{PACKAGES}`") from None


def _traversable_by(user: pwd.struct_passwd, path: Path) -> bool:
    """Whether `user` may pass through `path` and each of its parents (mode bits; no ACLs)."""
    groups = set(os.getgrouplist(user.pw_name, user.pw_gid))
    for p in (path, *path.parents):
        try:
            st = p.stat()
        except FileNotFoundError:  # not made yet: start() makes it 0700, out of reach
            return False
        if st.st_uid == user.pw_uid:
            bit = stat.S_IXUSR
        else:
            bit = stat.S_IXGRP if st.st_gid in groups else stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


class LocalPostgres:
    """A PostgreSQL cluster of its own in `directory`, on 127.0.0.1:port, for crv and Prefect."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory.resolve()
        self._port = port

    # -- where things are --------------------------------------------------------------------

    @property
    def data(self) -> Path:
        """The cluster's data directory (also its unix socket's directory)."""
        location = self.directory / "location"
        if location.exists():
            return Path(location.read_text().strip())
        own = self.directory / "data"
        if own.exists() or not _as_root() or _traversable_by(_postgres_user(), self.directory):
            return own
        digest = hashlib.sha256(str(self.directory).encode()).hexdigest()[:16]
        return ROOT_CLUSTERS / digest

    @property
    def port(self) -> int:
        if self._port is None:
            recorded = self.directory / "port"
            if not recorded.exists():
                raise PostgresError(f"no PostgreSQL was started in {self.directory}")
            self._port = int(recorded.read_text())
        return self._port

    @property
    def url(self) -> str:
        return self.url_for("crv")

    def url_for(self, database: str) -> str:
        try:
            password = (self.directory / "password").read_text().strip()
        except FileNotFoundError:
            raise PostgresError(f"no PostgreSQL was started in {self.directory}") from None
        return f"postgresql://crv:{password}@127.0.0.1:{self.port}/{database}"

    # -- life --------------------------------------------------------------------------------

    def running(self) -> bool:
        if not (self.data / "PG_VERSION").exists():
            return False
        return self._run("pg_ctl", "status", "-D", str(self.data), check=False).returncode == 0

    def start(self) -> str:
        """Start the server (initdb first when there is none); its URL, once it answers."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with exclusive(self.directory / "lock"):
            if not self.running():
                self._start_server()
        self._wait_answers()
        return self.url

    def stop(self) -> None:
        if not self.directory.is_dir():
            return
        with exclusive(self.directory / "lock"):
            if self.running():
                self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w")

    def destroy(self) -> None:
        """Stop the server and remove the cluster and what this class wrote in `directory`."""
        self.stop()
        shutil.rmtree(self.data, ignore_errors=True)
        for name in ("location", "port", "password"):  # not `lock`: waiters may hold it open
            (self.directory / name).unlink(missing_ok=True)

    def create_database(self, name: str) -> str:
        """A new empty database `name` owned by crv, with pg_trgm; its URL."""
        name = _identifier(name)
        self._psql(
            f'CREATE DATABASE "{name}" OWNER crv;\n\\connect "{name}"\n'
            "CREATE EXTENSION IF NOT EXISTS pg_trgm;\n"
        )
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """Drop `name`; WITH (FORCE) ends its sessions first (pg_terminate_backend)."""
        self._psql(f'DROP DATABASE IF EXISTS "{_identifier(name)}" WITH (FORCE);\n')

    # -- the work ----------------------------------------------------------------------------

    def _start_server(self) -> None:
        data = self.data
        fresh = not (data / "PG_VERSION").exists()
        if fresh:
            self._init(data)
        try:
            self._pg_ctl_start(data)
            if fresh:
                password = (self.directory / "password").read_text().strip()
                # The statement bears the password: kept out of the log even if it fails.
                self._psql(
                    "SET log_min_error_statement = panic;\n"
                    f"CREATE ROLE crv LOGIN PASSWORD '{password}';\n"
                    "CREATE DATABASE crv OWNER crv;\n\\connect crv\n"
                    "CREATE EXTENSION IF NOT EXISTS pg_trgm;\n"
                )
        except PostgresError:
            if fresh:  # a half-made cluster would never be finished: gone, the next start redoes it
                self._run("pg_ctl", "stop", "-D", str(data), "-m", "immediate", check=False)
                shutil.rmtree(data, ignore_errors=True)
            raise

    def _pg_ctl_start(self, data: Path) -> None:
        if self._port is None and not (self.directory / "port").exists():
            with socket.socket() as s:  # the kernel's pick of a free port
                s.bind(("127.0.0.1", 0))
                self._port = s.getsockname()[1]
        (self.directory / "port").write_text(f"{self.port}\n")  # a port given wins, and stays
        socket_path = data / f".s.PGSQL.{self.port}"
        if len(str(socket_path)) > 107:  # sun_path's limit
            raise PostgresError(f"{data}: too long a path for PostgreSQL's unix socket")
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {shlex.quote(str(data))}"
        log = data / "server.log"
        started = self._run(
            "pg_ctl", "start", "-D", str(data), "-w", "-t", str(START_SECONDS),
            "-l", str(log), "-o", options, check=False,
        )  # fmt: skip
        if started.returncode != 0:
            lines = log.read_text(errors="replace").splitlines()[-8:] if log.exists() else []
            raise PostgresError(
                f"PostgreSQL in {data} did not start on 127.0.0.1:{self.port}; "
                "the end of its log:\n  " + "\n  ".join(lines or [started.stdout.strip()])
            )

    def _init(self, data: Path) -> None:
        """initdb into `data`, after the password (and location) file."""
        password = self.directory / "password"
        if not password.exists():
            fd = os.open(password, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with open(fd, "w") as f:
                f.write(secrets.token_urlsafe(24) + "\n")
        if data.parent == ROOT_CLUSTERS:
            ROOT_CLUSTERS.mkdir(mode=0o711, exist_ok=True)
            ROOT_CLUSTERS.chmod(0o711)  # postgres passes through, lists nothing
            (self.directory / "location").write_text(f"{data}\n")
        data.mkdir(mode=0o700, exist_ok=True)
        if _as_root():
            user = _postgres_user()
            os.chown(data, user.pw_uid, user.pw_gid)
        self._run(
            "initdb", "-D", str(data), "-E", "UTF8", "--no-locale",
            "--auth-host=scram-sha-256", "--auth-local=peer",
        )  # fmt: skip

    def _wait_answers(self) -> None:
        """Until `SELECT 1` works over TCP with crv's password (pg_ctl -w waited for the
        socket; this proves the password and the TCP listener too)."""
        import psycopg  # only here: `crv` without PostgreSQL does not load it

        deadline = time.monotonic() + 10
        while True:
            try:
                with psycopg.connect(self.url, connect_timeout=5) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as e:
                if time.monotonic() > deadline:
                    raise PostgresError(f"{redact(self.url)} does not answer: {e}") from None
                time.sleep(0.05)

    def _psql(self, sql: str) -> None:
        """`sql` as the superuser over the unix socket, on stdin (off every command line)."""
        superuser = "postgres" if _as_root() else pwd.getpwuid(os.geteuid()).pw_name
        self._run(
            "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(self.data), "-p", str(self.port),
            "-U", superuser, "-d", "postgres", stdin=sql,
        )  # fmt: skip

    def _run(
        self, program: str, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        argv = [str(postgres_binaries() / program), *args]
        if _as_root():
            argv = ["runuser", "-u", "postgres", "--", *argv]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}  # no PGHOST...
        done = subprocess.run(  # cwd: one `postgres` may enter (not /root)
            argv, input=stdin, capture_output=True, text=True, env=env, cwd="/",
            timeout=START_SECONDS + 30,
        )  # fmt: skip
        if check and done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines() or ["failed"]
            line = next((x for x in lines if "ERROR" in x or "FATAL" in x), lines[0])
            password = self.directory / "password"
            if password.exists():  # psql may quote the statement that failed
                line = line.replace(password.read_text().strip(), "***")
            raise PostgresError(f"{program}: {line}")
        return done


def _identifier(name: str) -> str:
    """`name` if it is a plain lowercase SQL identifier (quoted as is, it cannot inject)."""
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise PostgresError(f"{name!r}: a database name is lowercase letters, digits and _")
    return name
