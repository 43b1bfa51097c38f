"""Rank 0's progress lines of a Ray Train run, printed by the driver.

Ray Train runs RunConfig callbacks in its controller, a process of its own: a line printed there reaches the
console through Ray's log monitor, prefixed `(TrainController pid=...)` and coloured. So the callback only hands
rank 0's reported metrics to a queue (a Ray actor holding no CPU), and a thread of the driver formats and prints
them, plainly and in order. Imported by `ray_train.fit_trainer` once Ray is up.

    with ProgressRelay() as callback:
        TorchTrainer(..., run_config=ray.train.RunConfig(callbacks=[callback])).fit()
"""

from __future__ import annotations

import threading

import ray
import ray.train
from ray.util.queue import Queue

JOIN_TIMEOUT_S = 30.0  # the longest the driver waits for queued lines after fit() returns


class RelayCallback(ray.train.UserCallback):
    """Runs in Ray Train's controller: puts rank 0's metrics of every report on the queue. It imports nothing
    heavy (the driver formats the line), so the controller does not load torch for it."""

    def __init__(self, queue: Queue):
        self.queue = queue

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        if not (metrics and metrics[0]):
            return
        try:
            self.queue.put(metrics[0])
        except Exception as e:  # the relay is gone: a progress line is not worth failing the run for
            print(f"[gl-ray] progress relay lost ({type(e).__name__}): step {metrics[0].get('step')}", flush=True)


class ProgressRelay:
    """A context manager: the queue and the driver's printing thread around one TorchTrainer.fit; `with` gives
    the RunConfig callback. On exit every line already queued is printed before the driver goes on."""

    def __init__(self):
        self.queue: Queue | None = None
        self.thread: threading.Thread | None = None

    def __enter__(self) -> RelayCallback:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # no CPU: it never waits for one the run or Ray Data holds; on the driver's node: a worker node that dies
        # (a spot node reclaimed) must not take the progress lines with it
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        self.thread = threading.Thread(target=self.print_lines, name="gl-ray-progress", daemon=True)
        self.thread.start()
        return RelayCallback(self.queue)

    def print_lines(self) -> None:
        from gl_ray.train.outputs import progress_line

        while True:
            try:
                metrics = self.queue.get()
            except Exception:  # Ray is shutting down under us: nothing more will come
                return
            if metrics is None:
                return
            print(progress_line(metrics), flush=True)

    def __exit__(self, *exc) -> None:
        try:
            self.queue.put(None)  # after every report of the run: fit() has returned
            self.thread.join(JOIN_TIMEOUT_S)
            self.queue.shutdown(force=True)  # drained: a graceful stop would wait seconds for nothing
        except Exception:  # Ray is going down (an interrupt, a lost cluster): the run's own error matters more
            pass
