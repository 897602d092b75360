"""Flop accounting (MFU), metric writers (metrics.jsonl, TensorBoard), progress bar, loss plot.

MFU follows llm-foundry's convention (DESIGN.md): flops per token = 6 * n_params (embeddings
included) + 12 * n_layers * d_model * seq_len (attention as a full square), divided by the
devices' dense bf16 peak. Peaks are known for the devices below; on any other device (a CPU
included) `mfu` is written as null rather than guessed.
"""
from __future__ import annotations

import io
import json
import time
from typing import Any

import jax

from mpt_jax import storage
from mpt_jax.model.config import MPTConfig

# Dense bf16 peak FLOP/s per device, by substrings of `device_kind` (vendor spec sheets).
PEAK_FLOPS = (
    ("H100", 989e12),  # SXM; also used for the H100 NVL/PCIe names, which report lower clocks
    ("H200", 989e12),
    ("A100", 312e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v6", 918e12),  # v6e (Trillium)
)


def flops_per_token(cfg: MPTConfig, seq_len: int) -> float:
    return 6.0 * cfg.num_params() + 12.0 * cfg.n_layers * cfg.d_model * seq_len


def peak_flops(device=None) -> float | None:
    kind = (device or jax.devices()[0]).device_kind
    for name, peak in PEAK_FLOPS:
        if name.lower() in kind.lower():
            return peak
    return None


def mfu(tokens_per_s: float, cfg: MPTConfig, seq_len: int, n_devices: int) -> float | None:
    peak = peak_flops()
    if peak is None:
        return None
    return tokens_per_s * flops_per_token(cfg, seq_len) / (n_devices * peak)


def device_memory_gb() -> dict[str, float | None]:
    """Peak / current bytes in use on this process's first device (None where unreported)."""
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # some backends do not implement memory_stats
        stats = {}
    gb = lambda k: (stats[k] / 2**30) if k in stats else None  # noqa: E731
    return {"mem_peak_gb": gb("peak_bytes_in_use"), "mem_in_use_gb": gb("bytes_in_use")}


class MetricWriter:
    """Appends JSON lines to WORKDIR/metrics.jsonl and scalars to TensorBoard (WORKDIR/tb).
    Only the writing process (process 0) writes; the others get a no-op writer. On gs:// /
    s3:// (no appends there) each write rewrites metrics.jsonl whole in one upload
    (storage.AppendLog), and the event file likewise (train/tensorboard.py)."""

    def __init__(self, workdir: str, *, enabled: bool):
        self.enabled = enabled
        self._tb = None
        if enabled:
            storage.makedirs(workdir)
            self._jsonl = storage.AppendLog(storage.join(workdir, "metrics.jsonl"))
            from mpt_jax.train.tensorboard import EventWriter

            self._tb = EventWriter(storage.join(workdir, "tb"))

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **values, "time": time.time()}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        scalars = {}
        for key, value in values.items():
            entries = ({f"{key}/{k}": v for k, v in value.items()} if isinstance(value, dict)
                       else {key: value})  # a dict (data_epochs) -> one scalar per entry
            scalars.update({name: v for name, v in entries.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
        self._tb.add_scalars(int(step), scalars)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def progress_bar(*, start: int, total: int, enabled: bool):
    """tqdm bar over optimizer steps with rate and ETA (a no-op object when disabled)."""
    import tqdm

    return tqdm.tqdm(initial=start, total=total, disable=not enabled, unit="step",
                     dynamic_ncols=True, smoothing=0.1)


def smoothed(values, window: int) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing) with the weight of a
    `window`-point moving average, beta = 1 - 2 / (window + 1): y_i = m_i / (1 - beta^(i+1)),
    m_i = beta m_(i-1) + (1 - beta) x_i. The first point is x_0 itself; window 1 is no
    smoothing."""
    if window < 1:
        raise ValueError(f"smoothing window must be >= 1, got {window}")
    beta = 1.0 - 2.0 / (window + 1)
    out, m = [], 0.0
    for i, x in enumerate(values):
        m = beta * m + (1.0 - beta) * x
        out.append(m / (1.0 - beta ** (i + 1)))
    return out


def plot_losses(workdir: str) -> str | None:
    """WORKDIR/loss.png from metrics.jsonl: the train loss smoothed (each logged loss is one
    batch's, noisy, and would zig-zag below the held-out line), the raw points faint behind
    it, and the held-out loss, against step."""
    path = storage.join(workdir, "metrics.jsonl")
    if not storage.exists(path):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = {}, {}
    for line in storage.read_text(path).splitlines():
        if line.strip():
            row = json.loads(line)
            if row.get("loss") is not None:
                train[row["step"]] = row["loss"]  # a rerun after a resume overwrites its steps
            if row.get("eval_loss") is not None:
                evals[row["step"]] = row["eval_loss"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        steps = sorted(train)
        raw = [train[s] for s in steps]
        window = max(1, len(steps) // 10)
        ax.plot(steps, raw, color="C0", alpha=0.25, lw=0.8, label="train loss (one batch)")
        ax.plot(steps, smoothed(raw, window), color="C0", lw=1.6,
                label=f"train loss (EMA over ~{window} logs)")
    if evals:
        steps = sorted(evals)
        ax.plot(steps, [evals[s] for s in steps], "o-", color="C1", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    out = storage.join(workdir, "loss.png")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    storage.write_atomic(out, png.getvalue())
    return out
