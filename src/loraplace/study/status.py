"""`loraplace status OUT`: where a study stands, from its files alone.

    loraplace status runs/offline            # a table of the runs, and when the study will end
    loraplace status runs/offline --json     # the same as one JSON object, for tools
    loraplace status runs/offline --watch    # refreshed every 2 s until the study has ended

It reads OUT/config.yaml (the runs the study plans), OUT/progress.json (when this start of the
study began, its runs at once), each run's result.json and progress.json, and OUT's lock: a
study is running only while a process holds OUT/.loraplace.lock, so after a kill its runs read
as interrupted, not running. It works while the study runs, after it stopped, on a copy of OUT.
"""

from __future__ import annotations

import fcntl
import heapq
import json
import time
from pathlib import Path

import yaml

from loraplace.core.errors import UserError
from loraplace.core.lock import NAME as LOCK_NAME
from loraplace.core.results import read_result, run_dir
from loraplace.core.timefmt import duration
from loraplace.train.progress import FILE as PROGRESS

STUDY_FILE = "progress.json"  # OUT/progress.json: this start of the study (`study_display`)


def study_eta(
    durations: list[float],
    running: list[tuple[float, float | None]],
    waiting: int,
    at_once: int | None,
) -> float | None:
    """Seconds until the study's last run ends; None where nothing has been measured yet.

    Args:
        durations: wall times of the runs this study finished.
        running: (seconds since it began, seconds left or None) of each running run; its
            time left comes from its measured step times.
        waiting: runs not begun yet.
        at_once: runs at a time (None: as many as run now, as on Ray).
    A waiting run takes the mean duration (or, with none finished, the running runs'
    projected ones) and begins when a slot frees."""
    projected = [e + r for e, r in running if r is not None]
    typical = (sum(durations) / len(durations) if durations
               else sum(projected) / len(projected) if projected else None)  # fmt: skip
    left = [r if r is not None else None if typical is None else max(typical - e, 0.0)
            for e, r in running]  # fmt: skip
    if None in left or (waiting and typical is None):
        return None
    slots = max(at_once or len(running), 1)
    free = sorted(left + [0.0] * max(0, slots - len(left)))
    for _ in range(waiting):
        heapq.heappush(free, heapq.heappop(free) + typical)
    return max(free, default=0.0)


def lock_state(out: Path) -> dict:
    """{"held": whether a process holds OUT's lock now, "holder": what the lock file names}.
    A study that ended cleanly leaves the file empty; a killed one leaves its holder."""
    path = Path(out) / LOCK_NAME
    try:
        f = open(path)  # noqa: SIM115 - read-only: works on a copy that cannot be written
    except OSError:
        return {"held": False, "holder": {}}
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            held = False
        except BlockingIOError:
            held = True
        try:
            holder = json.loads(f.read() or "{}")
        except ValueError:
            holder = {}
    return {"held": held, "holder": holder if isinstance(holder, dict) else {}}


def planned_runs(out: Path) -> list[tuple[str, int]]:
    """(strategy, seed) of every run the study plans (OUT/study.json; for a folder from before
    it, its config.yaml), seeds outermost; none where it cannot be read."""
    from loraplace.plan.strategies import resolve_strategies

    study = _json(Path(out) / "study.json")
    if study and isinstance(study.get("runs"), list):
        return [(r["strategy"], int(r["seed"])) for r in study["runs"]]
    try:
        cfg = yaml.safe_load((Path(out) / "config.yaml").read_text()) or {}
        names = [s.name for s in resolve_strategies(cfg["strategies"], cfg.get("layer_study"))]
        return [(name, int(seed)) for seed in cfg["seeds"] for name in names]
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError, UserError):
        return []


def _json(path: Path) -> dict | None:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


class Reader:
    """Reads a study's files, each again only where it changed (the live display polls)."""

    def __init__(self, out: Path) -> None:
        self.out, self._cache = Path(out), {}

    def _cached(self, path: Path, read):
        try:
            st = path.stat()
        except OSError:
            self._cache.pop(path, None)
            return None
        key = (st.st_mtime_ns, st.st_size)
        if path not in self._cache or self._cache[path][0] != key:
            self._cache[path] = (key, read(path), st.st_mtime)
        return self._cache[path][1:]

    def result(self, folder: Path) -> tuple[tuple[dict | None, str | None], float] | None:
        """((result or None, why it is damaged), the file's mtime), or None where absent."""
        return self._cached(folder / "result.json", read_result)

    def progress(self, folder: Path) -> dict | None:
        found = self._cached(folder / PROGRESS, _json)
        return found[0] if found else None

    def study(self) -> dict:
        return _json(self.out / STUDY_FILE) or {}

    def folders(self) -> list[tuple[str, int]]:
        """Every run folder under OUT/runs that holds a result."""
        found = []
        for path in sorted(self.out.glob("runs/*/seed-*/result.json")):
            seed = path.parent.name.removeprefix("seed-")
            if seed.lstrip("-").isdigit():
                found.append((path.parent.parent.name, int(seed)))
        return found


