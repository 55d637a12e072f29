"""What a node receives: its cluster's recipes as one reproducible tar.

Each appliance directory the cluster uses (the appliance, then each included one) becomes `a0/`,
`a1/`, ... so a recipe can source its own appliance's files through CRV_APPLIANCE_DIR. Next to
them, every bundle carries crv's own shell helpers at `lib/crv.sh` (need, swap, wait_for_port),
which a recipe sources as `"$CRV_APPLIANCE_DIR/../lib/crv.sh"`: no appliance can put a file
there, since each one's files land under its own `aN/`. The tar is byte-for-byte reproducible
(sorted names, zero times and owners), so re-running a deploy yields the same digest and agents
do not fetch it again.
"""

from __future__ import annotations

import gzip
import io
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

from crv.appliance.loader import Appliance, Role
from crv.appliance.spec import ParamValue
from crv.base.errors import SpecError

MAX_BUNDLE_BYTES = 16 << 20
SKIPPED = {".git", "__pycache__", ".venv"}
HELPERS = Path(__file__).with_name("lib") / "crv.sh"
HELPERS_NAME = "lib/crv.sh"  # in the bundle, next to a0/, a1/, ...


@dataclass(frozen=True)
class Bundle:
    data: bytes  # gzip tar
    roles: dict[str, dict[str, object]]  # role -> {recipe, drain, appdir, env, depends_on}


def param_env(params: dict[str, ParamValue]) -> dict[str, str]:
    def text(v: ParamValue) -> str:
        return ("true" if v else "false") if isinstance(v, bool) else str(v)

    return {f"CRV_PARAM_{k.upper().replace('-', '_')}": text(v) for k, v in params.items()}


BUSY = "busy"  # the per-node load a shrink reads to take the idlest nodes first


def build(appliance: Appliance) -> Bundle:
    dirs: dict[Path, str] = {}
    for role in appliance.roles.values():
        dirs.setdefault(role.directory, f"a{len(dirs)}")
    buf = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for directory, prefix in dirs.items():
            _add_tree(tar, directory, prefix, appliance.source)
        _add(tar, "lib", is_dir=True, mode=0o755)
        _add(tar, HELPERS_NAME, data=HELPERS.read_bytes(), mode=0o644)
    data = buf.getvalue()
    if len(data) > MAX_BUNDLE_BYTES:
        raise SpecError(
            appliance.source, "", f"the recipe bundle is {len(data)} bytes (at most 16 MiB)"
        )
    # measurements (an autoscaling metric, `busy`) change all the time: a dependent is not
    # contextualized again because one of them changed (the service leaves them out of its
    # digest of what a role reads)
    measured: dict[str, set[str]] = {}
    for g in appliance.groups.values():
        reads = g.scaling.measured() if g.scaling is not None else None
        if reads is not None:
            measured.setdefault(reads[0], set()).update(reads[1])
    roles: dict[str, dict[str, object]] = {}
    for name, role in appliance.roles.items():
        prefix = dirs[role.directory]

        def shipped(path: Path, prefix: str = prefix, role: Role = role) -> str:
            return f"{prefix}/{path.relative_to(role.directory).as_posix()}"

        roles[name] = {
            "recipe": shipped(role.recipe),
            "drain": shipped(role.drain) if role.drain else None,
            "renew": shipped(role.renew) if isinstance(role.renew, Path) else role.renew,
            "appdir": prefix,
            "env": {
                **param_env(dict(role.params)),
                **({"CRV_ROLE_PREFIX": role.prefix} if role.prefix else {}),
            },
            "depends_on": [
                {"role": d.role, "local": d.local, "min_ready": d.min_ready}
                for d in role.depends_on
            ],
            "metrics": sorted(
                measured.get(name, set()) | ({BUSY} if BUSY in role.publishes else set())
            ),
        }
    return Bundle(data, roles)


def _add_tree(tar: tarfile.TarFile, root: Path, prefix: str, source: str) -> None:
    """Regular files and directories only; a symlink is followed only if it stays inside."""
    paths = sorted(
        p for p in root.rglob("*") if not SKIPPED.intersection(p.relative_to(root).parts)
    )
    _add(tar, prefix, is_dir=True, mode=0o755)
    for path in paths:
        rel = path.relative_to(root).as_posix()
        resolved = path.resolve()
        if not resolved.is_relative_to(root):
            continue  # a link out of the appliance: never shipped
        st = resolved.stat()
        if stat.S_ISDIR(st.st_mode):
            _add(tar, f"{prefix}/{rel}", is_dir=True, mode=0o755)
        elif stat.S_ISREG(st.st_mode):
            mode = 0o755 if st.st_mode & 0o111 else 0o644
            _add(tar, f"{prefix}/{rel}", data=resolved.read_bytes(), mode=mode)


def _add(
    tar: tarfile.TarFile, name: str, *, data: bytes = b"", is_dir: bool = False, mode: int
) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    info.mode, info.mtime, info.uid, info.gid = mode, 0, 0, 0
    info.size = 0 if is_dir else len(data)
    tar.addfile(info, None if is_dir else io.BytesIO(data))
