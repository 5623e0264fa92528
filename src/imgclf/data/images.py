"""Decoding image files into RGB pictures, the same way for training, prediction and serving.

Every way a file can fail (empty, unreadable, a web page saved as .jpg, truncated, a decompression
bomb, too small) becomes an `ImageError` whose reason says what is wrong and what to do. Every
colour mode Pillow reads becomes 8-bit RGB: EXIF orientation applied, transparency composited on
white, 16/32-bit images scaled by their actual value range, animations reduced to the first frame.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps

from imgclf.errors import ImageError

IMAGE_EXTENSIONS = frozenset(
    {
        ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
        ".ppm", ".pgm", ".pbm", ".pnm", ".avif",
    }
)

# Only formats a photo data set plausibly holds. Pillow can read many more, but some (EPS runs
# Ghostscript, PSD, FITS, ...) widen the attack surface of a server that decodes uploads.
_ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "AVIF")

_WHITE = (255, 255, 255)
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_HIGH_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
# Errors Pillow's decoders raise on damaged data; anything else is a bug and must surface.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError,
                  struct.error, zlib.error, Image.DecompressionBombError, Warning)


@dataclass(frozen=True)
class ImageInfo:
    """What a file held before it was converted to RGB.

    Attributes:
        format: Pillow's format name ("JPEG", "PNG", ...).
        mode: Pillow's colour mode of the file ("L", "P", "RGBA", "I;16", "CMYK", ...).
        size: (width, height) of the returned picture, after EXIF orientation.
        animated: True for an animated GIF, PNG or WebP or a multi-page TIFF; only its
            first frame (page) is used.
        orientation: The EXIF orientation tag (1 = upright, 6 = rotate 90 degrees clockwise, ...).
        transparency: True when the file has an alpha channel or a transparent colour.
    """

    format: str
    mode: str
    size: tuple[int, int]
    animated: bool = False
    orientation: int = 1
    transparency: bool = False

    @property
    def conversion(self) -> str | None:
        """How the file was converted to RGB, as counted in the data check; None if it was RGB."""
        if self.transparency and self.mode not in _HIGH_BIT_MODES:
            return "with transparency"
        return describe_mode(self.mode)


def describe_mode(mode: str) -> str | None:
    """A short human name for the conversion a colour mode needs; None for plain 8-bit RGB.

    Args:
        mode: A Pillow colour mode, e.g. the `mode` of `ImageInfo` or `img.info["imgclf_original_mode"]`.
    """
    if mode == "RGB":
        return None
    if mode in ("L", "LA", "La"):
        return "grayscale"
    if mode in ("P", "PA"):
        return "palette"
    if mode in ("RGBA", "RGBa"):
        return "with transparency"
    if mode.startswith("I;16"):
        return "16-bit"
    if mode in ("I", "F"):
        return "32-bit"
    if mode == "1":
        return "1-bit black and white"
    return mode  # CMYK, YCbCr, LAB, ... are names users recognise


def read_bytes(path: str | os.PathLike) -> bytes:
    """The content of a file, with every way reading can fail turned into an `ImageError`.

    Raises:
        ImageError: The file is missing, a folder, unreadable or a symbolic link loop.
    """
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ImageError(path, "file not found (moved or deleted?)") from None
    except IsADirectoryError:
        raise ImageError(path, "is a folder, not an image file") from None
    except PermissionError:
        raise ImageError(path, "permission denied: make the file readable (chmod +r) or delete it") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ImageError(path, "symbolic link loop: remove the link") from None
        raise ImageError(path, f"cannot read the file ({e.strerror or e}): check the disk or delete it") from None


def file_digest(path: str | os.PathLike) -> str:
    """A 128-bit BLAKE2b hex digest of a file's content, for cache keys and duplicate detection.

    Raises:
        ImageError: The file cannot be read.
    """
    h = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError:
        read_bytes(path)  # re-raises the read error with a clear reason
        raise
    return h.hexdigest()


def bytes_digest(data: bytes) -> str:
    """The digest `file_digest` gives a file holding `data`."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def open_rgb(
    source: str | os.PathLike | bytes,
    max_pixels: int = 64_000_000,
    min_side: int = 8,
    *,
    name: str | None = None,
) -> Image.Image:
    """Decode an image file or in-memory bytes into a fully loaded 8-bit RGB picture.

    The original colour mode is kept in `img.info["imgclf_original_mode"]` (see `describe_mode`).

    Args:
        source: A file path, or the bytes of an image (an upload).
        max_pixels: Larger images are refused from their header, before any decoding, so a tiny
            file that declares a huge size (a decompression bomb) cannot exhaust memory.
        min_side: Images with a smaller width or height are refused.
        name: How to name bytes in error messages (e.g. the uploaded file's name).

    Raises:
        ImageError: The file cannot be used; the reason says why and what to do.
    """
    return open_rgb_with_info(source, max_pixels, min_side, name=name)[0]


