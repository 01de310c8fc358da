"""The scene pipeline: :func:`estimate_scene` (prior, tiles, per-tile matching, global fit) and
:func:`write_scene` (products), kept apart so that a fit can be applied to any raster later;
:func:`register_scene` does both.
"""

from __future__ import annotations

import dataclasses
import resource
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from promptmid import __version__, geo
from promptmid.errors import InputError
from promptmid.geometry import apply_transform
from promptmid.io import choose_bands
from promptmid.outputs import refuse_inputs_among_products, staged_products, write_json
from promptmid.scene import agreement
from promptmid.scene.agreement import Agreement
from promptmid.scene.grid import Tile, scene_tiles, select_tiles, spread_order
from promptmid.scene.matching import SceneMatches, coarse_prior, match_tile
from promptmid.scene.model import GlobalModel
from promptmid.scene.windows import READ_CACHE_MB, trim_heap, window_raster
from promptmid.scene.products import (
    TiePoints,
    plot_tile_map,
    write_gcp_vrt,
    write_registered_scene,
    write_tiepoints_csv,
    write_tiepoints_geojson,
)


GRIDS = ("optical", "utm")  # working grids of a scene (SceneOptions.grid)


@dataclass
class SceneOptions:
    """Settings of :func:`register_scene` (sizes in optical pixels unless stated)."""

    tile: int = 1024
    overlap: int = 128
    max_tiles: int | None = 64
    settle: int | None = 12  # stop matching tiles once this many agree on a global model and spread over the
    # selected tiles (tiles are matched in spread order, grid.spread_order); None / 0: match all selected tiles
    model: str = "affine"
    geo_prior: bool = True
    search_radius: str = "auto"  # "64px", "500m", a bare number (metres if georeferenced) or "auto" (geo.AUTO_RADIUS_*)
    overview_side: int = 1024  # coarse prior / figure resolution when there is no geo prior
    agree_px: float | None = None  # tile fits within this RMS distance (SAR px) of the global model agree;
    # None = twice the matcher's inlier threshold
    area_shift: bool = True  # check each tile's keypoint fit against a whole-tile area-based shift (scene/shift.py)
    max_distortion: float = 0.05  # geo prior: reject tile fits whose scale/shear/rotation differ more from it
    block: int = 1024  # output block side
    figures: bool = True
    report: bool = True  # report.html (promptmid.report)
    grid: str = "optical"  # work (and write) on the optical grid, or "utm": the optical reprojected to its local UTM zone


