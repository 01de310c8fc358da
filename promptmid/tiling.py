"""Large scenes: tile-by-tile matching with windowed reads, merged tie points, a global fit.

Pipeline of :func:`register_scene` (memory bounded: the model only ever sees one tile):

1. **prior** (optical px -> SAR px): from the geotransforms when both images are georeferenced
   (the SAR is read through a WarpedVRT in the optical CRS if the CRSs differ), else from a
   coarse match of decimated overviews (long side ``overview_side``).
2. **tiles**: a grid of ``tile`` x ``tile`` optical windows with ``overlap`` px overlap over the
   part of the optical image the SAR covers; at most ``max_tiles`` of them, spread evenly.
3. per tile, the SAR is resampled through the prior onto the tile's optical grid enlarged by the
   search radius (a "chip"), the pair is matched and fitted (per-tile QC), and matches are mapped
   back to **scene coordinates** (optical px, SAR px).
4. **global fit** on the union of tile inliers: MAGSAC affine, then iterative least squares with
   residual rejection, as an affine or a 2nd-order polynomial (``poly2``).
5. products, written block by block: registered SAR GeoTIFF on the optical grid, tie points
   (CSV + GeoJSON), GCP VRT, tile map figure, ``result.json``.
"""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from promptmid import __version__
from promptmid import geo
from promptmid.config import INLIER_THRESHOLD_PX
from promptmid.errors import InputError
from promptmid.io import RasterImage
from promptmid.geometry import apply_transform
from promptmid.matching import fit_geometry
from promptmid.geometry import warp_to_optical
from promptmid.registration import write_json

SCENE_MODELS = ("affine", "poly2")
CV_DTYPES = ("uint8", "uint16", "int16", "float32", "float64")


@dataclass
class SceneOptions:
    """Settings of :func:`register_scene` (sizes in optical pixels unless stated)."""

    tile: int = 1024
    overlap: int = 128
    max_tiles: int | None = 64
    model: str = "affine"
    geo_prior: bool = True
    search_radius: str = "64px"  # "64px", "500m", or a bare number (metres if georeferenced)
    overview_side: int = 1024  # coarse prior / figure resolution when there is no geo prior
    block: int = 1024  # output block side
    figures: bool = True


@dataclass
class Tile:
    """One optical window ``[x0, x0 + w) x [y0, y0 + h)`` and its QC numbers."""

    index: int
    row: int
    col: int
    x0: int
    y0: int
    w: int
    h: int
    status: str = "pending"  # ok | failed | rejected | empty | outside | error
    reason: str = ""
    matches: int = 0
    inliers: int = 0
    global_inliers: int = 0
    rmse_px: float | None = None
    seconds: float = 0.0


def translation(dx: float, dy: float) -> np.ndarray:
    """3x3 translation by ``(dx, dy)``."""
    return np.array([[1.0, 0, dx], [0, 1.0, dy], [0, 0, 1.0]])


# ----------------------------------------------------------------------------- tiles and windows


def tile_grid(bbox: tuple[int, int, int, int], tile: int, overlap: int) -> list[Tile]:
    """Tiles of side ``tile`` with ``overlap`` px overlap covering ``bbox = (x0, y0, x1, y1)``.

    The last row/column is shifted back so every tile is full size (if the box allows it).
    """
    if tile < 64 or not 0 <= overlap < tile:
        raise InputError(f"Need --tile >= 64 and 0 <= --overlap < --tile (got {tile}, {overlap}).")
    x0, y0, x1, y1 = bbox
    xs, ys = _starts(x0, x1, tile, overlap), _starts(y0, y1, tile, overlap)
    return [Tile(r * len(xs) + c, r, c, x, y, min(tile, x1 - x), min(tile, y1 - y))
            for r, y in enumerate(ys) for c, x in enumerate(xs)]


def _starts(lo: int, hi: int, tile: int, overlap: int) -> list[int]:
    if hi - lo <= tile:
        return [lo]
    n = int(np.ceil((hi - lo - overlap) / (tile - overlap)))
    return [int(round(v)) for v in np.linspace(lo, hi - tile, n)]


