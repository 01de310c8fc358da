"""Reading and scaling images; every bad input raises a clear InputError."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from promptmid.errors import InputError
from promptmid.io import border_fill_mask, load_image, read_raster, sar_to_unit
from tests.conftest import write_tif


def test_reads_uint16_multiband_and_scales_to_unit(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(100, 4000, (64, 80, 4)).astype(np.uint16)
    img = load_image(write_tif(tmp_path / "o.tif", data), "optical")
    assert img.image.shape == (64, 80, 3) and img.image.dtype == np.float32
    assert 0.0 <= img.image.min() and img.image.max() <= 1.0
    assert img.original_size == (80, 64) and img.scale == (1.0, 1.0)


def test_sar_float_is_log_scaled(tmp_path):
    rng = np.random.default_rng(1)
    intensity = rng.gamma(1.0, 1.0, (64, 64)).astype(np.float32) * 1e-3
    img = load_image(write_tif(tmp_path / "s.tif", intensity), "sar")
    assert img.image.shape == (64, 64, 3)
    assert np.allclose(img.image[..., 0], img.image[..., 2])
    # log scaling spreads the heavy-tailed intensities: the median is not crushed to ~0
    assert np.median(img.image) > 0.3


def test_downscaling_keeps_pixel_scale_back_to_original():
    img = load_image(np.random.default_rng(2).random((400, 200)).astype(np.float32), "optical", max_side=100)
    assert img.image.shape[:2] == (100, 50)
    assert img.scale == (4.0, 4.0)
    # pixel-centre convention: working (0, 0) is the centre of the first 4x4 block
    assert np.allclose(img.to_original(np.array([[0.0, 0.0]])), [[1.5, 1.5]])
    assert np.allclose(img.scale_matrix() @ [0, 0, 1], [1.5, 1.5, 1])


def test_border_fill_is_masked():
    a = np.ones((100, 100), np.float32)
    a[:20, :20] = 0  # corner fill touching the border
    a[50, 50] = 0  # an interior zero is not fill
    fill = border_fill_mask(a)
    assert fill[:20, :20].all() and not fill[50, 50] and fill.sum() == 400


def test_nodata_value_is_respected(tmp_path):
    data = np.random.default_rng(3).random((64, 64)).astype(np.float32) + 1
    data[:, :10] = -9999
    img = load_image(write_tif(tmp_path / "n.tif", data, nodata=-9999), "sar")
    assert not img.valid[:, :10].any() and img.valid[:, 12:].all()


def test_sar_multiband_average_power():
    hh = np.full((40, 40), 3.0)
    hv = np.full((40, 40), 4.0)
    out = sar_to_unit(np.stack([hh, hv], -1).astype(np.float32) + np.random.default_rng(0).random((40, 40, 2)),
                      np.ones((40, 40), bool))
    assert out.shape == (40, 40)


def _write(path, content: bytes):
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing.tif", "No image"),
        (lambda p: _write(p / "empty.png", b""), "empty"),
        (lambda p: _write(p / "junk.tif", b"not an image at all"), "Cannot read"),
        (lambda p: write_tif(p / "five.tif", np.random.default_rng(0).random((64, 64, 5)).astype(np.float32)),
         "5 bands"),
        (lambda p: write_tif(p / "small.tif", np.random.default_rng(0).random((16, 16)).astype(np.float32)),
         "at least"),
        (lambda p: write_tif(p / "const.tif", np.full((64, 64), 7, np.uint8)), "constant"),
        (lambda p: write_tif(p / "nodata.tif", np.full((64, 64), -1, np.float32), nodata=-1), "no valid pixel"),
        (lambda p: p, "directory"),
    ],
)
def test_bad_inputs_raise_input_error(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(InputError, match=message):
        load_image(path, "sar")


def test_nan_as_nodata_masks_instead_of_failing(tmp_path):
    """NaN/inf in an optical image is refused unless --nan-as-nodata; in a SAR image it is always nodata."""
    data = np.random.default_rng(4).random((64, 64)).astype(np.float32) + 0.1
    data[:5] = np.nan
    data[10, 10] = np.inf
    path = write_tif(tmp_path / "nan.tif", data)
    with pytest.raises(InputError, match="NaN"):
        load_image(path, "optical")
    for img in (load_image(path, "optical", nan_as_nodata=True), load_image(path, "sar")):
        assert not img.valid[:5].any() and img.valid[20:].sum() > 40 * 60
        assert np.isfinite(img.image).all()
        assert img.valid[10, 10]  # an isolated NaN/inf pixel is filled from its neighbours (fill_holes)
    with pytest.raises(InputError, match="NaN"):  # all NaN: nothing left, and the message says NaN
        load_image(write_tif(tmp_path / "allnan.tif", np.full((64, 64), np.nan, np.float32)), "sar")


def test_scattered_nodata_is_filled_not_black(tmp_path):
    """Scattered NaN pixels of a float SAR become neither black specks nor holes in the valid mask: each is filled
    from its neighbourhood (no edge), while a large nodata area stays nodata."""
    rng = np.random.default_rng(3)
    data = 0.5 + 0.05 * rng.standard_normal((96, 96)).astype(np.float32)
    data[:, :20] = np.nan  # a swath edge: stays nodata
    specks = (rng.random(data.shape) < 0.05) & (np.arange(96)[None, :] > 24)
    data[specks] = np.nan
    img = load_image(write_tif(tmp_path / "specks.tif", data), "sar")
    assert not img.valid[:, :19].any() and img.valid[:, 26:].all()
    gray = img.image[..., 0]
    inside = gray[:, 30:]
    assert np.abs(gray[specks] - np.median(inside)).max() < 5 * inside.std()  # no black specks


def test_scattered_nan_in_float_sar_still_registers(demo_pair, matcher_xfeat):
    """5 % scattered NaN in a float SAR: the same transform (within 1.5 px) and most of the inliers stay."""
    from promptmid.geometry import Size, corner_error

    sar = demo_pair.sar.copy()
    sar[np.random.default_rng(0).random(sar.shape) < 0.05] = np.nan
    clean, specked = matcher_xfeat.match(demo_pair.optical, demo_pair.sar), matcher_xfeat.match(demo_pair.optical, sar)
    assert specked.status == "ok", specked.reason
    assert corner_error(specked.transform, demo_pair.H, Size(512, 512)).mean() < 1.5
    assert specked.num_inliers >= 0.7 * clean.num_inliers


def test_nan_nodata_value_in_db_sar_is_masked(tmp_path):
    """A Sentinel-1 dB product with nodata=NaN (NaN border) loads; the NaN border is invalid."""
    rng = np.random.default_rng(5)
    db = (10 * np.log10(rng.gamma(2.0, 0.05, (80, 80)))).astype(np.float32)
    db[:, :15] = np.nan
    img = load_image(write_tif(tmp_path / "s1.tif", db, nodata=np.nan), "sar")
    assert img.sar_scaling == "db" and not img.valid[:, :15].any() and img.valid[:, 16:].all()


def test_read_raster_keeps_georeferencing(tmp_path):
    from rasterio.transform import from_origin

    path = write_tif(tmp_path / "g.tif", np.ones((40, 50), np.uint8), crs="EPSG:32633",
                     transform=from_origin(500000, 4000000, 10, 10))
    r = read_raster(path)
    assert r.crs is not None and "UTM zone 33N" in r.crs
    assert r.transform.a == 10 and r.size == (50, 40)


def test_sar_scale_is_honoured_and_db_is_not_logged_twice():
    """--sar-scale reaches the scaling; a dB product (negative values) is detected by auto and never logged."""
    from promptmid.errors import InputError
    from promptmid.io import load_image, sar_scale_of

    rng = np.random.default_rng(0)
    linear = rng.gamma(2.0, 0.05, (64, 64)).astype(np.float32)
    db = (10 * np.log10(linear)).astype(np.float32)  # typical Sentinel-1 sigma0 in dB: mostly negative
    valid = np.ones((64, 64), bool)
    assert sar_scale_of(db[..., None], valid) == "db" and sar_scale_of(linear[..., None], valid) == "log"
    as_db = load_image(db, "sar", sar_scale="db").image[..., 0]
    auto = load_image(db, "sar")
    assert np.allclose(auto.image[..., 0], as_db) and auto.sar_scaling == "db"  # auto == db on dB data
    # dB data stretched as is is a monotone map of the linear data logged once: same ranks
    logged = load_image(linear, "sar", sar_scale="log").image[..., 0]
    assert np.corrcoef(as_db.ravel(), logged.ravel())[0, 1] > 0.99
    lin = load_image(linear, "sar", sar_scale="linear").image[..., 0]
    assert not np.allclose(lin, logged, atol=1e-3)  # the option changes the result
    with pytest.raises(InputError, match="valid: auto, log, linear, db"):
        load_image(linear, "sar", sar_scale="banana")


def test_complex_sar_is_used_as_amplitude_and_said():
    import warnings

    rng = np.random.default_rng(1)
    amp = rng.gamma(2.0, 1.0, (64, 64)).astype(np.float32)
    slc = (amp * np.exp(1j * rng.uniform(0, 2 * np.pi, amp.shape))).astype(np.complex64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ComplexWarning may leak
        got = load_image(slc, "sar")
    assert np.allclose(got.image, load_image(amp, "sar").image, atol=1e-5)
    assert got.notes and "amplitude" in got.notes[0]
    with pytest.raises(InputError, match="complex"):
        load_image(slc, "optical")


def test_truncated_png_is_refused(tmp_path):
    import cv2

    img = (np.random.default_rng(0).random((300, 300)) * 255).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "full.png"), img)
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    assert read_raster(tmp_path / "full.png").data.shape == (300, 300, 1)
    with pytest.raises(InputError, match="truncated or corrupt"):
        read_raster(tmp_path / "cut.png")


def test_very_large_files_are_read_decimated(tmp_path):
    """Memory stays bounded: a file far larger than the working size is read decimated, and every
    coordinate still refers to the file's pixels."""
    big = np.full((3000, 4000), 40, np.uint8)
    big[1000:1040, 2000:2040] = 250  # a bright square centred near (2019.5, 1019.5)
    big[::97, :] = 90  # some structure so the image is not constant elsewhere
    path = write_tif(tmp_path / "big.tif", big)
    prepared = load_image(path, "optical", max_side=256)
    raster = prepared.raster
    assert raster.full_size == (4000, 3000) and max(raster.size) <= 2 * 256 + 1  # never read whole
    assert prepared.original_size == (4000, 3000) and prepared.image.shape[:2] == (192, 256)
    ys, xs = np.nonzero(prepared.image[..., 0] > 0.6)
    centre = prepared.to_original(np.array([[xs.mean(), ys.mean()]]))[0]
    assert np.allclose(centre, [2019.5, 1019.5], atol=prepared.scale[0])
    assert raster.full().data.shape == (3000, 4000, 1)
    small = load_image(write_tif(tmp_path / "small.tif", big[:400, :500]), "optical", max_side=256)
    assert small.raster.full_size is None  # up to twice the working size: read as is (results unchanged)