@dataclass
class SceneResult:
    """What :func:`estimate_scene` found for one optical/SAR scene pair.

    Attributes:
        status: the scene's verdict (:func:`promptmid.scene.agreement.scene_verdict`): ``"ok"`` (the tiles agree and
            an agreeing tile's keypoint fit has QC verdict ok), ``"uncertain"`` (a model the tiles agree on, but no
            such fit: check it; ``reason`` says why) or ``"failed"`` (then ``reason`` says why and there is no
            model; a model the tiles did not agree on is kept in ``info["rejected_model"]`` for inspection).
        confidence: the highest QC confidence among the agreeing tiles, in [0, 1].
        model: the global optical px -> SAR-grid px model (affine or poly2), or ``None``.
        tiepoints: merged tie points with global-fit inliers and residuals (``None`` without a prior).
        tiles: every processed tile with its QC numbers, own fit, disagreement with the model and prior departure
            (a per-tile verdict can be attached to each).
        agreement: how well the tiles agree (:class:`~promptmid.scene.agreement.Agreement`), ``None`` before tiling.
        prior: 3x3 optical px -> SAR-grid px prior, or ``None``; ``prior_kind`` ``"geo"`` or ``"coarse"``.
        info: the rest of ``result.json`` (image descriptions, accuracy, tile counts, config).
        timings: seconds per stage.
    """

    status: str
    reason: str
    model: GlobalModel | None
    tiepoints: TiePoints | None
    tiles: list[Tile]
    prior: np.ndarray | None
    prior_kind: str
    info: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    agreement: Agreement | None = None
    confidence: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def has_transform(self) -> bool:
        """A model was fitted (status ``ok`` or ``uncertain``)."""
        return self.model is not None

    @property
    def transform(self) -> np.ndarray | None:
        """3x3 optical px -> SAR-grid px (the affine part for ``poly2``), or ``None``."""
        return None if self.model is None else self.model.matrix

    @property
    def fit(self) -> Any:
        """The :class:`promptmid.fit.Fit` record (``None`` before the grids are known)."""
        from promptmid.fit import Fit

        if not isinstance(self.info.get("optical"), dict) or not isinstance(self.info.get("sar"), dict):
            return None
        block = self.info.get("config", {}).get("scene", {}).get("block", 1024)
        reprojected = bool(self.info.get("sar_grid", {}).get("reprojected_to_optical_crs", False))
        return Fit("scene", self.status, self.transform, self.model, geo.Grid.from_dict(self.info["optical"]),
                   geo.Grid.from_dict(self.info["sar"]), self.confidence, self.reason, {}, reprojected, block)

    def to_dict(self) -> dict[str, Any]:
        """The ``result.json`` content (the :class:`promptmid.fit.Fit` record's keys first)."""
        fit = self.fit
        record = fit.to_dict() if fit is not None else {
            "status": self.status, "confidence": self.confidence, "reason": self.reason,
            "transform": _list(self.transform), "global_model": None if self.model is None else self.model.to_dict()}
        return {**record, **self.info,
                "transform_convention": "optical (x, y) px -> SAR-grid (x, y) px; pixel centres at integers",
                "prior": {"kind": self.prior_kind, "transform": _list(self.prior)},
                "map_convention": "map coordinates in the optical CRS; pixel centre (x, y) -> A * (x + 0.5, y + 0.5)",
                "agreement": None if self.agreement is None else self.agreement.to_dict(),
                "tile_qc": [asdict(t) for t in self.tiles], "timings": dict(self.timings),
                "outputs": dict(self.outputs),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "promptmid_version": __version__}


@dataclass
class _Scene:
    """The opened rasters of a pair (see :func:`open_scene`)."""

    opt_ds: Any  # the optical as worked on: on its local UTM grid with ``grid="utm"``
    sar_ds: Any  # the SAR as matched: in the optical CRS when reprojected
    opt: geo.Grid
    sar_file: geo.Grid
    sar: geo.Grid
    reprojected: bool
    opt_file: geo.Grid | None = None  # the optical file's own grid when it was reprojected (``grid="utm"``)


@contextmanager
def open_scene(optical: str | Path, sar: str | Path, geo_prior: bool = True, grid: str = "optical") -> Iterator[_Scene]:
    """Open both rasters (GDAL block cache at most :data:`READ_CACHE_MB`); with ``grid="utm"`` the optical is read through a WarpedVRT on its local UTM grid
    (:func:`promptmid.geo.optical_on_utm`); with ``geo_prior`` the SAR is read through a WarpedVRT in the
    (working) optical CRS when the CRSs differ. Closed on exit.

    Raises:
        InputError: unreadable rasters, an unknown ``grid``, or a reprojection that is impossible.
    """
    import rasterio

    if grid not in GRIDS:
        raise InputError(f"Unknown grid {grid!r}; valid: {', '.join(GRIDS)}.")
    with rasterio.Env(GDAL_CACHEMAX=READ_CACHE_MB), geo.open_raster(optical) as opt_file_ds, \
            geo.open_raster(sar) as sar_file_ds:
        opt_ds, opt_warped = geo.optical_on_utm(opt_file_ds) if grid == "utm" else (opt_file_ds, False)
        opt_info, sar_file = geo.geo_info(opt_ds), geo.geo_info(sar_file_ds)
        sar_ds, reprojected = geo.sar_in_optical_crs(sar_file_ds, opt_info) if geo_prior else (sar_file_ds, False)
        try:
            yield _Scene(opt_ds, sar_ds, opt_info, sar_file, geo.geo_info(sar_ds), reprojected,
                         geo.geo_info(opt_file_ds) if opt_warped else None)
        finally:
            if reprojected:
                sar_ds.close()
            if opt_warped:
                opt_ds.close()


