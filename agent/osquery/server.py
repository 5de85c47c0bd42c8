"""``egress-agent extension``: register with osquery core, serve the tables, end cleanly.

The launch contract is osqueryd's autoloader (osquery/extensions/extensions.cpp): it runs
``PATH [--verbose] --socket S --timeout T --interval I`` with ``OSQUERY_EXTENSION`` set.  We then

1. connect to core's ExtensionManager on ``S`` (retrying until ``T`` seconds have passed),
2. ``registerExtension({name: egress_agent, version}, {"table": {...routes}})`` -> a uuid,
   waiting as long as core takes (it attaches tables only between queries) and trying a
   "Duplicate extension registered" again while core drops an orphan of a predecessor,
3. serve the ``Extension`` service on ``S.<uuid>``: Unix socket, buffered transport, binary
   protocol, one thread per connection, so a ping is answered while a generate runs
   (osquery-python's ``start_extension()`` serves one connection at a time: its issue #47);
   the reply to ``call`` is written by :mod:`agent.osquery.wire` (:class:`CallProcessor`),
4. ping core every ``I`` seconds, and end when core stops answering or no longer lists us,
   when core calls ``shutdown()``, or on SIGTERM/SIGINT: within 2 s, removing our socket.

osquery-python provides the generated Thrift bindings used here; nothing else of it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import stat
import struct
import sys
import threading
import time
from types import FrameType
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from osquery.extensions import Extension, ExtensionManager
from osquery.extensions.ttypes import ExtensionResponse, ExtensionStatus, InternalExtensionInfo
from thrift.protocol import TBinaryProtocol
from thrift.Thrift import TApplicationException, TMessageType
from thrift.transport import TSocket, TTransport

from agent import __version__
from agent.osquery import context as context_module
from agent.osquery import table, wire
from agent.osquery.dispatch import ExtensionTables
from agent.osquery.options import Options, add_arguments, core_argv
from agent.osquery.table import AgentInfo
from agent.pipeline import Monitor, RunningAgent
from agent.textsafe import error_line

EXTENSION_NAME = "egress_agent"
SDK_VERSION = "3.0.7"
"""The Thrift API generation of osquery-python 3.1.1's bindings (what it reports itself)."""
MIN_SDK_VERSION = "1.8.0"
STOP_WITHIN_S = 2.0
CONNECT_RETRY_S = 0.1
REGISTER_TIMEOUT_S = 300.0
"""How long a registration may take: core attaches our tables under a lock that every running
query holds for its whole duration, so registration lasts as long as the slowest query
running then.  osquery's C++ SDK waits ``--thrift_timeout`` (300 s) for it; so do we."""
DUPLICATE_RETRY_S = 0.5
DUPLICATE = "Duplicate extension registered"
UNIX_PATH_MAX = 108
"""The size of ``sun_path``, its terminating NUL included (unix(7))."""
MAX_CONNECTIONS = 64
STRING_LIMIT = 64 * 1024 * 1024
"""Largest string a request may carry; a bigger length prefix is refused, not allocated."""
CONTAINER_LIMIT = 1_000_000

log = logging.getLogger("egress_agent.extension")


class StartupError(Exception):
    """The extension could not start; the message says why (and names the socket)."""


# -- stopping ----------------------------------------------------------------------------------


