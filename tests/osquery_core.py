#!/usr/bin/env python3
"""A stand-in for osquery core, for tests, the packaging CI and the benchmark.

No osqueryd can be installed here, so this plays its part of the extension protocol
(osquery/extensions/thrift/osquery.thrift, osquery/extensions/extensions.cpp):

- an ``ExtensionManager`` Thrift server on a Unix socket in a temporary directory (buffered
  transport, binary protocol, a thread per connection, like core's);
- it launches an extension as osqueryd's autoloader does: ``execve(path, [path, (--verbose),
  --socket S, --timeout T, --interval I])`` with ``OSQUERY_EXTENSION=<our pid>`` added to the
  environment;
- ``registerExtension`` applies core's rules (osquery/extensions/interface.cpp,
  osquery/registry/registry_factory.cpp): a duplicate extension name, an SDK version below
  1.7.7, a table name that core or another extension has, an unknown registry and an empty
  route list are refused with core's messages; uuids are ``uint16(rand() + 1)``; each table is
  attached through a hook (:class:`sqlcore.SqlCore` attaches it under core's attach lock);
  ``extensions()`` lists the live registrations only (core's server never lists uuid 0: its
  clients add it);
- :class:`ExtensionConnection` calls ``ping``, ``call`` (columns, generate with or without a
  constraint context, in core 5.x's format or the pre-3.0 one) and ``shutdown`` on
  ``<socket>.<uuid>``;
- :class:`SqlHost` loads returned rows into an in-memory sqlite3 database, one table per
  osquery table with the column types of the routes (``""`` in a non-TEXT column becomes
  NULL, as osquery's ``virtual_table.cpp`` does), plus small stand-ins for the native tables
  a fleet query joins with (``processes``, ``hash``, ``osquery_extensions``), and runs SQL.

What it does not do: it never re-applies constraints itself (sqlite3 does, over all rows),
and its ``query``/``getQueryColumns`` answer "not supported".

Library use::

    with CoreStandIn() as core:
        process = core.launch(["/opt/egress-agent/bin/egress-agent.ext"], interval=1)
        registration = core.wait_for_registration()
        with core.connect(registration) as extension:
            rows = extension.generate("external_connections", {"pid": [(2, "1234")]})

Command line (exit 0 only when registration, every query and a clean shutdown worked)::

    python tests/osquery_core.py --ext /opt/egress-agent/bin/egress-agent.ext \\
        --sql "SELECT * FROM egress_agent_info" [--pack config/osquery/egress-agent.conf]
    python tests/osquery_core.py --ext "python -m agent.cli extension" --sql ...
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import logging
import os
import random
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import (
    Any,
    Callable,
    Dict,
    FrozenSet,
    Iterable,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

from osquery.extensions import Extension, ExtensionManager
from osquery.extensions.ttypes import ExtensionResponse, ExtensionStatus, InternalExtensionInfo
from thrift.protocol import TBinaryProtocol
from thrift.Thrift import TMessageType
from thrift.transport import TSocket, TTransport

Routes = List[Dict[str, str]]
Rows = List[Dict[str, str]]
ConstraintSpec = Mapping[str, Sequence[Tuple[int, str]]]


# thrift logs every failed connect attempt itself; the stand-in reports failures in its own words.
logging.getLogger("thrift").addHandler(logging.NullHandler())
logging.getLogger("thrift").propagate = False


class CoreProtocol(TBinaryProtocol.TBinaryProtocol):  # type: ignore[misc]
    """The binary protocol as osquery core's C++ Thrift speaks it: strings are bytes.

    Core never validates UTF-8 (rapidjson neither), so a request may carry any bytes; here
    they travel as PEP 383 surrogates (``surrogateescape``) in both directions.
    """

    def writeString(self, value: str) -> None:
        self.writeBinary(value.encode("utf-8", "surrogateescape"))

    def readString(self) -> str:
        return self.readBinary().decode("utf-8", "surrogateescape")


class _CountingSocket(TSocket.TSocket):  # type: ignore[misc]
    """A client socket that counts the bytes it received (the size of the answers)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bytes_read = 0

    def read(self, size: int) -> bytes:
        data = super().read(size)
        self.bytes_read += len(data)
        return data


class CoreError(Exception):
    """The extension answered with a failed status, or misbehaved."""