SCENE_PRODUCTS = ("result.json", "tiepoints.csv", "tiepoints.geojson", "tile_map.png", "sar_gcps.vrt",
                  "registered_sar.tif", "report.html")  # every file :func:`register_scene` may write into its output directory


def register_scene(optical: str | Path, sar: str | Path, out_dir: Path, matcher: Any,
                   options: SceneOptions | None = None,
                   progress: Callable[[str], None] | None = None) -> SceneResult:
    """Register a (large, possibly georeferenced) SAR scene to an optical scene, tile by tile, and write
    the products (:func:`estimate_scene` then :func:`write_scene`).

    Args:
        optical, sar: raster paths (any size; read in windows).
        out_dir: existing output directory (see :func:`promptmid.outputs.prepare_out_dir`).
        matcher: a :class:`promptmid.api.Matcher` used on each tile.

    Returns:
        the :class:`SceneResult` (``result.json`` = its ``to_dict()``, also written).
    Raises:
        InputError: unreadable inputs, bad options, or no overlap.
        OutputExistsError: an input is one of the products (exit 3).
    """
    options = options or SceneOptions()
    refuse_inputs_among_products(out_dir, optical, sar, products=SCENE_PRODUCTS)
    t_start = time.perf_counter()
    result = estimate_scene(optical, sar, matcher, options, progress)
    with staged_products(Path(out_dir), SCENE_PRODUCTS) as staging:  # complete or not at all, nothing stale
        write_scene(result, optical, sar, staging, options, progress)
        result.timings["total"] = time.perf_counter() - t_start
        if options.report:
            result.outputs["report"] = "report.html"
            write_scene_report(staging / "report.html", result, optical, sar, options)
        write_json(staging / "result.json", result.to_dict())
    return result


def write_scene_report(path: Path, result: SceneResult, optical: str | Path, sar: str | Path,
                       options: SceneOptions) -> None:
    """``report.html`` of a scene (:mod:`promptmid.report`): verdict, viewer of the optical overview against the
    SAR under the model and under the prior, tie points by residual, tile map and table, numbers of the run."""
    from promptmid import report

    data = result.to_dict()
    layers: dict[str, Any] = {}
    to_full = np.eye(3)
    with open_scene(optical, sar, options.geo_prior, options.grid) as sc:
        bands = result.info.get("bands", {}).get("optical", {}).get("bands")
        layers, to_full = report.scene_layers(sc.opt_ds, sc.sar_ds, result.model, result.prior, bands)
    tile_map = path.parent / result.outputs["tile_map"] if "tile_map" in result.outputs else None
    report.write_page(path, "promptmid scene report",
                      report.scene_page(data, layers, to_full, result.tiepoints, result.model, tile_map))