class Stopper:
    """The first reason to stop wins; everyone waits on the same event."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reason = ""
        self.code = 0
        self._lock = threading.Lock()

    def request(self, reason: str, code: int = 0) -> None:
        with self._lock:
            if not self.event.is_set():
                self.reason, self.code = reason, code
                self.event.set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        return self.event.wait(timeout)


# -- talking to core ---------------------------------------------------------------------------


_I32 = struct.Struct("!i")


class _BinaryProtocol(TBinaryProtocol.TBinaryProtocol):  # type: ignore[misc]
    """Thrift's binary protocol, writing a string in one transport write instead of three
    calls: a table of thousands of rows is tens of thousands of strings.  Same bytes."""

    def writeString(self, value: str) -> None:
        data = value.encode("utf-8")
        self.trans.write(_I32.pack(len(data)) + data)

    def readString(self) -> str:
        """A request's string, whatever its bytes: core does not validate UTF-8 (rapidjson
        neither), and a JOIN on a ``/proc``-derived name forwards raw bytes.  Undecodable
        bytes become PEP 383 surrogates, so nothing is lost and nothing drops the
        connection; answers never echo them raw (text is escaped where it leaves)."""
        return str(self.readBinary().decode("utf-8", "surrogateescape"))


class _ProtocolFactory(TBinaryProtocol.TBinaryProtocolFactory):  # type: ignore[misc]
    def getProtocol(self, trans: Any) -> _BinaryProtocol:
        return _BinaryProtocol(
            trans,
            self.strictRead,
            self.strictWrite,
            string_length_limit=self.string_length_limit,
            container_length_limit=self.container_length_limit,
        )


def _protocol_factory() -> Any:
    # The pure-Python codec: osquery-python's generated specs predate what thrift's C codec
    # (fastbinary) expects of nested structs, and it refuses them.  The one big message, the
    # reply to call, is written by agent.osquery.wire instead.
    return _ProtocolFactory(
        string_length_limit=STRING_LIMIT, container_length_limit=CONTAINER_LIMIT
    )


class CoreClient:
    """A connection to osquery core's ExtensionManager socket."""

    def __init__(self, path: str, timeout_s: float) -> None:
        self.path = path
        self._socket = TSocket.TSocket(unix_socket=path)
        self._socket.setTimeout(int(timeout_s * 1000))
        self._transport = TTransport.TBufferedTransport(self._socket)
        self._client = ExtensionManager.Client(_protocol_factory().getProtocol(self._transport))

    @classmethod
    def connect(
        cls, path: str, wait_s: float, timeout_s: float, stop: Optional[threading.Event] = None
    ) -> CoreClient:
        """Connect, retrying while the socket is absent or refuses, for up to ``wait_s``."""
        deadline = time.monotonic() + max(wait_s, 0.0)
        while stop is None or not stop.is_set():
            client = cls(path, timeout_s)
            try:
                client._transport.open()
                return client
            except TTransport.TTransportException as error:
                reason = _socket_problem(path, error)
            if time.monotonic() + CONNECT_RETRY_S > deadline:
                raise StartupError(
                    f"osquery core socket {path} {reason} (waited {wait_s:g} s, --timeout)"
                )
            time.sleep(CONNECT_RETRY_S)
        raise StartupError(f"stopped while waiting for osquery core socket {path}")

    def set_timeout(self, timeout_s: float) -> None:
        self._socket.setTimeout(int(timeout_s * 1000))

    def register(
        self, version: str, registry: Dict[str, Any], stop: threading.Event
    ) -> ExtensionStatus:
        """One ``registerExtension`` call, as long as core takes; :class:`StartupError` when
        it fails or ``stop`` is set meanwhile (the call is cut short then)."""
        info = InternalExtensionInfo(
            name=EXTENSION_NAME,
            version=version,
            sdk_version=SDK_VERSION,
            min_sdk_version=MIN_SDK_VERSION,
        )
        outcome: Dict[str, Any] = {}

        def call() -> None:
            try:
                outcome["status"] = self._client.registerExtension(info, registry)
            except Exception as error:
                outcome["error"] = error

        caller = threading.Thread(target=call, name="core-register", daemon=True)
        caller.start()
        while caller.is_alive():
            caller.join(0.2)
            if stop.is_set() and caller.is_alive():
                with contextlib.suppress(Exception):  # wakes the blocked read
                    self._socket.handle.shutdown(socket.SHUT_RDWR)
                caller.join(STOP_WITHIN_S / 2)
                raise StartupError("stopped while registering with osquery core")
        if "error" in outcome:
            raise StartupError(
                f"registration with osquery core at {self.path} failed: {outcome['error']}"
            )
        status: ExtensionStatus = outcome["status"]
        return status

    def ping(self) -> ExtensionStatus:
        return self._client.ping()

    def extension_uuids(self) -> List[int]:
        return [int(uuid) for uuid in self._client.extensions()]

    def deregister(self, uuid: int) -> None:
        self._client.deregisterExtension(uuid)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._transport.close()


def _socket_problem(path: str, error: Exception) -> str:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "does not exist"
    except OSError as stat_error:
        return f"cannot be reached: {stat_error.strerror}"
    if not stat.S_ISSOCK(mode):
        return "is not a socket"
    return f"refuses connections: {error}"


def watch_core(client: CoreClient, uuid: int, interval_s: float, stopper: Stopper) -> None:
    """Ping core every ``interval_s``; stop the extension when core is gone or forgot us.

    After a failed ping core unregisters an extension's tables and never re-adds them; a
    core restarted after a crash does not know our uuid.  Either way only a fresh process
    (which core's watcher starts) can serve again, so we end.
    """
    while not stopper.wait(interval_s):
        try:
            status = client.ping()
            if status.code != 0:
                stopper.request(
                    f"osquery core at {client.path} answered a ping with status {status.code}", 1
                )
                return
            if uuid not in client.extension_uuids():
                stopper.request(
                    f"osquery core at {client.path} no longer lists this extension (uuid {uuid})",
                    1,
                )
                return
        except Exception as error:
            stopper.request(f"osquery core at {client.path} stopped answering pings: {error}", 1)
            return


