"""The libvirt pool against libvirt's `test:///default` driver: the real libvirt API over an
in-memory hypervisor, no daemon. That hypervisor is one per process and shared by every
connection, so each test uses its own cluster and node names and cleans up after itself.

What the test driver does not do (and how the pool copes): it cannot upload into volumes, so
the seed ISO is a file in the state directory (seed "auto" -> "file" for test:); it does not
check the storage pool or network a domain names, so the pool looks both up itself first.
"""

from __future__ import annotations

import io
import json
import stat
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import libvirt  # type: ignore[import-untyped]
import pycdlib
import pytest
from pydantic import ValidationError

from pools import cloudinit
from pools.base import TAG_CLUSTER, TAG_NODE, NodeSpec, Pool, PoolError
from pools.libvirt import NAMESPACE, LibvirtOptions, LibvirtPool

URI = "test:///default"
STORAGE_POOL = "default-pool"  # the test driver's one storage pool (its network is "default")
BASE_IMAGE = "/default-pool/base & <image>.qcow2"  # metacharacters on purpose: escaped, not read
TOKEN = "tok-" + "S" * 39


def options(**overrides: object) -> LibvirtOptions:
    values: dict[str, object] = {
        "uri": URI,
        "base_image": BASE_IMAGE,
        "storage_pool": STORAGE_POOL,
        "network": "default",
        "memory_mb": 512,
        "vcpus": 1,
        "disk_gb": 2,
    }
    return LibvirtOptions.model_validate({**values, **overrides})


def make_pool(tmp_path: Path) -> LibvirtPool:
    """A libvirt pool on the in-memory test hypervisor (the shared contract suite uses it)."""
    return LibvirtPool("vm", tmp_path / "pool-vm", options())


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def spec(name: str, cluster: str, group: str = "workers", **tags: str) -> NodeSpec:
    bootstrap = {
        "service": "https://127.0.0.1:8443",
        "ca": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        "ca_sha256": "ab" * 32,
        "cluster": cluster,
        "node": name,
        "token": TOKEN,
    }
    return NodeSpec(name, cluster, group, bootstrap=bootstrap, tags=tags)


@pytest.fixture
def conn() -> Iterator[object]:
    c = libvirt.open(URI)
    yield c
    c.close()


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[LibvirtPool]:
    p = make_pool(tmp_path)
    yield p
    for node in p.list_nodes():  # only what this test made: names are unique per test
        if node.cluster.startswith("t-"):
            p.destroy_node(node.name)


def volumes(conn: object) -> set[str]:
    return {v.name() for v in conn.storagePoolLookupByName(STORAGE_POOL).listAllVolumes(0)}  # type: ignore[attr-defined]


def read_iso(data: bytes) -> tuple[str, dict[str, bytes]]:
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(data))
    files = {}
    for name in ("user-data", "meta-data"):
        out = io.BytesIO()
        iso.get_file_from_iso_fp(out, joliet_path=f"/{name}")
        rr = io.BytesIO()
        iso.get_file_from_iso_fp(rr, rr_path=f"/{name}")
        assert rr.getvalue() == out.getvalue()
        files[name] = out.getvalue()
    label = iso.pvd.volume_identifier.decode().strip()
    iso.close()
    return label, files


# -- the contract ------------------------------------------------------------------------------


def test_is_a_pool_and_validates(pool: LibvirtPool) -> None:
    assert isinstance(pool, Pool)
    pool.validate()


def test_create_get_list_only_its_cluster(pool: LibvirtPool, conn: object) -> None:
    cluster, other = unique("t-a"), unique("t-b")
    mine, theirs = unique("n-"), unique("n-")
    info = pool.create_node(spec(mine, cluster, role="web"))
    pool.create_node(spec(theirs, other))
    assert info.name == mine and info.cluster == cluster and info.state == "running"
    assert info.tags == {"role": "web", TAG_CLUSTER: cluster, TAG_NODE: mine}
    assert info.extra["uri"] == URI and info.extra["group"] == "workers"
    assert info.address is not None and info.address.count(".") == 3  # the test driver's lease
    assert pool.get_node(mine) == info
    assert [n.name for n in pool.list_nodes(cluster)] == [mine]
    everything = {n.name for n in pool.list_nodes()}
    assert {mine, theirs} <= everything
    assert "test" not in everything  # the test driver's own domain has no crv metadata
    assert pool.get_node("test") is None  # not ours, even by name
    assert pool.get_node(unique("absent-")) is None


