"""Containers by name, image and runtime, and Kubernetes pods, from the runtimes' own files
(issue 22, agent/containers.py), and allow rules by them.

- a real podman container (Debian's podman with runc, tools/install-podman) joins a test host
  and connects out: its row names the container and the runtime, and a ``container_name``
  rule allows it;
- the kubelet's log layout, built by the test under a temporary root, names the pod of a real
  process moved into a pod-like cgroup;
- docker's ``config.v2.json`` and containers/storage's ``containers.json``, written as the
  runtimes write them, under temporary roots (docker itself is not installed here).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest
from commands import egress_agent
from nethost import Namespace, NetHost

from agent.allow import matches
from agent.config import AllowRule, ConfigError, parse_settings, parse_yaml
from agent.containers import (
    CONTAINERD,
    CRIO,
    DOCKER,
    PODMAN,
    ContainerDirectory,
    ContainerInfo,
    kubelet_pod,
)
from agent.identity import IdentityCache
from agent.records import Connection, connection_of
from agent.who import WhoReader

PREFIX = os.environ.get("NETHOST_PREFIX", "eat")
SERVER, CLIENT = "2001:4860:4871::1", "2001:4860:4871::2"


def _hosts(net: NetHost) -> Tuple[Namespace, Namespace]:
    srv, cli = net.namespace("srv"), net.namespace("cli")
    net.veth(srv, "s0", cli, "c0")
    srv.add_address(net.name("s0"), SERVER + "/64")
    cli.add_address(net.name("c0"), CLIENT + "/64")
    return srv, cli


def _rows(*args: str, config: Any = None) -> List[Dict[str, Any]]:
    result = egress_agent("check", "--format", "json", "--allowlisted", *args, config=config)
    assert "Traceback" not in result.stderr, result.stderr
    rows: List[Dict[str, Any]] = json.loads(result.stdout or "[]")
    return rows


def _rules(text: str) -> Tuple[AllowRule, ...]:
    return parse_settings(parse_yaml(text, "test.yaml"), "test.yaml").allow


# --- podman, for real -------------------------------------------------------------------------


ROOT = Path(__file__).resolve().parent.parent


def _podman() -> str:
    """podman's path; as root, Debian's podman and runc are installed first where missing
    (tools/install-podman, as ``make pytest`` does: CI runs these tests, never skips them)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: podman with runc, network namespaces")
    if shutil.which("podman") is None or shutil.which("runc") is None:
        subprocess.run([str(ROOT / "tools" / "install-podman")], check=True)
    found = shutil.which("podman")
    assert found is not None and shutil.which("runc") is not None, "tools/install-podman failed"
    return found


def make_rootfs(tmp_path: Path) -> Path:
    """A root file system for ``--rootfs``: the host's /usr and /etc are bound in read-only."""
    root = tmp_path / "rootfs"
    for directory in ("usr", "etc", "proc", "sys", "dev", "tmp", "run"):
        (root / directory).mkdir(parents=True)
    for link in ("bin", "lib", "lib64", "sbin"):
        (root / link).symlink_to(f"usr/{link}")
    return root


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    return make_rootfs(tmp_path)


@contextlib.contextmanager
def podman_container(
    podman: str, rootfs: Path, namespace: Namespace, name: str, argv: List[str]
) -> Iterator[str]:
    """A detached container joined to ``namespace``; yields its id; removed afterwards."""
    command = [
        podman,
        "--runtime",
        "runc",
        "--cgroup-manager=cgroupfs",
        "run",
        "-d",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        "--pids-limit",
        "0",
        "-v",
        "/usr:/usr:ro",
        "-v",
        "/etc:/etc:ro",
        "--name",
        name,
        "--network",
        f"ns:/run/netns/{namespace.name}",
        "--rootfs",
        str(rootfs),
        *argv,
    ]
    subprocess.run([podman, "rm", "-f", name], capture_output=True, check=False)
    started = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert started.returncode == 0, started.stderr
    try:
        yield started.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(
            [podman, "rm", "-f", "-t", "0", name], capture_output=True, timeout=120, check=False
        )


def test_podman_container_row_names_it(nethost: NetHost, rootfs: Path, tmp_path: Path) -> None:
    podman = _podman()
    srv, cli = _hosts(nethost)
    server = nethost.listen(srv, SERVER)
    name = f"{PREFIX}-box-{os.getpid()}"
    url = f"http://[{SERVER}]:{server.port}/"
    argv = ["curl", "-s", "-o", "/dev/null", "--max-time", "60", url]
    with podman_container(podman, rootfs, cli, name, argv) as container_id:
        config = tmp_path / "egress-agent.yaml"
        config.write_text(
            "allow:\n"
            f"  - comment: by name\n    container_name: '{PREFIX}-box-*'\n"
            "  - comment: by id\n    container_id: " + "f" * 12 + "\n"
        )
        deadline = time.monotonic() + 60
        mine: List[Dict[str, Any]] = []
        while not mine and time.monotonic() < deadline:
            mine = [r for r in _rows("--netns", cli.name, config=config) if r["name"] == "curl"]
            if not mine:
                time.sleep(0.3)
        assert mine, "the container's curl never showed"
        row = mine[0]
        assert row["container_id"] == container_id
        assert row["container_name"] == name
        assert row["container_runtime"] == PODMAN
        assert row["container_image"] == ""  # --rootfs: no image
        assert (row["allowlisted"], row["allow_rule"]) == (True, "by name")
        # the container's init is curl itself: no ancestor inside the container
        assert row["ancestors"] == ""