# -- serving -----------------------------------------------------------------------------------


class ExtensionHandler:
    """The ``Extension`` service: ping, call, shutdown.  Never raises into Thrift."""

    def __init__(self, tables: ExtensionTables, stopper: Stopper, verbose: bool) -> None:
        self._tables = tables
        self._stopper = stopper
        self._verbose = verbose

    def ping(self) -> ExtensionStatus:
        return ExtensionStatus(code=0, message="OK")

    def shutdown(self) -> None:
        if self._verbose:
            log.info("shutdown requested by osquery core")
        self._stopper.request("osquery core asked the extension to shut down", 0)

    def call(self, registry: str, item: str, request: Mapping[str, str]) -> ExtensionResponse:
        started = time.monotonic()
        rows: Sequence[Dict[str, str]] = []
        try:
            if registry != "table":
                result_code, message = 1, f"no {registry!r} plugins in {EXTENSION_NAME}"
            else:
                result = self._tables.call(item, request or {})
                result_code, message, rows = result.code, result.message, result.rows
        except Exception as error:  # a bug must fail one query, not the connection
            result_code, message = 1, f"internal error: {type(error).__name__}: {error}"
            rows = []
        if self._verbose or result_code != 0:
            level = logging.INFO if result_code == 0 else logging.WARNING
            log.log(
                level,
                "call %r %r %s -> %s, %d rows, %.1f ms",
                registry,
                item,
                _describe(request),
                "ok" if result_code == 0 else f"failed: {message}",
                len(rows),
                (time.monotonic() - started) * 1000.0,
            )
        return ExtensionResponse(
            status=ExtensionStatus(code=result_code, message=table.cell(message)), response=rows
        )


class CallProcessor(Extension.Processor):  # type: ignore[misc]
    """The generated ``Extension`` processor, except that the reply to ``call`` is written by
    :mod:`agent.osquery.wire` (its rows may come encoded already: :class:`wire.EncodedRows`).

    Requests are still read by the generated code through our protocol (with its string and
    container limits); ``ping`` and ``shutdown`` are the generated code's.  A response that
    cannot be encoded becomes a failed status for that call, not a broken connection.
    """

    def __init__(self, handler: ExtensionHandler) -> None:
        super().__init__(handler)
        self._processMap["call"] = CallProcessor.process_call

    def process_call(self, seqid: int, iprot: Any, oprot: Any) -> None:
        args = Extension.call_args()
        args.read(iprot)
        iprot.readMessageEnd()
        try:
            response = self._handler.call(args.registry, args.item, args.request)
        except (TTransport.TTransportException, KeyboardInterrupt, SystemExit):
            raise
        except Exception as error:  # what the generated processor answers (never happens)
            log.warning("call failed: %s", error_line(error))
            failure = TApplicationException(TApplicationException.INTERNAL_ERROR, "Internal error")
            oprot.writeMessageBegin("call", TMessageType.EXCEPTION, seqid)
            failure.write(oprot)
            oprot.writeMessageEnd()
            oprot.trans.flush()
            return
        try:
            reply = wire.call_reply(seqid, response)
        except Exception as error:
            message = f"internal error: cannot encode the response: {error_line(error)}"
            log.warning("call %r %r -> failed: %s", args.registry, args.item, message)
            reply = wire.call_reply(
                seqid, ExtensionResponse(ExtensionStatus(code=1, message=message), [])
            )
        reply.write(oprot.trans)


def _describe(request: Optional[Mapping[str, str]]) -> str:
    if not request:
        return "(empty request)"
    text = f"action={request.get('action')!r}"
    context = request.get("context")
    if context is not None:
        try:
            parsed = context_module.parse_context(context)
        except context_module.ContextError:
            return f"{text} context={context[:120]!r}"
        constrained = {
            name: [f"{c.op}:{c.expr}" for c in constraints]
            for name, constraints in parsed.constraints.items()
            if constraints
        }
        if constrained:
            text += f" constraints={constrained!r}"[:300]
    return text


