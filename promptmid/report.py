"""``report.html``: one self-contained page per registration that a user looks at before trusting it.

The page holds the verdict (status, confidence, reason, the QC evidence with what each number means), a swipe and
a flicker viewer of the optical image against the registered SAR (and, for scenes, against the SAR under the prior)
with zoom and pan, the tie points coloured by residual with their residual vectors, and the numbers behind the fit
(transform or scene model, RMSE, tiles, timings, models). Everything is inline — images as data URIs (a two-level
pyramid: an overview and, for large images, a detail level used when zoomed in), the viewer as a small script — so
the file opens offline and makes no network request.

Coordinates: the viewer shows the OPTICAL grid; tie points are optical (x, y) pixels, pixel centres at integers;
residuals are in SAR pixels, drawn as vectors on the optical grid.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import cv2
import numpy as np

OVERVIEW_PX = 800  # long side of the overview level
DETAIL_PX = 2048  # long side of the detail level (only for images larger than the overview)
JPEG_QUALITY = 85

# what each QC number means (promptmid.qc evidence; shown beside the values)
EVIDENCE_HELP: dict[str, str] = {
    "matches": "descriptor matches before the robust fit",
    "inliers": "matches that agree with the transform (within the inlier threshold)",
    "inlier_ratio": "inliers / matches; right fits usually have a clearly higher share than wrong ones",
    "rmse_px": "residual of the inliers (SAR px)",
    "coverage": "share of the optical image covered by the inliers' convex hull (0-1)",
    "competitor_ratio": "inliers of the best other transform among the remaining matches / inliers (low is good)",
    "backward_px": "how far the SAR-to-optical fit disagrees with the optical-to-SAR fit (px)",
    "score_margin": "descriptor similarity of inliers minus that of outliers",
    "anisotropy": "how far the linear part is from a similarity (0 = none)",
    "scale": "SAR pixels per optical pixel implied by the transform",
    "refine_agreement": "share of refinement blocks that agree with the correction (1 = all)",
    "refine_inlier_ratio": "refinement blocks that fit the correction / blocks matched",
    "refine_shift_px": "how far the area-based refinement moved the transform (px)",
    "refine_blocks": "textured blocks the refinement could match",
    "dense_offset_px": "distance of the dense correlation peak from the transform (px; 0 = it agrees)",
    "dense_peak": "dense correlation of the oriented-gradient features at its peak",
    "dense_distinctness": "peak minus the best correlation away from it (low = repetitive or featureless)",
    "dense_at_zero": "dense correlation at the transform itself",
    "pixel_size_ratio": "implied scale / the scale the files' pixel sizes give (1 = consistent)",
    "mi_at_zero": "normalised mutual information of the optical and warped SAR intensities at the transform",
    "mi_peak": "how much more the intensities depend on each other at the transform than a few px off (thousandths)",
    "agreement": "1 = another kind of source (keypoints or the other area search) found the same transform (5 px)",
    "agreement_keypoints": "1 = the keypoint fit and an area hypothesis found this transform independently",
}

STATUS_COLOURS = {"ok": "#1a7f37", "uncertain": "#b08800", "failed": "#cf222e", "error": "#cf222e"}


def data_uri(image: np.ndarray, quality: int = JPEG_QUALITY) -> str:
    """A uint8 ``[H, W]`` / ``[H, W, 3]`` (RGB) image as a JPEG data URI."""
    bgr = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("could not encode a report image")
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


def png_uri(path: Path) -> str:
    """A PNG file as a data URI."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def pyramid(image: np.ndarray) -> list[dict[str, Any]]:
    """The levels the viewer loads: ``[{w, h, src}]``, overview first (long side <= :data:`OVERVIEW_PX`), then a
    detail level (<= :data:`DETAIL_PX`) when the image is larger than the overview. ``w``/``h`` are the level's
    pixels; the viewer maps them onto the image's own size."""
    h, w = image.shape[:2]
    levels = []
    for side in (OVERVIEW_PX, DETAIL_PX):
        s = min(1.0, side / max(h, w))
        size = (max(1, round(w * s)), max(1, round(h * s)))
        level = image if s == 1.0 else cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        levels.append({"w": size[0], "h": size[1], "src": data_uri(level)})
        if s == 1.0:
            break
    return levels


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A float image in [0, 1] (or any uint8) as uint8."""
    if image.dtype == np.uint8:
        return image
    return (np.clip(np.nan_to_num(image), 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


# --------------------------------------------------------------------------- page parts


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return html.escape(str(value))


def table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None, cls: str = "") -> str:
    """An HTML table of already-formatted or plain values."""
    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f'<table class="{cls}">{head}{body}</table>'


def matrix_table(m: Any) -> str:
    if m is None:
        return "<p>no transform</p>"
    rows = [[f"{v:.6g}" for v in row] for row in np.asarray(m, float)]
    return table(rows, cls="matrix")


def verdict_card(status: str, confidence: float | None, reason: str, evidence: Mapping[str, Any] | None = None,
                 extra: Sequence[Sequence[Any]] = ()) -> str:
    """The verdict: status badge, confidence, reason, key numbers and the QC evidence with meanings."""
    colour = STATUS_COLOURS.get(status, "#57606a")
    conf = "" if confidence is None else f' <span class="conf">confidence {confidence:.2f}</span>'
    rows = [[k, v, EVIDENCE_HELP.get(k, "")] for k, v in (evidence or {}).items()]
    ev = (f"<details open><summary>QC evidence</summary>{table(rows, ['evidence', 'value', 'meaning'])}</details>"
          if rows else "")
    why = f"<p class=\"reason\">{html.escape(reason)}</p>" if reason else ""
    return (f'<section id="verdict" class="card"><h2>Verdict: <span class="badge" style="background:{colour}">'
            f"{html.escape(status)}</span>{conf}</h2>{why}{table(extra) if extra else ''}{ev}</section>")


def viewer(layers: Mapping[str, np.ndarray], points: Mapping[str, Any] | None = None, title: str = "Compare") -> str:
    """The swipe / flicker viewer: ``layers`` (name -> uint8 image on the optical grid, the first is the base) and
    optional tie points ``{"xy": [[x, y], ...] (optical px of the full image), "residual": [...], "vectors":
    [[dx, dy], ...], "width": W, "height": H}``."""
    names = list(layers)
    base = layers[names[0]]
    data = {"layers": {n: pyramid(to_uint8(img)) for n, img in layers.items()}, "base": names[0],
            "size": [int(base.shape[1]), int(base.shape[0])], "points": points}
    options = "".join(f'<option value="{html.escape(n)}">{html.escape(n)}</option>' for n in names[1:])
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    return f"""<section class="card viewer" id="viewer">
<h2>{html.escape(title)}</h2>
<div class="controls">
  <label>{html.escape(names[0])} against <select class="other">{options}</select></label>
  <label><input type="radio" name="mode" value="swipe" checked> swipe</label>
  <label><input type="radio" name="mode" value="flicker"> flicker</label>
  <input type="range" class="swipe" min="0" max="1000" value="500" aria-label="swipe position">
  <label><input type="checkbox" class="showpts"{' checked' if points else ' disabled'}> tie points</label>
  <button type="button" class="reset">reset view</button>
  <span class="hint">wheel: zoom, drag: pan, space: flicker once</span>
