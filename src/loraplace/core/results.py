"""Results as data: atomic writes, run discovery, and the summary table built from result files.

write_json(path, obj)                    # never leaves a half-written file; umask's mode
write_result(path, result)               # and a checksum, so later changes are noticed
rows = summary_rows(load_results(out))   # one dict per run, the columns of summary.csv
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

SUMMARY_COLUMNS = [
    "strategy", "seed", "status", "eval_loss", "perplexity", "base_eval_loss",
    "relative_performance_pct", "trainable_params", "param_reduction_pct", "train_time_s",
    "peak_memory_mb", "tokens_per_s", "efficiency_ratio", "time_efficiency",
    "eval_loss_all_tokens", "rouge_l", "exact_match",
]  # fmt: skip
PACKAGES = (
    "loraplace",
    "torch",
    "transformers",
    "peft",
    "datasets",
    "accelerate",
    "numpy",
    "scipy",
)


CLEAR_REFS = "/proc/self/clear_refs"  # Linux: writing "5" restarts the process's VmHWM


def peak_memory_restartable() -> bool:
    """Whether a process here can restart its peak-memory count (so runs can share one)."""
    return os.access(CLEAR_REFS, os.W_OK)


def restart_peak_memory() -> bool:
    """Start this process's peak-memory count again; False where that cannot be done."""
    try:
        with open(CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def die_with_parent() -> bool:
    """Linux: this process gets SIGKILL when the one that started it ends (a study killed with
    kill -9 takes its server and its run along, instead of leaving them writing into a folder
    the next study takes over). False where that cannot be arranged."""
    import ctypes
    import signal

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGKILL) != 0:  # PR_SET_PDEATHSIG
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # it ended before the call above took effect
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def private_memory_mb(pid: int) -> float:
    """What only process `pid` holds (its private pages), in MB; 0.0 where that is unknown."""
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:
        return 0.0
    kb = sum(int(line.split()[1]) for line in lines if line.startswith("Private_"))
    return kb / 2**10


def umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc), else by
    setting it and putting it back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: Path, data: bytes, sync: bool = True) -> None:
    """Write via a temporary file in the same folder and rename: readers see old or new, never
    half. The file gets the permissions the user's umask gives a new file (mkstemp's own are
    0600, which a teammate on a shared folder cannot read); nothing is left if writing fails.
    `sync` False skips the fsync, for a file worth nothing after a crash (a run's progress):
    the rename alone keeps readers from a half-written one, at a fraction of the time."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~umask())
            f.write(data)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str, sync: bool = True) -> None:
    """Write atomically (see `write_bytes_atomic`)."""
    write_bytes_atomic(path, text.encode("utf-8"), sync)


def write_json(path: Path, obj, sync: bool = True) -> None:
    write_text(path, json.dumps(obj, indent=1, default=str, allow_nan=True) + "\n", sync)


def _checksum(result: dict) -> str:
    body = {k: v for k, v in result.items() if k != "checksum"}
    canonical = json.dumps(body, sort_keys=True, default=str, allow_nan=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def write_result(path: Path, result: dict) -> None:
    """result.json with a checksum of its content, so a file changed afterwards is noticed."""
    result = json.loads(json.dumps(result, default=str, allow_nan=True))  # as it will read back
    write_json(path, result | {"checksum": _checksum(result)})


def read_result(path: Path) -> tuple[dict | None, str | None]:
    """(result, None), or (None, why it cannot be used): unreadable, truncated, not a run's
    result, or changed after it was written. Results written before checksums are taken as is."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        return None, f"cannot be read ({err.strerror or err})"
    try:
        result = json.loads(text)
    except json.JSONDecodeError as err:
        # Our writer ends every file with its closing brace; a file without one was cut short.
        cut = err.pos >= len(text.rstrip()) or not text.rstrip().endswith("}")
        kind = "is truncated" if cut else "is not valid JSON"
        return None, f"{kind} ({err.msg} at line {err.lineno})"
    if not isinstance(result, dict) or not {"strategy", "seed", "status"} <= result.keys():
        return None, "is not a run result (strategy, seed or status missing)"
    if "checksum" in result and result["checksum"] != _checksum(result):
        return None, "was changed after it was written (its checksum does not match)"
    return result, None


def git_hash() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).parent,
        )  # fmt: skip
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "versions": versions,
        "git_hash": git_hash(),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.machine(),
            "cpus": os.cpu_count(),
        },
    }


def run_dir(out: Path, strategy: str, seed: int) -> Path:
    return Path(out) / "runs" / strategy / f"seed-{seed}"


def result_paths(out: Path) -> list[Path]:
    return sorted(Path(out).glob("runs/*/seed-*/result.json"))


def load_results(out: Path) -> list[dict]:
    """Every usable result.json under OUT/runs, in a stable order (see `damaged_results`)."""
    found = (read_result(path)[0] for path in result_paths(out))
    return [r for r in found if r is not None]


def damaged_results(out: Path) -> list[tuple[Path, str]]:
    """Result files that cannot be used, each with why: the study runs them again."""
    found = ((path, read_result(path)[1]) for path in result_paths(out))
    return [(path, why) for path, why in found if why]


def _nan_if_none(x):
    return math.nan if x is None else x


def summary_rows(results: list[dict], reference: str = "full") -> list[dict]:
    """One row per run; comparisons are against `reference` with the same seed."""
    ok = {(r["strategy"], r["seed"]): r["metrics"] for r in results if r.get("status") == "ok"}
    rows = []
    for r in results:
        row = {c: math.nan for c in SUMMARY_COLUMNS}
        row.update(strategy=r["strategy"], seed=r["seed"], status=r.get("status", "unknown"))
        m = r.get("metrics") if r.get("status") == "ok" else None
        if m:
            row.update(
                {
                    k: m[k]
                    for k in (
                        "eval_loss",
                        "perplexity",
                        "base_eval_loss",
                        "trainable_params",
                        "train_time_s",
                        "peak_memory_mb",
                        "tokens_per_s",
                    )
                }
            )
            ref = ok.get((reference, r["seed"]))
            if ref:
                loss_gap = m["eval_loss"] - ref["eval_loss"]
                saved = ref["trainable_params"] - m["trainable_params"]
                row["relative_performance_pct"] = 100 * loss_gap / ref["eval_loss"]
                row["param_reduction_pct"] = 100 * saved / ref["trainable_params"]
                # eval loss lost per million parameters saved (nan where nothing is saved)
                row["efficiency_ratio"] = loss_gap / (saved / 1e6) if saved else math.nan
            row["time_efficiency"] = (m["base_eval_loss"] - m["eval_loss"]) / m["train_time_s"]
            row |= _extra_metrics(r)
        rows.append({k: _nan_if_none(v) for k, v in row.items()})
    return rows


def _extra_metrics(result: dict) -> dict:
    """The all-token eval loss (the seed's, token-weighted) and each task metric's mean over
    the examples that have it; NaN where a result has none."""
    found = result.get("per_example") or {}
    sums, tokens = found.get("all_tokens_loss_sum"), found.get("all_tokens")
    row = {"eval_loss_all_tokens": sum(sums) / sum(tokens) if sums and sum(tokens) else math.nan}
    for name in ("rouge_l", "exact_match"):
        values = [v for v in (result.get("task") or {}).get(name) or [] if not math.isnan(v)]
        row[name] = sum(values) / len(values) if values else math.nan
    return row