def select_tiles(tiles: list[Tile], max_tiles: int | None) -> list[Tile]:
    """At most ``max_tiles`` tiles, spread evenly over the grid (all when ``None``)."""
    if not max_tiles or len(tiles) <= max_tiles:
        return tiles
    rows, cols = max(t.row for t in tiles) + 1, max(t.col for t in tiles) + 1
    k = int(np.ceil(np.sqrt(max_tiles * rows / cols)))
    pick_r = np.unique(np.linspace(0, rows - 1, min(rows, k)).round().astype(int))
    per_row = max(1, max_tiles // len(pick_r))
    pick_c = np.unique(np.linspace(0, cols - 1, min(cols, per_row)).round().astype(int))
    chosen = [t for t in tiles if t.row in pick_r and t.col in pick_c]
    return chosen[:max_tiles]


def read_window(ds: Any, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """Read pixels ``[y0, y0 + h) x [x0, x0 + w)`` of an open dataset as ``[h, w, C]``."""
    from rasterio.windows import Window

    return np.moveaxis(ds.read(window=Window(x0, y0, w, h)), 0, -1)


def read_overview(ds: Any, max_side: int) -> tuple[np.ndarray, np.ndarray]:
    """Decimated read ``[h, w, C]`` (long side <= ``max_side``) and the 3x3 overview px -> full px matrix."""
    from rasterio.enums import Resampling

    f = min(1.0, max_side / max(ds.width, ds.height))
    ow, oh = max(32, round(ds.width * f)), max(32, round(ds.height * f))
    data = ds.read(out_shape=(ds.count, oh, ow), resampling=Resampling.average)
    sx, sy = ds.width / ow, ds.height / oh
    return np.moveaxis(data, 0, -1), np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1.0]])


def _cv_ready(data: np.ndarray) -> np.ndarray:
    return data if data.dtype.name in CV_DTYPES else data.astype(np.float32)


def sar_chip(sar_ds: Any, chip_to_sar: np.ndarray, size: tuple[int, int], fill: float) -> np.ndarray | None:
    """Resample the SAR onto a chip grid of ``size = (W, H)`` through ``chip_to_sar`` (chip px -> SAR px).

    Only the SAR window under the chip is read. ``None`` when the chip misses the SAR image.
    """
    w, h = size
    corners = apply_transform(chip_to_sar, np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]], float))
    window = _clip_box(corners, sar_ds.width, sar_ds.height)
    if window is None:
        return None
    sx0, sy0, sw, sh = window
    data = _cv_ready(read_window(sar_ds, sx0, sy0, sw, sh))
    m = translation(-sx0, -sy0) @ chip_to_sar
    return np.stack([warp_to_optical(data[..., i], m, (w, h), fill=fill) for i in range(data.shape[-1])], -1)


def _clip_box(points: np.ndarray, width: int, height: int, pad: int = 2) -> tuple[int, int, int, int] | None:
    x0, y0 = np.floor(points.min(0)).astype(int) - pad
    x1, y1 = np.ceil(points.max(0)).astype(int) + pad + 1
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    return None if x1 - x0 < 2 or y1 - y0 < 2 else (int(x0), int(y0), int(x1 - x0), int(y1 - y0))


# ----------------------------------------------------------------------------- global model


@dataclass
class GlobalModel:
    """Optical px -> SAR px model of a whole scene.

    Attributes:
        kind: ``"affine"`` or ``"poly2"``.
        coeffs: ``[2, K]`` coefficients of (1, u, v[, u^2, uv, v^2]) for SAR x and y, where
            ``u = (x - cx) / s``, ``v = (y - cy) / s`` are normalised optical pixels.
        norm: ``(cx, cy, s)``.
    """

    kind: str
    coeffs: np.ndarray
    norm: tuple[float, float, float]

    def apply(self, points: np.ndarray) -> np.ndarray:
        """``[N, 2]`` optical px -> ``[N, 2]`` SAR px."""
        return _design(np.asarray(points, np.float64).reshape(-1, 2), self.kind, self.norm) @ self.coeffs.T

    @property
    def matrix(self) -> np.ndarray:
        """3x3 affine part (exact for ``affine``; the tangent at the scene centre for ``poly2``)."""
        cx, cy, s = self.norm
        c = self.coeffs[:, :3]
        lin = np.array([[c[0, 1] / s, c[0, 2] / s], [c[1, 1] / s, c[1, 2] / s]])
        off = c[:, 0] - lin @ np.array([cx, cy])
        return np.vstack([np.hstack([lin, off[:, None]]), [0, 0, 1.0]])

    def to_dict(self) -> dict[str, Any]:
        terms = ["1", "u", "v"] + (["u^2", "u*v", "v^2"] if self.kind == "poly2" else [])
        return {"kind": self.kind, "terms": terms, "coeffs_x": self.coeffs[0].tolist(), "coeffs_y": self.coeffs[1].tolist(),
                "normalisation": {"cx": self.norm[0], "cy": self.norm[1], "scale": self.norm[2],
                                  "u": "(x - cx) / scale", "v": "(y - cy) / scale"}}