@dataclass
class Registration:
    uuid: int
    name: str
    version: str
    sdk_version: str
    min_sdk_version: str
    registry: Dict[str, Dict[str, Routes]]
    at: float = field(default_factory=time.monotonic)

    def tables(self) -> Dict[str, Routes]:
        return dict(self.registry.get("table", {}))


# -- the ExtensionManager service ---------------------------------------------------------------


MIN_SDK_VERSION = "1.7.7"
"""osquery's kSDKVersionChanges: registrations from older SDKs are refused."""

KNOWN_REGISTRIES = frozenset(
    {
        "config",
        "config_parser",
        "database",
        "distributed",
        "enroll",
        "event_publisher",
        "event_subscriber",
        "killswitch",
        "logger",
        "numeric_monitoring",
        "sql",
        "table",
    }
)
"""The registries osqueryd has; a broadcast naming another is refused."""

BUILTIN_TABLES = frozenset(
    {"processes", "process_open_sockets", "listening_ports", "hash", "osquery_extensions"}
)
"""Table names that exist in core (of its hundreds, those the stand-ins serve or tests use)."""

AttachHook = Callable[[int, str, Routes], None]


def _version_at_least(required: str, actual: str) -> bool:
    """osquery's ``versionAtLeast``: dotted numbers compared part by part."""

    def parts(text: str) -> List[int]:
        numbers = []
        for part in text.split("."):
            digits = "".join(itertools.takewhile(str.isdigit, part))
            numbers.append(int(digits) if digits else 0)
        return numbers

    want, have = parts(required), parts(actual)
    width = max(len(want), len(have))
    return have + [0] * (width - len(have)) >= want + [0] * (width - len(want))


