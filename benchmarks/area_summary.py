"""Headline tables of the area-search benchmark from the per-pair rows of ``bench_realpairs.py``.

Run after ``bench_realpairs.py --out benchmarks/results/area_search.md ...``:

    .venv/bin/python benchmarks/area_summary.py [--results benchmarks/results/area_search] [--model affine+refine]
        [--candidate promptmid-lite+area --baseline promptmid-lite]

Per run (val, unseen) and method: SR@5, SR@10, failure rate (no transform, or a transform whose QC verdict is
``failed``), per split group (SR@5 as k/n); and the default rule: a new default must beat ``promptmid-lite`` on
perturbed validation and on every unseen group with >= 8 pairs. Writes the tables at the end of ``<results>.md``
(replacing those of an earlier run).
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "promptmid-lite"
CANDIDATE = "promptmid-lite+area"
MIN_GROUP = 8
HEADLINE = "\n## Headline: SR@5, SR@10, failure rate, the default rule"
USABLE = ("SR@5 counts the chosen transform whatever its verdict; SR@5 usable only when the verdict is not `failed` "
          "(the product returns no transform then).")


def load(run_dir: Path, model: str) -> list[dict[str, str]]:
    path = run_dir / "pairs.csv"
    if not path.is_file():
        return []
    return [r for r in csv.DictReader(open(path)) if r["model"] == model]


def rmse(row: dict[str, str]) -> float:
    try:
        return float(row["rmse"])
    except (TypeError, ValueError):
        return math.inf


def failed(row: dict[str, str]) -> bool:
    return row["status"] != "ok" or row.get("qc_status") == "failed"


def table(rows: list[dict[str, str]]) -> tuple[str, dict[str, dict[str, tuple[int, int]]]]:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    groups = sorted({r["group"] for r in rows})
    head = ["| method | pairs | SR@5 | SR@5 usable | SR@10 | failure rate | " + " | ".join(groups) + " |",
            "|---|---|---|---|---|---|" + "---|" * len(groups)]
    per_group: dict[str, dict[str, tuple[int, int]]] = {}
    for m in methods:
        sel = [r for r in rows if r["method"] == m]
        n = len(sel)
        g = {grp: (sum(rmse(r) <= 5 for r in sel if r["group"] == grp), sum(r["group"] == grp for r in sel))
             for grp in groups}
        per_group[m] = g
        usable = sum(rmse(r) <= 5 and not failed(r) for r in sel) / n
        head.append(f"| {m} | {n} | {sum(rmse(r) <= 5 for r in sel) / n:.3f} | {usable:.3f} | "
                    f"{sum(rmse(r) <= 10 for r in sel) / n:.3f} | {sum(failed(r) for r in sel) / n:.3f} | "
                    + " | ".join(f"{k}/{t}" for k, t in g.values()) + " |")
    return "\n".join(head), per_group


def default_rule(val: dict[str, dict[str, tuple[int, int]]], unseen: dict[str, dict[str, tuple[int, int]]],
                 candidate: str = CANDIDATE, baseline: str = BASELINE) -> str:
    if baseline not in val or candidate not in val:
        return ""
    lines = [f"Default rule ({candidate} vs {baseline}): must win on perturbed validation and on every unseen group "
             f"with >= {MIN_GROUP} pairs.", ""]
    v_new, v_old = (sum(k for k, _ in val[m].values()) for m in (candidate, baseline))
    lines.append(f"- validation: {v_new} vs {v_old} pairs within 5 px")
    for grp, (k, n) in unseen.get(candidate, {}).items():
        if n >= MIN_GROUP:
            old = unseen[baseline][grp][0]
            verdict = "win" if k > old else ("tie at the ceiling" if k == old == n else ("tie" if k == old else "LOSS"))
            lines.append(f"- unseen {grp}: {k}/{n} vs {old}/{n} ({verdict})")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "area_search")
    ap.add_argument("--model", default="affine+refine")
    ap.add_argument("--candidate", default=CANDIDATE, help="method that would become the default")
    ap.add_argument("--baseline", default=BASELINE, help="the current default it must beat")
    args = ap.parse_args()
    parts, groups = [], {}
    for run in ("val", "unseen"):
        rows = load(args.results / run, args.model)
        if not rows:
            continue
        text, groups[run] = table(rows)
        parts.append(f"### {run} ({args.model}; SR@5 per split group as k/n)\n\n{text}\n")
    if not parts:
        print(f"area_summary: no rows under {args.results}; run bench_realpairs.py first.")
        return 0
    rule = default_rule(groups.get("val", {}), groups.get("unseen", {}), args.candidate, args.baseline)
    text = HEADLINE + "\n\n" + USABLE + "\n\n" + "\n".join(parts) + "\n" + rule + "\n"
    md = args.results.with_suffix(".md")
    if md.is_file():  # replaces the section of an earlier run instead of adding a second one
        md.write_text(md.read_text().split(HEADLINE)[0].rstrip("\n") + "\n" + text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