# --- Kubernetes, by the kubelet's layout ------------------------------------------------------


def _kubelet_layout(root: Path, namespace: str, pod: str, container: str, cid: str) -> None:
    uid = str(uuid.uuid4())
    logs = root / "pods" / f"{namespace}_{pod}_{uid}" / container
    logs.mkdir(parents=True)
    (logs / "0.log").write_text("")
    (root / "containers").mkdir(exist_ok=True)
    (root / "containers" / f"{pod}_{namespace}_{container}-{cid}.log").symlink_to(logs / "0.log")


class Cgroup:
    """A cgroup of the systemd (v1) or unified hierarchy at a runtime's own path, made by the
    test; only the directories it made are removed (a shared parent such as
    ``libpod_parent`` stays), their processes moved back to the root first."""

    def __init__(self, relative: str) -> None:
        root = "/sys/fs/cgroup/systemd"
        if not os.path.isdir(root):
            root = "/sys/fs/cgroup/unified" if os.path.isdir("/sys/fs/cgroup/unified") else ""
        self.root = root or "/sys/fs/cgroup"
        self.made: List[str] = []
        path = self.root
        for component in relative.strip("/").split("/"):
            path = os.path.join(path, component)
            if not os.path.isdir(path):
                os.mkdir(path)
                self.made.append(path)
        self.path = path

    def add(self, pid: int) -> None:
        with open(os.path.join(self.path, "cgroup.procs"), "w") as handle:
            handle.write(str(pid))

    def remove(self) -> None:
        for directory in sorted(self.made, key=len, reverse=True):
            with contextlib.suppress(OSError):
                with open(os.path.join(directory, "cgroup.procs")) as handle:
                    pids = handle.read().split()
                for pid in pids:
                    with open(os.path.join(self.root, "cgroup.procs"), "w") as handle:
                        handle.write(pid)
            with contextlib.suppress(OSError):
                os.rmdir(directory)