class _Manager:
    """Core's side of the protocol, recording what extensions do."""

    def __init__(
        self,
        builtin_tables: FrozenSet[str] = BUILTIN_TABLES,
        attach: Optional[AttachHook] = None,
        detach: Optional[Callable[[str], None]] = None,
    ) -> None:
        self.lock = threading.Condition()
        self.registrations: Dict[int, Registration] = {}
        self.history: List[Registration] = []
        self.refusals: List[Tuple[str, str]] = []
        self.deregistered: List[int] = []
        self.pings = 0
        self.builtin_tables = builtin_tables
        self.attach: AttachHook = attach or (lambda uuid, name, routes: None)
        self.detach: Callable[[str], None] = detach or (lambda name: None)
        self._reserved: set = set()  # type: ignore[type-arg]

    def ping(self) -> ExtensionStatus:
        with self.lock:
            self.pings += 1
        return ExtensionStatus(code=0, message="OK")

    def call(self, registry: str, item: str, request: Dict[str, str]) -> ExtensionResponse:
        return ExtensionResponse(
            status=ExtensionStatus(code=1, message="the stand-in core has no plugins"),
            response=[],
        )

    def shutdown(self) -> None:
        pass

    def extensions(self) -> Dict[int, InternalExtensionInfo]:
        """The live registrations; never uuid 0 (core's clients add core themselves)."""
        with self.lock:
            return {
                uuid: InternalExtensionInfo(
                    name=reg.name,
                    version=reg.version,
                    sdk_version=reg.sdk_version,
                    min_sdk_version=reg.min_sdk_version,
                )
                for uuid, reg in self.registrations.items()
            }

    def options(self) -> Dict[str, Any]:
        return {}

    def registerExtension(
        self, info: InternalExtensionInfo, registry: Dict[str, Dict[str, Routes]]
    ) -> ExtensionStatus:
        """ExtensionManagerInterface::registerExtension, then RegistryFactory::addBroadcast.

        Each table is attached through :attr:`attach`, which may wait (core's attach lock is
        held by running queries); the registration becomes visible only afterwards, and it
        completes even when the extension has stopped waiting for the answer (an orphan).
        """
        with self.lock:
            if any(reg.name == info.name for reg in self.registrations.values()):
                return self._refuse(info, "Duplicate extension registered")
        if not _version_at_least(MIN_SDK_VERSION, info.sdk_version or ""):
            return self._refuse(info, "Incompatible extension SDK version")
        with self.lock:
            uuid = self._new_uuid()
        problem = self._broadcast_problem(registry)
        if problem is None:
            problem = self._attach_tables(uuid, registry.get("table", {}))
        if problem is not None:
            with self.lock:
                self._reserved.discard(uuid)
            return self._refuse(info, f"Failed adding registry: {problem}")
        reg = Registration(
            uuid=uuid,
            name=info.name,
            version=info.version,
            sdk_version=info.sdk_version,
            min_sdk_version=info.min_sdk_version,
            registry=registry,
        )
        with self.lock:
            self.registrations[uuid] = reg
            self.history.append(reg)
            self.lock.notify_all()
        return ExtensionStatus(code=0, message="OK", uuid=uuid)

    def _refuse(self, info: InternalExtensionInfo, message: str) -> ExtensionStatus:
        with self.lock:
            self.refusals.append((info.name, message))
            self.lock.notify_all()
        return ExtensionStatus(code=1, message=message)

    def _new_uuid(self) -> int:
        """``uint16(rand() + 1)``, again while in use (interface.cpp's UuidGenerator)."""
        while True:
            uuid = (random.getrandbits(31) + 1) & 0xFFFF
            if uuid not in self._reserved:
                self._reserved.add(uuid)
                return uuid

    def _broadcast_problem(self, registry: Dict[str, Dict[str, Routes]]) -> Optional[str]:
        taken = set(self.builtin_tables)
        with self.lock:
            for reg in self.registrations.values():
                taken.update(reg.tables())
        for registry_name, items in registry.items():
            for item in items:
                if registry_name == "table" and item in taken:
                    return f"Registry item {item} conflicts with another item of the same name."
        for registry_name in registry:
            if registry_name not in KNOWN_REGISTRIES:
                return f"Unknown registry: {registry_name}"
        return None

    def _attach_tables(self, uuid: int, tables: Dict[str, Routes]) -> Optional[str]:
        attached = []
        for name, routes in tables.items():
            if not routes:
                problem = "Invalid route info"
                break
            self.attach(uuid, name, routes)
            attached.append(name)
        else:
            return None
        for name in attached:  # a broadcast is atomic: detach what was attached
            self.detach(name)
        return problem

    def deregisterExtension(self, uuid: int) -> ExtensionStatus:
        with self.lock:
            reg = self.registrations.get(uuid)
            if reg is None:
                return ExtensionStatus(code=1, message="No extension UUID found")
        self.remove(reg)
        with self.lock:
            self.deregistered.append(uuid)
        return ExtensionStatus(code=0, message="OK")

    def remove(self, reg: Registration) -> None:
        """RegistryFactory::removeBroadcast: detach the tables, forget the uuid."""
        for name in reg.tables():
            self.detach(name)
        with self.lock:
            self.registrations.pop(reg.uuid, None)
            self._reserved.discard(reg.uuid)
            self.lock.notify_all()

    def query(self, sql: str) -> ExtensionResponse:
        return ExtensionResponse(
            status=ExtensionStatus(code=1, message="query is not supported by the stand-in"),
            response=[],
        )

    def getQueryColumns(self, sql: str) -> ExtensionResponse:
        return self.query(sql)


