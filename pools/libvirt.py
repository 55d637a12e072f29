"""The libvirt pool: each node is a libvirt domain booted from a copy-on-write disk.

A node is three things, all named after it so that destroy (and a reconciler) finds them:

- the domain `<node>`, whose `<metadata>` in the crv namespace (`NAMESPACE`) carries its node
  name, cluster, group and tags. `list_nodes` trusts that metadata, never a name prefix: a
  domain without it is not ours, whatever its name;
- the disk volume `<node>.qcow2` in the storage pool `storage_pool`: a qcow2 overlay whose
  backing store is `base_image` (a stock cloud image with python3 and cloud-init);
- the cloud-init NoCloud seed `<node>-seed.iso` (volume id `cidata`, files `user-data` and
  `meta-data`, built with pycdlib), attached as a CD-ROM. It is the only place the bootstrap
  token goes: not the domain XML, its metadata, NodeInfo, logs or errors.

Where the seed ISO lives (option `seed`): `"file"` writes it (mode 0600) to
`<state_dir>/seeds/<node>-seed.iso` and the domain refers to that path - that needs the
hypervisor on this machine, running as this user: `qemu:///session`, and `test:///...`, whose
in-memory driver cannot upload into volumes at all. `"volume"` creates a storage volume
`<node>-seed.iso` in `storage_pool` and uploads the ISO over the libvirt connection - for a
remote or a system hypervisor. `"auto"` (the default) picks `"file"` for `test:` and
`qemu:///session` and `"volume"` for everything else.

libvirt errors are translated at the boundary (`_translated`): a connection that cannot be
made or broke, an RPC failure or a timeout is temporary; everything else (an unknown storage
pool or network, XML libvirt refuses, an unsupported operation) is permanent.
"""

from __future__ import annotations

import io
import os
import re
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Literal, NoReturn
from urllib.parse import urlsplit

import libvirt  # type: ignore[import-untyped]  # libvirt-python ships no type hints
import pycdlib
import yaml
from pydantic import BaseModel, ConfigDict, Field, IPvAnyAddress, field_validator, model_validator

from crv.base.flock import exclusive
from pools import cloudinit, images
from pools.base import (
    TAG_CLUSTER,
    TAG_NODE,
    MaxNodes,
    NodeInfo,
    NodeSpec,
    PoolError,
    write_atomic,
)
from pools.templates import render

NAMESPACE = "https://crv.dev/xmlns/libvirt-node/1"  # crv's <metadata> element (a URI only)
DRIVERS = ("qemu", "test")  # hypervisors whose guests boot a cloud image with a NoCloud seed
TRANSPORTS = ("", "unix", "ssh", "libssh", "libssh2", "tcp", "tls", "ext")
GIB = 1 << 30
SEED_VOLUME_ID = "cidata"  # what cloud-init's NoCloud datasource looks for

# libvirt error codes worth a retry: the daemon is unreachable or the link broke or stalled.
_TEMPORARY_CODES = frozenset(
    {
        libvirt.VIR_ERR_SYSTEM_ERROR,  # connect(): refused, no socket, host unreachable
        libvirt.VIR_ERR_RPC,
        libvirt.VIR_ERR_NO_CONNECT,
        libvirt.VIR_ERR_INVALID_CONN,  # the connection was closed under us
        libvirt.VIR_ERR_OPERATION_TIMEOUT,
        libvirt.VIR_ERR_AGENT_UNRESPONSIVE,
        libvirt.VIR_ERR_RESOURCE_BUSY,
    }
)
_MISSING_VOLUME = libvirt.VIR_ERR_NO_STORAGE_VOL
_MISSING_DOMAIN = libvirt.VIR_ERR_NO_DOMAIN

