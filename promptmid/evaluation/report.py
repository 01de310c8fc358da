"""Write evaluation results: ``pairs.csv``, ``summary.md``, ``summary.json`` and figures.

Aggregates are computed per (method, geometry model) overall, per split group and per source.
Failed pairs stay in every denominator (their RMSE and corner error are infinite) and are counted,
with their reasons grouped, in the ``failed`` column.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from promptmid.config import SUCCESS_PX
from promptmid.evaluation import metrics
from promptmid.outputs import pyplot

CSV_SKIP = ("transform",)


def reason_category(row: dict[str, Any]) -> str:
    """Short failure category of a row (``""`` for successful fits)."""
    if row["status"] == "ok":
        return ""
    reason = str(row.get("reason", ""))
    if reason.startswith("image error"):
        return "image error"
    if re.match(r"only \d+ matches", reason):
        return "too few matches"
    if re.match(r"only \d+ inliers", reason):
        return "too few inliers"
    if "no consensus" in reason:
        return "no consensus"
    if reason.startswith("no GT"):
        return "no GT"
    m = re.match(r"(\w+(Error|Exception))", reason)
    return f"error: {m.group(1)}" if m else (reason[:40] or row["status"])


def write_pairs_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """One CSV line per pair x method x model (``inf`` for failed RMSE/corner error)."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys and k not in CSV_SKIP]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt_csv(row.get(k)) for k in keys})