class _UnixThriftServer:
    """A Thrift server on a Unix socket with a thread per connection, that can be stopped."""

    def __init__(self, path: str, processor: Any) -> None:
        self.path = path
        self._processor = processor
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(64)
        self._listener.settimeout(0.1)
        self._stop = threading.Event()
        self._connections: List[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True, name="core-accept")
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.settimeout(None)
            self._connections.append(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        handle = TSocket.TSocket()
        handle.setHandle(conn)
        transport = TTransport.TBufferedTransport(handle)
        protocol = CoreProtocol(transport)
        try:
            while True:
                self._processor.process(protocol, protocol)
        except Exception:  # noqa: S110 - the peer went away; core would log and carry on
            pass
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def stop(self) -> None:
        """Stop answering: close the listener and every open connection, remove the socket."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        for conn in self._connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                conn.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._thread.join(timeout=2)


class CoreStandIn:
    """osquery core's extension manager on ``<directory>/osquery.em``."""

    def __init__(self, directory: Optional[str] = None) -> None:
        self._own_directory = directory is None
        # A short path: AF_UNIX paths are limited to 107 bytes, and the extension adds a uuid.
        self.directory = directory or tempfile.mkdtemp(prefix="osq-", dir="/tmp")
        self.socket_path = os.path.join(self.directory, "osquery.em")
        self.manager = _Manager()
        self._server: Optional[_UnixThriftServer] = None
        self._processes: List[subprocess.Popen[bytes]] = []
        self._stderr_files: Dict[int, str] = {}

    # lifecycle of the stand-in itself

    def start(self) -> CoreStandIn:
        self._server = _UnixThriftServer(self.socket_path, ExtensionManager.Processor(self.manager))
        return self

    def stop(self) -> None:
        """Vanish, as a crashed core does: stop answering and remove the socket."""
        if self._server is not None:
            self._server.stop()
            self._server = None

    def close(self) -> None:
        """Stop, end every extension we launched (by pid: SIGTERM, then SIGKILL if it lingers,
        as osqueryd ends its extensions) and remove the directory, and any tracing instance an
        extension killed that way left (by its name)."""
        self.stop()
        for process in self._processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
            remove_tracing_instance(process.pid)
        if self._own_directory:
            for name in os.listdir(self.directory):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.directory, name))
            with contextlib.suppress(OSError):
                os.rmdir(self.directory)

    def __enter__(self) -> CoreStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # the extension

    def launch(
        self,
        command: Union[str, Sequence[str]],
        timeout: Union[float, str] = 3,
        interval: Union[float, str] = 3,
        verbose: bool = False,
        env: Optional[Mapping[str, str]] = None,
        socket_path: Optional[str] = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``command`` with osqueryd's arguments and environment; stderr goes to a file.

        ``command`` is the extension's path (or a command line, like ``python -m agent.cli
        extension``); osqueryd's arguments are appended to it.  A ``timeout`` or ``interval``
        given as text is passed as it is: osqueryd passes its string flags unparsed.
        """
        argv = shlex.split(command) if isinstance(command, str) else list(command)
        if verbose:
            argv.append("--verbose")
        argv += [
            "--socket",
            socket_path or self.socket_path,
            "--timeout",
            timeout if isinstance(timeout, str) else f"{timeout:g}",
            "--interval",
            interval if isinstance(interval, str) else f"{interval:g}",
        ]
        environment = dict(os.environ)
        environment.update(env or {})
        environment["OSQUERY_EXTENSION"] = str(os.getpid())
        fd, stderr_path = tempfile.mkstemp(prefix="ext-stderr-", dir=self.directory)
        try:
            process = subprocess.Popen(
                argv, env=environment, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd
            )
        finally:
            os.close(fd)
        self._processes.append(process)
        self._stderr_files[process.pid] = stderr_path
        return process

    def output(self, process: subprocess.Popen[bytes]) -> str:
        """What the launched process wrote to stdout and stderr so far."""
        with open(self._stderr_files[process.pid], encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait_for_registration(
        self,
        name: str = "egress_agent",
        timeout: float = 30,
        process: Optional[subprocess.Popen[bytes]] = None,
        serving: bool = True,
    ) -> Registration:
        """The live registration of ``name``, waiting up to ``timeout`` s for it to arrive.

        With ``serving``, also wait for the extension's socket: it can only listen on
        ``<socket>.<uuid>`` once our answer reached it.
        """
        deadline = time.monotonic() + timeout
        with self.manager.lock:
            while True:
                for reg in self.manager.registrations.values():
                    if reg.name == name and (
                        not serving or os.path.exists(self.extension_socket(reg))
                    ):
                        return reg
                if process is not None and process.poll() is not None:
                    raise CoreError(
                        f"extension exited with {process.returncode} before registering:\n"
                        + self.output(process)
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CoreError(f"no registration of {name!r} within {timeout} s")
                self.manager.lock.wait(min(left, 0.1))

    def extension_socket(self, registration: Registration) -> str:
        return f"{self.socket_path}.{registration.uuid}"

    def connect(
        self, registration: Union[Registration, str], timeout: float = 30, appear_within: float = 5
    ) -> ExtensionConnection:
        path = (
            registration if isinstance(registration, str) else self.extension_socket(registration)
        )
        return ExtensionConnection(path, timeout, appear_within)


TRACING_INSTANCES = ("/sys/kernel/tracing/instances", "/sys/kernel/debug/tracing/instances")


def remove_tracing_instance(pid: int) -> None:
    """Remove the kernel-events instance of the agent process ``pid`` (``egress-agent-PID``),
    if a kill left it behind; nothing else."""
    for directory in TRACING_INSTANCES:
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(directory, f"egress-agent-{pid}"))


def default_extension_command() -> List[str]:
    """How to start egress-agent's extension from this checkout: ``egress-agent extension``."""
    return [sys.executable, "-m", "agent.cli", "extension"]


