"""Apply a fitted result (``result.json`` of ``match`` or ``scene``) to any raster on either grid.

As AROSICS separates estimating a shift (``COREG``) from applying it (``DESHIFTER``), a fit is estimated once and
then applied to other bands, masks or the full-resolution product of the same acquisition:

* a raster on the **SAR grid** (the SAR image's size; for a scene, the SAR file) is resampled onto the optical grid,
  exactly as ``registered_sar.tif`` was written (the same writer: :func:`promptmid.registration.write_registered_sar`
  for ``match``, :func:`promptmid.scene.products.write_registered_scene` for ``scene``);
* a raster on the **optical grid** is resampled onto the SAR grid through the inverse transform (affine and
  homography fits; a ``poly2`` scene model has no closed-form inverse and is refused).

The grid is recognised by the raster's size (``--from`` decides when both images have the same size; ``auto``
then takes the SAR grid). Every transform maps optical pixel (x, y) -> SAR pixel (x, y), pixel centres at integers.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from promptmid.errors import InputError, OutputExistsError
from promptmid.geo import Grid
from promptmid.geometry import Size

DIRECTIONS = ("auto", "sar", "optical")  # --from: which grid the raster is on
MAX_IN_MEMORY_PX = 2**28  # largest optical/SAR grid (px) a match fit is applied to (it is warped in memory)


@dataclass
class Fit:
    """A fitted result read from ``result.json``.

    Attributes:
        kind: ``"match"`` or ``"scene"``; status: its status (``ok``, ``uncertain``, ...).
        matrix: 3x3 optical px -> SAR px (match: the fit; scene: the affine part of the global model).
        model: the scene's :class:`~promptmid.scene.model.GlobalModel` (``None`` for match).
        optical, sar: the two grids (for a scene, ``sar`` is the SAR file; ``reprojected`` says whether the scene
            matched it through a WarpedVRT in the optical CRS).
    """

    kind: str
    status: str
    matrix: np.ndarray
    model: Any
    optical: Grid
    sar: Grid
    reprojected: bool = False
    source: Grid | None = None  # the scene's optical grid with its bands (for write_registered_scene)
    block: int = 1024  # the scene's output block side (the same blocks give the same pixels)


def load_fit(path: str | Path) -> Fit:
    """Read a ``match`` or ``scene`` ``result.json``.

    Raises:
        InputError: missing or unreadable file, not a promptmid result, or no fitted transform in it.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"No result file at {path}.") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"Cannot read {path} as a promptmid result.json ({exc}).") from None
    if not isinstance(data, dict) or "transform" not in data:
        raise InputError(f"{path} is not a promptmid result.json (no 'transform').")
    if data["transform"] is None:
        raise InputError(f"{path} has no fitted transform (status {data.get('status')!r}: {data.get('reason', '')}).")
    return _scene_fit(data, path) if "global_model" in data else _match_fit(data, path)


