"""Reading and writing spec files: regular files only, never blocking, every OS error a :class:`SpecError`.

A FIFO blocks whoever opens it until the other end shows up, and a device may never end (``/dev/zero``), so
both directions check the target with ``stat`` first, open it non-blocking (a FIFO swapped in after the
check cannot block the open) and check the open descriptor again with ``fstat`` before any byte moves.
"""

from __future__ import annotations

import os
import stat
from typing import Optional

from .errors import SpecError

# A spec is a few kilobytes; anything past this is not one (and reading it whole could exhaust memory).
MAX_SPEC_BYTES = 16 * 1024 * 1024
_CHUNK = 1 << 20
_COMMON_FLAGS = getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def _reason(exc: Exception) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


def check_regular(mode: int, name: str) -> None:
    """Refuse anything but a regular file, naming what it is."""
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise SpecError("is a directory, not a spec file", file=name)
    kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
    raise SpecError(f"is {kind}, not a regular file", file=name, allowed="a regular .toml or .json file")


def _mode(name: str, verb: str) -> Optional[int]:
    """``st_mode`` of ``name`` (following links), or None when nothing is there."""
    try:
        return os.stat(name).st_mode
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise SpecError(f"cannot be {verb}: {_reason(exc)}", file=name) from None


def read_regular(name: str) -> bytes:
    """The bytes of the regular file ``name`` (at most MAX_SPEC_BYTES); anything else is a SpecError."""
    mode = _mode(name, "read")
    if mode is None:
        raise SpecError("does not exist", file=name)
    check_regular(mode, name)
    try:
        fd = os.open(name, os.O_RDONLY | _COMMON_FLAGS)
    except FileNotFoundError:
        raise SpecError("does not exist", file=name) from None
    except (OSError, ValueError) as exc:
        raise SpecError(f"cannot be read: {_reason(exc)}", file=name) from None
    try:
        check_regular(os.fstat(fd).st_mode, name)  # SpecError is no OSError: it passes the handler below
        chunks, size = [], 0
        while True:
            chunk = os.read(fd, min(_CHUNK, MAX_SPEC_BYTES + 1 - size))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_SPEC_BYTES:
                raise SpecError(f"is larger than {MAX_SPEC_BYTES} bytes, which no spec is", file=name,
                                allowed=f"a spec file of at most {MAX_SPEC_BYTES // (1024 * 1024)} MiB")
    except OSError as exc:
        raise SpecError(f"cannot be read: {_reason(exc)}", file=name) from None
    finally:
        os.close(fd)


def write_regular(name: str, data: bytes) -> None:
    """Write ``data`` to ``name``, creating or replacing a regular file; any other kind of target is refused."""
    mode = _mode(name, "written")
    if mode is not None:
        check_regular(mode, name)
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | _COMMON_FLAGS, 0o666)
    except (OSError, ValueError) as exc:  # a FIFO without a reader fails here (ENXIO) instead of blocking
        raise SpecError(f"cannot be written: {_reason(exc)}", file=name) from None
    try:
        check_regular(os.fstat(fd).st_mode, name)
        os.ftruncate(fd, 0)  # only now: the checks above must not cut a file they then refuse
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except OSError as exc:
        raise SpecError(f"cannot be written: {_reason(exc)}", file=name) from None
    finally:
        os.close(fd)
