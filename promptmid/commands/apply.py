"""CLI: ``promptmid apply RESULT.json RASTER --out OUT.tif`` (a thin layer over :mod:`promptmid.apply`)."""

from __future__ import annotations

from pathlib import Path

import typer

from promptmid.commands.common import OverwriteOpt, QuietOpt, add_command, out_console


def apply(
    result: Path = typer.Argument(..., help="result.json of `promptmid match` or `promptmid scene`."),
    raster: Path = typer.Argument(..., help="Raster on the SAR grid (other bands, masks, the product) or on the "
                                            "optical grid."),
    out: Path = typer.Option(..., "--out", "-o", help="Output GeoTIFF."),
    source: str = typer.Option("auto", "--from", help="Grid RASTER is on: auto (by size; the SAR grid when both "
                                                      "images have the same size) | sar | optical."),
    cog: bool = typer.Option(False, "--cog", help="Write a cloud-optimised GeoTIFF (GDAL COG driver)."),
    overwrite: bool = OverwriteOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Apply a fitted result to RASTER: SAR grid -> optical grid (as registered_sar.tif), or optical grid -> SAR
    grid through the inverse transform."""
    from promptmid.apply import apply_fit
    from promptmid.fit import read_fit

    done = apply_fit(read_fit(result), raster, out, source, cog, overwrite, inputs=(result,))
    if not quiet:
        out_console.print(f"{raster} ({done['from']} grid) -> {out} ({done['to']} grid, {done['size'][0]}x"
                          f"{done['size'][1]} px{', COG' if cog else ''}; {done['fit']} result, status "
                          f"{done['status']})")


def register(app: typer.Typer) -> None:
    """Add ``apply`` to the app."""
    add_command(app, "apply", apply)