def estimate_scene(optical: str | Path, sar: str | Path, matcher: Any, options: SceneOptions | None = None,
                   progress: Callable[[str], None] | None = None) -> SceneResult:
    """Prior, tiles, per-tile matching and the global fit; writes nothing."""
    options = options or SceneOptions()
    say = progress or (lambda _m: None)
    with open_scene(optical, sar, options.geo_prior, options.grid) as sc:
        say("computing the prior")
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        prior, kind, reason = _prior(sc, matcher, options)
        timings["prior"] = time.perf_counter() - t0
        info = _base_info(sc, matcher, options)
        if prior is None:
            return SceneResult("failed", reason, None, None, [], None, kind, info, timings)
        bbox = geo.overlap_bbox(prior, (sc.opt.width, sc.opt.height), (sc.sar.width, sc.sar.height))
        if bbox is None:
            raise InputError("The optical and SAR images do not overlap (under the prior).")
        io_conf = getattr(matcher, "conf", {}).get("io", {})
        grid = scene_tiles(bbox, options.tile, options.overlap, io_conf.get("max_side"))
        selected = spread_order(select_tiles(grid, options.max_tiles))
        mpp = sc.opt.metres_per_pixel
        margin = int(np.ceil(geo.parse_search_radius(options.search_radius, min(mpp) if mpp else None)))
        margin = min(margin, max(sc.opt.width, sc.opt.height, sc.sar.width, sc.sar.height))  # never beyond the scene
        t0 = time.perf_counter()
        found, tiles = _match_tiles(sc, matcher, selected, prior, margin, options, say)
        timings["tiles"] = time.perf_counter() - t0
        info.update(overlap_bbox_px=list(bbox), search_radius_px=margin,
                    tiles={"grid": len(grid), "selected": len(selected), "processed": len(tiles),
                           "settled": len(tiles) < len(selected), "settle": options.settle,
                           "tile": options.tile, "overlap": options.overlap, "max_tiles": options.max_tiles,
                           "single_tile_up_to_px": io_conf.get("max_side")})
        say("global fit")
        model, tp, reason, agreed = _fit(sc, matcher, options, tiles, found, prior, margin)
        info.update(_accuracy(sc, model, tp, prior, tiles))
        verdict, confidence, reason = agreement.scene_verdict(model is not None, agreed, tiles, reason)
        if model is not None and verdict == "failed":
            info["rejected_model"] = model.to_dict()
            model = None
        return SceneResult(verdict, reason, model, tp, tiles, prior, kind, info, timings, agreement=agreed,
                           confidence=confidence)


def write_scene(result: SceneResult, optical: str | Path, sar: str | Path, out_dir: Path,
                options: SceneOptions | None = None, progress: Callable[[str], None] | None = None) -> dict[str, str]:
    """Write the products of ``result`` for the rasters ``optical``/``sar`` into ``out_dir`` (tie points,
    figure, GCP VRT and the registered SAR when there is a model); records them in ``result.outputs``."""
    options = options or SceneOptions()
    (progress or (lambda _m: None))("writing outputs")
    t0 = time.perf_counter()
    out: dict[str, str] = {}
    tp = result.tiepoints
    if tp is not None:
        with open_scene(optical, sar, options.geo_prior, options.grid) as sc:
            out = _write_products(sc, result, Path(sar), out_dir, options)
    out["result"] = "result.json"
    result.outputs = out
    result.timings["write"] = time.perf_counter() - t0
    return out


def _prior(sc: _Scene, matcher: Any, options: SceneOptions) -> tuple[np.ndarray | None, str, str]:
    if options.geo_prior and sc.opt.georeferenced and sc.sar.georeferenced:
        return geo.geo_prior(sc.opt, sc.sar), "geo", ""
    p, reason = coarse_prior(matcher, sc.opt_ds, sc.sar_ds, options.overview_side)
    return p, "coarse", reason


def _rule(sc: _Scene, matcher: Any, options: SceneOptions, margin: int) -> agreement.Rule:
    """The scene's :class:`~promptmid.scene.agreement.Rule`: ``agree_px`` (default twice the matcher's inlier
    threshold), prior limit = search radius + threshold, distortion check with a georeferenced prior only."""
    g = matcher.conf["geometry"]
    geo_prior = options.geo_prior and sc.opt.georeferenced and sc.sar.georeferenced
    return agreement.Rule(options.agree_px or 2.0 * g["threshold"], margin + g["threshold"],
                          options.max_distortion if geo_prior else None, options.model, g["threshold"],
                          g["min_inliers"])


def _match_tiles(sc: _Scene, matcher: Any, tiles: list[Tile], prior: np.ndarray, margin: int,
                 options: SceneOptions, say: Callable[[str], None]) -> tuple[SceneMatches, list[Tile]]:
    """Match ``tiles`` in order until they all are or, with ``options.settle``, until the scene settles
    (:func:`promptmid.scene.agreement.settled`); returns the tie points and the tiles matched."""
    found, done = SceneMatches(), []
    fill = sc.sar.nodata if sc.sar.nodata is not None else 0.0
    rule = _rule(sc, matcher, options, margin)
    for i, tile in enumerate(tiles):
        say(f"matching tile {i + 1}/{len(tiles)}" + (f" (stops once {options.settle} agree)" if options.settle else ""))
        match_tile(matcher, sc.opt_ds, sc.sar_ds, prior, tile, margin, fill, found, options.area_shift, rule.agree_px)
        done.append(tile)
        trim_heap()
        if i + 1 < len(tiles) and agreement.settled(done, tiles, prior, rule, options.settle):
            break
    return found, done


