"""A container's name, image and runtime, and its Kubernetes pod, from the runtimes' own files.

Keyed by the container id (64 hex digits) :mod:`agent.identity` reads from a process's cgroup;
read from what each runtime keeps on disk, never through its API (no socket, no daemon, no
API server, nothing to hang on):

- podman and CRI-O (both on containers/storage): ``STORAGE/overlay-containers/containers.json``,
  a list of ``{"id", "names", "image", "metadata"}`` (the metadata a JSON text with ``name``
  and ``image-name``; CRI-O adds ``pod-name``, ``metadata-name`` (the container's name in its
  pod) and, for pods only, ``namespace``: CRI-O's ``RuntimeContainerMetadata``); image names
  from ``STORAGE/overlay-images/images.json``.  ``STORAGE`` is ``/var/lib/containers/storage`` for
  root (``storage.conf``'s ``graphroot``).
- docker: ``/var/lib/docker/containers/ID/config.v2.json`` (``Name`` with a leading ``/``,
  ``Config.Image``).
- Kubernetes (any CRI runtime: containerd, CRI-O): the kubelet's log layout,
  ``/var/log/containers/POD_NAMESPACE_CONTAINER-ID.log``, a link to
  ``/var/log/pods/NAMESPACE_POD_UID/CONTAINER/N.log``: namespace, pod and container names.
  The runtime is then said by the cgroup (``cri-containerd-ID``, ``crio-ID``), which the
  caller passes as ``runtime_hint``.

Not read: containerd's own metadata (a bolt database) and podman's libpod database (bolt or
SQLite): a containerd container outside Kubernetes (nerdctl, ctr) has its runtime, from the
cgroup, and no name.

Files that are missing, unreadable or malformed give nothing (empty columns), never an error.
Every source is owned by root and written by the runtime; a user cannot name a container
they do not run (the id comes from a cgroup, see :mod:`agent.identity`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

PODMAN = "podman"
CRIO = "cri-o"
DOCKER = "docker"
CONTAINERD = "containerd"

STORAGE_ROOT = "/var/lib/containers/storage"
DOCKER_ROOT = "/var/lib/docker"
KUBELET_LOGS = "/var/log"

_MAX_FILE = 64 << 20
"""The largest state file read (a containers.json of thousands of containers is a few MB)."""


@dataclass(frozen=True)
class ContainerInfo:
    """What the runtimes' files say about one container ("" where they say nothing)."""

    name: str = ""
    image: str = ""
    runtime: str = ""
    pod_namespace: str = ""
    pod_name: str = ""


NO_CONTAINER = ContainerInfo()


def _load_json(path: str) -> Any:
    try:
        with open(path, "rb") as handle:
            data = handle.read(_MAX_FILE + 1)
    except OSError:
        return None
    if len(data) > _MAX_FILE:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return None


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