def checked_transform(value: Any, path: Path, key: str = "transform") -> np.ndarray:
    """``value`` as a usable 3x3 optical px -> SAR px transform, or ``InputError`` naming ``path`` and ``key``: it
    must be a finite 3x3 matrix with a last row that keeps points finite, invertible, with a scale between 1e-4 and
    1e4 (SAR px per optical px) — anything else writes an all-nodata, constant or smeared raster."""
    try:
        m = np.asarray(value, np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{path}: '{key}' is not a numeric 3x3 matrix.") from None
    if m.shape != (3, 3) or not np.isfinite(m).all():
        raise InputError(f"{path}: '{key}' must be a finite 3x3 matrix; got shape {m.shape}.")
    if abs(m[2, 2]) < 1e-12:
        raise InputError(f"{path}: '{key}' has a zero last element (points map to infinity).")
    lin = m[:2, :2] / m[2, 2]
    det = float(np.linalg.det(lin))
    if not 1e-8 < abs(det) < 1e8 or abs(np.linalg.det(m)) < 1e-12:
        raise InputError(f"{path}: '{key}' is singular or has an implausible scale (|det| of its linear part "
                         f"{abs(det):.3g}; expected 1e-8..1e8).")
    return m


def _match_fit(data: dict[str, Any], path: Path) -> Fit:
    grids = data.get("grids")
    if not grids:
        raise InputError(f"{path} has no 'grids' (written by an older promptmid); rerun match to apply it.")
    if not isinstance(grids, dict):
        raise InputError(f"{path}: 'grids' is not a record of the optical and SAR grids.")
    return Fit("match", str(data.get("status")), checked_transform(data["transform"], path), None,
               Grid.from_dict(grids.get("optical"), f"{path}: 'grids.optical'"),
               Grid.from_dict(grids.get("sar"), f"{path}: 'grids.sar'"))


def _scene_fit(data: dict[str, Any], path: Path) -> Fit:
    model = _scene_model(data["global_model"], path)
    opt = Grid.from_dict(data.get("optical"), f"{path}: 'optical'")
    sar = Grid.from_dict(data.get("sar"), f"{path}: 'sar'")
    block = data.get("config", {}).get("scene", {}).get("block", 1024) if isinstance(data.get("config"), dict) else 1024
    if not (isinstance(block, int) and 16 <= block <= 65536):
        raise InputError(f"{path}: 'config.scene.block' must be a whole number of pixels in 16..65536.")
    reprojected = data.get("sar_grid", {}).get("reprojected_to_optical_crs") if isinstance(data.get("sar_grid"), dict) else False
    return Fit("scene", str(data.get("status")), checked_transform(model.matrix, path, "global_model"), model, opt, sar,
               bool(reprojected), opt, block)


def _scene_model(d: Any, path: Path) -> Any:
    """The scene's :class:`~promptmid.scene.model.GlobalModel`, checked (kind, coefficient counts, finite values,
    positive normalisation scale); ``InputError`` naming ``path`` and ``global_model`` otherwise."""
    from promptmid.scene.model import SCENE_MODELS, GlobalModel

    bad = InputError(f"{path}: 'global_model' is malformed (needs kind in {', '.join(SCENE_MODELS)}, coeffs_x and "
                     "coeffs_y of 3 (affine) or 6 (poly2) finite numbers, normalisation cx, cy, scale > 0).")
    try:
        model = GlobalModel.from_dict(d)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise bad from None
    n = {"affine": 3, "poly2": 6}.get(model.kind)
    if n is None or model.coeffs.shape != (2, n) or not np.isfinite(model.coeffs).all() \
            or not np.isfinite(model.norm).all() or model.norm[2] <= 0:
        raise bad
    return model


def apply_fit(fit: Fit, raster: str | Path, out: str | Path, direction: str = "auto", cog: bool = False,
              overwrite: bool = False, inputs: tuple[str | Path, ...] = ()) -> dict[str, Any]:
    """Resample ``raster`` (on the SAR or the optical grid of ``fit``) onto the other grid and write ``out``.

    The file is written beside ``out`` first and moved into place (complete or absent); ``cog`` writes a
    cloud-optimised GeoTIFF (GDAL's COG driver, DEFLATE).

    Returns:
        what was done: ``{"from": "sar"|"optical", "to": ..., "size": [w, h], "cog": bool}``.
    Raises:
        InputError: bad ``direction``, a raster on neither grid, or an optical-grid raster for a fit without an
            inverse; OutputExistsError: ``out`` exists (without ``overwrite``), or is the input raster or one of
            ``inputs`` (e.g. the result.json the fit was read from; never replaced, even with ``overwrite``).
    """
    from promptmid.geo import open_raster

    raster, out = Path(raster), Path(out)
    if direction not in DIRECTIONS:
        raise InputError(f"Unknown --from {direction!r}; valid: {', '.join(DIRECTIONS)}.")
    for given in (raster, *map(Path, inputs)):
        if out.exists() and given.exists() and out.resolve() == given.resolve():
            raise OutputExistsError(f"{out} is an input ({given}); choose another --out.")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} exists; pass --overwrite to replace it.")
    if not out.parent.is_dir():
        raise OutputExistsError(f"The folder of {out} does not exist.")
    with open_raster(raster) as ds:
        source = _which_grid(fit, Size(ds.width, ds.height), direction, raster)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tif")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        (_sar_to_optical if source == "sar" else _optical_to_sar)(fit, raster, tmp)
        if cog:
            _to_cog(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    target = fit.optical if source == "sar" else fit.sar
    return {"from": source, "to": "optical" if source == "sar" else "sar", "size": [target.width, target.height],
            "cog": cog, "fit": fit.kind, "status": fit.status}


def _which_grid(fit: Fit, size: Size, direction: str, path: Path) -> str:
    on = [name for name, grid in (("sar", fit.sar), ("optical", fit.optical)) if grid.size == size]
    if direction != "auto":
        if direction not in on:
            grid = fit.sar if direction == "sar" else fit.optical
            raise InputError(f"{path} is {size[0]}x{size[1]} px; the {direction} grid of this result is "
                             f"{grid.width}x{grid.height}.")
        return direction
    if not on:
        raise InputError(f"{path} is {size[0]}x{size[1]} px: on neither grid of this result (SAR "
                         f"{fit.sar.width}x{fit.sar.height}, optical {fit.optical.width}x{fit.optical.height}).")
    return on[0]  # both sizes equal: the SAR grid (use --from optical for the other way)


def _sar_to_optical(fit: Fit, raster: Path, out: Path) -> None:
    """The writer of ``registered_sar.tif`` itself, with this raster in place of the SAR image."""
    if fit.kind == "scene":
        from promptmid.geo import geo_info, open_raster, sar_in_optical_crs
        from promptmid.scene.products import write_registered_scene

        with open_raster(raster) as ds:
            src, reprojected = sar_in_optical_crs(ds, fit.source) if fit.reprojected else (ds, False)
            try:
                if fit.reprojected and geo_info(ds).crs != fit.sar.crs:
                    raise InputError(f"{raster} is not in the CRS of the scene's SAR ({fit.sar.crs}).")
                write_registered_scene(out, fit.model, fit.source, src, fit.block)
            finally:
                if reprojected:
                    src.close()
        return
    _write_match(fit.matrix, fit.optical, raster, out)


def _optical_to_sar(fit: Fit, raster: Path, out: Path) -> None:
    if fit.kind == "scene" and (fit.model.kind != "affine" or fit.reprojected):
        raise InputError("This scene result cannot be applied from the optical grid: only an affine model on the "
                         "SAR file's own grid has an exact inverse (resample the SAR onto the optical grid instead).")
    _write_match(np.linalg.inv(fit.matrix), fit.sar, raster, out)


def _write_match(matrix: np.ndarray, target: Grid, raster: Path, out: Path) -> None:
    """:func:`promptmid.registration.write_registered_sar` sampling ``raster`` at ``matrix @ p`` for every
    pixel ``p`` of ``target``."""
    from promptmid.io import read_raster
    from promptmid.registration import write_registered_sar

    if target.width * target.height > MAX_IN_MEMORY_PX:
        raise InputError(f"The target grid is {target.width}x{target.height} px, more than this writer holds in memory "
                         f"({MAX_IN_MEMORY_PX} px); register such scenes with `promptmid scene`, whose products are "
                         "written block by block.")

    write_registered_sar(out, matrix, target, read_raster(raster))


def _to_cog(path: Path) -> None:
    """Rewrite ``path`` in place as a cloud-optimised GeoTIFF (GDAL COG driver, DEFLATE, overviews)."""
    import rasterio.shutil

    cog = path.with_name(path.name + ".cog.tif")
    try:
        rasterio.shutil.copy(path, cog, driver="COG", COMPRESS="DEFLATE", BIGTIFF="IF_SAFER")
        shutil.move(cog, path)
    finally:
        cog.unlink(missing_ok=True)