</div>
<canvas class="view" width="900" height="600"></canvas>
<div class="legend">{_legend(points)}</div>
<script type="application/json" class="viewer-data">{payload}</script>
</section>"""


def _legend(points: Mapping[str, Any] | None) -> str:
    if not points:
        return ""
    res = np.asarray(points.get("residual", []), float)
    top = float(np.nanpercentile(res, 95)) if len(res) else 0.0
    return (f'tie points coloured by residual: <span class="ramp"></span> 0 … {top:.2f} SAR px '
            f"(95th percentile); vectors ×{points.get('vector_scale', 1):g}")


def image_section(title: str, uri: str, caption: str = "") -> str:
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<section class="card"><h2>{html.escape(title)}</h2><figure><img alt="{html.escape(title)}" ' \
           f'src="{uri}">{cap}</figure></section>'


def section(title: str, body: str, ident: str = "") -> str:
    idattr = f' id="{ident}"' if ident else ""
    return f'<section class="card"{idattr}><h2>{html.escape(title)}</h2>{body}</section>'


def page(title: str, parts: Sequence[str]) -> str:
    """The whole document: inline style and script, no external resource."""
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            '<link rel="icon" href="data:,">'
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><style>{_CSS}</style></head>"
            f"<body><header><h1>{html.escape(title)}</h1></header><main>{''.join(parts)}</main>"
            f"<script>{_JS}</script></body></html>")


def write_page(path: Path, title: str, parts: Sequence[str]) -> Path:
    path.write_text(page(title, parts), encoding="utf-8")
    return path


def tiepoint_overlay(points0: np.ndarray, residual_vectors: np.ndarray, size: tuple[int, int],
                     most: int = 3000) -> dict[str, Any] | None:
    """Tie points for :func:`viewer`: optical (x, y) px, residual length and vector (SAR px), at most ``most``
    (evenly subsampled); the vectors are scaled so that the 95th-percentile residual spans ~2 % of the image."""
    p = np.asarray(points0, float).reshape(-1, 2)
    v = np.asarray(residual_vectors, float).reshape(-1, 2)
    keep = np.isfinite(p).all(1) & np.isfinite(v).all(1)
    p, v = p[keep], v[keep]
    if not len(p):
        return None
    if len(p) > most:
        idx = np.linspace(0, len(p) - 1, most).astype(int)
        p, v = p[idx], v[idx]
    r = np.linalg.norm(v, axis=1)
    top = max(float(np.percentile(r, 95)), 1e-6)
    scale = max(1.0, round(0.02 * max(size) / top))
    return {"xy": np.round(p, 2).tolist(), "residual": np.round(r, 3).tolist(), "vectors": np.round(v, 3).tolist(),
            "vector_scale": scale, "width": int(size[0]), "height": int(size[1])}


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f6f8fa;color:#1f2328}
header{background:#24292f;color:#fff;padding:10px 20px}header h1{font-size:18px;margin:0}
main{max-width:1100px;margin:0 auto;padding:12px}
.card{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:12px 16px;margin:12px 0}
h2{font-size:16px;margin:4px 0 10px}.badge{color:#fff;border-radius:12px;padding:2px 10px}
.conf{font-weight:normal;color:#57606a;margin-left:8px}.reason{color:#57606a}
table{border-collapse:collapse;font-size:13px;margin:6px 0}td,th{border:1px solid #d0d7de;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#f6f8fa}table.matrix td{font-family:monospace;text-align:right}
.controls{display:flex;flex-wrap:wrap;gap:12px;align-items:center;font-size:13px;margin-bottom:6px}
.controls .swipe{width:220px}.hint{color:#57606a}
canvas.view{width:100%;max-width:900px;border:1px solid #d0d7de;background:#111;cursor:grab;display:block}
.legend{font-size:12px;color:#57606a;margin-top:4px}
.ramp{display:inline-block;width:80px;height:10px;vertical-align:middle;
background:linear-gradient(90deg,#2c7bb6,#abd9e9,#ffffbf,#fdae61,#d7191c)}
figure{margin:0}figure img{max-width:100%}figcaption{font-size:12px;color:#57606a}
.gallery{display:flex;gap:12px;align-items:flex-start}.gallery figure{position:sticky;top:8px;min-width:260px}
tr.clickable{cursor:pointer}tr.clickable:hover{background:#eef4ff}tr.selected{background:#ddf4ff}
"""

