"""What the training loop watches besides the step: its metrics, read one step late
(`StepMetrics`), llm-foundry's loss-spike guard (`LossSpikeGuard`) and SIGTERM / SIGINT
(`StopSignal`)."""
from __future__ import annotations

import math
import signal
from collections import deque

import jax
import numpy as np


class LossSpikeGuard:
    """llm-foundry's kill_loss_spike: over a window of recent losses, a loss above
    `multiplier` x the window mean (or above `loss_cap`) for `patience` consecutive steps is a
    spike; `check` returns a message then (the trainer warns or stops, by config)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.window: deque[float] = deque(maxlen=cfg.window)
        self.bad = 0

    def check(self, loss: float) -> str | None:
        c = self.cfg
        if not c.enabled:
            return None
        full = len(self.window) == c.window
        mean = float(np.mean(self.window)) if self.window else math.inf
        outlier = full and loss > c.multiplier * mean
        capped = full and loss > c.loss_cap
        self.bad = self.bad + 1 if (outlier or capped) else 0
        if not (outlier or capped):
            self.window.append(loss)
        if self.bad >= c.patience:
            self.bad = 0
            return (f"loss spike: {loss:.4f} vs window mean {mean:.4f} (multiplier "
                    f"{c.multiplier}, cap {c.loss_cap}) for {c.patience} consecutive steps")
        return None

    def state(self) -> dict:
        """JSON-serialisable, for checkpoints: a resumed run judges spikes as an
        uninterrupted one would."""
        return {"window": list(self.window), "bad": self.bad}

    def set_state(self, state: dict) -> None:
        self.window.clear()
        self.window.extend(float(x) for x in state["window"])
        self.bad = int(state["bad"])


class StopSignal:
    """SIGTERM / SIGINT set a flag; the loop checks it at its next log, eval or checkpoint
    boundary, then saves and returns."""

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def any_process(self) -> bool:
        """Whether any process got a signal: a collective with several processes (an
        allgather), so every process calls it at the same steps."""
        flag = self.received is not None
        if jax.process_count() == 1:
            return flag
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def host_metrics(metrics: dict) -> dict[str, float]:
    """Replicated scalar metrics -> floats, in one device-to-host transfer."""
    local = jax.device_get({k: v.addressable_data(0) for k, v in metrics.items()})
    return {k: float(v) for k, v in local.items()}


class StepMetrics:
    """Reads the train step's metrics off the devices one step late.

    `push(step, metrics)` right after dispatching `step` reads the metrics of the step before
    it, waiting only for that one while `step` is already queued behind it, and hands them to
    `on_step(step, values)`, in step order; `flush()` reads the last step pushed (at log, eval
    and checkpoint boundaries, where its values are needed) and returns its values. So the host
    never waits on the step it just dispatched between boundaries, the devices always have the
    next step queued, and every step is still checked (non-finite values, loss spikes) before
    any checkpoint that includes it is written."""

    def __init__(self, on_step):
        self._on_step = on_step
        self._pending = None

    def push(self, step: int, metrics: dict) -> None:
        self.flush()
        self._pending = (step, metrics)

    def flush(self) -> dict[str, float] | None:
        if self._pending is None:
            return None
        step, metrics = self._pending
        self._pending = None
        values = host_metrics(metrics)
        self._on_step(step, values)
        return values