def run_row(key: tuple[str, int], reader: Reader, study: dict, running: bool, now: float) -> dict:
    """One run's state: done, failed, damaged, running, interrupted or waiting, with what its
    files say about it."""
    folder = run_dir(reader.out, *key)
    row = {"strategy": key[0], "seed": key[1], "state": "waiting"}
    started = study.get("started") or 0.0
    todo = [tuple(r[:2]) for r in study.get("runs", [])]
    found = reader.result(folder)
    if found:
        (result, why), written = found  # the file's time, on this machine's clock
        stale = running and key in todo and written < started  # to be run again, not yet begun
        if why and not stale:
            row.update(state="damaged", error=f"result.json {why}")
        elif result and not stale:
            timing, metrics = result.get("timing") or {}, result.get("metrics") or {}
            duration = timing["finished"] - timing["started"] if "started" in timing else None
            row.update(
                state="done" if result.get("status") == "ok" else "failed",
                error=result.get("error"),
                eval_loss=metrics.get("eval_loss"),
                train_time_s=metrics.get("train_time_s"),
                tokens_per_s=metrics.get("tokens_per_s"),
                duration_s=duration,
                this_start=written >= started > 0,
            )
        if row["state"] != "waiting":
            return row
    progress = reader.progress(folder)
    if not progress or progress.get("updated", 0) < started:
        return row  # nothing, or what a run of an earlier start of the study left
    since = max(0.0, now - progress.get("updated", now))  # the file's age
    eta = progress.get("eta_s")
    row.update(
        state="running" if running else "interrupted",
        phase=progress.get("phase"),
        host=progress.get("host"),
        **{k: progress.get(k) for k in ("step", "total_steps", "epoch", "loss", "tokens_per_s")},
        elapsed_s=(progress.get("elapsed_s") or 0.0) + (since if running else 0.0),
        eta_s=max(0.0, eta - since) if running and eta is not None else None,
        updated=progress.get("updated"),
    )
    return row


def study_parts(out: Path) -> list[Path]:
    """The study folders `out` holds: itself; with an lr sweep (study/sweep.py) its sweep's
    studies, itself (the shared rate) and its tuned study, in the order they run, where
    begun."""
    out = Path(out)
    sweep = sorted((out / "sweep").glob("lr-*"), key=lambda p: float(p.name[3:]))
    if not sweep:
        return [out]
    parts = [*sweep, out, out / "tuned"]
    return [p for p in parts if (p / "config.yaml").is_file() or (p / "runs").is_dir()] or [out]


def read_status(out: Path, reader: Reader | None = None, now: float | None = None) -> dict:
    """Everything `loraplace status` shows, as data (`--json` prints it)."""
    out = Path(out)
    if not out.is_dir() or not (
        (out / "config.yaml").is_file() or (out / "runs").is_dir() or (out / STUDY_FILE).is_file()
    ):
        raise UserError(f"{str(out)!r} is not a study's output folder (no config.yaml or runs/)")
    reader = reader or Reader(out)
    now = time.time() if now is None else now
    lock, study = lock_state(out), reader.study()
    running = lock["held"] and lock["holder"].get("command", "study") == "study"
    keys = planned_runs(out)
    for key in [tuple(r[:2]) for r in study.get("runs", [])] + reader.folders():
        if key not in keys:
            keys.append(key)
    runs = [run_row(key, reader, study, running, now) for key in keys]
    counts = {s: 0 for s in ("done", "failed", "damaged", "running", "interrupted", "waiting")}
    for row in runs:
        counts[row["state"]] += 1
    ended = counts["done"] + counts["failed"] == len(runs) and runs
    begun = study or len(runs) > counts["waiting"]  # a start recorded, or a run with files
    state = ("running" if running else "finished" if ended
             else "stopped" if begun else "not started")  # fmt: skip
    status = {
        "out": str(out),
        "state": state,
        "holder": lock["holder"] or None,
        "lock_held_by": lock["holder"].get("command") if lock["held"] else None,
        "executor": study.get("executor"),
        "at_once": study.get("at_once"),
        "started": study.get("started"),
        "elapsed_s": now - study["started"] if running and study.get("started") else None,
        "counts": counts,
        "runs": runs,
        "eta_s": None,
    }
    if running:
        status["eta_s"] = study_eta(
            [r["duration_s"] for r in runs if r.get("this_start") and r.get("duration_s")],
            [(r["elapsed_s"], r["eta_s"]) for r in runs if r["state"] == "running"],
            counts["waiting"] + counts["damaged"],
            study.get("at_once"),
        )
    return status


