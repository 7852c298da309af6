"""The report's figure: memory and throughput per setting, one PNG (matplotlib, Agg backend).

Owns the drawing only; it reads the JSON-able report `report.build_report` makes. Four panels:
weight bytes as served against the packed-size formula; weight bytes relative to fp16 and to
the run's 16-bit setting; peak process memory (GPU allocator, else host RSS); and output tok/s
with req/s. Selecting the Agg backend here keeps it headless (no display, no GUI toolkit).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MiB = 2**20


def _values(settings: list[dict[str, Any]], section: str, key: str) -> list[float]:
    out = []
    for s in settings:
        v = s[section].get(key)
        out.append(float("nan") if v is None else float(v))
    return out


def draw(report: dict[str, Any], path: Path) -> bool:
    """Write the figure to `path` (atomically); False when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    settings = report["settings"]
    if not settings:
        return False
    labels = [s["label"] for s in settings]
    x = np.arange(len(labels))
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), constrained_layout=True)
    (ax_w, ax_r), (ax_p, ax_t) = axes

    served = np.array(_values(settings, "memory", "weight_bytes")) / MiB
    formula = np.array(_values(settings, "memory", "formula_bytes")) / MiB
    ax_w.bar(x - 0.2, served, 0.4, label="served (server)")
    ax_w.bar(x + 0.2, formula, 0.4, label="packed-size formula")
    for i, (a, b) in enumerate(zip(served, formula, strict=True)):
        if np.isfinite(a) and np.isfinite(b) and b:
            ax_w.annotate(f"{a / b:.3f}×", (i, max(a, b)), ha="center", va="bottom", fontsize=8)
    ax_w.set_title("weight memory (MiB)")
    ax_w.legend(fontsize=8)

    to_fp16 = _values(settings, "memory", "ratio_to_fp16")
    to_base = _values(settings, "memory", "ratio_to_16bit_setting")
    ax_r.bar(x - 0.2, to_fp16, 0.4, label="÷ fp16 (every float weight 16-bit)")
    if any(np.isfinite(to_base)):
        ax_r.bar(x + 0.2, to_base, 0.4, label=f"÷ {report.get('baseline') or '16-bit setting'}")
    ax_r.axhline(1.0, color="grey", lw=0.8, ls="--")
    for i, v in enumerate(to_fp16):
        if np.isfinite(v):
            ax_r.annotate(f"{v:.2f}", (i - 0.2, v), ha="center", va="bottom", fontsize=8)
    for i, v in enumerate(to_base):
        if np.isfinite(v):
            ax_r.annotate(f"{v:.2f}", (i + 0.2, v), ha="center", va="bottom", fontsize=8)
    ax_r.set_title("weight memory ratio")
    ax_r.legend(fontsize=8)

    gpu = _values(settings, "memory", "peak_device_allocated")
    if any(np.isfinite(gpu)):
        reserved = np.array(_values(settings, "memory", "peak_device_reserved")) / MiB
        ax_p.bar(x - 0.2, np.array(gpu) / MiB, 0.4, label="allocated")
        ax_p.bar(x + 0.2, reserved, 0.4, label="reserved")
        ax_p.set_title("peak GPU memory during the load (MiB)")
        ax_p.legend(fontsize=8)
    else:
        rss = np.array(_values(settings, "memory", "peak_host_rss")) / MiB
        ax_p.bar(x, rss, 0.5, color="tab:purple")
        ax_p.set_title("peak server RSS during the load (MiB)")

    tok = _values(settings, "throughput", "output_tok_per_s")
    req = _values(settings, "throughput", "req_per_s")
    ax_t.bar(x - 0.2, tok, 0.4, label="output tok/s", color="tab:green")
    twin = ax_t.twinx()
    twin.bar(x + 0.2, req, 0.4, label="req/s", color="tab:olive")
    ax_t.set_title("throughput")
    ax_t.set_ylabel("output tok/s")
    twin.set_ylabel("req/s")
    handles = ax_t.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    twin.legend(handles, ["output tok/s", "req/s"], fontsize=8, loc="upper right", framealpha=1)
    twin.set_ylim(0, 1.25 * (max([v for v in req if np.isfinite(v)], default=0) or 1))
    ax_t.set_ylim(0, 1.25 * (max([v for v in tok if np.isfinite(v)], default=0) or 1))

    for ax in (ax_w, ax_r, ax_p, ax_t):
        ax.set_xticks(x, labels, rotation=15, fontsize=8)
    title = "veq bench" + (" (interrupted: partial)" if report.get("interrupted") else "")
    fig.suptitle(title)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return True