def test_create_is_idempotent(pool: LibvirtPool, conn: object) -> None:
    cluster, name = unique("t-"), unique("n-")
    first = pool.create_node(spec(name, cluster))
    before = volumes(conn)
    again = pool.create_node(spec(name, cluster))
    assert again.extra["uuid"] == first.extra["uuid"]
    assert [d.name() for d in conn.listAllDomains(0)].count(name) == 1  # type: ignore[attr-defined]
    assert volumes(conn) == before


def test_create_starts_a_stopped_node(pool: LibvirtPool, conn: object) -> None:
    cluster, name = unique("t-"), unique("n-")
    pool.create_node(spec(name, cluster))
    conn.lookupByName(name).destroy()  # type: ignore[attr-defined]
    stopped = pool.get_node(name)
    assert stopped is not None and stopped.state == "stopped" and stopped.address is None
    assert pool.create_node(spec(name, cluster)).state == "running"


def test_same_name_in_another_cluster_is_refused(pool: LibvirtPool) -> None:
    name = unique("n-")
    pool.create_node(spec(name, unique("t-a")))
    with pytest.raises(
        PoolError, match=r"^pool vm: domain n-\w+ exists and belongs to cluster"
    ) as exc:
        pool.create_node(spec(name, unique("t-b")))
    assert not exc.value.temporary


def test_destroy_removes_domain_volumes_and_seed(pool: LibvirtPool, conn: object) -> None:
    cluster, name = unique("t-"), unique("n-")
    pool.create_node(spec(name, cluster))
    seed = pool.state_dir / "seeds" / f"{name}-seed.iso"
    assert seed.is_file() and f"{name}.qcow2" in volumes(conn)
    pool.destroy_node(name)
    assert pool.get_node(name) is None
    assert name not in [d.name() for d in conn.listAllDomains(0)]  # type: ignore[attr-defined]
    assert not any(v.startswith(name) for v in volumes(conn))
    assert not seed.exists()
    pool.destroy_node(name)  # again: nothing there, still fine
    pool.destroy_node(unique("never-"))


def test_destroy_clears_a_half_made_node(pool: LibvirtPool, conn: object) -> None:
    """A create killed after its volumes but before its domain: destroy (and create) clean up."""
    name = unique("n-")
    storage = conn.storagePoolLookupByName(STORAGE_POOL)  # type: ignore[attr-defined]
    for volume in (f"{name}.qcow2", f"{name}-seed.iso"):
        storage.createXML(f"<volume><name>{volume}</name><capacity>1024</capacity></volume>", 0)
    seed = pool.state_dir / "seeds" / f"{name}-seed.iso"
    seed.parent.mkdir(parents=True)
    seed.write_bytes(b"old")
    pool.destroy_node(name)
    assert not any(v.startswith(name) for v in volumes(conn)) and not seed.exists()

    storage.createXML(f"<volume><name>{name}.qcow2</name><capacity>1024</capacity></volume>", 0)
    info = pool.create_node(spec(name, unique("t-")))  # the leftover is replaced, not reused
    assert info.state == "running"
    disk = storage.storageVolLookupByName(f"{name}.qcow2")
    assert disk.info()[1] == 2 * 2**30


def test_destroy_refuses_a_domain_that_is_not_crv(pool: LibvirtPool) -> None:
    with pytest.raises(PoolError, match=r"^pool vm: domain test is not a crv node"):
        pool.destroy_node("test")


# -- what the node receives --------------------------------------------------------------------


def test_seed_iso_carries_exactly_the_bootstrap(pool: LibvirtPool) -> None:
    cluster, name = unique("t-"), unique("n-")
    node = spec(name, cluster)
    pool.create_node(node)
    seed = pool.state_dir / "seeds" / f"{name}-seed.iso"
    assert stat.S_IMODE(seed.stat().st_mode) == 0o600
    label, files = read_iso(seed.read_bytes())
    assert label == "cidata"
    assert files["user-data"] == cloudinit.user_data(node.bootstrap, name)
    written = cloudinit.parse(files["user-data"])
    assert json.loads(written[cloudinit.BOOTSTRAP_PATH]) == dict(node.bootstrap)
    assert written[cloudinit.AGENT_PATH].startswith(b"#!/usr/bin/env python3\n")
    assert files["meta-data"].decode() == (
        f"instance-id: crv-{cluster}-{name}\nlocal-hostname: {name}\n"
    )