def _bands_tif(path, data, descriptions=None, colorinterp=None, **profile):
    """Write ``[H, W, C]`` with band descriptions / colour interpretation (as real products carry them)."""
    import rasterio

    write_tif(path, data, **profile)
    with rasterio.open(path, "r+") as ds:
        for i, d in enumerate(descriptions or []):
            ds.set_band_description(i + 1, d)
        if colorinterp:
            ds.colorinterp = colorinterp
    return path


def _s2_like(n: int, seed: int = 0) -> np.ndarray:
    """``[64, 64, n]`` uint16 where band b holds the value 100 * b everywhere (plus texture), to tell bands apart."""
    tex = np.random.default_rng(seed).integers(0, 50, (64, 64))
    return np.stack([100 * (b + 1) + tex for b in range(n)], -1).astype(np.uint16)


@pytest.mark.parametrize("count", [12, 13])
def test_sentinel2_band_stacks_load_as_red_green_blue(tmp_path, count):
    """A 12-band L2A / 13-band L1C stack needs no conversion: bands 4,3,2 (B04, B03, B02) become R, G, B."""
    from promptmid.io import choose_bands, read_raster

    path = write_tif(tmp_path / "s2.tif", _s2_like(count))
    img = load_image(path, "optical")
    assert img.bands.bands == (4, 3, 2) and "Sentinel-2" in img.bands.rule
    assert choose_bands(read_raster(path), "optical", "8,4,3").bands == (8, 4, 3)  # user choice wins
    # the chosen bands, in order: the stretched red channel equals band 4 stretched alone
    alone = load_image(write_tif(tmp_path / "b4.tif", _s2_like(count)[..., 3]), "optical")
    assert np.allclose(img.image[..., 0], alone.image[..., 0])


