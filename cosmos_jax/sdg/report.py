"""The report of an sdg run: `report.json` (counts, time, throughput, score distributions, with `--critic` the
critic's question and its score counts) and
`report.png` (the consistency histogram of kept and rejected candidates beside a contact sheet of a few
episodes' first and last frames), drawn with PIL."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from cosmos_jax.sampling.media import atomic_path
from cosmos_jax.sdg.critic import report_section
from cosmos_jax.sdg.fingerprint import NO_MODEL_OPTIONS

BINS = 10


def distribution(values: Sequence[float]) -> dict[str, Any]:
    """min/mean/max, quantiles and a histogram over [0, 1] in BINS bins (empty: count 0 only)."""
    if not values:
        return {"count": 0}
    x = np.asarray(values, np.float64)
    counts, edges = np.histogram(np.clip(x, 0.0, 1.0), bins=BINS, range=(0.0, 1.0))
    return {"count": int(x.size), "min": float(x.min()), "mean": float(x.mean()), "max": float(x.max()),
            "q10": float(np.quantile(x, 0.1)), "q50": float(np.quantile(x, 0.5)), "q90": float(np.quantile(x, 0.9)),
            "histogram": {"edges": [round(float(e), 3) for e in edges], "counts": counts.tolist()}}


def build_report(records: Sequence[dict[str, Any]], wall_seconds: float | None,
                 model_options: Mapping[str, Any] | None = None, critic: bool = False) -> dict[str, Any]:
    """The report of every candidate's record (each with its "outcome") and the run's model options;
    `critic`: the run had --critic."""
    kept = [r for r in records if r["outcome"] == "kept"]
    rejected = [r for r in records if r["outcome"] != "kept"]
    seconds = float(sum(r.get("seconds") or 0.0 for r in records))
    checking = float(sum(r.get("consistency_seconds") or 0.0 for r in records))
    judging = float(sum(r.get("critic_seconds") or 0.0 for r in records))
    generating = seconds - checking - judging
    scores = lambda rs: [r["consistency"] for r in rs if r.get("consistency") is not None]  # noqa: E731
    return {
        "candidates": len(records), "episodes": len(kept),
        "rejected": {"best_of": sum(r["outcome"] == "best_of" for r in records),
                     "min_consistency": sum(r["outcome"] == "min_consistency" for r in records)},
        "seconds": round(seconds, 3),
        "consistency_seconds": round(checking, 3),
        "consistency_fraction_of_generation": round(checking / generating, 4) if generating > 0 else None,
        "critic_seconds": round(judging, 3),
        "wall_seconds_last_session": None if wall_seconds is None else round(wall_seconds, 3),
        "candidates_per_second": round(len(records) / seconds, 4) if seconds else None,
        "episodes_per_second": round(len(kept) / seconds, 4) if seconds else None,
        "consistency": {"kept": distribution(scores(kept)), "rejected": distribution(scores(rejected))},
        "rejected_candidates": [{"job_id": r["job_id"], "sample_index": r["sample_index"], "reason": r["outcome"],
                                 "consistency": r.get("consistency")} for r in rejected],
        "critic": report_section([r.get("critic_score") for r in kept], [r.get("critic_score") for r in records])
        if critic else None,
        "by_mode": {mode: sum(r["mode"] == mode for r in kept) for mode in sorted({r["mode"] for r in records})},
        "model_options": dict(model_options or NO_MODEL_OPTIONS),
    }


def _histogram(records: Sequence[dict[str, Any]], size: tuple[int, int]) -> Image.Image:
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    left, bottom, top = 30, height - 30, 30
    groups = {"kept": ((44, 160, 44), [r for r in records if r["outcome"] == "kept"]),
              "rejected": ((214, 39, 40), [r for r in records if r["outcome"] != "kept"])}
    counts = {name: np.histogram([r["consistency"] for r in rs if r.get("consistency") is not None], bins=BINS,
                                 range=(0.0, 1.0))[0] for name, (_, rs) in groups.items()}
    peak = max(1, int(max(c.max() for c in counts.values())))
    bin_w = (width - left - 10) / BINS
    for b in range(BINS):
        base = bottom
        for name, (color, _) in groups.items():
            h = counts[name][b] / peak * (bottom - top)
            if not h:
                continue
            x0 = left + b * bin_w
            draw.rectangle([x0 + 1, base - h, x0 + bin_w - 1, base], fill=color)
            base -= h
    draw.line([left, bottom, width - 10, bottom], fill="black")
    draw.text((left, 8), f"consistency (exp(-error)); green kept, red rejected; peak {peak}", fill="black")
    for b in range(0, BINS + 1, 2):
        draw.text((left + b * bin_w - 6, bottom + 6), f"{b / BINS:.1f}", fill="black")
    return image


def write_report_png(path: str | os.PathLike, records: Sequence[dict[str, Any]],
                     contact: Sequence[tuple[np.ndarray, np.ndarray, str]], tile: int = 96) -> None:
    """The histogram (left) and the contact sheet (right: one row per episode, first and last frame)."""
    rows = max(len(contact), 1)
    height = max(240, rows * (tile + 14) + 10)
    sheet = Image.new("RGB", (420 + 2 * tile + 20, height), "white")
    sheet.paste(_histogram(records, (400, 240)), (0, 0))
    draw = ImageDraw.Draw(sheet)
    for i, (first, last, label) in enumerate(contact):
        y = 10 + i * (tile + 14)
        for k, frame in enumerate((first, last)):
            sheet.paste(Image.fromarray(frame).resize((tile, tile)), (420 + k * (tile + 4), y + 12))
        draw.text((420, y), f"{label}: first, last", fill="black")
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