GOLDEN_DOMAIN = """\
<domain type="kvm">
  <name>demo-web-0</name>
  <title>crv node demo-web-0 of cluster demo</title>
  <metadata>
    <crv:node xmlns:crv="https://crv.dev/xmlns/libvirt-node/1">
      <crv:name>demo-web-0</crv:name>
      <crv:cluster>demo</crv:cluster>
      <crv:group>web</crv:group>
      <crv:tag key="k">a&lt;b</crv:tag>
    </crv:node>
  </metadata>
  <memory unit="MiB">1024</memory>
  <currentMemory unit="MiB">1024</currentMemory>
  <vcpu placement="static">1</vcpu>
  <os>
    <type>hvm</type>
    <boot dev="hd"/>
  </os>
  <features>
    <acpi/>
    <apic/>
  </features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type="volume" device="disk">
      <driver name="qemu" type="qcow2"/>
      <source pool="default" volume="demo-web-0.qcow2"/>
      <target dev="vda" bus="virtio"/>
    </disk>
    <disk type="file" device="cdrom">
      <driver name="qemu" type="raw"/>
      <source file="/srv/crv/pools/vm/seeds/demo-web-0-seed.iso"/>
      <target dev="sda" bus="scsi"/>
      <readonly/>
    </disk>
    <controller type="scsi" model="virtio-scsi"/>
    <interface type="network">
      <source network="default"/>
      <model type="virtio"/>
    </interface>
    <channel type="unix">
      <target type="virtio" name="org.qemu.guest_agent.0"/>
    </channel>
    <serial type="pty"/>
    <console type="pty"/>
    <rng model="virtio">
      <backend model="random">/dev/urandom</backend>
    </rng>
  </devices>
</domain>
"""


def test_domain_xml_golden() -> None:
    """The template's output, whole (house rule 7): a change to it is a reviewed change here."""
    opts = LibvirtOptions.model_validate(
        {"uri": "qemu:///session", "base_image": "/img/base.qcow2"}
    )
    pool = LibvirtPool("vm", Path("/srv/crv/pools/vm"), opts)
    node = NodeSpec("demo-web-0", "demo", "web", bootstrap={"token": TOKEN}, tags={"k": "a<b"})
    assert pool.domain_xml(node) == GOLDEN_DOMAIN


def test_domain_xml_has_metadata_disk_seed_and_network(pool: LibvirtPool, conn: object) -> None:
    cluster, name = unique("t-"), unique("n-")
    info = pool.create_node(spec(name, cluster, "db", note="a<b & 'c'"))
    assert info.tags["note"] == "a<b & 'c'"  # escaped on the way in, read back as it was
    dom = conn.lookupByName(name)  # type: ignore[attr-defined]
    xml = dom.XMLDesc(0)
    root = ET.fromstring(xml)  # well-formed
    assert root.get("type") == "test" and root.findtext("name") == name
    meta = root.find(f"metadata/{{{NAMESPACE}}}node")
    assert meta is not None
    assert meta.findtext(f"{{{NAMESPACE}}}cluster") == cluster
    assert meta.findtext(f"{{{NAMESPACE}}}name") == name
    assert meta.findtext(f"{{{NAMESPACE}}}group") == "db"
    disks = {d.get("device"): d for d in root.iter("disk")}
    assert disks["disk"].find("source").attrib == {"pool": STORAGE_POOL, "volume": f"{name}.qcow2"}  # type: ignore[union-attr]
    seed = str(pool.state_dir / "seeds" / f"{name}-seed.iso")
    assert disks["cdrom"].find("source").get("file") == seed  # type: ignore[union-attr]
    assert disks["cdrom"].find("readonly") is not None
    assert root.find("devices/interface/source").get("network") == "default"  # type: ignore[union-attr]
    assert int(root.findtext("memory") or 0) == 512 * 1024  # KiB

    volume = conn.storagePoolLookupByName(STORAGE_POOL).storageVolLookupByName(f"{name}.qcow2")  # type: ignore[attr-defined]
    vroot = ET.fromstring(volume.XMLDesc(0))
    assert vroot.findtext("backingStore/path") == BASE_IMAGE
    assert vroot.find("backingStore/format").get("type") == "qcow2"  # type: ignore[union-attr]
    assert vroot.find("target/format").get("type") == "qcow2"  # type: ignore[union-attr]

    assert TOKEN not in xml and TOKEN not in volume.XMLDesc(0)
    assert TOKEN not in repr(info) and TOKEN not in repr(pool.list_nodes())