def _design(p: np.ndarray, kind: str, norm: tuple[float, float, float]) -> np.ndarray:
    u, v = (p[:, 0] - norm[0]) / norm[2], (p[:, 1] - norm[1]) / norm[2]
    cols = [np.ones_like(u), u, v] + ([u * u, u * v, v * v] if kind == "poly2" else [])
    return np.stack(cols, axis=1)


def fit_global(p0: np.ndarray, p1: np.ndarray, kind: str = "affine", threshold: float = INLIER_THRESHOLD_PX, min_inliers: int = 6,
               max_rounds: int = 10) -> tuple[GlobalModel | None, np.ndarray, str]:
    """Robust scene fit: MAGSAC affine (:func:`fit_geometry`), then least squares with residual rejection.

    Each round refits on the current inliers and keeps points with residual below
    ``min(threshold, max(1, 3 * robust sigma))`` (SAR px) until the set is stable.

    Returns:
        ``(model or None, inliers [N] bool, reason)``.
    """
    if kind not in SCENE_MODELS:
        raise InputError(f"Unknown scene model {kind!r}; valid: {', '.join(SCENE_MODELS)}")
    geom = fit_geometry(p0, p1, "affine", threshold, min_inliers)
    if not geom.ok:
        return None, geom.inliers, geom.reason
    need = max(min_inliers, 12 if kind == "poly2" else 3)
    if geom.num_inliers < need:
        return None, geom.inliers, f"only {geom.num_inliers} inliers; {kind} needs at least {need}"
    p0, p1 = np.asarray(p0, np.float64), np.asarray(p1, np.float64)
    lo, hi = p0[geom.inliers].min(0), p0[geom.inliers].max(0)
    norm = (float((lo[0] + hi[0]) / 2), float((lo[1] + hi[1]) / 2), float(max(np.max(hi - lo) / 2, 1.0)))
    mask = geom.inliers.copy()
    for _ in range(max_rounds):
        a = _design(p0[mask], kind, norm)
        coeffs = np.linalg.lstsq(a, p1[mask], rcond=None)[0].T
        res = np.linalg.norm(_design(p0, kind, norm) @ coeffs.T - p1, axis=1)
        sigma = 1.4826 * np.median(res[mask])
        new = res < min(threshold, max(1.0, 3 * sigma))
        if new.sum() < need or np.array_equal(new, mask):
            break
        mask = new
    return GlobalModel(kind, coeffs, norm), mask, ""


# ----------------------------------------------------------------------------- matching


@dataclass
class SceneMatches:
    """Tie points from all tiles in scene coordinates (optical px, SAR-grid px)."""

    p0: list[np.ndarray] = field(default_factory=list)
    p1: list[np.ndarray] = field(default_factory=list)
    scores: list[np.ndarray] = field(default_factory=list)
    tile: list[np.ndarray] = field(default_factory=list)
    tile_inlier: list[np.ndarray] = field(default_factory=list)

    def arrays(self) -> tuple[np.ndarray, ...]:
        def cat(items: list[np.ndarray], shape: tuple[int, ...], dtype: Any) -> np.ndarray:
            return np.concatenate(items).astype(dtype) if items else np.zeros(shape, dtype)
        return (cat(self.p0, (0, 2), np.float64), cat(self.p1, (0, 2), np.float64), cat(self.scores, (0,), np.float32),
                cat(self.tile, (0,), np.int64), cat(self.tile_inlier, (0,), bool))


