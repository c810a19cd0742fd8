"""Training metrics: one JSON object per logged step (JSONL) and a loss plot (PNG)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from premier.files import atomic_write, atomic_write_bytes

PLOTTED = ("loss", "fm", "disp_shared", "disp_distinct")


class MetricsLog:
    """Append-only JSONL; on resume, lines after the resumed step are dropped so the log tells one run."""

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [r for r in self.read(self.path) if r.get("step", 0) <= resume_step]
            atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())
        self._fh = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()

    @staticmethod
    def read(path: str | Path) -> list[dict[str, Any]]:
        rows = []
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line torn by a crash
                continue
        return rows


def plot_losses(metrics_path: str | Path, out: str | Path, title: str = "Premier stage 1") -> Path:
    """Loss curves (raw and smoothed) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = MetricsLog.read(metrics_path)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for key in PLOTTED:
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if not pts:
            continue
        steps, values = zip(*pts)
        line = ax.plot(steps, values, alpha=0.3, linewidth=0.8)[0]
        window = max(1, len(values) // 50)
        smooth = [
            sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
            for i in range(len(values))
        ]
        ax.plot(steps, smooth, color=line.get_color(), label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    out = Path(out)
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return out