def test_group_overrides_size_the_node(tmp_path: Path, conn: object) -> None:
    pool = LibvirtPool(
        "vm", tmp_path, options(groups={"db": {"memory_mb": 2048, "vcpus": 4, "disk_gb": 7}})
    )
    name = unique("n-")
    try:
        pool.create_node(spec(name, unique("t-"), "db"))
        root = ET.fromstring(conn.lookupByName(name).XMLDesc(0))  # type: ignore[attr-defined]
        assert int(root.findtext("memory") or 0) == 2048 * 1024
        assert root.findtext("vcpu") == "4"
        disk = conn.storagePoolLookupByName(STORAGE_POOL).storageVolLookupByName(f"{name}.qcow2")  # type: ignore[attr-defined]
        assert disk.info()[1] == 7 * 2**30
    finally:
        pool.destroy_node(name)


def test_domain_xml_template_renders_escaped(tmp_path: Path) -> None:
    pool = LibvirtPool("vm", tmp_path, options())
    xml = pool.domain_xml(spec("n-1", "t-c", "g", tag='"><evil/>'))
    root = ET.fromstring(xml)
    assert root.find(".//evil") is None
    assert root.find(f".//{{{NAMESPACE}}}tag").text == '"><evil/>'  # type: ignore[union-attr]
    assert TOKEN not in xml


# -- options and validate() --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("network", "default<x>"),
        ("network", "a b"),
        ("storage_pool", "../p"),
        ("memory_mb", 64),
        ("vcpus", 0),
        ("disk_gb", 0),
        ("base_image", "/img\n.qcow2"),
        ("domain_type", "xen"),
        ("seed", "http"),
        ("groups", {"db": {"memory_mb": 1, "vcpus": 1}}),
        ("groups", {"db": {"cpus": 2}}),
        ("unknown_option", 1),
    ],
)
def test_options_refuse_bad_values(field: str, value: object) -> None:
    with pytest.raises(ValidationError):
        options(**{field: value})


def test_options_defaults() -> None:
    opts = LibvirtOptions.model_validate({"base_image": "/var/lib/images/debian-12.qcow2"})
    assert (opts.uri, opts.storage_pool, opts.network, opts.seed) == (
        "qemu:///session",
        "default",
        "default",
        "auto",
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"uri": "bogus:///x"}, "pool vm: option uri: 'bogus:///x' is not a known libvirt URI"),
        ({"uri": "qemu+carrier-pigeon://h/system"}, "pool vm: option uri:"),
        (
            {"uri": "qemu:///nowhere"},
            "pool vm: option uri: 'qemu:///nowhere': a qemu URI ends in /session or /system",
        ),
        (
            {"base_image": "images/base.qcow2"},
            "pool vm: option base_image: 'images/base.qcow2' is not an absolute path",
        ),
        (
            {"uri": "qemu:///session", "base_image": "/nonexistent/base.qcow2"},
            "pool vm: option base_image: /nonexistent/base.qcow2 does not exist or is not a file",
        ),
        (
            {"uri": "qemu+ssh://host/system", "seed": "file"},
            "pool vm: option seed: 'file' needs a session or test URI",
        ),
        (
            {"groups": {"bad group": {"vcpus": 2}}},
            "pool vm: option groups: 'bad group' is not a group name",
        ),
    ],
)
def test_validate_refuses(tmp_path: Path, overrides: dict[str, object], message: str) -> None:
    pool = LibvirtPool("vm", tmp_path, options(**overrides))
    with pytest.raises(PoolError) as exc:
        pool.validate()
    assert str(exc.value).startswith(message)
    assert not exc.value.temporary


def test_validate_is_offline_and_accepts_remote_and_existing_images(tmp_path: Path) -> None:
    image = tmp_path / "base.qcow2"
    image.write_bytes(b"QFI\xfb")
    LibvirtPool("vm", tmp_path, options(uri="qemu:///session", base_image=str(image))).validate()
    # an unreachable host: validate does not connect, and cannot see the remote image
    remote = options(uri="qemu+tcp://127.0.0.1:1/system", base_image="/var/lib/x.qcow2")
    LibvirtPool("vm", tmp_path, remote).validate()


