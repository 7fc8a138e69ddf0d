"""The record of a training run: one JSON line per optimizer step, and the loss curve drawn as a PNG.

    OUT/loss.jsonl   {"step": 1, "epoch": 1, "loss": 0.998, "lr": 0.0001}  (one line per step)
    OUT/loss.png     loss against step on a log scale, raw in grey and a moving average in blue

The log holds only what the run computes (no wall-clock times), so two runs with the same seed write the same
bytes. A resumed run first cuts the log back to its checkpoint's step: the steps a killed run logged after
its last checkpoint are run again and logged again.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from minidiff.images import save_png


class LossLog:
    """Append-only JSON lines at `path`, one record per optimizer step."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def records(self) -> list[dict]:
        """Every complete record; a line cut short by a crash is skipped."""
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate(self, step: int) -> None:
        """Keep the records up to `step` (rewritten atomically)."""
        kept = [r for r in self.records() if r["step"] <= step]
        temp = self.path.with_name(f".{self.path.name}.tmp")
        temp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(temp, self.path)


def moving_average(values: list[float], window: int) -> list[float]:
    """The mean of each value and the (window - 1) before it (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def draw_loss_curve(records: list[dict], size: tuple[int, int] = (640, 360)) -> Image.Image:
    """Loss against step, log-scale y axis, with the first/last step and the min/max loss written on the axes."""
    width, height = size
    left, right, top, bottom = 70, 20, 20, 40  # margins for the axis labels
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.rectangle((left, top, width - right, height - bottom), outline="black")
    steps = [r["step"] for r in records]
    losses = [max(r["loss"], 1e-12) for r in records]
    if not records:
        return image
    first, last = steps[0], max(steps[-1], steps[0] + 1)
    low, high = math.log10(min(losses)), math.log10(max(losses))
    high = max(high, low + 1e-6)

    def point(step: float, loss: float) -> tuple[float, float]:
        x = left + (step - first) / (last - first) * (width - left - right)
        y = height - bottom - (math.log10(loss) - low) / (high - low) * (height - top - bottom)
        return x, y

    smooth = moving_average(losses, max(1, len(losses) // 20))
    for series, colour in ((losses, (190, 190, 190)), (smooth, (31, 119, 180))):
        points = [point(s, v) for s, v in zip(steps, series, strict=True)]
        if len(points) == 1:
            points = points * 2
        draw.line(points, fill=colour, width=2)
    draw.text((4, top), f"{max(losses):.4g}", fill="black", font=font)
    draw.text((4, height - bottom - 10), f"{min(losses):.4g}", fill="black", font=font)
    draw.text((left, height - bottom + 6), f"step {first}", fill="black", font=font)
    draw.text((width - right - 70, height - bottom + 6), f"step {steps[-1]}", fill="black", font=font)
    draw.text((left + 8, top + 4), "loss (log scale)", fill="black", font=font)
    return image


def save_loss_curve(log: LossLog, path: str | os.PathLike) -> None:
    save_png(draw_loss_curve(log.records()), path, {"software": "minidiff"})