_JS = r"""
(function(){
function ramp(t){t=Math.max(0,Math.min(1,t));var s=[[44,123,182],[171,217,233],[255,255,191],[253,174,97],[215,25,28]];
 var f=t*(s.length-1),i=Math.min(s.length-2,Math.floor(f)),u=f-i,c=s[i],d=s[i+1];
 return 'rgb('+Math.round(c[0]+(d[0]-c[0])*u)+','+Math.round(c[1]+(d[1]-c[1])*u)+','+Math.round(c[2]+(d[2]-c[2])*u)+')';}
function Viewer(root){
 var data=JSON.parse(root.querySelector('.viewer-data').textContent);
 var canvas=root.querySelector('canvas'),ctx=canvas.getContext('2d');
 var W=data.size[0],H=data.size[1],imgs={},st={zoom:1,ox:0,oy:0,split:0.5,mode:'swipe',flick:false};
 var other=root.querySelector('.other'),range=root.querySelector('.swipe'),pts=root.querySelector('.showpts');
 canvas.height=Math.round(canvas.width*Math.min(1.2,Math.max(0.4,H/W)));
 var fit=function(){return Math.min(canvas.width/W,canvas.height/H);};
 function reset(){st.zoom=1;var f=fit();st.ox=(canvas.width-W*f)/2;st.oy=(canvas.height-H*f)/2;}
 reset();
 Object.keys(data.layers).forEach(function(name){imgs[name]=data.layers[name].map(function(l){
  var im=new Image();im.onload=draw;im.src=l.src;return im;});});
 function level(name){var ls=imgs[name],want=st.zoom*fit()*W;var pick=ls[0];
  for(var i=0;i<ls.length;i++){if(ls[i].complete&&ls[i].naturalWidth){pick=ls[i];if(ls[i].naturalWidth>=want)break;}}return pick;}
 function paint(name){var im=level(name);if(!im.complete||!im.naturalWidth)return;
  var s=st.zoom*fit();ctx.drawImage(im,st.ox,st.oy,W*s,H*s);}
 function draw(){ctx.setTransform(1,0,0,1,0,0);ctx.fillStyle='#111';ctx.fillRect(0,0,canvas.width,canvas.height);
  var b=data.base,o=other?other.value:b;
  if(st.mode==='flicker'){paint(st.flick?o:b);}
  else{paint(b);var x=st.split*canvas.width;ctx.save();ctx.beginPath();ctx.rect(x,0,canvas.width-x,canvas.height);
   ctx.clip();paint(o);ctx.restore();ctx.strokeStyle='#fff';ctx.lineWidth=2;ctx.beginPath();ctx.moveTo(x,0);
   ctx.lineTo(x,canvas.height);ctx.stroke();}
  if(pts&&pts.checked&&data.points){drawPoints();}}
 function drawPoints(){var p=data.points,s=st.zoom*fit(),k=p.vector_scale||1,res=p.residual.slice().sort(function(a,b){return a-b;});
  var top=res[Math.floor(0.95*(res.length-1))]||1;ctx.lineWidth=1;
  for(var i=0;i<p.xy.length;i++){var x=st.ox+(p.xy[i][0]+0.5)*s,y=st.oy+(p.xy[i][1]+0.5)*s,c=ramp(p.residual[i]/top);
   ctx.strokeStyle=c;ctx.fillStyle=c;ctx.beginPath();ctx.arc(x,y,2.5,0,6.283);ctx.fill();ctx.beginPath();ctx.moveTo(x,y);
   ctx.lineTo(x+p.vectors[i][0]*k*s,y+p.vectors[i][1]*k*s);ctx.stroke();}}
 root.viewerState=st;root.viewerDraw=draw;
 range.addEventListener('input',function(){st.split=range.value/1000;draw();});
 root.querySelectorAll('input[name=mode]').forEach(function(r){r.addEventListener('change',function(){st.mode=r.value;draw();});});
 if(other)other.addEventListener('change',draw);if(pts)pts.addEventListener('change',draw);
 root.querySelector('.reset').addEventListener('click',function(){reset();draw();});
 canvas.addEventListener('wheel',function(e){e.preventDefault();var r=canvas.getBoundingClientRect(),
  mx=(e.clientX-r.left)*canvas.width/r.width,my=(e.clientY-r.top)*canvas.height/r.height,f=e.deltaY<0?1.25:0.8;
  var z=Math.max(0.5,Math.min(64,st.zoom*f));f=z/st.zoom;st.ox=mx-(mx-st.ox)*f;st.oy=my-(my-st.oy)*f;st.zoom=z;draw();},{passive:false});
 var drag=null;canvas.addEventListener('mousedown',function(e){drag=[e.clientX,e.clientY,st.ox,st.oy];});
 window.addEventListener('mouseup',function(){drag=null;});
 window.addEventListener('mousemove',function(e){if(!drag)return;var r=canvas.getBoundingClientRect(),q=canvas.width/r.width;
  st.ox=drag[2]+(e.clientX-drag[0])*q;st.oy=drag[3]+(e.clientY-drag[1])*q;draw();});
 setInterval(function(){if(st.mode==='flicker'){st.flick=!st.flick;draw();}},700);
 window.addEventListener('keydown',function(e){if(e.code==='Space'&&document.activeElement===document.body){
  e.preventDefault();st.flick=!st.flick;if(st.mode!=='flicker'){st.mode='flicker';}draw();}});
 draw();}
document.querySelectorAll('section.viewer').forEach(Viewer);
document.querySelectorAll('tr.clickable').forEach(function(row){row.addEventListener('click',function(){
 var img=document.getElementById('gallery-image'),cap=document.getElementById('gallery-caption');
 document.querySelectorAll('tr.selected').forEach(function(r){r.classList.remove('selected');});row.classList.add('selected');
 if(img){img.src=row.getAttribute('data-src');img.alt=row.getAttribute('data-pair');}
 if(cap){cap.textContent=row.getAttribute('data-pair');}});});
})();
"""


