"""One study per output folder at a time.

    with holding(out, "study", log):   # UserError naming the holder if another process has it
        ...

The lock is OUT/.loraplace.lock, held with flock(2) for as long as the holding process lives:
the kernel lets go of it when the process ends, however it ends (kill -9 included), so a lock
left behind by a dead study is simply taken, with a line saying whose it was. The file names the
holder (pid, host, what it is doing, since when) for the message a second process gets.
Within one process the lock is re-entrant (`study` holds it while `report` is built).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from loraplace.core.errors import UserError

NAME = ".loraplace.lock"
_held: dict[Path, list] = {}  # folder -> [file, depth]


def _describe(holder: dict) -> str:
    return (
        f"a {holder.get('command', 'study')} (pid {holder.get('pid', '?')} on host "
        f"{holder.get('host', '?')}, since {holder.get('since', '?')})"
    )


def acquire(out: Path, command: str = "study", log=print) -> None:
    """Hold OUT's lock, or raise UserError naming the live holder."""
    key = Path(out).resolve()
    if key in _held:
        _held[key][1] += 1
        return
    path = key / NAME
    try:
        f = open(path, "a+")  # noqa: SIM115 - kept open while held
    except OSError as err:
        raise UserError(f"cannot write the lock file {str(path)!r} ({err.strerror})") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = _parse(f.read())
        f.close()
        raise UserError(
            f"{str(out)!r} is in use by {_describe(holder)}; wait for it to finish or use "
            "another --out"
        ) from None
    f.seek(0)
    before = _parse(f.read())
    if before and (before.get("pid"), before.get("host")) != (os.getpid(), socket.gethostname()):
        log(f"lock: took over {_describe(before)}, which is no longer running")
    f.seek(0)
    f.truncate()
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command,
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    f.write(json.dumps(me) + "\n")
    f.flush()
    _held[key] = [f, 1]


def release(out: Path) -> None:
    """Let go once for every `acquire`; the file is emptied when the last one lets go."""
    key = Path(out).resolve()
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        f = entry[0]
        f.seek(0)
        f.truncate()  # a clean release leaves no holder to report as taken over
        f.close()  # closing the file releases the flock
        del _held[key]


@contextmanager
def holding(out: Path, command: str = "study", log=print):
    acquire(out, command, log)
    try:
        yield
    finally:
        release(out)


def _parse(text: str) -> dict:
    try:
        found = json.loads(text)
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}