def _fit(sc: _Scene, matcher: Any, options: SceneOptions, tiles: list[Tile], found: SceneMatches,
         prior: np.ndarray, margin: int) -> tuple[GlobalModel | None, TiePoints, str, Agreement]:
    """The global model (:func:`promptmid.scene.agreement.agreeing_model`) and the tie points: inliers when they lie
    within the inlier threshold of the model and belong to an agreeing tile."""
    p0, p1, scores, tile_idx, _ = found.arrays()
    rule = _rule(sc, matcher, options, margin)
    model, reason, agreed = agreement.agreeing_model(tiles, prior, rule)
    res_after = np.linalg.norm(model.apply(p0) - p1, axis=1) if model else np.full(len(p0), np.nan)
    res_before = np.linalg.norm(apply_transform(prior, p0) - p1, axis=1) if len(p0) else np.zeros(0)
    inliers = np.isin(tile_idx, agreed.agreeing) & (res_after < rule.threshold)
    tp = TiePoints(p0, p1, geo.sar_grid_to_file_pixels(p1, sc.sar, sc.sar_file), tile_idx, scores,
                   inliers, res_after, res_before)
    agreement.tile_qc(tiles, tp)
    if model is None:
        reason = f"{reason}; {tile_reasons(tiles)}"
    elif not agreed.ok:
        reason = f"{agreed.reason}; {tile_reasons(tiles)}"
    return model, tp, reason, agreed


def tile_reasons(tiles: list[Tile], most: int = 3) -> str:
    """One line on why tiles gave no tie points: ``"4 tiles: 3 empty (...), 1 failed (...)"``."""
    from collections import Counter

    counts = Counter((t.status, t.reason) for t in tiles if t.status != "ok")
    parts = [f"{n} {status} ({why})" if why else f"{n} {status}" for (status, why), n in counts.most_common(most)]
    ok = sum(t.status == "ok" for t in tiles)
    return f"{len(tiles)} tiles, {ok} ok" + (": " + ", ".join(parts) if parts else "")


def _accuracy(sc: _Scene, model: GlobalModel | None, tp: TiePoints, prior: np.ndarray,
              tiles: list[Tile]) -> dict[str, Any]:
    """RMSE over the global inliers that were MEASURED (keypoint tie points; the grid points of an area-shift tile
    lie on its fit by construction and are left out) under the prior and the fitted model, and the correction
    (RMS distance between the model and the prior over the agreeing tiles), in SAR-grid px and in ground metres
    (per-axis metres per pixel at the scene centre: correct for geographic CRSs too)."""
    shifted = [t.index for t in tiles if t.method == "area shift"]
    inl = tp.inlier & ~np.isin(tp.tile, shifted)
    p0, p1 = tp.optical_px[inl], tp.sar_px[inl]
    mpp = sc.sar.metres_per_pixel
    m_before = geo.residuals_m(apply_transform(prior, p0) - p1, mpp)
    m_after = geo.residuals_m(model.apply(p0) - p1, mpp) if model is not None else None
    agreeing = [t for t in tiles if t.agrees]
    grid = np.concatenate([t.grid_points() for t in agreeing]) if agreeing else np.zeros((0, 2))
    moved = model.apply(grid) - apply_transform(prior, grid) if model is not None else np.zeros((0, 2))
    m_moved = geo.residuals_m(moved, mpp)
    d: dict[str, Any] = {"tiepoints": int(len(tp.optical_px)), "inliers": int(tp.inlier.sum()),
                         "measured_inliers": int(inl.sum()),
                         "rmse_before_px": geo.rmse(tp.prior_residual_px[inl]),
                         "rmse_after_px": geo.rmse(tp.residual_px[inl]),
                         "rmse_before_m": geo.rmse(m_before) if m_before is not None else None,
                         "rmse_after_m": geo.rmse(m_after) if m_after is not None else None,
                         "correction_px": geo.rmse(np.linalg.norm(moved, axis=1)) if len(moved) else None,
                         "correction_m": geo.rmse(m_moved) if m_moved is not None else None,
                         "sar_metres_per_pixel": list(mpp) if mpp else None,
                         "rmse_note": "over measured global inliers (keypoint tie points of agreeing tiles), SAR-grid "
                                      "px; before = prior, after = fitted model; correction = RMS distance model vs "
                                      "prior over the agreeing tiles; metres from the SAR grid's ground pixel size "
                                      "(x, y) at the scene centre"}
    if model:
        d["map_transform"] = _list(geo.map_transform(model.matrix, sc.opt, sc.sar))
    return d


