"""rcdm.images: decoding of awkward inputs, the ADM crop, the model range and grids."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from rcdm import images


def _bytes(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_model_range_round_trip_is_exact():
    arr = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    x = images.to_model(arr)
    assert x.shape == (3, 16, 16)
    assert x.min().item() == -1.0 and x.max().item() == 1.0  # 0 -> -1, 255 -> 1 (x = p / 127.5 - 1)
    assert torch.equal(images.to_uint8(x).permute(1, 2, 0), torch.from_numpy(arr))


def test_center_crop_matches_adm_rule():
    # 640x480 -> halve once with BOX (480 >= 2*128 ... 240 < 256 stops), resize short side to 128
    # (scale 128/240: 320x240 -> 171x128), crop the centre 128x128.
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
    out = images.center_crop_arr(img, 128)
    half = img.resize((320, 240), resample=Image.BOX)
    ref = np.asarray(half.resize((171, 128), resample=Image.BICUBIC))[:, 21:149]
    assert out.shape == (128, 128, 3) and np.array_equal(out, ref)


@pytest.mark.parametrize(
    "mode, fmt",
    [
        ("L", "PNG"),
        ("RGBA", "PNG"),
        ("CMYK", "JPEG"),
        ("P", "PNG"),
        ("I;16", "PNG"),
        ("1", "PNG"),
        ("LA", "PNG"),
    ],
)
def test_every_mode_becomes_rgb(mode, fmt):
    base = Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    if mode == "I;16":
        img = Image.fromarray(np.arange(1500, dtype=np.uint16).reshape(30, 50) * 40)
        assert img.mode == "I;16"
    else:
        img = base.convert(mode)
    out = images.open_image(_bytes(img, fmt))
    assert out.mode == "RGB" and out.size == (50, 30)
    crop = images.center_crop_arr(out, 224)
    assert crop.shape == (224, 224, 3) and crop.dtype == np.uint8


def test_sixteen_bit_keeps_most_significant_bits():
    arr16 = np.array([[0, 256, 65535, 1000]], dtype=np.uint16)
    out = np.asarray(images.to_rgb(Image.fromarray(arr16)))
    assert out[0, :, 0].tolist() == [0, 1, 255, 3]  # v >> 8


def test_transparent_pixels_become_white():
    img = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert np.asarray(images.open_image(_bytes(img, "PNG"))).max() == 255


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty file"),
        (b"this is text, not a JPEG", "cannot decode"),
    ],
)
def test_bad_inputs_raise_image_error(data, message):
    with pytest.raises(images.ImageError, match=message):
        images.open_image(data)


def test_truncated_jpeg_is_refused():
    data = _bytes(Image.new("RGB", (64, 64), (200, 10, 10)), "JPEG")
    with pytest.raises(images.ImageError, match="cannot decode"):
        images.open_image(data[: len(data) // 2])


def test_pixel_limit_checked_before_decoding():
    data = _bytes(Image.new("L", (100, 100)), "PNG")
    with pytest.raises(images.ImageError, match="over the limit of 5000"):
        images.open_image(data, max_pixels=5000)


def test_max_pixels_governs_and_pils_hard_limit_still_holds(monkeypatch):
    # with PIL's warning threshold at 100 pixels: 150 pixels (a warning in PIL) decode when max_pixels
    # allows them; over twice the threshold PIL itself refuses, and the error says so
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.warns(Image.DecompressionBombWarning):
        assert images.open_image(_bytes(Image.new("L", (15, 10)), "PNG"), max_pixels=10**6).size == (15, 10)
    with pytest.raises(images.ImageError, match="decompression bomb refused"):
        images.open_image(_bytes(Image.new("L", (30, 10)), "PNG"), max_pixels=10**6)


def test_grid_layout():
    imgs = torch.zeros(5, 3, 4, 4, dtype=torch.uint8)
    imgs[3] = 7
    grid = images.make_grid(imgs, nrow=3, padding=1)
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1, 3)
    assert (grid[6:10, 1:5] == 7).all()  # image 3 = row 1, column 0
    assert (grid[6:10, 11:15] == 255).all()  # empty slot stays white


def test_png_round_trip(tmp_path):
    arr = np.random.default_rng(2).integers(0, 256, (8, 9, 3), dtype=np.uint8)
    images.save_png(arr, str(tmp_path / "a.png"))
    assert np.array_equal(images.decode_png((tmp_path / "a.png").read_bytes()), arr)


def test_to_channels_luma_and_back():
    g = torch.Generator().manual_seed(0)
    grey = torch.rand(2, 1, 4, 4, generator=g) * 2 - 1
    rgb = images.to_channels(grey, 3)
    assert rgb.shape == (2, 3, 4, 4) and (rgb == grey).all()  # repeated
    torch.testing.assert_close(images.to_channels(rgb, 1), grey)  # the luma of a grey image is its level
    colour = torch.tensor([1.0, -1.0, 0.0]).view(1, 3, 1, 1)  # red, no green, half blue, in [-1, 1]
    # BT.601 of the pixel (255, 0, 127.5): 0.299 * 255 + 0.114 * 127.5
    luma = images.to_channels(colour, 1)
    assert luma.shape == (1, 1, 1, 1)
    assert (luma.item() + 1) * 127.5 == pytest.approx(0.299 * 255 + 0.114 * 127.5, abs=1e-4)
    assert images.to_channels(colour, 3) is colour
    with pytest.raises(ValueError, match="images have 1 or 3"):
        images.to_channels(torch.zeros(1, 2, 4, 4), 3)
