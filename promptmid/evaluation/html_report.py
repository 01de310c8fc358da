"""``summary.html`` of an evaluation: the tables of ``summary.md``, the plots, and a per-pair gallery.

One self-contained page (:mod:`promptmid.report`): the markdown summary rendered as HTML, the corner-error CDF, MMA
and reliability plots inline, and a table with one row per pair (each method's corner error); clicking a row shows
that pair's checkerboard (optical against the SAR warped with the gallery method's estimate).
"""

from __future__ import annotations

import html
import math
import re
from pathlib import Path
from typing import Any, Sequence

from promptmid import report

GALLERY_SIDE = 360  # long side (px) of a gallery checkerboard


def markdown_to_html(text: str) -> str:
    """The subset of markdown the evaluation writes: ``#`` headings, pipe tables, ``-`` lists, paragraphs, inline
    ``**bold**`` and ``code``."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        if line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append(lines[i])
                i += 1
            out.append(_table(block))
            continue
        if line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")) + 1, 6)
            out.append(f"<h{level}>{_inline(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            out.append(f"<ul>{''.join(items)}</ul>")
            continue
        elif line:
            out.append(f"<p>{_inline(line)}</p>")
        i += 1
    return "\n".join(out)


def _inline(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def _table(block: Sequence[str]) -> str:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in block]
    rows = [r for r in rows if not all(set(c) <= set("-: ") for c in r)]  # drop the |---| separator
    if not rows:
        return ""
    head = "".join(f"<th>{_inline(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


def _checkerboard_uri(pair: Any, transform: Any, perturb: Any) -> str | None:
    """The pair's checkerboard (optical / SAR warped with ``transform``) as a data URI, ``None`` if unreadable."""
    import cv2

    from promptmid.evaluation.perturb import perturb_pair
    from promptmid.geometry import checkerboard, warp_to_optical
    from promptmid.io import load_image

    try:
        opt = load_image(pair.optical, "optical", max_side=None).image
        sar = load_image(perturb_pair(pair, perturb)[1], "sar", max_side=None).image
    except Exception:  # noqa: BLE001 - an unreadable pair is already a failed row
        return None
    h, w = opt.shape[:2]
    board = checkerboard(opt, warp_to_optical(sar, transform, (w, h))) if transform is not None else opt
    f = min(1.0, GALLERY_SIDE / max(h, w))
    small = cv2.resize(board, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
    return report.data_uri(report.to_uint8(small))


def gallery(rows: list[dict[str, Any]], pairs: dict[str, Any], perturb: Any, model: str, method: str) -> str:
    """The per-pair table (corner error of every method under ``model``) whose rows show the ``method``'s
    checkerboard when clicked."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["pair"], r["method"]): r for r in rows if r["model"] == model}
    head = "".join(f"<th>{html.escape(m)} (px)</th>" for m in methods)
    body = []
    for pid in dict.fromkeys(r["pair"] for r in rows):
        mine = by.get((pid, method))
        uri = _checkerboard_uri(pairs[pid], mine.get("transform") if mine else None, perturb) if pid in pairs else None
        cells = "".join(f"<td>{_err(by.get((pid, m)))}</td>" for m in methods)
        group = html.escape(str((mine or {}).get("group", "")))
        attrs = f' class="clickable" data-src="{uri}" data-pair="{html.escape(pid)}"' if uri else ""
        body.append(f"<tr{attrs}><td>{html.escape(pid)}</td><td>{group}</td>{cells}</tr>")
    return (f"<p>Click a row: the checkerboard of <strong>{html.escape(method)}</strong> ({html.escape(model)}) on that "
            f"pair (optical against the warped SAR).</p><div class=\"gallery\"><figure><img id=\"gallery-image\" "
            f"alt=\"\" src=\"data:,\"><figcaption id=\"gallery-caption\">no pair selected</figcaption></figure>"
            f"<table><tr><th>pair</th><th>group</th>{head}</tr>{''.join(body)}</table></div>")


def _err(row: dict[str, Any] | None) -> str:
    if row is None:
        return ""
    if row.get("transform") is None:
        return "failed"
    value = row.get("corner_error")
    return "n/a" if not isinstance(value, float) or not math.isfinite(value) else f"{value:.1f}"


def write_summary_html(rows: list[dict[str, Any]], pairs: dict[str, Any], out_dir: Path, perturb: Any = None,
                       title: str = "promptmid eval") -> Path:
    """``out_dir/summary.html`` from ``out_dir/summary.md``, the plots written beside it and the rows."""
    parts = [report.section("Summary", markdown_to_html((out_dir / "summary.md").read_text()), "summary")]
    for name, caption in (("corner_cdf.png", "corner error CDF"), ("mma.png", "mean matching accuracy"),
                          ("reliability.png", "QC reliability")):
        if (out_dir / name).is_file():
            parts.append(report.image_section(caption, report.png_uri(out_dir / name)))
    if rows:
        model = "affine+refine" if any(r["model"] == "affine+refine" for r in rows) else rows[0]["model"]
        method = rows[0]["method"]
        parts.append(report.section("Pairs", gallery(rows, pairs, perturb, model, method), "pairs"))
    return report.write_page(out_dir / "summary.html", title, parts)