def generated_call_reply(seqid: int, response: Optional[ExtensionResponse]) -> bytes:
    """The reply to ``call`` as osquery-python's generated processor writes it, with thrift's
    pure-Python binary protocol: the reference the extension's own writer is checked against."""
    buffer = TTransport.TMemoryBuffer()
    protocol = TBinaryProtocol.TBinaryProtocol(buffer)
    protocol.writeMessageBegin("call", TMessageType.REPLY, seqid)
    Extension.call_result(success=response).write(protocol)
    protocol.writeMessageEnd()
    return buffer.getvalue()


# -- talking to the extension ---------------------------------------------------------------------


def make_context(
    routes: Routes,
    constraints: Optional[ConstraintSpec] = None,
    old_format: bool = False,
) -> str:
    """A generate context as core serialises it: every column, constrained or not.

    ``constraints`` maps a column to ``[(op, expr), ...]``.  ``old_format`` writes what cores
    before 3.0 sent: ``op`` as a string, an empty list as ``""``.
    """
    constraints = constraints or {}
    lists = []
    used = []
    for route in routes:
        name = route["name"]
        pairs = constraints.get(name, ())
        if old_format:
            items: Any = [{"op": str(op), "expr": expr} for op, expr in pairs] or ""
        else:
            items = [{"op": op, "expr": expr} for op, expr in pairs]
        lists.append({"name": name, "list": items, "affinity": route["type"]})
        used.append(name)
    bitset = (1 << len(used)) - 1
    return json.dumps({"constraints": lists, "colsUsed": used, "colsUsedBitset": bitset})


class ExtensionConnection:
    """A client of an extension's socket, as core uses it."""

    def __init__(self, path: str, timeout: float = 30, appear_within: float = 5) -> None:
        """Connect to ``path``, waiting up to ``appear_within`` s for the socket to appear.

        An extension starts serving only after registration returns, so core (which first
        pings after ``--extensions_interval``) never meets a missing socket; we may.
        """
        self.path = path
        deadline = time.monotonic() + appear_within
        while True:
            self._socket = _CountingSocket(unix_socket=path)
            self._socket.setTimeout(int(timeout * 1000))
            self._transport = TTransport.TBufferedTransport(self._socket)
            try:
                self._transport.open()
                break
            except TTransport.TTransportException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self._client = Extension.Client(CoreProtocol(self._transport))
        self._routes: Dict[str, Routes] = {}

    @property
    def bytes_read(self) -> int:
        """Bytes received on this connection so far."""
        return int(self._socket.bytes_read)

    def __enter__(self) -> ExtensionConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._transport.close()

    def ping(self) -> ExtensionStatus:
        return self._client.ping()

    def shutdown(self) -> None:
        self._client.shutdown()

    def call(self, registry: str, item: str, request: Mapping[str, str]) -> ExtensionResponse:
        return self._client.call(registry, item, dict(request))

    def columns(self, table: str) -> Routes:
        response = self.call("table", table, {"action": "columns"})
        _check(response, f"columns of {table}")
        self._routes[table] = list(response.response)
        return self._routes[table]

    def generate(
        self,
        table: str,
        constraints: Union[str, ConstraintSpec, None] = None,
        old_format: bool = False,
    ) -> Rows:
        """Rows of ``table``; ``constraints`` is a context string, or a mapping for make_context."""
        if isinstance(constraints, str):
            context = constraints
        else:
            routes = self._routes.get(table) or self.columns(table)
            context = make_context(routes, constraints, old_format)
        response = self.call("table", table, {"action": "generate", "context": context})
        _check(response, f"generate {table}")
        return list(response.response)


def _check(response: ExtensionResponse, what: str) -> None:
    if response.status is None or response.status.code != 0:
        message = response.status.message if response.status else "no status"
        raise CoreError(f"{what}: status {getattr(response.status, 'code', '?')}: {message}")