def test_bigearthnet_like_blue_green_red_nir_uses_descriptions(tmp_path):
    from promptmid.io import choose_bands, read_raster

    path = _bands_tif(tmp_path / "ben.tif", _s2_like(4), ["B02", "B03", "B04", "B08"])
    choice = choose_bands(read_raster(path), "optical")
    assert choice.bands == (3, 2, 1) and choice.names == ("B04", "B03", "B02") and choice.rule == "band descriptions"
    plain = choose_bands(read_raster(write_tif(tmp_path / "rgbn.tif", _s2_like(4))), "optical")
    assert plain.bands == (1, 2, 3)  # no descriptions: RGB(N) order, documented


def test_dual_pol_sar_uses_the_co_pol_band_not_gray_alpha(tmp_path):
    """VV/VH (dB, float32) is two polarisations: VV is used; band 2 is not an alpha mask."""
    from promptmid.io import choose_bands, read_raster

    rng = np.random.default_rng(6)
    vv = (10 * np.log10(rng.gamma(2.0, 0.05, (64, 64)))).astype(np.float32)
    vh = vv - 7 + rng.normal(0, 1, vv.shape).astype(np.float32)
    for order, names in (((vv, vh), ["VV", "VH"]), ((vh, vv), ["VH", "VV"])):
        path = _bands_tif(tmp_path / f"{names[0]}.tif", np.stack(order, -1), names)
        img = load_image(path, "sar")
        assert img.bands.names == ("VV",) and img.bands.alpha is None and img.valid.all()
        assert np.allclose(img.image[..., 0], load_image(vv, "sar").image[..., 0])
    nameless = read_raster(write_tif(tmp_path / "hhhv.tif", np.stack([vv, vh], -1)))
    assert choose_bands(nameless, "sar").bands == (1,)
    assert choose_bands(nameless, "sar", "1,2").bands == (1, 2)
    with pytest.raises(InputError, match="--sar-bands asks for band 3"):
        load_image(nameless, "sar", sar_bands="3")


