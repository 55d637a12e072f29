"""Where one crv installation keeps everything: `$CRV_HOME` (default ~/.local/share/crv).

One directory holds the CA, the service's keys and database, the Prefect server's home and the
pools' state, so a test or a demo isolates itself by pointing CRV_HOME elsewhere, and
`rm -rf $CRV_HOME` after `crv down` forgets everything.
"""

from __future__ import annotations

import os
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

    def pool_dir(self, pool: str) -> Path:
        return self.root / "pools" / pool

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