def open_rgb_with_info(
    source: str | os.PathLike | bytes,
    max_pixels: int = 64_000_000,
    min_side: int = 8,
    *,
    name: str | None = None,
) -> tuple[Image.Image, ImageInfo]:
    """Like `open_rgb`, also returning what the file held before conversion.

    Raises:
        ImageError: The file cannot be used; the reason says why and what to do.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, where = bytes(source), name
    else:
        data, where = read_bytes(source), source
    if not data:
        raise ImageError(where, "file is empty (0 bytes): delete it or download it again")
    im = _identify(data, where)
    width, height = im.size
    if width * height > max_pixels:
        raise ImageError(
            where,
            f"image declares {width}x{height} pixels ({width * height / 1e6:.3g} MP), over the "
            f"limit of {max_pixels / 1e6:.3g} MP (a decompression bomb?): downscale it or raise max_pixels",
        )
    if min(width, height) < min_side:
        raise ImageError(
            where, f"image is {width}x{height} pixels, too small to classify (min side {min_side}): delete it"
        )
    fmt = "JPEG" if im.format == "MPO" else (im.format or "image")
    try:
        # MPO files (camera JPEGs) hold extra pictures too, but are not animations; a TIFF
        # with several pages is counted with the animations (only its first page is used).
        animated = im.format in ("GIF", "PNG", "WEBP", "TIFF") and int(
            getattr(im, "n_frames", 1) or 1) > 1
        im.load()  # the first frame only, for animations
        info_mode, transparency = im.mode, _has_transparency(im)
        orientation = _orientation(im)
        im = _apply_orientation(im, orientation)
        rgb = _to_rgb(im, transparency)
    except ImageError as e:
        raise ImageError(where, e.reason) from None
    except _DECODE_ERRORS:
        raise ImageError(where, f"truncated or corrupt {fmt}: re-export or delete it") from None
    except MemoryError:
        raise ImageError(where, f"not enough memory to decode this {width}x{height} {fmt}: downscale it") from None
    rgb.info["imgclf_original_mode"] = info_mode
    rgb.info["imgclf_transparency"] = transparency
    info = ImageInfo(fmt, info_mode, rgb.size, animated, orientation, transparency)
    return rgb, info


def _identify(data: bytes, where: object) -> ImageFile.ImageFile:
    """Open the header of one of the allowed formats, without Pillow's global bomb check.

    Image.open checks the declared size against the global MAX_IMAGE_PIXELS and warns or raises
    before we see the size; calling the format's factory directly leaves that decision to
    `max_pixels`, without touching global state.
    """
    fmt = _sniff(data)
    if fmt is None:
        kind = _non_image_kind(data)
        if kind:
            raise ImageError(where, f"is {kind}, not an image: delete it or download the image again")
    Image.init()
    candidates = [fmt] if fmt else list(_ALLOWED_FORMATS)
    prefix = data[:16]
    for candidate in candidates:
        if candidate not in Image.OPEN:
            continue  # e.g. Pillow built without AVIF support
        factory, accept = Image.OPEN[candidate]
        accepted = accept(prefix) if accept is not None else True
        if not accepted or isinstance(accepted, str):  # a str is Pillow's "almost, but no"
            continue
        try:
            return factory(io.BytesIO(data), "")
        except _DECODE_ERRORS:
            if fmt:
                # Text can start like an image by chance ("BM..." is a BMP's magic).
                kind = _non_image_kind(data)
                if kind:
                    raise ImageError(where, f"is {kind}, not an image: delete it or download the image again") from None
                raise ImageError(where, f"truncated or corrupt {fmt}: re-export or delete it") from None
    if fmt:
        raise ImageError(where, f"{fmt} images are not supported by this Pillow build: convert it to PNG or JPEG")
    raise ImageError(where, f"not a supported image format (starts with {data[:8]!r}): convert it to JPEG or PNG")


def _sniff(data: bytes) -> str | None:
    """The allowed format a file's magic bytes announce, or None."""
    head = data[:32]
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head.startswith(b"BM"):
        return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis"):
        return "AVIF"
    if len(head) > 2 and head[0:1] == b"P" and head[1:2] in b"123456fF" and head[2:3].isspace():
        return "PPM"
    return None