def match_tile(matcher: Any, opt_ds: Any, sar_ds: Any, prior: np.ndarray, tile: Tile, margin: int,
               sar_fill: float, found: SceneMatches) -> None:
    """Match one tile (optical window vs SAR chip through the prior); append its inlier tie points.

    Updates ``tile`` status/QC in place. Tie points: optical = tile px + tile origin;
    SAR = ``prior @ (chip px + chip origin)``.
    """
    from promptmid.errors import PromptMIDError

    t0 = time.perf_counter()
    chip_to_sar = prior @ translation(tile.x0 - margin, tile.y0 - margin)
    try:
        chip = sar_chip(sar_ds, chip_to_sar, (tile.w + 2 * margin, tile.h + 2 * margin), sar_fill)
        if chip is None:
            tile.status, tile.reason = "outside", "predicted SAR window lies outside the SAR image"
            return
        opt = RasterImage(read_window(opt_ds, tile.x0, tile.y0, tile.w, tile.h), nodata=opt_ds.nodata)
        result = matcher.match(opt, RasterImage(chip, nodata=sar_ds.nodata))
    except PromptMIDError as exc:
        tile.status, tile.reason = "empty", str(exc)
        return
    finally:
        tile.seconds = time.perf_counter() - t0
    tile.matches, tile.inliers = len(result.points0), result.num_inliers
    tile.status, tile.reason = ("ok", "") if result.ok else ("failed", result.reason)
    if result.ok:
        keep = result.inliers
        tile.rmse_px = float(result.rmse)
        found.p0.append(result.points0[keep] + [tile.x0, tile.y0])
        found.p1.append(apply_transform(chip_to_sar, result.points1[keep]))
        found.scores.append(result.scores[keep])
        found.tile.append(np.full(int(keep.sum()), tile.index))
        found.tile_inlier.append(np.ones(int(keep.sum()), bool))


def coarse_prior(matcher: Any, opt_ds: Any, sar_ds: Any, max_side: int) -> tuple[np.ndarray | None, str]:
    """Optical px -> SAR px prior from matching decimated overviews (long side ``max_side``)."""
    from promptmid.errors import PromptMIDError

    opt, s_opt = read_overview(opt_ds, max_side)
    sar, s_sar = read_overview(sar_ds, max_side)
    try:
        r = matcher.match(RasterImage(opt, nodata=opt_ds.nodata), RasterImage(sar, nodata=sar_ds.nodata))
    except PromptMIDError as exc:
        return None, f"coarse match of overviews failed: {exc}"
    if not r.ok:
        return None, f"coarse match of overviews failed: {r.reason}"
    return s_sar @ r.transform @ np.linalg.inv(s_opt), ""


# ----------------------------------------------------------------------------- outputs


def output_nodata(opt: geo.GeoInfo, sar: geo.GeoInfo) -> float:
    """Nodata of the registered SAR: the optical nodata when the SAR dtype can hold it, else the SAR's, else 0."""
    for value in (opt.nodata, sar.nodata):
        if value is not None and (np.dtype(sar.dtype).kind == "f" or
                                  (float(value).is_integer() and np.can_cast(np.min_scalar_type(value), sar.dtype))):
            return float(value)
    return 0.0


GDAL_CACHE_MB = 256  # GDAL block cache while writing the registered scene (MB)


def write_registered_scene(path: Path, model: GlobalModel, opt: geo.GeoInfo, sar_ds: Any, block: int = 1024) -> None:
    """Write the SAR resampled onto the optical grid, block by block (tiled, DEFLATE, BigTIFF if needed).

    CRS/geotransform come from the optical image, nodata from :func:`output_nodata`; dtype and
    bands from the SAR. Only the SAR window under each output block is read.
    """
    import rasterio
    from rasterio.windows import Window

    sar = geo.geo_info(sar_ds)
    nodata = output_nodata(opt, sar)
    dtype = sar.dtype if sar.dtype in CV_DTYPES else "float32"
    profile = {"driver": "GTiff", "width": opt.width, "height": opt.height, "count": sar.count, "dtype": dtype,
               "nodata": nodata, "compress": "deflate", "tiled": True, "blockxsize": 256, "blockysize": 256,
               "BIGTIFF": "IF_SAFER"}
    if opt.georeferenced:
        profile.update(crs=opt.crs, transform=opt.transform)
    # GDAL's block cache defaults to 5% of RAM; cap it so memory stays bounded for any scene size
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB), rasterio.open(path, "w", **profile) as dst:
        for by in range(0, opt.height, block):
            for bx in range(0, opt.width, block):
                bw, bh = min(block, opt.width - bx), min(block, opt.height - by)
                out = _warp_block(model, sar_ds, bx, by, bw, bh, nodata, dtype)
                dst.write(np.moveaxis(out, -1, 0), window=Window(bx, by, bw, bh))