# Names libvirt objects are looked up by and that end up in XML and file names: plain words.
_OBJECT_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}$"
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class GroupResources(BaseModel):
    """Per-group overrides of the pool's default size; a field left out keeps the default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    memory_mb: int | None = Field(default=None, ge=128, le=4 * 1024 * 1024)
    vcpus: int | None = Field(default=None, ge=1, le=512)
    disk_gb: int | None = Field(default=None, ge=1, le=64 * 1024)


class LibvirtOptions(BaseModel):
    """The options of a libvirt pool (its entry in pools.yaml).

    - `uri`: the libvirt connection URI (`qemu:///session`, `qemu+ssh://host/system`,
      `test:///default` for tests). Only the `qemu` and `test` drivers are accepted.
    - `image`: absolute path of the manifest (`image.json`) of an image `crv image build` made:
      its qcow2 disk is the base of every node's disk, its kernel and initrd boot the node
      (direct kernel boot, the manifest's command line), and every file's SHA-256 is checked
      against the manifest before a node is made (a mismatch is refused: FAULTS F10).
    - `base_image`: instead of `image`, absolute path on the hypervisor host of a base disk
      image (a bootable cloud image with cloud-init and python3); on a local hypervisor a
      qcow2 with a backing file is refused (crv did not make that chain).
    - `base_format`: the base image's format, `qcow2` (default) or `raw`.
    - `storage_pool`: the libvirt storage pool the node disks (and seed volumes) go to.
    - `network`: the libvirt network the node's one interface is attached to.
    - `memory_mb`, `vcpus`, `disk_gb`: the size of a node (the disk is thin: an overlay).
    - `groups`: per-group overrides of those three, e.g. `{"db": {"memory_mb": 4096}}`.
    - `domain_type`: `kvm` (default) or `qemu` (pure emulation); `test:` URIs always use
      `test`.
    - `seed`: where the cloud-init seed ISO lives: `auto`, `file` or `volume` (module doc).
    - `max_nodes`: at most this many nodes (crv's domains, of any cluster) at a time; the
      pool's `capacity()`. None (default): no limit known to crv.
    - `service_address`: the address the guests reach the crv service at (the lab's bridge
      address, `crv lab up` sets it); None: the address the service was started with.
    - `console_log`: keep each guest's serial console in `<state_dir>/consoles/<node>.log`
      (local hypervisors only; the lab turns it on).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    uri: str = Field(default="qemu:///session", min_length=1, max_length=500)
    image: str = Field(default="", max_length=4096)
    base_image: str = Field(default="", max_length=4096)
    base_format: Literal["qcow2", "raw"] = "qcow2"
    storage_pool: str = Field(default="default", pattern=_OBJECT_NAME)
    network: str = Field(default="default", pattern=_OBJECT_NAME)
    memory_mb: int = Field(default=1024, ge=128, le=4 * 1024 * 1024)
    vcpus: int = Field(default=1, ge=1, le=512)
    disk_gb: int = Field(default=10, ge=1, le=64 * 1024)
    groups: dict[str, GroupResources] = Field(default_factory=dict)
    domain_type: Literal["kvm", "qemu"] = "kvm"
    seed: Literal["auto", "file", "volume"] = "auto"
    max_nodes: int | None = Field(default=None, ge=0, le=100_000)
    service_address: IPvAnyAddress | None = None
    console_log: bool = False

    @model_validator(mode="after")
    def _one_image(self) -> LibvirtOptions:
        if bool(self.image) == bool(self.base_image):
            raise ValueError("give exactly one of image (a crv image.json) or base_image")
        return self

    @field_validator("uri", "base_image", "image")
    @classmethod
    def _one_line(cls, value: str) -> str:
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ValueError("must not contain control characters")
        return value


class _Uri:
    """The parts of a libvirt URI that decide what can be checked and where the seed goes."""

    def __init__(self, uri: str) -> None:
        parts = urlsplit(uri)
        self.driver, _, self.transport = parts.scheme.partition("+")
        self.host = parts.hostname or ""
        self.path = parts.path

    @property
    def local(self) -> bool:
        """The hypervisor runs on this machine (so its files are our files)."""
        return not self.host and self.transport in ("", "unix")

    @property
    def session(self) -> bool:
        """Guests run as this user: they can read files we write to our state directory."""
        return self.local and (self.driver == "test" or self.path == "/session")


def seed_iso(spec: NodeSpec) -> bytes:
    """The NoCloud seed of a node: an ISO 9660 image (Joliet and Rock Ridge names, which is
    what cloud-init reads) labelled `cidata`, holding `user-data` and `meta-data`."""
    files = {
        "user-data": cloudinit.user_data(spec.bootstrap, spec.name),
        "meta-data": yaml.safe_dump(
            {"instance-id": f"crv-{spec.cluster}-{spec.name}", "local-hostname": spec.name},
            sort_keys=False,
        ).encode(),
    }
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=SEED_VOLUME_ID)
    for index, (name, data) in enumerate(files.items()):
        iso.add_fp(
            io.BytesIO(data),
            len(data),
            f"/SEED{index}.;1",  # ISO 9660 names are 8.3 upper case; the real names are below
            rr_name=name,
            joliet_path=f"/{name}",
        )
    out = io.BytesIO()
    iso.write_fp(out)
    iso.close()
    return out.getvalue()


def _error_text(exc: libvirt.libvirtError) -> str:
    message = exc.get_error_message() or str(exc)
    return " ".join(message.split())


class LibvirtPool(MaxNodes):
    """Nodes as libvirt domains on `options.uri`; local state (locks, seed files) under
    `state_dir`. See the module docstring for what a node is made of."""

    def __init__(self, name: str, state_dir: Path, options: LibvirtOptions) -> None:
        self.name = name
        self.state_dir = Path(os.path.abspath(state_dir))
        self.options = options
        self.max_nodes = options.max_nodes
        # where the guests dial the service (crv.engine.stages puts it in the bootstrap)
        self.service_address = str(options.service_address) if options.service_address else None
        self._uri = _Uri(options.uri)
        self._conn: libvirt.virConnect | None = None
        self._conn_lock = threading.Lock()

    # -- the contract ----------------------------------------------------------------------------

    def validate(self) -> None:
        """Offline checks only (no libvirt connection): the URI names a known driver and
        transport; `base_image` is an absolute path, and on a local qemu hypervisor one that
        exists as a file (on a remote host or the in-memory test driver it cannot be seen from
        here, so it is left to create_node); `seed: file` only where the guest can read it."""
        uri, opts = self._uri, self.options
        if uri.driver not in DRIVERS or uri.transport not in TRANSPORTS:
            known = ", ".join(f"{d}:" for d in DRIVERS)
            self._refuse("uri", f"{opts.uri!r} is not a known libvirt URI ({known})")
        if uri.driver == "qemu" and uri.path not in ("/session", "/system"):
            self._refuse("uri", f"{opts.uri!r}: a qemu URI ends in /session or /system")
        option = "image" if opts.image else "base_image"
        path = opts.image or opts.base_image
        if not path.startswith("/"):
            self._refuse(option, f"{path!r} is not an absolute path")
        if uri.local and uri.driver == "qemu" and not Path(path).is_file():
            self._refuse(option, f"{path} does not exist or is not a file")
        if opts.image and uri.local:
            self._manifest()  # readable, and names its files
        if opts.console_log and not uri.local:
            self._refuse("console_log", "only for a hypervisor on this machine")
        if opts.seed == "file" and not uri.session:
            self._refuse("seed", f"'file' needs a session or test URI, not {opts.uri!r}")
        bad = [g for g in opts.groups if not _NODE_NAME.match(g)]
        if bad:
            self._refuse("groups", f"{bad[0]!r} is not a group name")

    def list_nodes(self, cluster: str | None = None) -> list[NodeInfo]:
        with self._translated("list nodes"):
            domains = self._connect().listAllDomains(0)
            nodes = [info for dom in domains if (info := self._describe(dom)) is not None]
        nodes.sort(key=lambda n: n.name)
        return [n for n in nodes if cluster is None or n.cluster == cluster]

    def get_node(self, name: str) -> NodeInfo | None:
        self._check_name(name)
        with self._translated(f"get node {name}"):
            dom = self._lookup(name)
            return None if dom is None else self._describe(dom)

    def create_node(self, spec: NodeSpec) -> NodeInfo:
        """Disk, seed, domain, start. An existing domain of the node (same cluster) is
        returned, started if it was off; a half-made node (volumes or seed without a domain)
        is cleared and made again."""
        self._check_name(spec.name)
        with self._translated(f"create node {spec.name}"), self._flock(spec.name):
            conn = self._connect()
            dom = self._lookup(spec.name)
            if dom is not None:
                meta = self._metadata(dom)
                if meta is None or meta["cluster"] != spec.cluster:
                    owner = "no crv cluster" if meta is None else f"cluster {meta['cluster']!r}"
                    message = f"domain {spec.name} exists and belongs to {owner}"
                    raise PoolError(self.name, f"{message}, not {spec.cluster!r}")
                if not dom.isActive():
                    dom.create()
                info = self._describe(dom)
                assert info is not None  # it has our metadata
                return info
            pool = conn.storagePoolLookupByName(self.options.storage_pool)
            conn.networkLookupByName(self.options.network)  # an unknown network: permanent
            self._check_base_image()
            self._remove_volumes(pool, spec.name)  # leftovers of a half-made node
            try:
                dom = self._make(conn, pool, spec)
            except BaseException:
                with suppress(Exception):
                    self._remove(conn, spec.name)
                raise
            info = self._describe(dom)
            assert info is not None
            return info

    def destroy_node(self, name: str) -> None:
        """Power off, undefine, then delete its disk and seed; each step skips what is gone.
        A domain of that name without crv metadata is refused, never destroyed."""
        self._check_name(name)
        with self._translated(f"destroy node {name}"), self._flock(name):
            conn = self._connect()
            dom = self._lookup(name)
            if dom is not None and self._metadata(dom) is None:
                raise PoolError(self.name, f"domain {name} is not a crv node; not destroying it")
            self._remove(conn, name)

    # -- making and removing -----------------------------------------------------------------------

    def _make(self, conn: libvirt.virConnect, pool: libvirt.virStoragePool, spec: NodeSpec) -> Any:
        size = self._resources(spec.group)
        seed_file = self._seed_path(spec.name) if self._seed_mode() == "file" else None
        iso = seed_iso(spec)
        if seed_file is not None:
            _write_private(seed_file, iso)
        else:
            volume = pool.createXML(self._volume_xml(f"{spec.name}-seed.iso", len(iso)), 0)
            stream = conn.newStream(0)
            try:
                volume.upload(stream, 0, len(iso), 0)
                stream.send(iso)
                stream.finish()
            except BaseException:
                with suppress(libvirt.libvirtError):
                    stream.abort()
                raise
        base_path, base_format = self._base()
        disk_xml = self._volume_xml(
            f"{spec.name}.qcow2",
            size["disk_gb"] * GIB,
            backing_path=base_path,
            backing_format=base_format,
            format="qcow2",
        )
        pool.createXML(disk_xml, 0)
        dom = conn.defineXML(self.domain_xml(spec))
        dom.create()
        return dom

    def _remove(self, conn: libvirt.virConnect, name: str) -> None:
        dom = self._lookup(name)
        if dom is not None:
            try:
                if dom.isActive():
                    dom.destroy()
                _undefine(dom)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != _MISSING_DOMAIN:  # gone meanwhile: fine
                    raise
        try:
            pool = conn.storagePoolLookupByName(self.options.storage_pool)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_POOL:
                raise
        else:
            self._remove_volumes(pool, name)
        self._seed_path(name).unlink(missing_ok=True)
        self._console_path(name).unlink(missing_ok=True)

    @staticmethod
    def _remove_volumes(pool: libvirt.virStoragePool, name: str) -> None:
        for volume_name in (f"{name}.qcow2", f"{name}-seed.iso"):
            try:
                pool.storageVolLookupByName(volume_name).delete(0)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != _MISSING_VOLUME:
                    raise

    # -- XML ---------------------------------------------------------------------------------------

    def domain_xml(self, spec: NodeSpec) -> str:
        """The domain of a node. Only validated values go in, and all of them escaped."""
        size = self._resources(spec.group)
        seed_file = self._seed_path(spec.name) if self._seed_mode() == "file" else None
        boot = self._kernel_boot()
        console = self._console_path(spec.name) if self.options.console_log else None
        if console is not None:
            console.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        return render(
            "libvirt-domain.xml.j2",
            domain_type="test" if self._uri.driver == "test" else self.options.domain_type,
            namespace=NAMESPACE,
            name=spec.name,
            cluster=spec.cluster,
            group=spec.group,
            tags=sorted(spec.tags.items()),
            memory_mb=size["memory_mb"],
            vcpus=size["vcpus"],
            storage_pool=self.options.storage_pool,
            disk_volume=f"{spec.name}.qcow2",
            seed_file=str(seed_file) if seed_file else "",
            seed_volume=f"{spec.name}-seed.iso",
            network=self.options.network,
            kernel=boot[0],
            initrd=boot[1],
            cmdline=boot[2],
            console_log=str(console) if console else "",
        )

    @staticmethod
    def _volume_xml(
        name: str,
        capacity: int,
        *,
        backing_path: str = "",
        backing_format: str = "",
        format: str = "raw",
    ) -> str:
        return render(
            "libvirt-volume.xml.j2",
            name=name,
            capacity=capacity,
            format=format,
            backing_path=backing_path,
            backing_format=backing_format,
        )

    # -- reading domains ---------------------------------------------------------------------------

    def _describe(self, dom: Any) -> NodeInfo | None:
        """A domain as NodeInfo, None if it is not a crv node (or vanished meanwhile)."""
        try:
            meta = self._metadata(dom)
            if meta is None:
                return None
            state, _reason = dom.state()
            uuid = dom.UUIDString()
            address = self._address(dom) if dom.isActive() else None
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == _MISSING_DOMAIN:
                return None
            raise
        tags = {**meta["tags"], TAG_CLUSTER: meta["cluster"], TAG_NODE: meta["name"]}
        extra = {"uri": self.options.uri, "uuid": uuid, "group": meta["group"]}
        return NodeInfo(
            meta["name"], meta["cluster"], _STATES.get(state, "error"), address, tags, extra
        )

    @staticmethod
    def _metadata(dom: Any) -> dict[str, Any] | None:
        """crv's metadata element of a domain, None if it has none (not ours)."""
        try:
            text = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NAMESPACE, 0)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                return None
            raise
        root = ET.fromstring(text)  # libvirt's own serialisation of what we wrote

        def child(tag: str) -> str:
            element = root.find(tag)
            return element.text or "" if element is not None else ""

        if not child("cluster") or not child("name"):
            return None
        tags = {t.get("key", ""): t.text or "" for t in root.findall("tag")}
        return {
            "name": child("name"),
            "cluster": child("cluster"),
            "group": child("group"),
            "tags": tags,
        }

    @staticmethod
    def _address(dom: Any) -> str | None:
        """The first IPv4 (else IPv6) address from the DHCP lease or the guest agent."""
        for source in (
            libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE,
            libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT,
            libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP,  # the hypervisor's neighbour table
        ):
            try:
                interfaces = dom.interfaceAddresses(source, 0) or {}
            except libvirt.libvirtError:
                continue  # no lease yet, no agent, unsupported: try the next source
            found = [
                (a.get("type"), a.get("addr"))
                for iface in interfaces.values()
                for a in iface.get("addrs") or []
                if a.get("addr") and not str(a.get("addr")).startswith(("127.", "::1", "fe80"))
            ]
            found.sort(key=lambda t: t[0] != libvirt.VIR_IP_ADDR_TYPE_IPV4)
            if found:
                return str(found[0][1])
        return None

    # -- helpers -----------------------------------------------------------------------------------

    def _connect(self) -> libvirt.virConnect:
        """One connection, reopened when it died (a restarted daemon)."""
        with self._conn_lock:
            if self._conn is not None:
                try:
                    alive = self._conn.isAlive() == 1
                except libvirt.libvirtError:
                    alive = False
                if alive:
                    return self._conn
                with suppress(libvirt.libvirtError):
                    self._conn.close()
                self._conn = None
            _quiet_libvirt()
            self._conn = libvirt.open(self.options.uri)
            return self._conn

    def _lookup(self, name: str) -> Any:
        try:
            return self._connect().lookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == _MISSING_DOMAIN:
                return None
            raise

    def _resources(self, group: str) -> dict[str, int]:
        opts = self.options
        override = opts.groups.get(group, GroupResources())
        return {
            "memory_mb": override.memory_mb or opts.memory_mb,
            "vcpus": override.vcpus or opts.vcpus,
            "disk_gb": override.disk_gb or opts.disk_gb,
        }

    def _seed_mode(self) -> str:
        if self.options.seed != "auto":
            return self.options.seed
        return "file" if self._uri.session else "volume"

    def _seed_path(self, name: str) -> Path:
        return self.state_dir / "seeds" / f"{name}-seed.iso"

    def _console_path(self, name: str) -> Path:
        return self.state_dir / "consoles" / f"{name}.log"

    def _manifest(self) -> images.ImageManifest:
        try:
            return images.load(Path(self.options.image))
        except images.ImageError as exc:
            self._refuse("image", str(exc))

    def _base(self) -> tuple[str, str]:
        """The base disk every node's disk is an overlay of: (path, format)."""
        if not self.options.image:
            return self.options.base_image, self.options.base_format
        manifest = self._manifest()
        return str(manifest.path("disk")), manifest.files["disk"].format or "qcow2"

    def _kernel_boot(self) -> tuple[str, str, str]:
        """(kernel, initrd, command line) of a crv image (direct kernel boot); empty strings
        for a base_image, which boots its own loader."""
        if not self.options.image:
            return "", "", ""
        manifest = self._manifest()
        return str(manifest.path("kernel")), str(manifest.path("initrd")), manifest.cmdline

    def _check_base_image(self) -> None:
        """On a hypervisor on this machine: the base exists, a crv image's files are the ones
        its manifest names (SHA-256), and no base disk has a backing file (a chain crv did not
        make could read anything: FAULTS F10). Remote hypervisors check their own files, and
        a stock base_image is looked at only by a real (qemu) hypervisor."""
        if not self._uri.local or (self._uri.driver != "qemu" and not self.options.image):
            return
        option = "image" if self.options.image else "base_image"
        base, base_format = self._base()
        if not Path(base).is_file():
            self._refuse(option, f"{base} does not exist")
        try:
            if self.options.image:
                manifest = self._manifest()
                for role in ("disk", "kernel", "initrd"):
                    images.verify(manifest.path(role), manifest.files[role].sha256)
            backing = images.backing_file(Path(base), base_format)
        except images.ImageError as exc:
            self._refuse(option, str(exc))
        if backing:
            self._refuse(
                option,
                f"{base} has a backing file ({backing}); crv refuses a chain it did not make",
            )

    def _check_name(self, name: str) -> None:
        """Node names become domain, volume and file names: refuse anything unusual."""
        if not _NODE_NAME.match(name):
            raise PoolError(self.name, f"unusable node name {name[:80]!r}")

    def _refuse(self, option: str, message: str) -> NoReturn:
        raise PoolError(self.name, f"option {option}: {message}")

    @contextmanager
    def _flock(self, name: str) -> Iterator[None]:
        """One lock per node name (threads and processes): create and destroy of a node do not
        interleave. Lock files are never deleted: unlinking one races with its waiters."""
        with exclusive(self.state_dir / ".locks" / name):
            yield

    @contextmanager
    def _translated(self, action: str) -> Iterator[None]:
        """libvirt and OS errors become one-line PoolErrors that say whether to retry."""
        try:
            yield
        except libvirt.libvirtError as exc:
            temporary = exc.get_error_code() in _TEMPORARY_CODES
            if temporary:  # the connection may be what broke: open a fresh one next time
                with self._conn_lock:
                    self._conn = None
            raise PoolError(
                self.name, f"{action}: {_error_text(exc)}", temporary=temporary
            ) from None
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename else ""
            raise PoolError(self.name, f"{action}: {exc.strerror or exc}{where}") from None