def _non_image_kind(data: bytes) -> str | None:
    """What a file that is not an image is, for the message ("an HTML file"), or None if unknown."""
    if data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"heim", b"heis"):
        return "a HEIC/HEIF photo (not supported; convert it to JPEG)"
    signatures = {b"%PDF": "a PDF document", b"PK\x03\x04": "a ZIP archive", b"\x1f\x8b": "a gzip archive"}
    for magic, kind in signatures.items():
        if data.startswith(magic):
            return kind
    head = data[:4096]
    for bom in (b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff"):
        head = head.removeprefix(bom)
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in text[:1024]:
        return "an HTML file"
    if text.startswith(b"<svg") or (text.startswith((b"<?xml", b"<!doctype svg", b"<!--")) and b"<svg" in text):
        return "an SVG file"
    if text.startswith(b"<?xml"):
        return "an XML file"
    if _looks_like_text(head):
        return "a text file"
    return None


def _looks_like_text(head: bytes) -> bool:
    if not head or b"\x00" in head:
        return False
    try:
        # The 4 KiB cut may split a multi-byte character; ignore a broken tail.
        head.decode("utf-8") if len(head) < 4096 else head[:-4].decode("utf-8")
    except UnicodeDecodeError:
        return False
    controls = sum(b < 32 and b not in (9, 10, 12, 13) for b in head)
    return controls == 0


def _has_transparency(im: Image.Image) -> bool:
    return im.mode in _ALPHA_MODES or "transparency" in im.info


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(0x0112, 1)
    except _DECODE_ERRORS:
        return 1  # unreadable EXIF should not make a good picture unusable
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _apply_orientation(im: Image.Image, orientation: int) -> Image.Image:
    if orientation == 1:
        return im
    return ImageOps.exif_transpose(im)


def _to_rgb(im: Image.Image, transparency: bool) -> Image.Image:
    if im.mode in _HIGH_BIT_MODES:
        return _scale_to_8bit(im).convert("RGB")
    if transparency:
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, _WHITE)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    if im.mode == "RGB":
        return im.copy()  # detached from the decoder; info is ours to annotate
    try:
        return im.convert("RGB")
    except ValueError:
        raise ImageError(None, f"colour mode {im.mode} cannot be converted to RGB: re-export it as RGB") from None


def _scale_to_8bit(im: Image.Image) -> Image.Image:
    """Map the image's actual value range onto 0..255; clipping would turn most 16-bit images white."""
    arr = np.asarray(im).astype(np.float64)
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        return Image.new("L", im.size, 0)
    lo, hi = float(finite.min()), float(finite.max())
    arr = np.nan_to_num(arr, nan=lo, posinf=hi, neginf=lo)
    if hi > lo:
        arr = (arr - lo) * (255.0 / (hi - lo))
    else:
        # A flat image has no range to stretch: keep its level relative to the format's range.
        full = 65535.0 if im.mode.startswith("I;16") else 255.0
        arr = np.full_like(arr, min(max(lo, 0.0), full) * 255.0 / full)
    return Image.fromarray(np.rint(arr).astype(np.uint8))