class _StorageIndex:
    """containers/storage's containers.json and images.json, re-read when they change."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._stamp: Optional[Tuple[int, int, int]] = None
        self._containers: Dict[str, ContainerInfo] = {}

    def _file_stamp(self) -> Optional[Tuple[int, int, int]]:
        stamps = []
        for name in ("overlay-containers/containers.json", "overlay-images/images.json"):
            try:
                status = os.stat(os.path.join(self.root, name))
            except OSError:
                stamps.append(0)
                continue
            stamps.append(status.st_mtime_ns ^ status.st_size)
        if not any(stamps):
            return None
        return (stamps[0], stamps[1], len(stamps))

    def get(self, container_id: str) -> Optional[ContainerInfo]:
        stamp = self._file_stamp()
        if stamp is None:
            return None
        if stamp != self._stamp:
            self._stamp = stamp
            self._containers = self._read()
        return self._containers.get(container_id)

    def _read(self) -> Dict[str, ContainerInfo]:
        images: Dict[str, str] = {}
        listed = _load_json(os.path.join(self.root, "overlay-images/images.json"))
        for image in listed if isinstance(listed, list) else []:
            if isinstance(image, dict):
                names = image.get("names")
                if isinstance(names, list) and names and isinstance(names[0], str):
                    images[_text(image.get("id"))] = names[0]
        found: Dict[str, ContainerInfo] = {}
        listed = _load_json(os.path.join(self.root, "overlay-containers/containers.json"))
        for entry in listed if isinstance(listed, list) else []:
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
                continue
            names = entry.get("names")
            name = names[0] if isinstance(names, list) and names else ""
            metadata: Dict[str, Any] = {}
            try:
                parsed = json.loads(_text(entry.get("metadata")) or "{}")
                if isinstance(parsed, dict):
                    metadata = parsed
            except ValueError:
                pass
            image = _text(metadata.get("image-name")) or images.get(_text(entry.get("image")), "")
            pod = _text(metadata.get("pod-name"))
            if pod:  # CRI-O: "metadata-name" is the container's name in its pod spec
                own = _text(metadata.get("metadata-name")) or _text(metadata.get("name"))
            else:
                own = _text(metadata.get("name"))
            found[entry["id"]] = ContainerInfo(
                name=own or _text(name),
                image=image,
                runtime=CRIO if pod else PODMAN,
                pod_namespace=_text(metadata.get("namespace")) if pod else "",
                pod_name=pod,
            )
        return found


def _docker(root: str, container_id: str) -> Optional[ContainerInfo]:
    config = _load_json(os.path.join(root, "containers", container_id, "config.v2.json"))
    if not isinstance(config, dict):
        return None
    inner = config.get("Config")
    image = _text(inner.get("Image")) if isinstance(inner, dict) else ""
    return ContainerInfo(name=_text(config.get("Name")).lstrip("/"), image=image, runtime=DOCKER)


def kubelet_pod(log_root: str, container_id: str) -> Optional[Tuple[str, str, str]]:
    """(pod namespace, pod name, container name) from the kubelet's log links, or None.

    ``/var/log/containers/POD_NAMESPACE_CONTAINER-ID.log`` (names cannot hold ``_``: they are
    DNS labels and subdomains) links to ``/var/log/pods/NAMESPACE_POD_UID/CONTAINER/N.log``;
    the link's target is preferred, its own name is the fallback.
    """
    directory = os.path.join(log_root, "containers")
    suffix = f"-{container_id}.log"
    try:
        entries = [entry for entry in os.listdir(directory) if entry.endswith(suffix)]
    except OSError:
        return None
    for entry in entries:
        path = os.path.join(directory, entry)
        try:
            target = os.readlink(path)
        except OSError:
            target = ""
        parts = target.split("/")
        if len(parts) >= 3 and parts[-3].count("_") >= 2:
            namespace, pod, _uid = parts[-3].split("_", 2)
            if namespace and pod and parts[-2]:
                return namespace, pod, parts[-2]
        fields = entry[: -len(suffix)].split("_")
        if len(fields) == 3 and all(fields):
            return fields[1], fields[0], fields[2]
    return None


class ContainerDirectory:
    """:class:`ContainerInfo` by container id, cached; an id nothing names is asked again after
    ``retry_s`` (a container's files may be written a moment after its first process runs).

    The roots default to the runtimes' own paths; tests give temporary ones.
    """

    def __init__(
        self,
        storage_root: str = STORAGE_ROOT,
        docker_root: str = DOCKER_ROOT,
        kubelet_logs: str = KUBELET_LOGS,
        retry_s: float = 5.0,
        max_entries: int = 4096,
    ) -> None:
        self.docker_root = docker_root
        self.kubelet_logs = kubelet_logs
        self.retry_s = retry_s
        self.max_entries = max_entries
        self._storage = _StorageIndex(storage_root)
        self._known: Dict[str, ContainerInfo] = {}
        self._unknown: Dict[str, float] = {}

    def lookup(self, container_id: str, runtime_hint: str = "") -> ContainerInfo:
        """What the runtimes say about ``container_id`` ("": not a container: nothing)."""
        if not container_id:
            return NO_CONTAINER
        known = self._known.get(container_id)
        if known is not None:
            return known
        now = time.monotonic()
        asked = self._unknown.get(container_id)
        if asked is not None and now - asked < self.retry_s:
            return ContainerInfo(runtime=runtime_hint)
        found = self._read(container_id, runtime_hint)
        if found is None:
            if len(self._unknown) >= self.max_entries:
                self._unknown.clear()
            self._unknown[container_id] = now
            return ContainerInfo(runtime=runtime_hint)
        if len(self._known) >= self.max_entries:
            self._known.clear()
        self._known[container_id] = found
        self._unknown.pop(container_id, None)
        return found

    def _read(self, container_id: str, runtime_hint: str) -> Optional[ContainerInfo]:
        pod = kubelet_pod(self.kubelet_logs, container_id)
        own: Optional[ContainerInfo] = None
        if runtime_hint != CONTAINERD:
            own = self._storage.get(container_id) or _docker(self.docker_root, container_id)
        if pod is None:
            return own
        namespace, pod_name, name = pod
        return ContainerInfo(
            name=name,
            image=own.image if own is not None else "",
            runtime=runtime_hint or (own.runtime if own is not None else ""),
            pod_namespace=namespace,
            pod_name=pod_name,
        )


def runtime_of_cgroup(text: str) -> str:
    """The runtime a ``/proc/PID/cgroup`` text names by its container component's prefix
    (``libpod-``, ``docker-``/``/docker/``, ``cri-containerd-``, ``crio-``), or ""."""
    for marker, runtime in _RUNTIME_MARKERS:
        if marker in text:
            return runtime
    return ""


_RUNTIME_MARKERS: List[Tuple[str, str]] = [
    ("/libpod-", PODMAN),
    ("/cri-containerd-", CONTAINERD),
    ("/crio-", CRIO),
    ("/docker-", DOCKER),
    ("/docker/", DOCKER),
]
