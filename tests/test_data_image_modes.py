"""Every Pillow mode to 8-bit RGB (issue 17 item 7), and the EXIF orientation option (item 10).

Each expected image is computed here from the mode's definition (numpy, float64 where it matters), not by
calling Pillow's converter: 16-bit values divided by 257 and rounded, floats by their range, palettes looked
up, alpha composited onto white, YCbCr by BT.601 (full range, as JPEG), CMYK by (255 − C)(255 − K)/255, HSV by
`colorsys`. Where a file format holds the mode, the image goes through a real file; otherwise (PA, HSV, RGBX,
RGBa, La, I;16B) through `to_rgb8` directly.
"""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
from PIL import Image

from ditkit.data.images import ImageFolderDataset, load_rgb, to_rgb8

RNG = np.random.default_rng(0)
H, W = 5, 7


def _gray3(values: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(values, dtype=np.uint8)[..., None], 3, axis=-1)


def _load(tmp_path, img: Image.Image, fmt: str) -> np.ndarray:
    path = tmp_path / f"img.{fmt.lower()}"
    img.save(path, format=fmt)
    with Image.open(path) as check:
        assert check.mode == img.mode, (check.mode, img.mode)  # the file really holds the mode under test
    out = load_rgb(path)
    assert out is not None and out.mode == "RGB" and out.size == (W, H)
    return np.asarray(out)


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255.0
    return rgb.astype(np.float64) * a + 255.0 * (1.0 - a)


def test_16_bit_png_is_divided_by_257_not_clipped(tmp_path):
    """Today's bug: values above 255 clipped to white. A full-range ramp includes 0, 128/129 (the rounding
    boundary) and 65535."""
    values = RNG.integers(0, 65536, (H, W)).astype(np.uint16)
    values.flat[:4] = [0, 128, 129, 65535]
    got = _load(tmp_path, Image.fromarray(values), "PNG")  # mode I;16
    expected = np.floor(values.astype(np.float64) / 257.0 + 0.5)
    assert np.array_equal(got, _gray3(expected))
    assert got.flat[3 * 3] == 255 and got.std() > 20  # not a white (or black) square


def test_16_bit_big_endian_tiff_and_in_memory(tmp_path):
    values = RNG.integers(0, 65536, (H, W)).astype(np.uint16)
    img = Image.frombytes("I;16B", (W, H), values.astype(">u2").tobytes())
    expected = _gray3(np.floor(values / 257.0 + 0.5))
    assert np.array_equal(np.asarray(to_rgb8(img)), expected)
    assert np.array_equal(_load(tmp_path, img, "TIFF"), expected)


@pytest.mark.parametrize("low,high,rule", [(0, 65535, "16-bit"), (-5000, 90000, "range")])
def test_32_bit_integer_tiff(tmp_path, low, high, rule):
    values = RNG.integers(low, high + 1, (H, W)).astype(np.int32)
    values.flat[:2] = [low, high]
    got = _load(tmp_path, Image.fromarray(values, mode="I"), "TIFF")
    v = values.astype(np.float64)
    expected = v / 257.0 if rule == "16-bit" else (v - low) * 255.0 / (high - low)
    assert np.array_equal(got, _gray3(np.floor(expected + 0.5)))


@pytest.mark.parametrize("low,high,rule", [(0.0, 1.0, "unit"), (0.2, 0.7, "unit"), (-3.0, 7.5, "range")])
def test_float_tiff(tmp_path, low, high, rule):
    """Today's bug: F → black. [0, 1] is the unit range (not stretched); anything else by its min..max."""
    values = RNG.uniform(low, high, (H, W)).astype(np.float32)
    values.flat[:2] = [low, high]
    got = _load(tmp_path, Image.fromarray(values, mode="F"), "TIFF")
    v = values.astype(np.float64)
    expected = v * 255.0 if rule == "unit" else (v - low) * 255.0 / (high - low)
    # float32 storage vs the float64 reference: a value within 1e-6 of a .5 boundary may round either way
    assert np.abs(got.astype(int) - _gray3(np.floor(expected + 0.5)).astype(int)).max() <= 1
    assert np.array_equal(got[..., 0], got[..., 2]) and got.max() >= 178  # 0.7·255 = 178.5


def test_non_finite_float_image_is_skipped_by_name(tmp_path, capsys):
    values = np.zeros((H, W), np.float32)
    values[1, 1] = np.nan
    path = tmp_path / "nan.tiff"
    Image.fromarray(values, mode="F").save(path)
    assert load_rgb(path) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "NaN" in err