# --------------------------------------------------------------------------- match and scene pages


def match_page(result: Any, data: Mapping[str, Any], optical: Any, sar: Any) -> list[str]:
    """The parts of a ``match`` report: ``result`` (:class:`promptmid.api.MatchResult`), ``data`` (its
    ``result.json``), the two :class:`promptmid.io.PreparedImage` (the viewer shows their working resolution)."""
    from promptmid.geometry import Size, apply_transform, warp_to_optical
    from promptmid.geometry import working_transform

    extra = [["transform from", data.get("hypothesis") or "n/a"], ["geometry", data.get("model")],
             ["matches / inliers", f"{data.get('matches')} / {data.get('inliers')}"],
             ["inlier RMSE (SAR px)", data.get("rmse")], ["total time (s)", data.get("timings", {}).get("total")]]
    qc = data.get("qc") or {}
    parts = [verdict_card(str(data.get("status")), data.get("confidence"), str(data.get("reason") or ""),
                          qc.get("evidence"), extra)]
    if result.transform is not None:
        h, w = optical.image.shape[:2]
        work = working_transform(result.transform, optical, sar)
        registered = warp_to_optical(sar.image[..., 0], work, Size(w, h))
        inl = np.asarray(result.inliers, bool)
        p0, p1 = np.asarray(result.points0)[inl], np.asarray(result.points1)[inl]
        vectors = apply_transform(result.transform, p0) - p1  # SAR px; drawn on the optical grid
        points = tiepoint_overlay((p0 + 0.5) / np.asarray(optical.scale) - 0.5, vectors / np.asarray(optical.scale),
                                  (w, h))
        parts.append(viewer({"optical": to_uint8(optical.image), "registered SAR": to_uint8(registered)}, points,
                            "Optical against the registered SAR"))
        parts.append(section("Transform (optical px -> SAR px)", matrix_table(result.transform)
                             + f"<p>{html.escape(str(data.get('transform_convention', '')))}</p>"))
    cands = hypothesis_rows(data, optical.original_size)
    if cands:
        from promptmid.selection import AGREEMENT_BONUS, MI_WEIGHT

        parts.append(section("Hypotheses weighed", "<p>Every candidate transform the QC judged; the pick keeps the "
                             "highest pick score among those not failed (by default the QC confidence, plus "
                             f"{MI_WEIGHT:g} x the mutual-information peak, plus {AGREEMENT_BONUS:g} when another kind "
                             "of source found the same transform; mutual-information peak: thousandths, about 1-4 at "
                             "a right transform, about 0 at a wrong one; distance: mean corner distance from the kept "
                             "transform, SAR px).</p>"
                             + table(cands, ["", "source", "status", "confidence", "MI peak", "pick score", "refined",
                                             "px from the kept transform"])))
    parts.append(_run_section(data))
    return parts