def test_pod_of_a_process_in_a_pod_cgroup(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: cgroups")
    cid = uuid.uuid4().hex + uuid.uuid4().hex
    pod_uid = str(uuid.uuid4()).replace("-", "_")
    _kubelet_layout(tmp_path, "payments", "api-7d9f-x2x", "shipper", cid)
    relative = (  # the kubelet's layout with the systemd driver (agent/data/container-cgroups.csv)
        "kubepods.slice/kubepods-besteffort.slice/"
        f"kubepods-besteffort-pod{pod_uid}.slice/cri-containerd-{cid}.scope"
    )
    group = Cgroup(relative)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        group.add(sleeper.pid)
        directory = ContainerDirectory(
            storage_root=str(tmp_path / "none"),
            docker_root=str(tmp_path / "none"),
            kubelet_logs=str(tmp_path),
        )
        identities = IdentityCache(who=WhoReader(containers=directory))
        identity = identities.lookup(sleeper.pid)
        assert identity.container_id == cid
        row = _row(identity)
        assert (row.pod_namespace, row.pod_name) == ("payments", "api-7d9f-x2x")
        assert (row.container_name, row.container_runtime) == ("shipper", CONTAINERD)
        assert matches(_rules("allow:\n  - {pod_namespace: payments}\n")[0], row)
        assert not matches(_rules("allow:\n  - {pod_namespace: kube-system}\n")[0], row)
    finally:
        sleeper.kill()
        sleeper.wait()
        group.remove()


def _row(identity: Any) -> Connection:
    from agent.records import SocketColumns

    sock = SocketColumns(None, None, None, 2, 6, "", "", 0, 0, "outbound")
    return connection_of(identity, None, sock)


def test_kubelet_layout_by_link_and_by_name(tmp_path: Path) -> None:
    cid = "ab" * 32
    _kubelet_layout(tmp_path, "kube-system", "coredns-5d78c9869d-abcde", "coredns", cid)
    assert kubelet_pod(str(tmp_path), cid) == ("kube-system", "coredns-5d78c9869d-abcde", "coredns")
    assert kubelet_pod(str(tmp_path), "cd" * 32) is None
    # a dangling link (logs rotated away) still names the pod by its own name
    other = "ef" * 32
    (tmp_path / "containers" / f"web-0_shop_nginx-{other}.log").symlink_to("/nonexistent")
    assert kubelet_pod(str(tmp_path), other) == ("shop", "web-0", "nginx")
    assert kubelet_pod(str(tmp_path / "missing"), cid) is None


def test_docker_and_storage_state(tmp_path: Path) -> None:
    docker_id, podman_id, crio_id = "1" * 64, "2" * 64, "3" * 64
    config = tmp_path / "docker" / "containers" / docker_id / "config.v2.json"
    config.parent.mkdir(parents=True)
    config.write_text(json.dumps({"Name": "/web", "Config": {"Image": "nginx:1.25"}}))
    storage = tmp_path / "storage"
    (storage / "overlay-containers").mkdir(parents=True)
    (storage / "overlay-images").mkdir(parents=True)
    (storage / "overlay-images" / "images.json").write_text(
        json.dumps([{"id": "i" * 64, "names": ["docker.io/library/redis:7"]}])
    )
    (storage / "overlay-containers" / "containers.json").write_text(
        json.dumps(
            [
                {"id": podman_id, "names": ["rw-pod"], "image": "i" * 64, "metadata": "{}"},
                {
                    "id": crio_id,
                    "names": ["k8s_x"],
                    "image": "",
                    "metadata": json.dumps(  # as CRI-O's RuntimeContainerMetadata
                        {
                            "pod-name": "web-0",
                            "pod-id": "p" * 64,
                            "name": "k8s_x_web-0_shop_1",
                            "metadata-name": "x",
                            "namespace": "shop",
                        }
                    ),
                },
                "garbage",
                {"id": 7},
            ]
        )
    )
    directory = ContainerDirectory(str(storage), str(tmp_path / "docker"), str(tmp_path / "logs"))
    assert directory.lookup(docker_id) == ContainerInfo("web", "nginx:1.25", DOCKER)
    assert directory.lookup(podman_id) == ContainerInfo(
        "rw-pod", "docker.io/library/redis:7", PODMAN
    )
    assert directory.lookup(crio_id) == ContainerInfo("x", "", CRIO, "shop", "web-0")
    assert directory.lookup("4" * 64, "docker") == ContainerInfo(runtime="docker")
    assert directory.lookup("") == ContainerInfo()
    # malformed state files name nothing and raise nothing
    config.write_text("{not json")
    (storage / "overlay-containers" / "containers.json").write_text("[1, 2")
    fresh = ContainerDirectory(str(storage), str(tmp_path / "docker"), str(tmp_path / "logs"))
    assert fresh.lookup(docker_id) == ContainerInfo()
    assert fresh.lookup(podman_id) == ContainerInfo()


def test_container_rules_apply_to_runtime_containers_only() -> None:
    named = dict(container_name="web", container_image="nginx:1.25", pod_namespace="shop")
    in_runtime = Connection(container_id="a" * 64, container_runtime=DOCKER, **named)  # type: ignore[arg-type]
    no_runtime = Connection(container_id="a" * 64, **named)  # type: ignore[arg-type]
    host = Connection(**named)  # type: ignore[arg-type]
    for text in (
        "{container_name: web}",
        "{container_name: 'w*'}",
        "{container_image: 'nginx:*'}",
        "{pod_namespace: shop}",
        "{container_name: web, pod_namespace: shop}",
    ):
        (rule,) = _rules(f"allow:\n  - {text}\n")
        assert matches(rule, in_runtime), text
        assert not matches(rule, no_runtime), text
        assert not matches(rule, host), text
    (rule,) = _rules("allow:\n  - {container_name: web, pod_namespace: other}\n")
    assert not matches(rule, in_runtime)
    with pytest.raises(ConfigError, match="container_name"):
        _rules("allow:\n  - {container_name: ''}\n")


def test_a_user_cgroup_named_after_a_container_gets_none_of_its_names(tmp_path: Path) -> None:
    """The attack: a user names a cgroup of their own (a delegated subtree, as systemd gives
    ``user@UID.service``) after a real container's id, to borrow its name for a
    ``container_name`` rule.  A cgroup some user owns gets no names; root's does."""
    if os.geteuid() != 0:
        pytest.skip("needs root: cgroups")
    cid = uuid.uuid4().hex + uuid.uuid4().hex
    storage = tmp_path / "storage"
    (storage / "overlay-containers").mkdir(parents=True)
    (storage / "overlay-containers" / "containers.json").write_text(
        json.dumps([{"id": cid, "names": ["prod-db"], "image": "", "metadata": "{}"}])
    )
    directory = ContainerDirectory(str(storage), str(tmp_path / "none"), str(tmp_path / "none"))
    rule = _rules("allow:\n  - {container_name: prod-db}\n")[0]
    group = Cgroup(f"libpod_parent/libpod-{cid}")  # podman's own path (cgroupfs manager)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        group.add(sleeper.pid)
        owned = IdentityCache(who=WhoReader(containers=directory)).lookup(sleeper.pid)
        assert (_row(owned).container_name, matches(rule, _row(owned))) == ("prod-db", True)
        os.chown(group.path, 65534, 65534)  # what delegation to a user does
        borrowed = IdentityCache(who=WhoReader(containers=directory)).lookup(sleeper.pid)
        row = _row(borrowed)
        assert (row.container_name, row.container_runtime) == ("", "")
        assert not matches(rule, row)
    finally:
        sleeper.kill()
        sleeper.wait()
        group.remove()