class ThreadedUnixServer:
    """A Thrift server on a Unix socket, one daemon thread per connection.

    thrift's own TThreadedServer cannot be stopped (its accept loop runs forever, and spins
    logging errors once its socket is closed), so the loop is here, with a stop event.
    """

    def __init__(self, path: str, processor: Any, max_connections: int = MAX_CONNECTIONS) -> None:
        self.path = path
        self._processor = processor
        self._slots = threading.BoundedSemaphore(max_connections)
        self._listener: Optional[socket.socket] = None
        self._inode: Optional[int] = None

    def listen(self) -> None:
        """Listen on ``path``, readable and writable by our user only (0600).  Raises
        :class:`StartupError`.

        The socket is bound and listening under a temporary name first, then renamed to
        ``path``: core's watcher takes a socket file that exists for a live extension, and one
        refused ping (a connect between ``bind()`` and ``listen()``) and it drops us.
        """
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)  # left by an earlier run of ours that was killed
        staging = f"{self.path}.{os.getpid()}~"
        if len(os.fsencode(staging)) >= UNIX_PATH_MAX:
            staging = self.path  # no room for a longer name: bind in place
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staging)  # left by a run of ours killed in between
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            listener.bind(staging)
            listener.listen(128)
            os.chmod(staging, 0o600)
            if staging != self.path:
                os.rename(staging, self.path)
            self._inode = os.lstat(self.path).st_ino
        except OSError as error:
            listener.close()
            with contextlib.suppress(OSError):
                if staging != self.path:
                    os.unlink(staging)
            raise StartupError(f"cannot listen on {self.path}: {error.strerror or error}") from None
        finally:
            os.umask(old_umask)
        listener.settimeout(0.2)
        self._listener = listener

    def serve(self, stop: threading.Event) -> None:
        listener = self._listener
        if listener is None:
            raise RuntimeError("ThreadedUnixServer.serve() before listen()")
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                if stop.is_set() or listener.fileno() < 0:
                    return
                time.sleep(0.05)  # EMFILE and friends: let the load pass
                continue
            connection.settimeout(None)
            while not self._slots.acquire(timeout=0.2):
                if stop.is_set():
                    connection.close()
                    return
            threading.Thread(
                target=self._handle, args=(connection,), name="thrift-connection", daemon=True
            ).start()

    def _handle(self, connection: socket.socket) -> None:
        try:
            client = TSocket.TSocket()
            client.setHandle(connection)
            transport = TTransport.TBufferedTransport(client)
            protocol = _protocol_factory().getProtocol(transport)
            while True:
                self._processor.process(protocol, protocol)
        except TTransport.TTransportException:
            pass  # the peer closed the connection
        except Exception as error:  # a malformed request ends that connection only
            log.warning(
                "dropped a connection after a bad request: %s",
                error_line(error),
            )
        finally:
            with contextlib.suppress(OSError):
                connection.close()
            self._slots.release()

    def close(self) -> None:
        """Remove our socket file (only if it is still ours), then stop accepting: the file,
        while it is there, always has a listener behind it."""
        with contextlib.suppress(OSError):
            if self._inode is not None and os.lstat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()


# -- the process -------------------------------------------------------------------------------


def serve(
    options: Options,
    tables: ExtensionTables,
    monitor: Optional[Monitor],
    stopper: Stopper,
    on_ready: Optional[Callable[[str], None]] = None,
) -> int:
    """Register, serve, and return the exit status once something asked us to stop.

    The building block of :func:`run_extension`, without signals, for tests that need a table
    the real sampler cannot provide (a deliberately slow one).
    """
    try:
        core = CoreClient.connect(
            options.socket, options.timeout, REGISTER_TIMEOUT_S, stopper.event
        )
    except StartupError as error:
        if stopper.event.is_set():
            return stopper.code
        log.error("%s", error)
        return 1
    try:
        uuid = register(core, table.registry(list(tables.specs.values())), options, stopper)
    except StartupError as error:
        core.close()
        if stopper.event.is_set():
            return stopper.code
        log.error("%s", error)
        return 1
    server = ThreadedUnixServer(
        f"{options.socket}.{uuid}",
        CallProcessor(ExtensionHandler(tables, stopper, options.verbose)),
    )
    try:
        server.listen()
    except StartupError as error:
        log.error("%s", error)
        core.close()
        return 1
    if options.verbose:
        log.info(
            "registered %s %s with osquery core at %s as uuid %d; serving %s on %s",
            EXTENSION_NAME,
            __version__,
            options.socket,
            uuid,
            ", ".join(tables.specs),
            server.path,
        )
    core.set_timeout(max(STOP_WITHIN_S, options.interval))
    threads = [
        threading.Thread(target=server.serve, args=(stopper.event,), name="thrift-accept"),
        threading.Thread(
            target=watch_core, args=(core, uuid, options.interval, stopper), name="core-watch"
        ),
    ]
    if monitor is not None:
        threads.append(threading.Thread(target=monitor.run, args=(stopper.event,), name="sampler"))
    for thread in threads:
        thread.daemon = True
        thread.start()
    if on_ready is not None:
        on_ready(server.path)
    while not stopper.wait(0.5):
        pass
    server.close()
    level = logging.INFO if stopper.code == 0 else logging.ERROR
    if options.verbose or stopper.code != 0:
        log.log(level, "stopping: %s", stopper.reason)
    if stopper.code == 0 and stopper.reason.startswith("received"):
        # Ended by a signal, not by core: tell core, briefly, so our tables go at once.
        core.set_timeout(0.5)
        with contextlib.suppress(Exception):
            core.deregister(uuid)
    core.close()
    for thread in threads:
        thread.join(timeout=0.3)
    return stopper.code