# -- error classification ----------------------------------------------------------------------


def test_unknown_storage_pool_is_permanent(tmp_path: Path) -> None:
    pool = LibvirtPool("vm", tmp_path, options(storage_pool="no-such-pool"))
    with pytest.raises(PoolError) as exc:
        pool.create_node(spec(unique("n-"), unique("t-")))
    assert not exc.value.temporary
    assert str(exc.value).startswith("pool vm: create node n-")
    assert "no-such-pool" in str(exc.value) and "\n" not in str(exc.value)


def test_unknown_network_is_permanent_and_leaves_nothing(tmp_path: Path, conn: object) -> None:
    pool = LibvirtPool("vm", tmp_path, options(network="no-such-net"))
    name = unique("n-")
    with pytest.raises(PoolError, match="no-such-net") as exc:
        pool.create_node(spec(name, unique("t-")))
    assert not exc.value.temporary
    assert pool.get_node(name) is None and not any(v.startswith(name) for v in volumes(conn))


def test_failed_seed_upload_is_permanent_and_cleaned_up(tmp_path: Path, conn: object) -> None:
    """The test driver cannot upload into volumes (VIR_ERR_NO_SUPPORT): a permanent error,
    the half-made seed volume is removed, and the token is not in the message."""
    pool = LibvirtPool("vm", tmp_path, options(seed="volume"))
    name = unique("n-")
    with pytest.raises(PoolError, match=r"^pool vm: create node n-\w+: .*not supported") as exc:
        pool.create_node(spec(name, unique("t-")))
    assert not exc.value.temporary and TOKEN not in str(exc.value)
    assert not any(v.startswith(name) for v in volumes(conn))
    assert pool.get_node(name) is None


def test_unreachable_hypervisor_is_temporary(tmp_path: Path) -> None:
    pool = LibvirtPool("vm", tmp_path, options(uri="qemu+tcp://127.0.0.1:1/system"))
    for call in (pool.list_nodes, lambda: pool.get_node("n-1"), lambda: pool.destroy_node("n-1")):
        with pytest.raises(PoolError, match=r"^pool vm: .*127\.0\.0\.1:1") as exc:
            call()
        assert exc.value.temporary and "\n" not in str(exc.value)


def test_node_names_are_checked(pool: LibvirtPool) -> None:
    for bad in ("", "../x", "a<b", "x" * 64, "-x"):
        with pytest.raises(PoolError, match=r"^pool vm: unusable node name") as exc:
            pool.get_node(bad)
        assert not exc.value.temporary


# The bootstrap data proven end to end (the real agent enrolling from the seed ISO) is in
# tests/test_machines.py; a whole deploy through this pool is in tests/test_pools_e2e.py.


def test_capacity_is_max_nodes_minus_the_domains_held(tmp_path: Path) -> None:
    assert make_pool(tmp_path).capacity() is None
    p = LibvirtPool("vm", tmp_path / "capped", options(max_nodes=100))
    held = len(p.list_nodes())  # the shared in-memory hypervisor may hold other tests' nodes
    cluster = unique("t-")
    p.create_node(spec(unique("n"), cluster))
    try:
        assert p.capacity() == max(0, 100 - held - 1)
    finally:
        for node in p.list_nodes(cluster):
            p.destroy_node(node.name)


# -- crv images (image: a manifest from `crv image build`) -------------------------------------