def test_alpha_only_when_colour_interpretation_says_so(tmp_path):
    from rasterio.enums import ColorInterp

    gray = np.random.default_rng(7).integers(10, 250, (64, 64)).astype(np.uint8)
    alpha = np.full((64, 64), 255, np.uint8)
    alpha[:, :20] = 0
    path = _bands_tif(tmp_path / "ga.tif", np.stack([gray, alpha], -1), colorinterp=[ColorInterp.gray, ColorInterp.alpha])
    for modality in ("optical", "sar"):
        img = load_image(path, modality)
        assert img.bands.bands == (1,) and img.bands.alpha == 2
        assert not img.valid[:, :20].any() and img.valid[:, 21:].all()


@pytest.mark.parametrize("text", ["0", "a,b", "1,,2"])
def test_bad_band_lists_are_clear_errors(text):
    with pytest.raises(InputError, match="[Bb]and"):
        load_image(np.random.default_rng(0).random((64, 64, 3)).astype(np.float32), "optical", optical_bands=text)


def test_palette_png_is_read_as_its_colours(tmp_path):
    """A palette PNG (shuffled colour table) gives the image its colours show, not its index numbers."""
    from PIL import Image

    rng = np.random.default_rng(2)
    gray = (cv2_blur(rng.random((64, 64))) * 255).astype(np.uint8)
    order = rng.permutation(256).astype(np.uint8)  # index i shows gray level order[i]
    inverse = np.argsort(order).astype(np.uint8)
    pal = Image.fromarray(inverse[gray], mode="P")
    pal.putpalette(np.repeat(order, 3).tolist())
    pal.save(tmp_path / "pal.png")
    Image.fromarray(gray).save(tmp_path / "gray.png")
    raster = read_raster(tmp_path / "pal.png")
    assert raster.data.shape == (64, 64, 3) and (raster.data[..., 0] == gray).all()
    for modality in ("optical", "sar"):
        a, b = load_image(tmp_path / "pal.png", modality), load_image(tmp_path / "gray.png", modality)
        assert np.allclose(a.image, b.image, atol=1e-6)


def cv2_blur(x: np.ndarray) -> np.ndarray:
    import cv2

    y = cv2.GaussianBlur(x.astype(np.float32), (0, 0), 3)
    return (y - y.min()) / (y.max() - y.min())


def test_image_tensor_is_channels_first_with_the_same_pixels():
    """promptmid.io.image_tensor: [1, 3, H, W] float32 of a prepared image or its array, pixel (x, y) at [..., y, x]."""
    from promptmid.io import image_tensor

    rgb = np.random.default_rng(0).random((37, 53, 3), dtype=np.float32)
    prepared = load_image(rgb, "optical")
    t = image_tensor(prepared)
    assert t.shape == (1, 3, 37, 53) and t.dtype == torch.float32
    assert torch.equal(t, image_tensor(prepared.image))
    assert float(t[0, 2, 5, 7]) == float(prepared.image[5, 7, 2])