def _warp_block(model: GlobalModel, sar_ds: Any, bx: int, by: int, bw: int, bh: int, fill: float,
                dtype: str) -> np.ndarray:
    if model.kind == "affine":
        corners = np.array([[bx, by], [bx + bw - 1, by], [bx, by + bh - 1], [bx + bw - 1, by + bh - 1]], float)
        sar_pts, maps = model.apply(corners), None
    else:
        yy, xx = np.mgrid[by:by + bh, bx:bx + bw]
        sar_pts = model.apply(np.stack([xx.ravel(), yy.ravel()], 1))
        maps = sar_pts.reshape(bh, bw, 2).astype(np.float32)
    window = _clip_box(sar_pts, sar_ds.width, sar_ds.height)
    if window is None:
        return np.full((bh, bw, sar_ds.count), fill, dtype)
    sx0, sy0, sw, sh = window
    data = _cv_ready(read_window(sar_ds, sx0, sy0, sw, sh)).astype(dtype, copy=False)
    if maps is None:
        m = translation(-sx0, -sy0) @ model.matrix @ translation(bx, by)
        bands = [warp_to_optical(data[..., i], m, (bw, bh), fill=fill) for i in range(data.shape[-1])]
    else:
        mx, my = maps[..., 0] - sx0, maps[..., 1] - sy0
        bands = [cv2.remap(data[..., i], mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=fill)
                 for i in range(data.shape[-1])]
    return np.stack(bands, -1)


def plot_tile_map(path: Path, opt_ds: Any, tiles: list[Tile], tp: geo.TiePoints, max_side: int = 900) -> None:
    """Figure: optical overview, tiles coloured by status with inlier counts, tie points (green = inlier)."""
    from promptmid.viz import pyplot

    plt = pyplot()
    from matplotlib.patches import Rectangle

    from promptmid.io import optical_to_unit

    data, to_full = read_overview(opt_ds, max_side)
    img = optical_to_unit(data, np.ones(data.shape[:2], bool))
    f = 1.0 / to_full[0, 0], 1.0 / to_full[1, 1]
    colours = {"ok": "lime", "failed": "red", "rejected": "orange", "empty": "grey", "outside": "grey", "error": "magenta"}
    fig, ax = plt.subplots(figsize=(8, 8 * img.shape[0] / img.shape[1]))
    ax.imshow(img)
    for t in tiles:
        c = colours.get(t.status, "white")
        ax.add_patch(Rectangle((t.x0 * f[0], t.y0 * f[1]), t.w * f[0], t.h * f[1], fill=False, edgecolor=c, lw=1.2))
        ax.text((t.x0 + t.w / 2) * f[0], (t.y0 + t.h / 2) * f[1], f"{t.index}\n{t.global_inliers}/{t.inliers}",
                color=c, ha="center", va="center", fontsize=7)
    pts = (tp.optical_px + 0.5) * f - 0.5
    ax.scatter(pts[tp.inlier, 0], pts[tp.inlier, 1], s=2, c="lime")
    ax.scatter(pts[~tp.inlier, 0], pts[~tp.inlier, 1], s=2, c="red")
    ax.set_title("tiles: index, global/tile inliers (green ok, red failed, orange rejected, grey empty)", fontsize=8)
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- the scene pipeline