def test_one_bit_gray_and_palette(tmp_path):
    bits = RNG.random((H, W)) < 0.5
    assert np.array_equal(_load(tmp_path, Image.fromarray(bits), "PNG"), _gray3(bits * 255))
    gray = RNG.integers(0, 256, (H, W)).astype(np.uint8)
    assert np.array_equal(_load(tmp_path, Image.fromarray(gray, mode="L"), "PNG"), _gray3(gray))
    palette = RNG.integers(0, 256, (256, 3)).astype(np.uint8)
    index = RNG.integers(0, 256, (H, W)).astype(np.uint8)
    pimg = Image.fromarray(index, mode="L").convert("P")  # identity palette, then ours
    pimg.putpalette(palette.tobytes())
    pimg.frombytes(index.tobytes())
    assert np.array_equal(_load(tmp_path, pimg, "PNG"), palette[index])


def test_palette_with_a_transparent_index_goes_onto_white(tmp_path):
    palette = RNG.integers(0, 256, (256, 3)).astype(np.uint8)
    index = RNG.integers(0, 4, (H, W)).astype(np.uint8)
    pimg = Image.new("P", (W, H))
    pimg.putpalette(palette.tobytes())
    pimg.frombytes(index.tobytes())
    pimg.info["transparency"] = 2
    expected = palette[index].copy()
    expected[index == 2] = 255
    assert np.array_equal(_load(tmp_path, pimg, "PNG"), expected)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_onto_white(tmp_path, mode):
    channels = 4 if mode == "RGBA" else 2
    arr = RNG.integers(0, 256, (H, W, channels)).astype(np.uint8)
    arr[0, :3, -1] = [0, 255, 128]  # fully transparent, opaque, half
    colour = arr[..., :3] if mode == "RGBA" else np.repeat(arr[..., :1], 3, axis=-1)
    got = _load(tmp_path, Image.fromarray(arr, mode=mode), "PNG")
    expected = _over_white(colour, arr[..., -1])
    assert np.abs(got - expected).max() <= 1.0  # Pillow's paste rounds 8-bit products
    assert (got[0, 0] == 255).all() and np.array_equal(got[0, 1], colour[0, 1])


def test_pa_and_premultiplied_rgba_in_memory():
    palette = RNG.integers(0, 256, (256, 3)).astype(np.uint8)
    index = RNG.integers(0, 256, (H, W)).astype(np.uint8)
    alpha = RNG.integers(0, 256, (H, W)).astype(np.uint8)
    pa = Image.new("PA", (W, H))
    pa.putpalette(palette.tobytes())
    pa.frombytes(np.stack([index, alpha], -1).tobytes())
    got = np.asarray(to_rgb8(pa))
    assert got.dtype == np.uint8 and np.abs(got - _over_white(palette[index], alpha)).max() <= 1.0
    rgb = RNG.integers(0, 256, (H, W, 3)).astype(np.float64)
    a = np.full((H, W), 255, np.uint8)  # opaque premultiplied == straight
    rgba_pm = Image.frombytes("RGBa", (W, H), np.dstack([rgb.astype(np.uint8), a]).tobytes())
    assert np.array_equal(np.asarray(to_rgb8(rgba_pm)), rgb.astype(np.uint8))


def test_rgbx_keeps_the_colour():
    arr = RNG.integers(0, 256, (H, W, 4)).astype(np.uint8)
    got = np.asarray(to_rgb8(Image.frombytes("RGBX", (W, H), arr.tobytes())))
    assert np.array_equal(got, arr[..., :3])


@pytest.mark.parametrize("fmt", ["TIFF", "JPEG"])
def test_cmyk_without_a_profile(tmp_path, fmt):
    cmyk = RNG.integers(0, 256, (H, W, 4)).astype(np.uint8)
    img = Image.frombytes("CMYK", (W, H), cmyk.tobytes())
    c = cmyk.astype(np.float64)
    expected = (255 - c[..., :3]) * (255 - c[..., 3:]) / 255.0
    if fmt == "TIFF":  # lossless: the formula, to Pillow's 8-bit rounding
        assert np.abs(_load(tmp_path, img, fmt) - expected).max() <= 1.0
    else:  # JPEG stores CMYK lossily; the same formula on the decoded CMYK
        path = tmp_path / "c.jpg"
        img.save(path, quality=95)
        with Image.open(path) as back:
            d = np.asarray(back).astype(np.float64)
        assert np.abs(np.asarray(load_rgb(path)) - (255 - d[..., :3]) * (255 - d[..., 3:]) / 255.0).max() <= 1.0


