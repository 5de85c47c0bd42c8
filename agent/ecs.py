"""Connection records as Elastic Common Schema documents (ECS 8.x, the network category).

For SIEMs that speak ECS (Elasticsearch, OpenSearch, Elastic Agent pipelines): the process
(with its arguments, its parent, ``process.hash.sha256`` and the owning ``package.name``), the
user (``user.name`` the login user when one is known, with the process's own user beside it in
``user.effective``), the container, its Kubernetes pod (``orchestrator.*``) and both ends of the
connection land in ECS fields
(https://www.elastic.co/guide/en/ecs/current/ecs-field-reference.html); every other column
goes under ``egress_agent`` with its own name.  Text is lossless (``utf8_safe``).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
from typing import Any, Dict, List, Mapping, Optional

from agent.inet import FAMILY_NAMES, PROTOCOL_NAMES, is_ipv4_mapped
from agent.records import Value
from agent.textsafe import utf8_safe

ECS_VERSION = "8.11.0"

ECS_DIRECTIONS = {"outbound": "egress", "inbound": "ingress", "unknown": "unknown"}
# Columns that land in ECS fields; every other column goes under ``egress_agent``.
ECS_MAPPED = frozenset(
    {
        "pid",
        "name",
        "path",
        "cmdline",
        "uid",
        "username",
        "parent",
        "process_start_time",
        "process_uuid",
        "container_id",
        "sha256",
        "package",
        "login_user",
        "container_name",
        "container_runtime",
        "container_image",
        "pod_namespace",
        "pod_name",
        "local_address",
        "local_port",
        "remote_address",
        "remote_port",
        "remote_domain",
        "protocol",
        "family",
    }
)


def _iso(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _ip(text: Value) -> Optional[str]:
    """``text`` without its zone index when it is an IP address (Elasticsearch's ``ip`` type
    takes no zone), as written: ``::ffff:192.0.2.1`` stays readable, and Elasticsearch treats
    it as the same value as ``192.0.2.1``.
    """
    if not isinstance(text, str):
        return None
    address = text.partition("%")[0]
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return None
    return address


def _put(document: Dict[str, Any], dotted: str, value: Any) -> None:
    """Set a nested field; missing values (``None``, ``""``) are left out, as ECS asks."""
    if value is None or value == "":
        return
    *parents, leaf = dotted.split(".")
    for parent in parents:
        document = document.setdefault(parent, {})
    document[leaf] = utf8_safe(value) if isinstance(value, str) else value


def _endpoint(document: Dict[str, Any], prefix: str, address: Value, port: Value) -> None:
    _put(document, f"{prefix}.address", address)
    _put(document, f"{prefix}.ip", _ip(address))
    if isinstance(port, int) and not isinstance(port, bool) and port > 0:
        _put(document, f"{prefix}.port", port)


def _who(document: Dict[str, Any], get: Any) -> None:
    """Issue 22's columns: the arguments (``process.args``, the command line split at spaces,
    as ``cmdline`` keeps them), the parent's name from ``ancestors``, the login user, the
    container's name, image and runtime, the pod (``orchestrator.*``)."""
    cmdline = get("cmdline")
    if isinstance(cmdline, str) and cmdline:
        args = cmdline.split(" ")
        document.setdefault("process", {})["args"] = [utf8_safe(arg) for arg in args]
        document["process"]["args_count"] = len(args)
    ancestors = _ancestors(get("ancestors"))
    if ancestors and ancestors[0].get("pid") == get("parent"):
        _put(document, "process.parent.name", ancestors[0].get("name"))
    login = get("login_user")
    if isinstance(login, str) and login:
        user = document.setdefault("user", {})
        effective = {key: user.pop(key) for key in ("name", "id") if key in user}
        if effective:
            user["effective"] = effective
        _put(document, "user.name", login)
    _put(document, "container.runtime", get("container_runtime"))
    namespace, pod = get("pod_namespace"), get("pod_name")
    if namespace or pod:
        _put(document, "orchestrator.type", "kubernetes")
        _put(document, "orchestrator.namespace", namespace)
        _put(document, "orchestrator.resource.type", "pod")
        _put(document, "orchestrator.resource.name", pod)