def register(core: CoreClient, registry: Dict[str, Any], options: Options, stopper: Stopper) -> int:
    """Register with core, waiting as long as core takes; the uuid.

    A "Duplicate extension registered" refusal is tried again every 0.5 s for ``--timeout``
    plus two ``--interval``: an extension that gave up (or was killed) while core was still
    attaching its tables left core an orphan registration, which core drops after its next
    ping of it fails (within one interval, plus up to ``--timeout`` of grace at the first
    check); only then is the name free.  Any other refusal is final.
    """
    deadline: Optional[float] = None
    while True:
        status = core.register(__version__, registry, stopper.event)
        if status.code == 0:
            return int(status.uuid)
        if status.message != DUPLICATE:
            raise StartupError(
                f"osquery core at {core.path} refused the registration of {EXTENSION_NAME}: "
                f"{status.message!r}"
            )
        now = time.monotonic()
        if deadline is None:
            deadline = now + options.timeout + 2 * options.interval
            if options.verbose:
                log.info("osquery core has %s registered already; trying again", EXTENSION_NAME)
        if now + DUPLICATE_RETRY_S > deadline or stopper.wait(DUPLICATE_RETRY_S):
            raise StartupError(
                f"osquery core at {core.path} refused the registration of {EXTENSION_NAME}: "
                f"{status.message!r} (tried again for {options.timeout + 2 * options.interval:g}"
                " s: another egress_agent is registered)"
            )


def run_extension(argv: Sequence[str]) -> int:
    """``egress-agent extension ARGS``: parse, then :func:`extension_main`; the exit status."""
    parser = argparse.ArgumentParser(
        prog="egress-agent extension", description="Serve egress-agent's tables to osquery."
    )
    add_arguments(parser)
    try:
        args = parser.parse_args(core_argv(argv))
    except SystemExit as exit:
        return int(exit.code or 0)
    return extension_main(args)


def extension_main(args: argparse.Namespace) -> int:
    """Run the extension with parsed arguments (see :func:`add_arguments`) until told to stop."""
    from agent.config import ConfigError, load_settings
    from agent.limits import raise_open_files

    raise_open_files()
    _configure_logging(args.verbose)
    options = Options(
        socket=args.socket,
        timeout=args.timeout,
        interval=args.interval,
        verbose=args.verbose,
    )
    try:
        settings = load_settings(getattr(args, "config", None))
    except ConfigError as error:
        log.error("%s", error)
        return 2
    sampler_log = logging.getLogger("egress_agent.sampler")
    agent = RunningAgent.open(settings, "extension", sampler_log)
    for notice in agent.pipeline.notices:
        sampler_log.warning("%s", notice)
    tables = ExtensionTables(
        agent.monitor,
        agent.pipeline.store,
        AgentInfo(
            version=__version__,
            config_path=settings.source or "",
            sampling_interval=settings.sampling_interval,
            history_path=settings.history_path if agent.pipeline.store is not None else "",
        ),
        events=agent.events,
    )
    stopper = Stopper()
    with agent, _stop_on_signals(stopper):
        return serve(options, tables, agent.monitor, stopper)


@contextlib.contextmanager
def _stop_on_signals(stopper: Stopper) -> Any:
    def handle(signum: int, frame: Optional[FrameType]) -> None:
        stopper.request(f"received {signal.Signals(signum).name}", 0)

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _configure_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("egress-agent extension: %(levelname)s: %(message)s"))
    agent_log = logging.getLogger("egress_agent")
    agent_log.handlers[:] = [handler]
    agent_log.setLevel(logging.INFO if verbose else logging.WARNING)
    agent_log.propagate = False
    # thrift logs connection errors itself; we report them once, in our own words.
    thrift_log = logging.getLogger("thrift")
    thrift_log.handlers[:] = [logging.NullHandler()]
    thrift_log.propagate = False
