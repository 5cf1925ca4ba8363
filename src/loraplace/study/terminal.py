"""The terminal as a running study uses it: one writer, rows redrawn in place at the bottom.

    log = Output(quiet=False).take_terminal()   # "live" in a terminal, else "lines" or "quiet"
    region = log.start_live()                   # rows at the bottom; log(line) prints above them
    region.draw(["full seed 42  training ...", "study: ..."]); log("  full seed 42: ok (5m02s)")
    log.close()                                 # the rows cleared, fds 1 and 2 given back

In live mode the terminal has this one writer. Everything else that this process or a process
it starts writes to stdout or stderr comes through a pipe and is printed as whole lines above the
rows; the rows are a few ANSI codes (cursor up, erase line, erase below), each change one write.
"""

from __future__ import annotations

import os
import re
import sys
import threading

CURSOR = re.compile(r"\x1b\[[0-9;?]*[A-Za-ln-z]")  # terminal codes other than colours


def _terminal(stream) -> bool:
    try:
        return stream.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False


class Output:
    """The study's `log`: a line at a time to `stream`, above the live rows while they show.

    In live mode `take_terminal` keeps the terminal for this object alone: whatever else this
    process or any process it starts writes to stdout or stderr (a server's import warnings,
    Ray's messages) comes through a pipe and is printed here as whole lines, above the rows."""

    def __init__(self, quiet: bool = False, stream=None, mode: str | None = None) -> None:
        self.stream = stream or sys.stdout
        self.mode = mode or ("quiet" if quiet else "live" if _terminal(self.stream) else "lines")
        self.region: Region | None = None
        self.lock = threading.RLock()
        self._saved = None  # {fd: its copy} while the terminal is taken

    def __call__(self, line: str) -> None:
        with self.lock:
            if self.region is not None:
                self.region.print(line)
            else:
                self.stream.write(line + "\n")
                self.stream.flush()

    def take_terminal(self) -> Output:
        """Live mode, where the stream is this process's stdout: fd 1, and fd 2 where it is the
        terminal too (not a file it was sent to), to a pipe whose lines this object prints (the
        processes started from now on inherit it)."""
        if self.mode != "live" or self.stream is not sys.stdout or self.stream.fileno() != 1:
            return self
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = {fd: os.dup(fd) for fd in (1, 2) if os.isatty(fd)}
        read, write = os.pipe()
        terminal = os.fdopen(os.dup(self._saved[1]), "w", encoding=self.stream.encoding,
                             errors="replace")  # fmt: skip
        for fd in self._saved:
            os.dup2(write, fd)
        os.close(write)
        self.stream = terminal
        threading.Thread(target=self._relay, args=(read,), daemon=True, name="output").start()
        return self

    def _relay(self, fd: int) -> None:
        """Print what comes through the pipe, a whole line at a time; of a line redrawn with
        carriage returns (a progress bar) its last state, without cursor movements."""
        pending = b""
        while chunk := os.read(fd, 65536):
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                text = CURSOR.sub("", line.decode("utf-8", "replace").rsplit("\r", 1)[-1])
                if text.strip():
                    self(text.rstrip())
        os.close(fd)

    def start_live(self) -> Region:
        with self.lock:
            self.region = Region(self.stream)
            return self.region

    def stop_live(self) -> None:
        with self.lock:
            if self.region:
                self.region.clear()
                self.region = None

    def close(self) -> None:
        """Give fds 1 and 2 back (lines still coming through the pipe, from servers that
        outlive the study, are printed as they come)."""
        self.stop_live()
        if self._saved:
            sys.stdout.flush()
            sys.stderr.flush()
            with self.lock:
                for fd, copy in self._saved.items():
                    os.dup2(copy, fd)
                    os.close(copy)
                self._saved = None


class Region:
    """Rows redrawn in place at the bottom of a terminal, lines printed above them; each
    change is one write, so the terminal never shows half of one."""

    def __init__(self, stream) -> None:
        self.stream, self.rows, self.height = stream, [], 0
        self.lock = threading.Lock()
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
        self.ascii = encoding != "utf8"

    def size(self) -> tuple[int, int]:
        try:
            return tuple(os.get_terminal_size(self.stream.fileno()))
        except (OSError, ValueError, AttributeError):
            return 100, 24

    def _write(self, above: list[str], rows: list[str]) -> None:
        width, height = self.size()
        height = max(height, 5)
        if len(rows) > height - 1:  # rows that scrolled away could not be redrawn
            hidden = len(rows) - (height - 2)
            rows = rows[: height - 3] + [f"... and {hidden} more"] + rows[-1:]
        rows = [r[: max(width - 1, 10)] for r in rows]
        text = "\r" + (f"\x1b[{self.height}A" if self.height else "")
        if above:  # lines that may wrap: clear the rows first, so nothing of them is left
            text += "\x1b[J" + "".join(f"{line}\n" for line in above)
        text += "".join(f"\x1b[2K{row}\n" for row in rows) + "\x1b[J"
        self.stream.write(text)
        self.stream.flush()
        self.rows, self.height = rows, len(rows)

    def draw(self, rows: list[str]) -> None:
        with self.lock:
            self._write([], rows)

    def print(self, line: str) -> None:
        with self.lock:
            self._write([line], self.rows)

    def clear(self) -> None:
        with self.lock:
            self._write([], [])
