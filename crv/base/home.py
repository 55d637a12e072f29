"""Where one crv installation keeps everything: `$CRV_HOME` (default ~/.local/share/crv).

One directory holds the CA, the service's keys and database, the Prefect server's home and the
pools' state, so a test or a demo isolates itself by pointing CRV_HOME elsewhere, and
`rm -rf $CRV_HOME` after `crv down` forgets everything.
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Home:
    root: Path

    @classmethod
    def from_env(cls) -> Home:
        given = os.environ.get("CRV_HOME")
        if given:
            return cls(Path(given).expanduser().resolve())
        data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
        return cls(Path(data) / "crv")

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def service_dir(self) -> Path:
        return self.root / "service"

    @property
    def prefect_dir(self) -> Path:
        return self.root / "prefect"

    @property
    def lab_dir(self) -> Path:
        """The lab for real machines (lab/lab.py): its state, its libvirtd's files, volumes."""
        return self.root / "lab"

    @property
    def images_dir(self) -> Path:
        """crv's guest images (lab/images.py), one directory per content key."""
        return self.root / "images"

    def pool_dir(self, pool: str) -> Path:
        return self.root / "pools" / pool

    def autoscale_plot(self, cluster: str, group: str) -> Path:
        """A scaled group's nodes against its metric or queue over time, as the autoscale flow
        redraws it (PNG), linked from the cluster's summary artifact."""
        return self.root / "autoscale" / f"{cluster}-{group}.png"

    @property
    def prefect_auth_file(self) -> Path:
        """`user:password` of the Prefect API's basic auth (mode 0600; `crv api-credentials`)."""
        return self.prefect_dir / "api-auth"

    @property
    def database(self) -> Path:
        return self.service_dir / "state.db"

    @property
    def autoscale_lock(self) -> Path:
        """Held by whoever changes the autoscaling settings (`crv autoscale enable/disable`) and
        by the serve process while it brings the `autoscale/*` deployments in line with them."""
        return self.service_dir / "autoscale.lock"

    @property
    def ca_file(self) -> Path:
        return self.ca_dir / "ca.crt"

    @property
    def admin_cert(self) -> Path:
        return self.service_dir / "admin.crt"

    @property
    def admin_key(self) -> Path:
        return self.service_dir / "admin.key"

    def ensure(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for d in (self.service_dir, self.prefect_dir):
            d.mkdir(mode=0o700, exist_ok=True)
        self.tighten()

    def tighten(self) -> None:
        """Only this user reads CRV_HOME: its directories 0700, its databases and the daemons'
        logs 0600 (a home made before crv cared, or files a umask left open to others)."""
        pools = self.root / "pools"
        dirs = [self.root, self.ca_dir, self.service_dir, self.prefect_dir, pools]
        if pools.is_dir():
            dirs += [p for p in pools.iterdir() if p.is_dir() and not p.is_symlink()]
        for d in dirs:
            _chmod(d, 0o700)
        for d in dirs[1:]:
            for pattern in ("*.db", "*.db-wal", "*.db-shm", "*.db-journal", "*.log", "api-auth"):
                for f in d.glob(pattern):
                    _chmod(f, 0o600)


LOW_DISK = 16 << 20  # bytes free under CRV_HOME below which crv starts no change (F15)


def disk_full(root: Path) -> str | None:
    """Why no change should start when the filesystem under `root` is (nearly) full, or None.
    Prefect's server and crv's service fail their writes then, and Prefect's may leave a
    cluster's change slot taken for good (its count written, its lease not): so crv refuses
    before it takes the slot, rather than fail halfway."""
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        return None
    if free >= LOW_DISK:
        return None
    return f"the disk under {root} is full ({free // 1024} KiB free): free some space"


def _chmod(path: Path, mode: int) -> None:
    """Take group and other bits away (never adds any); what is not there is skipped."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode) or st.st_uid != os.getuid():
        return
    if stat.S_IMODE(st.st_mode) & ~mode:
        path.chmod(stat.S_IMODE(st.st_mode) & mode)
