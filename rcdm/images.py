"""Images: robust decoding, the ADM center crop, the [-1, 1] model range, grids and PNG files.

The model range is guided-diffusion's: ``x = pixel / 127.5 - 1``. Going back we round to the nearest
integer (guided-diffusion truncates), so ``to_uint8(to_model(a)) == a`` exactly.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from rcdm import storage

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold (about 0.25 GiB of RGBA)


class ImageError(ValueError):
    """An input that is not a decodable image (truncated, empty, not an image, too large...)."""


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """Composite an image with transparency onto white (transparent pixels have no defined colour)."""
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode (CMYK, L, 1, P, RGBA, LA, I;16, I, F, ...) to 8-bit RGB."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        return _flatten_alpha(img)
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        arr = np.asarray(img)
        if img.mode == "F":
            arr8 = np.clip(arr, 0, 255)
        else:
            # 16-bit data (I;16*, or 16-bit PNGs that PIL opens as I): keep the 8 most significant bits.
            arr8 = np.clip(arr.astype(np.int64), 0, 65535) >> 8
        return Image.fromarray(arr8.astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


def open_image(source: bytes | str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``source`` (bytes, a path or an fsspec URL) fully into an RGB image.

    Raises ImageError naming the problem for empty, truncated or non-image inputs and for images over
    ``max_pixels`` (checked from the header, before any pixel is decoded).
    """
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    data = source if isinstance(source, bytes) else storage.read_bytes(str(source))
    if len(data) == 0:
        raise ImageError(f"{name}: empty file (0 bytes)")
    # The size check is ours, from the header, with no warning filters: those are process-wide state,
    # and stage one decodes on several threads at once.
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > max_pixels:
            raise ImageError(f"{name}: {w}x{h} = {w * h} pixels is over the limit of {max_pixels}")
        img.load()
        img = ImageOps.exif_transpose(img)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:  # PIL's own hard limit (twice its warning threshold)
        raise ImageError(f"{name}: decompression bomb refused ({e})") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise ImageError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from None
    return to_rgb(img)


def center_crop_arr(img: Image.Image, size: int) -> np.ndarray:
    """ADM's center crop: (size, size, 3) uint8.

    Halve with a BOX filter while the short side is at least ``2 * size`` (cheap, alias-free
    down-scaling), BICUBIC-resize so the short side is ``size``, then crop the center square.
    """
    img = to_rgb(img)
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)  # (H, W, 3)
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return np.ascontiguousarray(arr[top : top + size, left : left + size])


def to_model(arr: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (H, W, 3) or (N, H, W, 3) -> float32 (3, H, W) or (N, 3, H, W) in [-1, 1]."""
    t = torch.as_tensor(np.array(arr))  # a copy: PIL-backed arrays are read-only
    t = t.permute(2, 0, 1) if t.ndim == 3 else t.permute(0, 3, 1, 2)
    return t.float().div(127.5).sub(1.0).contiguous()


LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601, PIL's convert("L")


def to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Images (..., C, H, W) in the model range with C in {1, 3} -> (..., channels, H, W).

    RGB to one channel is the BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` (exactly the grey level of a
    grey image, whose three channels are equal); one channel to RGB repeats it. A model for grey data
    (``UNetConfig.in_channels = 1``) trains on the luma of the stored RGB crops, and its samples go back
    to RGB before an encoder or a picture sees them.
    """
    have = x.shape[-3]
    if have == channels:
        return x
    if have == 3 and channels == 1:
        w = torch.tensor(LUMA_WEIGHTS, dtype=x.dtype, device=x.device).view(3, 1, 1)
        return (x * w).sum(dim=-3, keepdim=True)
    if have == 1 and channels == 3:
        return x.expand(*x.shape[:-3], 3, *x.shape[-2:]).contiguous()
    raise ValueError(f"cannot turn {have}-channel images into {channels}-channel ones: images have 1 or 3")


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float (..., 3, H, W) in [-1, 1] -> uint8 (..., 3, H, W), rounded to the nearest level."""
    return ((x.detach().float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def to_hwc(x: torch.Tensor) -> np.ndarray:
    """uint8 (N, 3, H, W) -> numpy (N, H, W, 3) (the ADM evaluator's layout)."""
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: torch.Tensor | Sequence[torch.Tensor], nrow: int, padding: int = 2) -> np.ndarray:
    """uint8 images (N, 3, H, W) -> one uint8 (H', W', 3) grid, ``nrow`` images per row, white gaps."""
    batch = torch.stack(list(images)) if not isinstance(images, torch.Tensor) else images
    if batch.dtype != torch.uint8:
        raise TypeError("make_grid expects uint8 images; convert with to_uint8 first")
    n, c, h, w = batch.shape
    cols = max(1, min(nrow, n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, c), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y : y + h, x : x + w] = batch[i].permute(1, 2, 0).cpu().numpy()
    return grid


def encode_png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def save_png(arr: np.ndarray, url: str) -> None:
    """Write uint8 (H, W, 3) ``arr`` as a PNG to a path or fsspec URL, atomically."""
    storage.write_bytes_atomic(url, encode_png(arr))