def _num(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def progress_text(row: dict) -> str:
    """A running or interrupted run's phase and steps: "training 45/75 (60%)"."""
    text = row.get("phase") or "starting"
    step, total = row.get("step"), row.get("total_steps")
    if step is not None and total:
        text += f" {step}/{total} ({100 * step // total}%)"
    return text


def _cells(row: dict) -> list[str]:
    state, name = row["state"], f"{row['strategy']} seed {row['seed']}"
    if state == "done":
        what = f"eval loss {row['eval_loss']:.4f}" if row.get("eval_loss") is not None else ""
        return [name, state, what, "", _num(row.get("tokens_per_s"), ",.0f"),
                duration(row.get("duration_s") or row.get("train_time_s")), ""]  # fmt: skip
    if state in ("failed", "damaged"):
        error = str(row.get("error") or "no reason recorded").splitlines()[0]
        return [name, state, error[:90] + ("..." if len(error) > 90 else ""), "", "", "", ""]
    if state in ("running", "interrupted"):
        return [name, state, progress_text(row), _num(row.get("loss"), ".4f"),
                _num(row.get("tokens_per_s"), ",.0f"), duration(row.get("elapsed_s")),
                duration(row.get("eta_s")) if state == "running" else ""]  # fmt: skip
    return [name, state, "", "", "", "", ""]


def _headline(status: dict) -> str:
    out, state, holder = status["out"], status["state"], status["holder"] or {}
    who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('since', '?')}"
    if state == "running":
        at_once = status["at_once"]
        each = f"; {at_once} runs at a time" if at_once and at_once > 1 else ""
        return f"{out}: running ({who}){each}"
    if status["lock_held_by"]:
        return f"{out}: not running; a `loraplace {status['lock_held_by']}` holds it ({who})"
    if state == "stopped" and holder:
        return f"{out}: stopped; its study ({who}) is no longer running (killed)"
    if state == "stopped":
        return f"{out}: stopped before its runs ended"
    return f"{out}: {state}"


def render(status: dict) -> str:
    """The table `loraplace status` prints."""
    header = ["run", "state", "progress", "loss", "tok/s", "time", "ETA"]
    rows = [header] + [_cells(r) for r in status["runs"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    right = {3, 4, 5, 6}
    lines = [_headline(status)]
    for r in rows:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    c = status["counts"]
    parts = [
        f"{c[s]} {s}"
        for s in ("done", "running", "failed", "damaged", "interrupted", "waiting")
        if c[s]
    ]
    summary = f"{', '.join(parts) or 'no runs'} of {len(status['runs'])}"
    if status["state"] == "running":
        eta = status["eta_s"]
        end = (
            time.strftime(" (about %H:%M)", time.localtime(time.time() + eta))
            if eta is not None
            else ""
        )
        summary += f"; elapsed {duration(status['elapsed_s'])}, ETA {duration(eta)}{end}"
    elif c["interrupted"] or c["waiting"]:
        summary += "; run the same `loraplace study` again to carry on"
    lines.append(f"study: {summary}")
    return "\n".join(lines)


def watch(out: Path, every_s: float, as_json: bool, stream) -> int:
    """Print the status every `every_s` seconds until the study has ended (or Ctrl-C)."""
    reader, clear = Reader(out), stream.isatty() and not as_json
    try:
        while True:
            status = read_status(out, reader)
            text = json.dumps(status) if as_json else render(status)
            stream.write(
                ("\x1b[H\x1b[2J" if clear else "") + text + ("\n" if as_json or clear else "\n\n")
            )
            stream.flush()
            if status["state"] == "finished":
                return 0
            time.sleep(every_s)
    except KeyboardInterrupt:
        return 0
