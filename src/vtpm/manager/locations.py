"""Where a front-door vTPM keeps its state, and noticing when its orchestrator removed it.

An orchestrator names a state location by path (`vtpm.wire.compat.StateLocation`) and hands
an open descriptor of it. The Manager records the path with the device and inode it had at
setup (`LocationRecord`): a descriptor is the recorded vTPM's only if the path still names that
very directory or file and the descriptor is of it too (`identify`), so a peer cannot name one
vTPM's path and pass another directory. The instances write there as the Manager's user: a peer
other than root may only hand over a location of its own (owned by its uid; a file opened for
writing), so the front door cannot be made to write into a directory its peer could not.

Orchestrators delete a vTPM by removing its state (`virsh undefine --tpm` removes the
directory; `--keep-tpm` keeps it, and with it the vTPM). `removed` tells such a removal from an
unmounted disk by the nearest ancestor of the path that still exists: on the device the
location was recorded on, the path was removed (libvirt removes `<uuid>/` above the `tpm2`
it named); on another device (the mount point of a disk not mounted now) the vTPM is kept.
A path that names another directory than the recorded one is not the vTPM's (an attach there
is refused); a setup there replaces it.
"""

from __future__ import annotations

import fcntl
import os
import re
import stat
import uuid
from dataclasses import dataclass
from pathlib import PurePosixPath

from vtpm.errors import RequestError
from vtpm.manager.records import LocationRecord
from vtpm.wire.compat import StateKind, StateLocation

_UUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")


@dataclass(frozen=True, slots=True)
class Identity:
    st_dev: int
    st_ino: int


def _kind_ok(kind: StateKind, mode: int) -> bool:
    if kind is StateKind.DIR:
        return stat.S_ISDIR(mode)
    return stat.S_ISREG(mode) or stat.S_ISBLK(mode)


def identify(loc: StateLocation, fd: int, peer_uid: int = 0) -> Identity:
    """The identity of the state location `fd` opens; RequestError unless `loc.path` names
    that same directory (or file) now and, for a peer other than root, is the peer's own."""
    path = loc.path
    if not PurePosixPath(path).is_absolute() or "\x00" in path or len(path) > 4096:
        raise RequestError(f"state location {path[:200]!r}: an absolute path is needed")
    try:
        held = os.fstat(fd)
    except OSError as e:
        raise RequestError(f"the state descriptor cannot be used: {e.strerror}") from None
    if not _kind_ok(loc.kind, held.st_mode):
        what = "a directory" if loc.kind is StateKind.DIR else "a file or block device"
        raise RequestError(f"the state descriptor of {path} is not {what}")
    if peer_uid != 0:
        if held.st_uid != peer_uid:
            raise RequestError(f"state location {path} is not owned by uid {peer_uid}")
        if loc.kind is StateKind.FILE and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE not in (
            os.O_RDWR,
            os.O_WRONLY,
        ):
            raise RequestError(f"the state descriptor of {path} is not open for writing")
    try:
        named = os.stat(path)
    except OSError as e:
        raise RequestError(f"state location {path}: {e.strerror}") from None
    if (named.st_dev, named.st_ino) != (held.st_dev, held.st_ino):
        raise RequestError(f"the state descriptor is not of {path}")
    return Identity(held.st_dev, held.st_ino)


def same(rec: LocationRecord, loc: StateLocation, ident: Identity) -> bool:
    """Whether a recorded location is the one named and held now."""
    return (
        rec.path == loc.path
        and rec.kind == loc.kind
        and (rec.st_dev, rec.st_ino) == (ident.st_dev, ident.st_ino)
    )


def uuid_in_path(path: str) -> uuid.UUID | None:
    """The last uuid among the path's components (libvirt: `.../swtpm/<vm uuid>/tpm2`)."""
    for part in reversed(PurePosixPath(path).parts):
        m = _UUID.fullmatch(part)
        if m:
            return uuid.UUID(m.group(0))
    return None


def removed(rec: LocationRecord) -> bool:
    """Whether the orchestrator removed the recorded location (the module's rule). A path that
    names another directory now is not taken for a removal here (a copy put back from a
    backup has a new inode); the next setup there decides."""
    path = PurePosixPath(rec.path)
    try:
        os.stat(path)
    except FileNotFoundError:
        # libvirt removes the directory above the one it named (<uuid>/ of <uuid>/tpm2): the
        # nearest ancestor that exists decides; on the recorded device it is a removal, on
        # another one (a mount point whose disk is not mounted) the vTPM is kept
        for parent in path.parents:
            try:
                st = os.stat(parent)
            except FileNotFoundError:
                continue
            except OSError:
                return False
            return stat.S_ISDIR(st.st_mode) and st.st_dev == rec.st_dev
        return False
    except OSError:
        return False  # cannot tell (a permission, an I/O error): keep it
    return False


STATE_SUFFIXES = (".blob", ".next", ".gone", ".tmp")  # what an instance keeps in a directory


def has_state(loc: StateLocation, fd: int) -> bool:
    """Whether the location holds any state now (blob files; a non-empty file)."""
    if loc.kind is StateKind.DIR:
        dfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
        try:
            return any(n.endswith(STATE_SUFFIXES) for n in os.listdir(dfd))
        finally:
            os.close(dfd)
    st = os.fstat(fd)
    return not stat.S_ISREG(st.st_mode) or st.st_size > 0


def clear(loc: StateLocation, fd: int) -> None:
    """Remove a replaced vTPM's state at the location `fd` opens (`--overwrite`): in a
    directory its blob files (nothing else there is touched), a regular file is emptied; a
    block device is left as it is (the new vTPM's first write replaces its header)."""
    if loc.kind is StateKind.DIR:
        dfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
        try:
            for name in os.listdir(dfd):
                if name.endswith(STATE_SUFFIXES):
                    os.unlink(name, dir_fd=dfd)
            os.fsync(dfd)
        finally:
            os.close(dfd)
    elif stat.S_ISREG(os.fstat(fd).st_mode):
        os.ftruncate(fd, 0)
        os.fsync(fd)