def crv_image(root: Path, *, backing: bool = False) -> Path:
    """A small image directory as lab/images.py writes it: a qcow2 disk (made by qemu-img, with
    a backing file when asked), a kernel and an initrd, and image.json with their SHA-256."""
    import hashlib
    import subprocess

    root.mkdir(parents=True, exist_ok=True)
    if backing:
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(root / "other.raw"), "1M"],
                       check=True)  # fmt: skip
        extra = ["-b", str(root / "other.raw"), "-F", "raw"]
    else:
        extra = []
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *extra, str(root / "disk.qcow2"),
                    "16M"], check=True)  # fmt: skip
    (root / "vmlinuz").write_bytes(b"kernel")
    (root / "initrd.img").write_bytes(b"initrd")
    files = {}
    for role, name in (("disk", "disk.qcow2"), ("kernel", "vmlinuz"), ("initrd", "initrd.img")):
        data = (root / name).read_bytes()
        files[role] = {"path": name, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    files["disk"]["format"] = "qcow2"
    manifest = {"format": 1, "key": "k" * 16, "cmdline": "root=/dev/vda rw console=ttyS0",
                "files": files}  # fmt: skip
    (root / "image.json").write_text(json.dumps(manifest))
    return root / "image.json"


needs_qemu_img = pytest.mark.skipif(
    __import__("shutil").which("qemu-img") is None, reason="qemu-img (Debian qemu-utils) missing"
)


@needs_qemu_img
def test_a_crv_image_boots_its_kernel_with_a_checked_disk(tmp_path: Path, conn: object) -> None:
    manifest = crv_image(tmp_path / "img")
    pool = LibvirtPool("vm", tmp_path / "pool", options(base_image="", image=str(manifest),
                                                        service_address="10.77.3.1"))  # fmt: skip
    pool.validate()
    assert pool.service_address == "10.77.3.1"
    cluster, name = unique("t-"), unique("n-")
    try:
        pool.create_node(spec(name, cluster))
        dom = ET.fromstring(conn.lookupByName(name).XMLDesc(0))  # type: ignore[attr-defined]
        assert dom.findtext("os/kernel") == str(tmp_path / "img" / "vmlinuz")
        assert dom.findtext("os/initrd") == str(tmp_path / "img" / "initrd.img")
        assert dom.findtext("os/cmdline") == "root=/dev/vda rw console=ttyS0"
        assert "<boot " not in pool.domain_xml(spec(name, cluster))  # the kernel, not a disk
        cdrom = dom.find("devices/disk[@device='cdrom']/target")
        assert cdrom is not None and cdrom.get("bus") == "scsi"  # cloud kernels have no AHCI
        disk = conn.storagePoolLookupByName(STORAGE_POOL).storageVolLookupByName(f"{name}.qcow2")  # type: ignore[attr-defined]
        assert str(tmp_path / "img" / "disk.qcow2") in disk.XMLDesc(0)
    finally:
        pool.destroy_node(name)


@needs_qemu_img
@pytest.mark.parametrize("fault", ["checksum", "backing", "corrupt", "missing", "manifest"])
def test_a_bad_image_is_refused_naming_the_option_and_nothing_is_made(
    tmp_path: Path, conn: object, fault: str
) -> None:
    """FAULTS F10: a disk or kernel that is not the one the manifest names, a qcow2 with a
    backing file crv did not make, a corrupt qcow2, a missing file, a broken manifest."""
    manifest = crv_image(tmp_path / "img", backing=fault == "backing")
    disk = tmp_path / "img" / "disk.qcow2"
    if fault == "checksum":
        (tmp_path / "img" / "vmlinuz").write_bytes(b"another kernel")
    elif fault == "corrupt":
        import hashlib

        disk.write_bytes(b"QFI\xfb" + b"\0" * 100)  # qcow2 magic, nothing valid after it
        data = json.loads(manifest.read_text())
        data["files"]["disk"]["sha256"] = hashlib.sha256(disk.read_bytes()).hexdigest()
        manifest.write_text(json.dumps(data))
    elif fault == "missing":
        disk.unlink()
    elif fault == "manifest":
        manifest.write_text('{"format": 1, "key": "x", "files": {"disk": {"path": "../etc"}}}')
    pool = LibvirtPool("vm", tmp_path / "pool", options(base_image="", image=str(manifest)))
    cluster, name = unique("t-"), unique("n-")
    with pytest.raises(PoolError) as err:
        pool.create_node(spec(name, cluster))
    message = str(err.value)
    assert "option image:" in message and "\n" not in message
    assert not err.value.temporary
    expected = {"checksum": "SHA-256", "backing": "backing file", "corrupt": "not a usable disk",
                "missing": "does not exist", "manifest": "files.disk"}[fault]  # fmt: skip
    assert expected in message
    assert pool.get_node(name) is None
    assert not {f"{name}.qcow2", f"{name}-seed.iso"} & volumes(conn)


def test_image_and_base_image_exclude_each_other() -> None:
    with pytest.raises(ValidationError, match="exactly one of image"):
        options(image="/img/image.json")
    with pytest.raises(ValidationError, match="exactly one of image"):
        options(base_image="")