def hypothesis_rows(data: Mapping[str, Any], size: tuple[int, int]) -> list[list[Any]]:
    """One row per weighed candidate of ``result.json`` (``hypotheses``): kept mark, source, status, confidence, MI
    peak, pick score, refined, and its mean corner distance from the kept transform (optical image of ``size``)."""
    from promptmid.geometry import corner_error

    kept = data.get("transform")
    rows = []
    for c in data.get("hypotheses") or []:
        far = (float(corner_error(np.asarray(c["transform"]), np.asarray(kept), size).mean())
               if kept is not None and c.get("transform") is not None else None)
        rows.append(["kept" if c.get("source") == data.get("hypothesis") else "", c.get("source"), c.get("status"),
                     c.get("confidence"), c.get("mi_peak"), c.get("pick_score"), c.get("refined"),
                     None if far is None else round(far, 1)])
    return rows


def _run_section(data: Mapping[str, Any]) -> str:
    timings = [[k, v] for k, v in (data.get("timings") or {}).items()]
    models = [[k, json.dumps(v) if isinstance(v, (dict, list)) else v] for k, v in (data.get("models") or {}).items()]
    sizes = [[k, f"{v[0]} x {v[1]}" if isinstance(v, (list, tuple)) and len(v) == 2 else v]
             for k, v in (data.get("image_sizes") or {}).items()]
    notes = "".join(f"<li>{html.escape(str(n))}</li>" for n in data.get("input_notes") or [])
    body = (table(timings, ["stage", "seconds"]) + table(models, ["model", "details"])
            + (table(sizes, ["image", "size (px)"]) if sizes else "") + (f"<ul>{notes}</ul>" if notes else "")
            + f"<p>promptmid {html.escape(str(data.get('promptmid_version', '')))}</p>")
    return section("Run", body, "run")


