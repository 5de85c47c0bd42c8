"""Socket inode -> (pid, fd): early stop, previous owners first, the negative cache."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Tuple

import pytest

from agent.owners import OwnerFinder

NO_SUCH_INODE = 1  # inode 1 is never a socket's


def inode_of(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


@pytest.fixture
def pair() -> Iterator[Tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_nothing_wanted_reads_nothing() -> None:
    scan = OwnerFinder().find(set())
    assert scan.skipped and scan.pids_scanned == 0 and scan.fds_scanned == 0
    scan = OwnerFinder().find({0})  # TIME_WAIT sockets have inode 0: no owner to look for
    assert scan.skipped and scan.owners == {}


def test_finds_this_process_sockets(pair: Tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    scan = OwnerFinder().find({inode_of(a), inode_of(b)})
    assert scan.owners == {
        inode_of(a): (os.getpid(), a.fileno()),
        inode_of(b): (os.getpid(), b.fileno()),
    }
    assert not scan.complete  # it stopped once both were found


def test_previous_owners_are_scanned_first(pair: Tuple[socket.socket, socket.socket]) -> None:
    finder = OwnerFinder()
    wanted = {inode_of(pair[0])}
    first = finder.find(wanted)
    second = finder.find(wanted)
    assert first.owners == second.owners
    assert second.pids_scanned == 0  # no fd directory listed:
    assert second.fds_scanned == 1  # straight to the fd that held it last time
    assert second.pids_scanned <= first.pids_scanned


def test_a_socket_that_moved_to_another_fd_is_found_again(
    pair: Tuple[socket.socket, socket.socket],
) -> None:
    finder = OwnerFinder()
    moved = pair[0].dup()
    try:
        wanted = {inode_of(moved)}
        first = finder.find(wanted)
        old_fd = first.owners[inode_of(moved)][1]
        holder = moved if old_fd == moved.fileno() else pair[0]
        keeper = pair[0] if holder is moved else moved
        holder.close()  # the fd remembered is gone; the socket lives on in the other one
        second = finder.find(wanted)
        assert second.owners == {inode_of(keeper): (os.getpid(), keeper.fileno())}
    finally:
        moved.close()


def test_unowned_inodes_stop_holding_up_the_scan(pair: Tuple[socket.socket, socket.socket]) -> None:
    finder = OwnerFinder(negative_ttl=2)
    real = inode_of(pair[0])
    first = finder.find({real, NO_SUCH_INODE})
    assert first.complete and NO_SUCH_INODE not in first.owners
    assert finder.unowned == {NO_SUCH_INODE}
    second = finder.find({real, NO_SUCH_INODE})
    assert not second.complete and second.fds_scanned == 1
    assert second.owners == {real: (os.getpid(), pair[0].fileno())}
    third = finder.find({real, NO_SUCH_INODE})  # the entry expired: looked for again
    assert third.complete
    finder.find({real})  # no longer wanted: forgotten
    assert finder.unowned == set()


def test_a_shared_socket_goes_to_the_first_owner(pair: Tuple[socket.socket, socket.socket]) -> None:
    """A child inherits the socket; the lower pid (this process) is found first."""
    a, _ = pair
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"],
        stdin=subprocess.PIPE,
        pass_fds=(a.fileno(),),
    )
    try:
        scan = OwnerFinder().find({inode_of(a)})
        assert scan.owners[inode_of(a)][0] == min(os.getpid(), child.pid)
        restricted = OwnerFinder().find({inode_of(a)}, pids=[child.pid])
        assert restricted.owners == {inode_of(a): (child.pid, a.fileno())}
    finally:
        child.communicate(b"")


def test_restricted_scan_leaves_memory_alone(pair: Tuple[socket.socket, socket.socket]) -> None:
    finder = OwnerFinder()
    scan = finder.find({inode_of(pair[0]), NO_SUCH_INODE}, pids=[os.getpid()])
    assert scan.complete and scan.pids_scanned == 1
    assert finder.unowned == set()
    assert OwnerFinder().find({inode_of(pair[0])}, pids=[]).owners == {}


def test_unreadable_and_odd_fd_entries(tmp_path: Path) -> None:
    """A /proc on disk: fd links are symlinks; odd ones are skipped, a missing fd dir counted."""
    fd_dir = tmp_path / "40" / "fd"
    fd_dir.mkdir(parents=True)
    os.symlink("socket:[777]", fd_dir / "3")
    os.symlink("/dev/null", fd_dir / "0")
    os.symlink("socket:[garbage]", fd_dir / "4")
    os.symlink("anon_inode:[eventfd]", fd_dir / "5")
    (tmp_path / "41").mkdir()  # no fd dir
    scan = OwnerFinder(str(tmp_path)).find({777, 888})
    assert scan.owners == {777: (40, 3)}
    assert scan.unreadable_pids == 1 and scan.fds_scanned == 4 and scan.complete
