"""Progress from Ray tasks to the study's driver, which alone has OUT (no shared filesystem).

    mail = Mail(ray, todo)                      # the driver: a mailbox actor on its own node
    task.remote(spec, ..., mail.box)            # each task forwards its run's progress.json:
    with forwarding(box, ("full", 42), folder / "progress.json"): run it
    mail.drain()                                # the driver, while it waits: into OUT, atomically

A task sends its run's progress.json each time it changes (looked at twice a second) to a small
actor; the driver takes what arrived whenever it waits for tasks and writes each run's latest
into OUT/runs/S/seed-N/progress.json, where the study's display and `loraplace status` read it
as they read a local run's. Progress is best effort: a mailbox that cannot be made or has died
only stops the updates, never a run.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path

from loraplace.core.results import write_bytes_atomic
from loraplace.train.progress import FILE

LOOK_S = 0.5  # how often a task looks at its run's progress.json


class _Mailbox:
    """(A Ray actor) What the tasks sent since the driver last took it."""

    def __init__(self) -> None:
        self.items: list = []

    def put(self, key: tuple, data: bytes) -> None:
        self.items.append((key, data))

    def take(self) -> list:
        items, self.items = self.items, []
        return items


class Mail:
    """The driver's side: the mailbox actor, and the runs' folders under OUT."""

    def __init__(self, ray, todo: list) -> None:
        self.ray, self.pending, self.done = ray, None, set()
        self.folders = {(s.name, s.seed): s.folder for s in todo}
        try:  # on the driver's node, which outlives any worker node; no CPU taken from a run
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            here = ray.get_runtime_context().get_node_id()
            where = NodeAffinitySchedulingStrategy(here, soft=True)
            actor = ray.remote(num_cpus=0, max_restarts=0)(_Mailbox)
            self.box = actor.options(scheduling_strategy=where).remote()
        except Exception:  # progress is best effort: the study runs without it
            self.box = None

    def drain(self) -> None:
        """Write what arrived into OUT, each run's latest; never waits on the actor."""
        if self.box is None:
            return
        if self.pending is None:
            self.pending = self.box.take.remote()
        ready, _ = self.ray.wait([self.pending], timeout=0)
        if not ready:
            return
        try:
            items = self.ray.get(self.pending)
        except Exception:  # the mailbox died: no more updates
            self.box = None
            return
        self.pending, latest = None, {}
        for key, data in items:
            latest[tuple(key)] = data
        for key, data in latest.items():
            if key in self.folders and key not in self.done:
                write_bytes_atomic(self.folders[key] / FILE, data, sync=False)

    def finish(self, key: tuple) -> None:
        """A run's task returned: what it sent (all of it, since its last send returned before
        the task did) is written now, and nothing for it after this."""
        for _ in range(2):  # a take asked for earlier may predate the task's last sends
            if self.box is None:
                break
            try:
                self.pending = self.pending or self.box.take.remote()
                self.ray.wait([self.pending], timeout=5)
            except Exception:
                break
            self.drain()
        self.done.add(tuple(key))

    def __enter__(self) -> Mail:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.box is not None:
            try:
                self.ray.kill(self.box)
            except Exception:
                pass
            self.box = None


@contextmanager
def forwarding(box, key: tuple, path: Path, every_s: float = LOOK_S):
    """(In a task) Send `path` to the mailbox `box` each time it changes until the block ends,
    and once more then."""
    if box is None:
        yield
        return
    import ray

    stop = threading.Event()

    def send_changes() -> None:
        last = None
        while True:
            stopping = stop.wait(every_s)
            try:
                data = Path(path).read_bytes()
            except OSError:
                data = None
            if data and data != last:
                try:
                    ray.get(box.put.remote(list(key), data), timeout=10)
                except Exception:
                    return  # the mailbox is gone: the run goes on without it
                last = data
            if stopping:
                return

    thread = threading.Thread(target=send_changes, daemon=True, name="progress")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=15)