def write_match_report(path: Path, result: Any, data: Mapping[str, Any], optical: Any, sar: Any) -> Path:
    """Write the ``report.html`` of a ``match`` (see :func:`match_page`)."""
    return write_page(path, "promptmid match report", match_page(result, data, optical, sar))


def _resample(image: np.ndarray, mapping: Any, size: tuple[int, int]) -> np.ndarray:
    """``image`` sampled at ``mapping(points)`` for every pixel of a ``size = (w, h)`` grid (nearest-free bilinear)."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    src = mapping(np.stack([xx.ravel(), yy.ravel()], 1).astype(np.float64))
    mx, my = src[:, 0].reshape(h, w).astype(np.float32), src[:, 1].reshape(h, w).astype(np.float32)
    return cv2.remap(image, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def scene_layers(opt_ds: Any, sar_ds: Any, model: Any, prior: np.ndarray | None, optical_bands: Sequence[int] | None,
                 max_side: int = DETAIL_PX) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Viewer layers of a scene on an overview of the optical grid: the optical image, the SAR under the fitted
    ``model`` (:class:`promptmid.scene.model.GlobalModel`, optical px -> SAR-grid px) and under the ``prior``
    (3x3). Returns ``(layers, to_full)`` with ``to_full`` the overview px -> optical px matrix."""
    from promptmid.geometry import apply_transform
    from promptmid.io import optical_to_unit, sar_to_unit
    from promptmid.scene.windows import read_overview

    opt, to_full = read_overview(opt_ds, max_side)
    if optical_bands:
        opt = opt[..., [b - 1 for b in optical_bands]]
    opt = np.nan_to_num(opt.astype(np.float64))
    layers = {"optical": to_uint8(optical_to_unit(opt, np.ones(opt.shape[:2], bool)))}
    sar, sar_full = read_overview(sar_ds, max_side)
    valid = np.isfinite(sar).all(-1) & (sar != (sar_ds.nodata if sar_ds.nodata is not None else np.nan)).all(-1)
    sar_unit = sar_to_unit(np.nan_to_num(sar[..., :1].astype(np.float64)), valid).astype(np.float32)
    to_sar_overview = np.linalg.inv(sar_full)
    size = (opt.shape[1], opt.shape[0])
    if model is not None:
        layers["registered SAR"] = to_uint8(_resample(
            sar_unit, lambda p: apply_transform(to_sar_overview, model.apply(apply_transform(to_full, p))), size))
    if prior is not None:
        layers["SAR under the prior"] = to_uint8(_resample(
            sar_unit, lambda p: apply_transform(to_sar_overview @ prior @ to_full, p), size))
    return layers, to_full