def _ancestors(text: Value) -> List[Dict[str, Any]]:
    """The ``ancestors`` column's JSON, or [] when it is none or not ours."""
    if not isinstance(text, str) or not text:
        return []
    try:
        chain = json.loads(text)
    except ValueError:
        return []
    return [item for item in chain if isinstance(item, dict)] if isinstance(chain, list) else []


def ecs_document(record: Mapping[str, Value], timestamp: float) -> Dict[str, Any]:
    """One connection record as an Elastic Common Schema event (ECS 8.x, network category).

    ``source`` is the end that opened the connection (ECS: "the sender"), so for an inbound
    connection it is the remote end; ``network.direction`` is ``egress``/``ingress``, the
    values ECS gives for a host's own view (``unknown`` when the agent cannot tell).
    ``network.type`` says what is on the wire: an IPv4-mapped remote address on an AF_INET6
    socket is ``ipv4``.  Columns without an ECS field go under ``egress_agent`` with their own
    names.
    """
    get = record.get
    stamp = get("last_seen")
    document: Dict[str, Any] = {}
    _put(document, "@timestamp", _iso(stamp if isinstance(stamp, (int, float)) else timestamp))
    _put(document, "ecs.version", ECS_VERSION)
    document["event"] = {
        "kind": "event",
        "category": ["network"],
        "type": ["connection"],
        "module": "egress_agent",
        "dataset": "egress_agent.connection",
    }
    pid = get("pid")
    if isinstance(pid, int) and not isinstance(pid, bool) and pid >= 0:
        _put(document, "process.pid", pid)
    _put(document, "process.name", get("name"))
    _put(document, "process.executable", get("path"))
    _put(document, "process.command_line", get("cmdline"))
    _put(document, "process.parent.pid", get("parent"))
    start = get("process_start_time")
    if isinstance(start, int) and not isinstance(start, bool):
        _put(document, "process.start", _iso(start))
    _put(document, "process.entity_id", get("process_uuid"))
    _put(document, "user.name", get("username"))
    uid = get("uid")
    if uid is not None:
        _put(document, "user.id", str(uid))
    _put(document, "container.id", get("container_id"))
    _put(document, "process.hash.sha256", get("sha256"))
    _put(document, "package.name", get("package"))
    _put(document, "container.name", get("container_name"))
    _put(document, "container.image.name", get("container_image"))
    _who(document, get)

    local = (get("local_address"), get("local_port"))
    remote = (get("remote_address"), get("remote_port"))
    direction = get("direction")
    source, destination = (remote, local) if direction == "inbound" else (local, remote)
    _endpoint(document, "source", *source)
    _endpoint(document, "destination", *destination)
    remote_side = "source" if direction == "inbound" else "destination"
    _put(document, f"{remote_side}.domain", get("remote_domain"))

    protocol = get("protocol")
    if isinstance(protocol, int):
        _put(document, "network.transport", PROTOCOL_NAMES.get(protocol))
        _put(document, "network.iana_number", str(protocol))
    remote_ip = _ip(remote[0])
    family = get("family")
    network_type = FAMILY_NAMES.get(family) if isinstance(family, int) else None
    if remote_ip is not None:
        address = ipaddress.ip_address(remote_ip)
        if address.version == 6 and is_ipv4_mapped(int(address)):
            network_type = "ipv4"
    _put(document, "network.type", network_type)
    _put(document, "network.direction", ECS_DIRECTIONS.get(str(direction)))
    related = [ip for ip in (_ip(local[0]), remote_ip) if ip is not None]
    if related:
        document["related"] = {"ip": sorted(set(related))}

    for key, value in record.items():
        if key not in ECS_MAPPED:
            _put(document, f"egress_agent.{utf8_safe(key)}", value)
    return document