def register_scene(optical: str | Path, sar: str | Path, out_dir: Path, matcher: Any,
                   options: SceneOptions | None = None,
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Register a (large, possibly georeferenced) SAR scene to an optical scene, tile by tile.

    Args:
        optical, sar: raster paths (any size; read in windows).
        out_dir: existing output directory (see :func:`promptmid.registration.prepare_out_dir`).
        matcher: a :class:`promptmid.api.Matcher` used on each tile.

    Returns:
        the ``result.json`` content (also written). ``status`` is ``"ok"`` or ``"failed"``.
        ``transform`` maps optical px -> SAR-grid px (see :mod:`promptmid.geo`).
    Raises:
        InputError: unreadable inputs, bad options, or no overlap.
    """
    options = options or SceneOptions()
    say = progress or (lambda _m: None)
    t_start = time.perf_counter()
    with geo.open_raster(optical) as opt_ds, geo.open_raster(sar) as sar_file_ds:
        opt_info, sar_file = geo.geo_info(opt_ds), geo.geo_info(sar_file_ds)
        sar_ds, reprojected = (geo.sar_in_optical_crs(sar_file_ds, opt_info) if options.geo_prior
                               else (sar_file_ds, False))
        try:
            ctx = _Context(matcher, options, opt_ds, sar_ds, opt_info, sar_file, geo.geo_info(sar_ds), reprojected,
                           Path(sar), out_dir, say, t_start)
            return ctx.run()
        finally:
            if reprojected:
                sar_ds.close()


@dataclass
class _Context:
    matcher: Any
    options: SceneOptions
    opt_ds: Any
    sar_ds: Any
    opt: geo.GeoInfo
    sar_file: geo.GeoInfo
    sar: geo.GeoInfo
    reprojected: bool
    sar_path: Path
    out: Path
    say: Callable[[str], None]
    t_start: float
    timings: dict[str, float] = field(default_factory=dict)

    def run(self) -> dict[str, Any]:
        self.say("computing the prior")
        prior, kind, reason = self.prior()
        base = self.base_result(prior, kind)
        if prior is None:
            return self.finish({**base, "status": "failed", "reason": reason}, [])
        bbox = geo.overlap_bbox(prior, (self.opt.width, self.opt.height), (self.sar.width, self.sar.height))
        if bbox is None:
            raise InputError("The optical and SAR images do not overlap (under the prior).")
        grid = tile_grid(bbox, self.options.tile, self.options.overlap)
        tiles = select_tiles(grid, self.options.max_tiles)
        margin = int(np.ceil(geo.parse_search_radius(self.options.search_radius, self.opt.pixel_size)))
        found = self.match_tiles(tiles, prior, margin)
        base.update(overlap_bbox_px=list(bbox), search_radius_px=margin,
                    tiles={"grid": len(grid), "processed": len(tiles), "tile": self.options.tile,
                           "overlap": self.options.overlap, "max_tiles": self.options.max_tiles})
        return self.fit_and_write(base, tiles, found, prior)

    def prior(self) -> tuple[np.ndarray | None, str, str]:
        t0 = time.perf_counter()
        if self.options.geo_prior and self.opt.georeferenced and self.sar.georeferenced:
            p, kind, reason = geo.geo_prior(self.opt, self.sar), "geo", ""
        else:
            p, reason = coarse_prior(self.matcher, self.opt_ds, self.sar_ds, self.options.overview_side)
            kind = "coarse"
        self.timings["prior"] = time.perf_counter() - t0
        return p, kind, reason

    def match_tiles(self, tiles: list[Tile], prior: np.ndarray, margin: int) -> SceneMatches:
        t0 = time.perf_counter()
        found = SceneMatches()
        fill = self.sar.nodata if self.sar.nodata is not None else 0.0
        for i, tile in enumerate(tiles):
            self.say(f"matching tile {i + 1}/{len(tiles)}")
            match_tile(self.matcher, self.opt_ds, self.sar_ds, prior, tile, margin, fill, found)
        self.timings["tiles"] = time.perf_counter() - t0
        return found

    def fit_and_write(self, base: dict[str, Any], tiles: list[Tile], found: SceneMatches,
                      prior: np.ndarray) -> dict[str, Any]:
        self.say("global fit")
        p0, p1, scores, tile_idx, _ = found.arrays()
        g = self.matcher.conf["geometry"]
        model, inliers, reason = fit_global(p0, p1, self.options.model, g["threshold"], g["min_inliers"])
        res_after = np.linalg.norm(model.apply(p0) - p1, axis=1) if model else np.full(len(p0), np.nan)
        res_before = np.linalg.norm(apply_transform(prior, p0) - p1, axis=1) if len(p0) else np.zeros(0)
        tp = geo.TiePoints(p0, p1, geo.sar_grid_to_file_pixels(p1, self.sar, self.sar_file), tile_idx, scores,
                           inliers, res_after, res_before)
        _tile_qc(tiles, tp, g["min_inliers"])
        result = {**base, "status": "ok" if model else "failed", "reason": reason,
                  **self.accuracy(model, prior, tp)}
        return self.finish(result, tiles, tp, model)

    def accuracy(self, model: GlobalModel | None, prior: np.ndarray, tp: geo.TiePoints) -> dict[str, Any]:
        px = self.sar.pixel_size or 0.0
        inl = tp.inlier
        before, after = geo.rmse(tp.prior_residual_px[inl]), geo.rmse(tp.residual_px[inl])
        d: dict[str, Any] = {"tiepoints": int(len(tp.optical_px)), "inliers": int(inl.sum()),
                             "rmse_before_px": before, "rmse_after_px": after,
                             "rmse_before_m": before * px if before is not None and px else None,
                             "rmse_after_m": after * px if after is not None and px else None,
                             "rmse_note": "over global inliers, SAR-grid px; before = prior, after = fitted model"}
        if model:
            d.update(transform=model.matrix.tolist(), global_model=model.to_dict(),
                     map_transform=_list(geo.map_transform(model.matrix, self.opt, self.sar)))
        return d

    def base_result(self, prior: np.ndarray | None, kind: str) -> dict[str, Any]:
        return {"status": "pending", "reason": "", "model": self.options.model, "transform": None,
                "transform_convention": "optical (x, y) px -> SAR-grid (x, y) px; pixel centres at integers",
                "prior": {"kind": kind, "transform": _list(prior)},
                "map_convention": "map coordinates in the optical CRS; pixel centre (x, y) -> A * (x + 0.5, y + 0.5)",
                "optical": self.opt.to_dict(), "sar": self.sar_file.to_dict(),
                "sar_grid": {"reprojected_to_optical_crs": self.reprojected, **self.sar.to_dict()},
                "config": {"preset": getattr(self.matcher, "preset", None), "scene": asdict(self.options)}}

    def finish(self, result: dict[str, Any], tiles: list[Tile], tp: geo.TiePoints | None = None,
               model: GlobalModel | None = None) -> dict[str, Any]:
        self.say("writing outputs")
        t0 = time.perf_counter()
        outputs = self.write_products(tiles, tp, model) if tp is not None else {}
        self.timings["write"] = time.perf_counter() - t0
        self.timings["total"] = time.perf_counter() - self.t_start
        result.update(tile_qc=[asdict(t) for t in tiles], timings=self.timings, outputs=outputs,
                      peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      promptmid_version=__version__)
        result["outputs"]["result"] = "result.json"
        write_json(self.out / "result.json", result)
        return result

    def write_products(self, tiles: list[Tile], tp: geo.TiePoints, model: GlobalModel | None) -> dict[str, str]:
        out: dict[str, str] = {"tiepoints_csv": "tiepoints.csv", "tiepoints_geojson": "tiepoints.geojson"}
        geo.write_tiepoints_csv(self.out / out["tiepoints_csv"], tp, self.opt, self.sar)
        geo.write_tiepoints_geojson(self.out / out["tiepoints_geojson"], tp, self.opt, self.sar)
        if self.options.figures:
            out["tile_map"] = "tile_map.png"
            plot_tile_map(self.out / out["tile_map"], self.opt_ds, tiles, tp)
        if model is None:
            return out
        if self.opt.georeferenced and tp.inlier.any():
            out["gcp_vrt"] = "sar_gcps.vrt"
            map_xy = geo.pixel_to_map(self.opt.transform, tp.optical_px[tp.inlier])
            geo.write_gcp_vrt(self.out / out["gcp_vrt"], self.sar_path, self.sar_file, tp.sar_file_px[tp.inlier],
                              map_xy, self.opt.crs)
        out["registered_sar"] = "registered_sar.tif"
        write_registered_scene(self.out / out["registered_sar"], model, self.opt, self.sar_ds, self.options.block)
        return out


def _tile_qc(tiles: list[Tile], tp: geo.TiePoints, min_inliers: int) -> None:
    """Per-tile global inliers and RMSE; a tile whose matches the global fit rejects becomes ``rejected``."""
    for t in tiles:
        mine = tp.tile == t.index
        t.global_inliers = int((mine & tp.inlier).sum())
        if t.global_inliers:
            t.rmse_px = geo.rmse(tp.residual_px[mine & tp.inlier])
        if t.status == "ok" and t.global_inliers < min(min_inliers, t.inliers):
            t.status, t.reason = "rejected", "tile fit disagrees with the global model"


def _list(m: np.ndarray | None) -> list | None:
    return None if m is None else np.asarray(m).tolist()