def scene_page(data: Mapping[str, Any], layers: Mapping[str, np.ndarray], to_full: np.ndarray, tiepoints: Any,
               model: Any, tile_map: Path | None = None) -> list[str]:
    """The parts of a ``scene`` report: ``data`` (its ``result.json``), the viewer ``layers`` on an overview
    (``to_full``: overview px -> optical px), the merged tie points and the global model."""
    from promptmid.geometry import apply_transform

    tiles = data.get("tiles") or {}
    extra = [["RMSE before / after (SAR px)", f"{_fmt(data.get('rmse_before_px'))} / {_fmt(data.get('rmse_after_px'))}"],
             ["RMSE before / after (m)", f"{_fmt(data.get('rmse_before_m'))} / {_fmt(data.get('rmse_after_m'))}"],
             ["tie points / inliers", f"{data.get('tiepoints')} / {data.get('inliers')}"],
             ["tiles processed / grid", f"{tiles.get('processed')} / {tiles.get('grid')}"
                                        + (f" (settled: {tiles.get('settle')} tiles agreed before all "
                                           f"{tiles.get('selected')} selected were matched)" if tiles.get("settled") else "")],
             ["prior", (data.get("prior") or {}).get("kind")],
             ["total time (s)", (data.get("timings") or {}).get("total")]]
    parts = [verdict_card(str(data.get("status")), data.get("confidence"), str(data.get("reason") or ""), None, extra)]
    if len(layers) > 1:
        points = None
        if tiepoints is not None and model is not None and tiepoints.inlier.any():
            inl = tiepoints.inlier
            p0 = tiepoints.optical_px[inl]
            vectors = model.apply(p0) - tiepoints.sar_px[inl]
            scale = np.array([to_full[0, 0], to_full[1, 1]])
            base = next(iter(layers.values()))
            points = tiepoint_overlay(apply_transform(np.linalg.inv(to_full), p0), vectors / scale,
                                      (base.shape[1], base.shape[0]))
        parts.append(viewer(layers, points, "Optical against the registered SAR (and the SAR under the prior)"))
    gm = data.get("global_model")
    if gm:
        parts.append(section("Scene model (optical px -> SAR-grid px)",
                             f"<p>{html.escape(str(gm.get('kind')))}</p>" + matrix_table(data.get("transform"))))
    rows = [[t.get("index"), t.get("status"), t.get("verdict"), t.get("inliers"), t.get("global_inliers"),
             t.get("disagreement_px"), t.get("rmse_px"), t.get("reason")] for t in data.get("tile_qc") or []]
    tile_body = (f'<figure><img alt="tile map" src="{png_uri(tile_map)}"></figure>' if tile_map and tile_map.is_file()
                 else "") + table(rows, ["tile", "status", "verdict", "inliers", "global inliers", "disagreement px",
                                         "RMSE px", "reason"])
    parts.append(section("Tiles", tile_body, "tiles"))
    parts.append(_run_section(data))
    return parts