# -- SQL over the rows ----------------------------------------------------------------------

_SQLITE_TYPES = {
    "TEXT": "TEXT",
    "INTEGER": "INTEGER",
    "BIGINT": "INTEGER",
    "UNSIGNED BIGINT": "INTEGER",
    "DOUBLE": "REAL",
    "BLOB": "BLOB",
}


class SqlHost:
    """An in-memory sqlite3 database holding osquery tables, to run fleet SQL against."""

    def __init__(self) -> None:
        self.db = sqlite3.connect(":memory:")
        self.db.row_factory = sqlite3.Row

    def load(self, name: str, routes: Routes, rows: Iterable[Mapping[str, str]]) -> None:
        """Create table ``name`` with the routes' columns and insert ``rows`` (strings)."""
        columns = [(route["name"], route.get("type", "TEXT")) for route in routes]
        for column, _ in columns:
            if not column.replace("_", "").isalnum():
                raise CoreError(f"table {name}: unusable column name {column!r}")
        definition = ", ".join(
            f'"{col}" {_SQLITE_TYPES.get(kind, "TEXT")}' for col, kind in columns
        )
        self.db.execute(f'DROP TABLE IF EXISTS "{name}"')
        self.db.execute(f'CREATE TABLE "{name}" ({definition})')
        placeholders = ", ".join("?" for _ in columns)
        values = []
        for row in rows:
            values.append(
                [
                    None if (kind != "TEXT" and row.get(col, "") == "") else row.get(col)
                    for col, kind in columns
                ]
            )
        self.db.executemany(f'INSERT INTO "{name}" VALUES ({placeholders})', values)

    def load_natives(self, core: Optional[CoreStandIn] = None, paths: Iterable[str] = ()) -> None:
        """Stand-ins for the native tables fleet queries join with.

        ``processes`` from psutil (pid, name, path, cmdline, uid, parent, start_time, state);
        ``hash`` for the given executable ``paths`` (osquery's needs a path constraint);
        ``osquery_extensions`` from the stand-in core's registrations.
        """
        import psutil

        routes = _routes(
            ("pid", "BIGINT"), ("name", "TEXT"), ("path", "TEXT"), ("cmdline", "TEXT"),
            ("uid", "BIGINT"), ("parent", "BIGINT"), ("start_time", "BIGINT"), ("state", "TEXT"),
        )  # fmt: skip
        rows = []
        for process in psutil.process_iter():
            try:
                with process.oneshot():
                    rows.append(
                        {
                            "pid": str(process.pid),
                            "name": process.name(),
                            "path": process.exe(),
                            "cmdline": " ".join(process.cmdline()),
                            "uid": str(process.uids().real),
                            "parent": str(process.ppid()),
                            "start_time": str(int(process.create_time())),
                            "state": process.status(),
                        }
                    )
            except (psutil.Error, OSError):
                continue
        self.load("processes", routes, rows)
        hashes = []
        for path in sorted({p for p in paths if p}):
            digests = _digests(path)
            if digests is not None:
                hashes.append({"path": path, **digests})
        self.load(
            "hash",
            _routes(("path", "TEXT"), ("md5", "TEXT"), ("sha1", "TEXT"), ("sha256", "TEXT")),
            hashes,
        )
        extensions = []
        if core is not None:
            core_info = InternalExtensionInfo(name="core", version="5.0.0", sdk_version="0.0.0")
            listed = {0: core_info, **core.manager.extensions()}  # as core's getExtensions()
            for uuid, info in listed.items():
                extensions.append(
                    {
                        "uuid": str(uuid),
                        "name": info.name,
                        "version": info.version,
                        "sdk_version": info.sdk_version,
                        "path": core.socket_path if uuid == 0 else f"{core.socket_path}.{uuid}",
                        "type": "core" if uuid == 0 else "extension",
                    }
                )
        self.load(
            "osquery_extensions",
            _EXTENSION_ROUTES,
            extensions,
        )

    def query(self, sql: str, parameters: Sequence[Any] = ()) -> List[Dict[str, Any]]:
        return [dict(row) for row in self.db.execute(sql, parameters)]


