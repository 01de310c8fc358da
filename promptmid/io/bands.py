"""Band choice: which bands of a multi-band file the models see (README section "Bands")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from promptmid.errors import InputError

if TYPE_CHECKING:  # annotations only: band choice needs no file reading
    from promptmid.io.raster import Modality, RasterImage


S2_RGB_BY_COUNT = {12: (4, 3, 2), 13: (4, 3, 2)}  # Sentinel-2 L2A (12 bands, no B10) / L1C (13): B04, B03, B02
COLOUR_NAMES = {"red": "red", "green": "green", "blue": "blue", "b04": "red", "b4": "red", "b03": "green",
                "b3": "green", "b02": "blue", "b2": "blue"}  # band descriptions (Sentinel-2 / Landsat 8-9 names)
CO_POL = ("vv", "hh")  # dual-pol SAR: the co-polarised band is used


@dataclass(frozen=True)
class BandChoice:
    """Which bands of a file are used, and why.

    Attributes:
        bands: 1-based band numbers (as GDAL) given to the models, in order (optical: red, green, blue or one
            gray band; SAR: one band, or several averaged in power / in dB).
        alpha: 1-based band used as a validity mask (colour interpretation ``alpha``; 0 = invalid), or ``None``.
        rule: how the choice was made (``"user"``, ``"colour interpretation"``, ``"band descriptions"``, ...).
        names: the descriptions of the chosen bands (empty strings where the file has none).
    """

    bands: tuple[int, ...]
    alpha: int | None
    rule: str
    names: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"bands": list(self.bands), "alpha": self.alpha, "rule": self.rule, "names": list(self.names)}


def parse_bands(text: str | Sequence[int] | None) -> tuple[int, ...] | None:
    """``"4,3,2"`` (1-based, as GDAL) or a sequence of ints -> ``(4, 3, 2)``; ``None``/empty -> ``None``.

    Raises:
        InputError: not a comma-separated list of positive integers.
    """
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        bands = tuple(int(str(b).strip()) for b in items)
    except ValueError:
        raise InputError(f"Cannot parse band list {text!r}; use 1-based band numbers, e.g. '4,3,2'.") from None
    if not bands or min(bands) < 1:
        raise InputError(f"Band numbers are 1-based (as GDAL); got {text!r}.")
    return bands


def choose_bands(raster: RasterImage, modality: Modality, requested: str | Sequence[int] | None = None) -> BandChoice:
    """The bands of ``raster`` to use for ``modality`` (see the README section "Bands").

    Optical: ``requested`` (1 or 3 bands) if given; else red/green/blue by colour interpretation, else by band
    descriptions (``B04,B03,B02`` / ``red,green,blue``), else by count: 1-2 bands -> band 1 (gray),
    3-4 -> bands 1,2,3 (RGB, RGBA, RGBN), 12-13 -> 4,3,2 (Sentinel-2 L2A / L1C order).
    SAR: ``requested`` (any number of bands, averaged) if given; else the co-polarised band (description
    ``VV`` or ``HH``), else band 1 of a 2-band file (dual-pol products put the co-pol band first), else every
    band of a 1-4 band file (averaged). A band is an alpha mask only when its colour interpretation says so.

    Raises:
        InputError: a band number beyond the file's count, or a band layout that cannot be guessed.
    """
    count, name = raster.data.shape[-1], raster.label
    colour = [c.lower() for c in raster.colorinterp] if len(raster.colorinterp) == count else [""] * count
    desc = [(d or "") for d in raster.descriptions] if len(raster.descriptions) == count else [""] * count
    alpha = next((i + 1 for i, c in enumerate(colour) if c == "alpha"), None)
    wanted = parse_bands(requested)
    if wanted:
        flag = "--optical-bands" if modality == "optical" else "--sar-bands"
        if max(wanted) > count:
            raise InputError(f"{name} has {count} bands; {flag} asks for band {max(wanted)}.")
        if modality == "optical" and len(wanted) not in (1, 3):
            raise InputError(f"{flag} takes 1 (gray) or 3 (red,green,blue) bands; got {len(wanted)}.")
        bands, rule = wanted, "user"
    else:
        usable = [i + 1 for i in range(count) if i + 1 != alpha]
        bands, rule = (_auto_optical if modality == "optical" else _auto_sar)(usable, colour, desc, name)
    return BandChoice(tuple(bands), alpha if alpha not in bands else None, rule, tuple(desc[b - 1] for b in bands))


def _auto_optical(usable: list[int], colour: list[str], desc: list[str], name: str) -> tuple[list[int], str]:
    for names, rule in ((colour, "colour interpretation"), ([COLOUR_NAMES.get(d.lower().strip(), "") for d in desc],
                                                              "band descriptions")):
        rgb = [names.index(c) + 1 if c in names else None for c in ("red", "green", "blue")]
        if all(rgb):
            return [int(b) for b in rgb], rule  # type: ignore[arg-type]
    n = len(usable)
    if n in (1, 2):
        return usable[:1], "gray (band 1)"
    if n in (3, 4):
        return usable[:3], "bands 1,2,3 as red, green, blue"
    if n in S2_RGB_BY_COUNT:
        return list(S2_RGB_BY_COUNT[n]), f"Sentinel-2 order ({n} bands): B04, B03, B02"
    raise InputError(f"{name} has {n} bands and no red/green/blue colour interpretation or band descriptions; "
                     f"say which to use with --optical-bands, e.g. '4,3,2'.")


def _auto_sar(usable: list[int], colour: list[str], desc: list[str], name: str) -> tuple[list[int], str]:
    for pol in CO_POL:
        hit = [b for b in usable if desc[b - 1].strip().lower() == pol]
        if hit:
            return hit[:1], f"co-polarised band ({pol.upper()}) by band description"
    n = len(usable)
    if n == 2:
        return usable[:1], "band 1 of 2 (dual-pol: co-polarised band first)"
    if 1 <= n <= 4:
        return usable, "all bands" if n > 1 else "single band"
    raise InputError(f"{name} has {n} bands and no VV/HH band description; say which to use with --sar-bands, "
                     f"e.g. '1'.")