def test_ycbcr_by_bt601_full_range(tmp_path):
    ycc = RNG.integers(16, 240, (H, W, 3)).astype(np.uint8)
    y, cb, cr = (ycc[..., i].astype(np.float64) for i in range(3))
    expected = np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                         y + 1.772 * (cb - 128)], -1).clip(0, 255)
    img = Image.frombytes("YCbCr", (W, H), ycc.tobytes())
    assert np.abs(np.asarray(to_rgb8(img)).astype(np.float64) - expected).max() <= 1.0  # ditkit's conversion
    # From a file, where this Pillow can write and read a YCbCr TIFF: Pillow 13 can; Pillow 12 (which gradio pins
    # in the test environment) writes one it then reads back as truncated RGBX, a Pillow bug, not ditkit's.
    path = tmp_path / "img.tiff"
    img.save(path, format="TIFF")
    with Image.open(path) as check:
        readable = check.mode == "YCbCr"
    if readable:
        got = load_rgb(path)
        assert got is not None and got.mode == "RGB" and got.size == (W, H)
        assert np.abs(np.asarray(got).astype(np.float64) - expected).max() <= 1.0


def test_hsv_by_colorsys():
    hsv = RNG.integers(0, 256, (H, W, 3)).astype(np.uint8)
    got = np.asarray(to_rgb8(Image.frombytes("HSV", (W, H), hsv.tobytes())))
    expected = np.array([[colorsys.hsv_to_rgb(*(hsv[i, j] / 255.0)) for j in range(W)] for i in range(H)]) * 255
    assert np.abs(got - expected).max() <= 1.0


def test_lab_neutral_axis_is_srgb_gray(tmp_path):
    """CIELAB L* (8-bit L = L*·255/100), a* = b* = 0 (signed bytes, as TIFF's CIELab), to sRGB: Y = f⁻¹(L*),
    then the sRGB curve; and the hue's direction off that axis (+a* red, −b* blue)."""
    levels = np.linspace(0, 255, W * H).round().astype(np.uint8).reshape(H, W)
    lab = np.stack([levels, np.zeros_like(levels), np.zeros_like(levels)], -1)
    got = _load(tmp_path, Image.frombytes("LAB", (W, H), lab.tobytes()), "TIFF")
    lstar = levels / 255.0 * 100.0
    fy = (lstar + 16) / 116
    y = np.where(fy > 6 / 29, fy**3, 3 * (6 / 29) ** 2 * (fy - 4 / 29))
    srgb = np.where(y <= 0.0031308, 12.92 * y, 1.055 * y ** (1 / 2.4) - 0.055) * 255
    assert np.abs(got - srgb[..., None]).max() <= 2.0 and got.std() > 50
    red, blue = np.asarray(to_rgb8(Image.frombytes("LAB", (2, 1), bytes([128, 60, 0, 128, 0, 196]))))[0]
    assert red[0] > red[1] + 100 and blue[2] > blue[0] + 100


def test_a_mode_without_a_defined_conversion_is_refused_by_name(tmp_path, capsys):
    img = Image.frombytes("La", (W, H), RNG.integers(0, 256, (H, W, 2)).astype(np.uint8).tobytes())
    with pytest.raises(ValueError, match="image mode 'La' has no defined conversion to 8-bit RGB"):
        to_rgb8(img)


def test_the_dataset_sees_the_16_bit_image_correctly(tmp_path):
    """End to end through an image folder: the crop of a 16-bit gray PNG, in [-1, 1]."""
    values = np.full((40, 40), 32896, np.uint16)  # 32896 / 257 = 128 exactly
    (tmp_path / "cls").mkdir()
    Image.fromarray(values).save(tmp_path / "cls" / "a.png")
    x, label = ImageFolderDataset(tmp_path, 16, random_flip=False)[0]
    assert label == 0 and x.shape == (3, 16, 16)
    assert float(x.min()) == float(x.max()) == pytest.approx(128 / 127.5 - 1.0, abs=1e-6)


def _oriented_png(path, orientation: int) -> np.ndarray:
    """A 20×10 (W×H) image, left half black, right half white, with an EXIF orientation tag."""
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:, 10:] = 255
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = orientation
    img.save(path, format="PNG", exif=exif.tobytes())
    return arr


def test_exif_orientation_is_ignored_by_default_and_applied_when_asked(tmp_path):
    path = tmp_path / "rot.png"
    arr = _oriented_png(path, 6)  # 6: the camera was turned; show it rotated 90° clockwise
    plain = np.asarray(load_rgb(path))
    assert np.array_equal(plain, arr)  # the authors' preprocessing: pixels as stored
    turned = np.asarray(load_rgb(path, exif_transpose=True))
    assert turned.shape == (20, 10, 3) and np.array_equal(turned, np.rot90(arr, k=-1))