def _fmt_csv(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else v


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Summary numbers of a set of rows (one method and model)."""
    n = len(rows)
    rmse = [r.get("rmse", math.inf) for r in rows]
    corner = [r.get("corner_error", math.inf) for r in rows]
    out: dict[str, Any] = {"pairs": n, "failed": sum(r["status"] != "ok" for r in rows)}
    out["failure_reasons"] = dict(Counter(reason_category(r) for r in rows if r["status"] != "ok"))
    out.update(metrics.success_rates(rmse))
    out.update(metrics.auc(corner))
    out["median_corner_error"] = float(np.median(corner)) if n else math.nan
    out["median_rmse"] = float(np.median(rmse)) if n else math.nan
    for key in ("ncm_before", "ncm_after", "cmr", "inlier_cmr", "matches", "inliers",
                *(f"mma@{t}" for t in metrics.MMA_THRESHOLDS)):
        vals = [r[key] for r in rows if key in r]
        out[f"mean_{key}"] = float(np.mean(vals)) if vals else math.nan
    for key in ("time_total", "time_features", "time_matching", "time_fitting", "peak_mem_mb"):
        vals = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        out[f"median_{key}"] = float(np.median(vals)) if vals else math.nan
    if any(r.get("qc_status") not in (None, "n/a") for r in rows):
        out["verdict"] = verdict_counts(rows)
    return out


def verdict_counts(rows: list[dict[str, Any]], success_px: float = SUCCESS_PX, wrong_px: float = 20.0) -> dict[str, Any]:
    """QC verdicts of rows against the truth: counts per status, precision of ``ok`` (share within
    ``success_px`` RMSE), recall of ``ok`` (share of the rows within ``success_px`` that are ``ok``) and how
    many ``ok`` rows are beyond ``wrong_px``. Rows without a fit count as ``failed``."""
    status = [r.get("qc_status") or "failed" for r in rows]
    right = [r.get("rmse", math.inf) <= success_px for r in rows]
    n_ok = sum(s == "ok" for s in status)
    ok_right = sum(s == "ok" and g for s, g in zip(status, right))
    return {"ok": n_ok, "uncertain": status.count("uncertain"), "failed": status.count("failed"),
            "ok_precision": ok_right / n_ok if n_ok else math.nan,
            "ok_recall": ok_right / sum(right) if sum(right) else math.nan,
            f"ok_beyond_{wrong_px:g}px": sum(s == "ok" and r.get("rmse", math.inf) > wrong_px
                                              for s, r in zip(status, rows))}


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"overall": {method: {model: agg}}, "by_group": {group: ...}, "by_source": {source: ...}}``."""
    def table(subset: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        subset = list(subset)
        for method in dict.fromkeys(r["method"] for r in subset):
            out[method] = {model: aggregate([r for r in subset if r["method"] == method and r["model"] == model])
                           for model in dict.fromkeys(r["model"] for r in subset)}
        return out

    groups = sorted({r["group"] for r in rows})
    sources = sorted({r["source"] for r in rows})
    return {
        "overall": table(rows),
        "by_group": {g: table(r for r in rows if r["group"] == g) for g in groups},
        "by_source": {s: table(r for r in rows if r["source"] == s) for s in sources},
    }


def _num(v: float, digits: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else ("inf" if v == math.inf else f"{v:.{digits}f}")


def markdown_table(tab: dict[str, dict[str, Any]], model: str) -> list[str]:
    """Rows of one results table (methods as rows) for ``model``."""
    lines = ["| method | pairs | failed (reasons) | SR@3 | SR@5 | AUC@3 | AUC@5 | AUC@10 | median corner err (px) "
             "| NCM | CMR | MMA@3 | s/pair (feat/match/fit) | peak MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, per_model in tab.items():
        a = per_model.get(model)
        if a is None:
            continue
        reasons = ", ".join(f"{k} {v}" for k, v in a["failure_reasons"].items())
        lines.append(
            f"| {method} | {a['pairs']} | {a['failed']}{f' ({reasons})' if reasons else ''} | {_num(a['sr@3'])} "
            f"| {_num(a['sr@5'])} | {_num(a['auc@3'])} | {_num(a['auc@5'])} | {_num(a['auc@10'])} "
            f"| {_num(a['median_corner_error'], 1)} | {_num(a['mean_ncm_before'], 1)} | {_num(a['mean_cmr'])} "
            f"| {_num(a['mean_mma@3'])} | {_num(a['median_time_total'])} ({_num(a['median_time_features'])}/"
            f"{_num(a['median_time_matching'])}/{_num(a['median_time_fitting'], 3)}) | {_num(a['median_peak_mem_mb'], 0)} |"
        )
    return lines


def verdict_table(tab: dict[str, dict[str, Any]], model: str) -> list[str]:
    """Rows of the QC verdict table (methods with a verdict) for ``model``; empty when none has one."""
    lines = []
    for method, per_model in tab.items():
        v = (per_model.get(model) or {}).get("verdict")
        if v:
            lines.append(f"| {method} | {v['ok']} | {v['uncertain']} | {v['failed']} | {_num(v['ok_precision'])} "
                         f"| {_num(v['ok_recall'])} | {v['ok_beyond_20px']} |")
    head = ["| method | ok | uncertain | failed | precision of ok (RMSE <= 5 px) | recall of ok | ok beyond 20 px |",
            "|---|---|---|---|---|---|---|"]
    return head + lines if lines else []


def summary_markdown(summary: dict[str, Any], header: list[str], models: Iterable[str]) -> str:
    """The whole ``summary.md`` text."""
    out = list(header)
    out += ["", "SR@t: fraction of pairs with transform RMSE <= t SAR px (check points, else a 10x10 grid of the "
            "optical image); AUC@t of the mean corner error; NCM/CMR/MMA before fitting (eps = 3 px), means over "
            "pairs; times are medians (s); failed pairs count in every rate.", ""]
    for model in models:
        out += [f"## {model}", "", "### overall", "", *markdown_table(summary["overall"], model), ""]
        verdicts = verdict_table(summary["overall"], model)
        if verdicts:
            out += ["### QC verdict (overall)", "", *verdicts, ""]
        for name, key in (("split group", "by_group"), ("source", "by_source")):
            for value, tab in summary[key].items():
                out += [f"### {name}: {value}", "", *markdown_table(tab, model), ""]
    return "\n".join(out)


def write_summary(rows: list[dict[str, Any]], out_dir: Path, header: list[str], config: dict[str, Any]) -> dict[str, Any]:
    """Write ``pairs.csv``, ``summary.json``, ``summary.md``; returns the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_pairs_csv(rows, out_dir / "pairs.csv")
    summary = summarize(rows)
    models = list(dict.fromkeys(r["model"] for r in rows))
    doc = json_safe({"config": config, **summary})
    (out_dir / "summary.json").write_text(json.dumps(doc, indent=1, allow_nan=False))
    picks = pick_table(rows)
    (out_dir / "summary.md").write_text(summary_markdown(summary, header, models) + "\n"
                                        + (f"\n{picks}\n" if picks else ""))
    return summary


def pick_table(rows: list[dict[str, Any]], success_px: float = SUCCESS_PX) -> str:
    """For methods that weigh several hypotheses per pair (``<method>+area``, ``area-search``; ``+refine`` rows):
    how often some candidate was within ``success_px`` of the truth, how often the pick was, and where the picks
    came from. Empty when no row weighed hypotheses."""
    lines = []
    for (method, model) in dict.fromkeys((r["method"], r["model"]) for r in rows if r.get("best_candidate_rmse")
                                         is not None):
        sel = [r for r in rows if r["method"] == method and r["model"] == model
               and r.get("best_candidate_rmse") is not None]
        best = sum(float(r["best_candidate_rmse"]) <= success_px for r in sel)
        picked = sum(float(r["rmse"]) <= success_px for r in sel)
        sources = Counter(str(r.get("hypothesis")).split(" ")[0] for r in sel)
        lines.append(f"| {method} | {model} | {len(sel)} | {best} | {picked} | "
                     f"{picked / best if best else float('nan'):.2f} | "
                     + ", ".join(f"{k} {v}" for k, v in sources.most_common()) + " |")
    if not lines:
        return ""
    return "\n".join(["Hypothesis pick (QC evidence chooses among the keypoint fit and the area-search hypotheses; "
                      f"within {success_px:g} px of the truth):", "",
                      "| method | model | pairs | some candidate right | pick right | pick right / some right | "
                      "picked from |", "|---|---|---|---|---|---|---|", *lines])


def json_safe(v: Any) -> Any:
    """``v`` with numpy scalars as Python numbers and NaN/inf as ``None`` (strict JSON: a failed pair's
    infinite error becomes null), recursively; other objects as strings."""
    if isinstance(v, dict):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None
    if v is None or isinstance(v, str):
        return v
    return str(v)


# --- figures -------------------------------------------------------------------------------------


def _save_curves(fig: Any, ax: Any, path: Path, legend_size: int, **labels: Any) -> None:
    """Label, grid, legend, save and close a curve plot."""
    ax.set(ylim=(0, 1), **labels)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def plot_mma(rows: list[dict[str, Any]], path: Path, model: str = "affine") -> None:
    """Mean MMA over pairs vs threshold (1-10 px), one curve per method."""
    fig, ax = pyplot().subplots(figsize=(5, 4))
    ts = list(metrics.MMA_THRESHOLDS)
    for method in dict.fromkeys(r["method"] for r in rows):
        sel = [r for r in rows if r["method"] == method and r["model"] == model and "mma@1" in r]
        if sel:
            ax.plot(ts, [np.mean([r[f"mma@{t}"] for r in sel]) for t in ts], marker="o", ms=3, label=method)
    _save_curves(fig, ax, path, 7, xlabel="threshold (SAR px)", ylabel="MMA", title="Mean matching accuracy")


def plot_corner_cdf(rows: list[dict[str, Any]], path: Path, models: tuple[str, ...] = ("affine", "affine+refine"),
                    max_px: float = 20.0) -> None:
    """Cumulative fraction of pairs with mean corner error <= e: one colour per method, one line style
    per geometry model (solid: first of ``models``, dashed: second, ...)."""
    fig, ax = pyplot().subplots(figsize=(6, 4.5))
    xs = np.linspace(0, max_px, 201)
    styles = ("-", "--", ":")
    for i, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        for model, style in zip(models, styles):
            e = np.array([r.get("corner_error", np.inf) for r in rows if r["method"] == method and r["model"] == model])
            if len(e):
                ax.plot(xs, [(e <= x).mean() for x in xs], style, color=f"C{i}", label=f"{method} ({model})")
    _save_curves(fig, ax, path, 6, xlabel="mean corner error (SAR px)", ylabel="fraction of pairs",
                 title="Corner error CDF")


def plot_reliability(rows: list[dict[str, Any]], path: Path, model: str = "affine+refine", bins: int = 10,
                     success_px: float = SUCCESS_PX) -> None:
    """Reliability diagram: mean predicted QC confidence vs observed share within ``success_px`` RMSE, per
    confidence bin and method (only rows with a fit and a verdict); the diagonal is perfect calibration."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4.5))
    edges = np.linspace(0, 1, bins + 1)
    for method in dict.fromkeys(r["method"] for r in rows):
        sel = [r for r in rows if r["method"] == method and r["model"] == model
               and isinstance(r.get("qc_confidence"), float) and math.isfinite(r["qc_confidence"])]
        if not sel:
            continue
        conf = np.array([r["qc_confidence"] for r in sel])
        right = np.array([r.get("rmse", math.inf) <= success_px for r in sel], float)
        idx = np.clip(np.digitize(conf, edges) - 1, 0, bins - 1)
        xs = [conf[idx == b].mean() for b in range(bins) if (idx == b).any()]
        ys = [right[idx == b].mean() for b in range(bins) if (idx == b).any()]
        ns = [int((idx == b).sum()) for b in range(bins) if (idx == b).any()]
        ax.plot(xs, ys, marker="o", label=f"{method} ({len(sel)} pairs)")
        for x, y, n in zip(xs, ys, ns):
            ax.annotate(str(n), (x, y), fontsize=6, textcoords="offset points", xytext=(3, -8))
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set_xlim(0, 1)
    _save_curves(fig, ax, path, 7, xlabel="predicted confidence", ylabel=f"observed share within {success_px:g} px",
                 title="QC reliability (numbers: pairs per bin)")


def plot_checkerboards(rows: list[dict[str, Any]], pairs: dict[str, Any], path: Path, model: str = "affine",
                       n_pairs: int = 3, side: int = 256, perturb: Any = None) -> None:
    """Grid of checkerboards (optical / SAR warped with the estimate): pairs as rows, methods as columns.

    ``perturb``: the run's :class:`~promptmid.evaluation.perturb.Perturbation` (the SAR shown is the
    displaced one the methods saw), or ``None``.
    """
    import cv2

    from promptmid.evaluation.perturb import perturb_pair
    from promptmid.io import load_image
    from promptmid.geometry import checkerboard, warp_to_optical

    plt = pyplot()
    methods = list(dict.fromkeys(r["method"] for r in rows))
    ids = list(dict.fromkeys(r["pair"] for r in rows))[:n_pairs]
    if not ids or not methods:
        return
    fig, axes = plt.subplots(len(ids), len(methods), figsize=(2.2 * len(methods), 2.3 * len(ids)), squeeze=False)
    for i, pid in enumerate(ids):
        try:
            opt = load_image(pairs[pid].optical, "optical", max_side=None).image
            sar = load_image(perturb_pair(pairs[pid], perturb)[1], "sar", max_side=None).image
        except Exception:  # noqa: BLE001 - an unreadable pair is already a failed row
            opt = sar = None
        for j, method in enumerate(methods):
            ax = axes[i, j]
            ax.axis("off")
            row = next((r for r in rows if r["pair"] == pid and r["method"] == method and r["model"] == model), None)
            if row is None or opt is None:
                continue
            if row.get("transform") is None:
                ax.set_title(f"{method}\nfailed", fontsize=6)
                continue
            h, w = opt.shape[:2]
            board = checkerboard(opt, warp_to_optical(sar, row["transform"], (w, h)))
            f = side / max(h, w)
            ax.imshow(cv2.resize(board, (max(1, round(w * f)), max(1, round(h * f)))))
            ax.set_title(f"{method}\n{pid} {_num(row['corner_error'], 1)} px", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_figures(rows: list[dict[str, Any]], pairs: dict[str, Any], out_dir: Path, perturb: Any = None) -> None:
    """``mma.png``, ``corner_cdf.png``, ``reliability.png`` (when rows carry a QC verdict) and
    ``checkerboards.png`` (with the run's ``perturb``) in ``out_dir``."""
    plot_mma(rows, out_dir / "mma.png")
    plot_corner_cdf(rows, out_dir / "corner_cdf.png")
    if any(isinstance(r.get("qc_confidence"), float) and math.isfinite(r["qc_confidence"]) for r in rows):
        plot_reliability(rows, out_dir / "reliability.png")
    refined = any(r["model"] == "affine+refine" for r in rows)
    plot_checkerboards(rows, pairs, out_dir / "checkerboards.png", model="affine+refine" if refined else "affine",
                       perturb=perturb)