_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: "pending",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "running",  # running, waiting on I/O
    libvirt.VIR_DOMAIN_PAUSED: "stopped",
    libvirt.VIR_DOMAIN_SHUTDOWN: "stopped",  # shutting down
    libvirt.VIR_DOMAIN_SHUTOFF: "stopped",
    libvirt.VIR_DOMAIN_CRASHED: "error",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "stopped",
}

_quiet_lock = threading.Lock()
_quieted = False


def _quiet_libvirt() -> None:
    """libvirt prints every error to stderr by default; ours become PoolErrors instead."""
    global _quieted
    with _quiet_lock:
        if not _quieted:
            libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
            _quieted = True


def _undefine(dom: Any) -> None:
    """Undefine with its managed save, snapshot metadata and NVRAM; drivers that do not know
    some of these flags (the test driver refuses NVRAM) get a plain undefine."""
    flags = (
        libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
        | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
    )
    try:
        dom.undefineFlags(flags)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() not in (libvirt.VIR_ERR_INVALID_ARG, libvirt.VIR_ERR_NO_SUPPORT):
            raise
        dom.undefine()


def _write_private(path: Path, data: bytes) -> None:
    """The seed holds the bootstrap token: mode 0600 from the first byte, replaced atomically."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomic(path, data, 0o600)