def _routes(*columns: Tuple[str, str]) -> Routes:
    return [{"id": "column", "name": n, "type": t, "op": "0"} for n, t in columns]


_EXTENSION_ROUTES = _routes(
    ("uuid", "BIGINT"), ("name", "TEXT"), ("version", "TEXT"),
    ("sdk_version", "TEXT"), ("path", "TEXT"), ("type", "TEXT"),
)  # fmt: skip


def _digests(path: str) -> Optional[Dict[str, str]]:
    md5, sha1, sha256 = hashlib.md5(), hashlib.sha1(), hashlib.sha256()  # noqa: S324
    try:
        with open(path, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                md5.update(chunk)
                sha1.update(chunk)
                sha256.update(chunk)
    except OSError:
        return None
    return {"md5": md5.hexdigest(), "sha1": sha1.hexdigest(), "sha256": sha256.hexdigest()}


def load_extension_tables(
    host: SqlHost, connection: ExtensionConnection, registration: Registration
) -> Dict[str, Rows]:
    """Generate every table the extension registered (no constraints) and load it."""
    loaded = {}
    for name, routes in registration.tables().items():
        rows = connection.generate(name)
        host.load(name, routes, rows)
        loaded[name] = rows
    return loaded


def pack_queries(pack_path: str) -> List[Tuple[str, str]]:
    """``(name, sql)`` of an osquery pack's discovery and scheduled queries."""
    with open(pack_path, encoding="utf-8") as stream:
        pack = json.load(stream)
    queries = [(f"discovery[{i}]", sql) for i, sql in enumerate(pack.get("discovery", []))]
    queries += [(name, spec["query"]) for name, spec in pack.get("queries", {}).items()]
    return queries


# -- command line ----------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Launch an osquery extension against a stand-in osquery core and query it."
    )
    parser.add_argument(
        "--ext",
        required=True,
        help="the extension's path, or a command line (osqueryd's arguments are appended)",
    )
    parser.add_argument("--sql", action="append", default=[], help="SQL to run (repeatable)")
    parser.add_argument("--pack", action="append", default=[], help="run an osquery pack's SQL")
    parser.add_argument("--name", default="egress_agent", help="the extension's registered name")
    parser.add_argument("--timeout", type=float, default=3)
    parser.add_argument("--interval", type=float, default=3)
    parser.add_argument("--verbose", action="store_true", help="launch with --verbose")
    parser.add_argument("--wait", type=float, default=30, help="seconds to wait for registration")
    args = parser.parse_args(argv)

    failures = 0
    with CoreStandIn() as core:
        process = core.launch(args.ext, args.timeout, args.interval, args.verbose)
        try:
            registration = core.wait_for_registration(args.name, args.wait, process)
        except CoreError as error:
            print(f"osquery_core: {error}", file=sys.stderr)
            return 1
        print(
            f"registered {registration.name} {registration.version} as uuid "
            f"{registration.uuid}: tables {', '.join(registration.tables())}",
            file=sys.stderr,
        )
        host = SqlHost()
        with core.connect(registration) as extension:
            status = extension.ping()
            if status.code != 0:
                print(f"osquery_core: ping answered {status.code}", file=sys.stderr)
                failures += 1
            loaded = load_extension_tables(host, extension, registration)
            paths = {row.get("path", "") for rows in loaded.values() for row in rows}
            host.load_natives(core, paths)
            queries = [(f"sql[{i}]", sql) for i, sql in enumerate(args.sql)]
            for pack in args.pack:
                queries += pack_queries(pack)
            for name, sql in queries:
                try:
                    rows = host.query(sql)
                except sqlite3.Error as error:
                    print(f"osquery_core: {name}: {error}: {sql}", file=sys.stderr)
                    failures += 1
                    continue
                print(json.dumps({"query": name, "rows": rows}, default=str))
            extension.shutdown()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            print("osquery_core: the extension did not exit after shutdown()", file=sys.stderr)
            failures += 1
        if os.path.exists(core.extension_socket(registration)):
            print("osquery_core: the extension left its socket behind", file=sys.stderr)
            failures += 1
        if process.returncode not in (0, None):
            print(f"osquery_core: the extension exited with {process.returncode}", file=sys.stderr)
            failures += 1
        if failures:
            sys.stderr.write(core.output(process))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
