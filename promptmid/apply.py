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

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from promptmid.errors import InputError, OutputExistsError
from promptmid.fit import Fit, read_fit
from promptmid.geo import Grid
from promptmid.geometry import Size

__all__ = ["DIRECTIONS", "Fit", "apply_fit", "read_fit"]

DIRECTIONS = ("auto", "sar", "optical")  # --from: which grid the raster is on
MAX_IN_MEMORY_PX = 2**28  # largest optical/SAR grid (px) a match fit is applied to (it is warped in memory)


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
            src, reprojected = sar_in_optical_crs(ds, fit.optical) if fit.reprojected else (ds, False)
            try:
                if fit.reprojected and geo_info(ds).crs != fit.sar.crs:
                    raise InputError(f"{raster} is not in the CRS of the scene's SAR ({fit.sar.crs}).")
                write_registered_scene(out, fit.model, fit.optical, src, fit.block)
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