def band_choices(sc: _Scene, matcher: Any) -> dict[str, dict[str, Any]]:
    """The bands every window of each image will use (:func:`promptmid.io.choose_bands` with the matcher's
    ``io.optical_bands`` / ``io.sar_bands``), checked once before any tile is read.

    Raises:
        InputError: a requested band the file does not have, or a layout that cannot be guessed.
    """
    io_conf = getattr(matcher, "conf", {}).get("io", {})
    out = {}
    for modality, ds in (("optical", sc.opt_ds), ("sar", sc.sar_ds)):
        stub = dataclasses.replace(window_raster(np.zeros((0, 0, ds.count), ds.dtypes[0]), ds), path=Path(ds.name))
        out[modality] = choose_bands(stub, modality, io_conf.get(f"{modality}_bands")).to_dict()
    return out


def _base_info(sc: _Scene, matcher: Any, options: SceneOptions) -> dict[str, Any]:
    return {"model": options.model, "bands": band_choices(sc, matcher), "optical": sc.opt.to_dict(),
            "optical_file": (sc.opt_file or sc.opt).to_dict(), "grid": options.grid, "sar": sc.sar_file.to_dict(),
            "sar_grid": {"reprojected_to_optical_crs": sc.reprojected, **sc.sar.to_dict()},
            "config": {"preset": getattr(matcher, "preset", None), "scene": asdict(options)}}


def _write_products(sc: _Scene, result: SceneResult, sar_path: Path, out_dir: Path,
                    options: SceneOptions) -> dict[str, str]:
    tp, model = result.tiepoints, result.model
    assert tp is not None
    out: dict[str, str] = {"tiepoints_csv": "tiepoints.csv", "tiepoints_geojson": "tiepoints.geojson"}
    write_tiepoints_csv(out_dir / out["tiepoints_csv"], tp, sc.opt, sc.sar)
    write_tiepoints_geojson(out_dir / out["tiepoints_geojson"], tp, sc.opt, sc.sar)
    if options.figures:
        out["tile_map"] = "tile_map.png"
        plot_tile_map(out_dir / out["tile_map"], sc.opt_ds, result.tiles, tp,
                      result.info.get("bands", {}).get("optical", {}).get("bands"),
                      verdict=f"{result.status} (confidence {result.confidence:.2f})")
    if model is None:
        return out
    if sc.opt.georeferenced and tp.inlier.any():
        out["gcp_vrt"] = "sar_gcps.vrt"
        map_xy = geo.pixel_to_map(sc.opt.transform, tp.optical_px[tp.inlier])
        write_gcp_vrt(out_dir / out["gcp_vrt"], sar_path, sc.sar_file, tp.sar_file_px[tp.inlier], map_xy, sc.opt.crs)
    out["registered_sar"] = "registered_sar.tif"
    write_registered_scene(out_dir / out["registered_sar"], model, sc.opt, sc.sar_ds, options.block)
    return out


def _list(m: np.ndarray | None) -> list | None:
    return None if m is None else np.asarray(m).tolist()
