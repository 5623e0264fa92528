"""Decoding: every colour mode becomes RGB correctly, every bad file becomes a clear ImageError."""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from imgclf.data.images import (
    IMAGE_EXTENSIONS,
    describe_mode,
    file_digest,
    open_rgb,
    open_rgb_with_info,
)
from imgclf.errors import ImageError, ImgclfError


def _reason(source, **kwargs) -> str:
    with pytest.raises(ImageError) as e:
        open_rgb(source, **kwargs)
    message = str(e.value)
    assert "\n" not in message
    message.encode("utf-8")  # printable whatever the file name
    return e.value.reason


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a size in its header but holds almost no data (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


# --- good images ------------------------------------------------------------------------------


def test_rgb_jpeg_round_trip(tmp_path, make_image):
    path = make_image(tmp_path / "a.jpg", (24, 12), color=(200, 30, 30))
    img, info = open_rgb_with_info(path)
    assert img.mode == "RGB" and img.size == (24, 12)
    assert np.abs(np.asarray(img).astype(int) - [200, 30, 30]).max() <= 3
    assert info.format == "JPEG" and info.conversion is None
    assert img.info["imgclf_original_mode"] == "RGB"


def test_bytes_and_path_give_the_same_pixels(tmp_path, make_image):
    path = make_image(tmp_path / "a.png", (16, 16))
    assert np.array_equal(np.asarray(open_rgb(path)), np.asarray(open_rgb(path.read_bytes())))


def test_exif_orientation_is_applied(tmp_path, make_image):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = make_image(tmp_path / "r.jpg", (40, 20), color=(10, 200, 10), exif=exif.tobytes())
    img, info = open_rgb_with_info(path)
    assert img.size == (20, 40)
    assert info.orientation == 6


def test_grayscale_is_converted(tmp_path, make_image):
    img, info = open_rgb_with_info(make_image(tmp_path / "g.png", color=77, mode="L"))
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (77, 77, 77)
    assert info.conversion == "grayscale"


def test_1bit_is_converted(tmp_path, make_image):
    img = open_rgb(make_image(tmp_path / "b.png", color=1, mode="1"))
    assert img.getpixel((3, 3)) == (255, 255, 255)


def test_16bit_png_is_scaled_by_its_range_not_clipped(tmp_path):
    values = np.linspace(1000, 3000, 16 * 16).reshape(16, 16).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    img, info = open_rgb_with_info(path)
    px = np.asarray(img)[..., 0].astype(int)
    assert info.mode.startswith("I;16") and info.conversion == "16-bit"
    assert px.min() == 0 and px.max() == 255  # clipping would give 255 everywhere
    assert abs(int(px[8, 0]) - 128) <= 2  # linear in between
    assert (np.diff(px.ravel()) >= 0).all()


def test_32bit_float_tiff_is_scaled(tmp_path):
    values = np.linspace(-1.0, 1.0, 16 * 16, dtype=np.float32).reshape(16, 16)
    values[0, 0] = np.nan
    path = tmp_path / "f.tif"
    Image.fromarray(values).save(path)
    px = np.asarray(open_rgb(path))[..., 0]
    assert px.max() == 255 and px[0, 1] == 0


def test_cmyk_jpeg_is_converted(tmp_path, make_image):
    # Pillow writes CMYK JPEGs the Adobe way (inverted), like Photoshop.
    path = make_image(tmp_path / "c.jpg", color=(0, 255, 255, 0), mode="CMYK")
    img, info = open_rgb_with_info(path)
    assert info.mode == "CMYK" and info.conversion == "CMYK"
    r, g, b = np.asarray(img).reshape(-1, 3).mean(0)
    assert r > 240 and g < 15 and b < 15  # red, not its inverse (cyan)


def test_palette_png_with_transparency_is_composited_on_white(tmp_path):
    img = Image.new("P", (16, 16), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.paste(1, (0, 0, 8, 16))  # left half red, right half transparent index 0
    path = tmp_path / "p.png"
    img.save(path, transparency=0)
    out, info = open_rgb_with_info(path)
    assert out.getpixel((2, 2)) == (255, 0, 0)
    assert out.getpixel((12, 2)) == (255, 255, 255)
    assert info.transparency and info.conversion == "with transparency"


def test_rgba_is_composited_on_white(tmp_path, make_image):
    path = make_image(tmp_path / "a.png", color=(0, 0, 255, 0), mode="RGBA")
    assert open_rgb(path).getpixel((0, 0)) == (255, 255, 255)
    path = make_image(tmp_path / "half.png", color=(0, 0, 0, 128), mode="RGBA")
    assert open_rgb(path).getpixel((0, 0)) == pytest.approx((127, 127, 127), abs=1)


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    img, info = open_rgb_with_info(path)
    assert info.animated
    assert img.getpixel((5, 5)) == (255, 0, 0)


def test_animated_webp_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in ((0, 255, 0), (0, 0, 255))]
    path = tmp_path / "anim.webp"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, lossless=True)
    img, info = open_rgb_with_info(path)
    assert info.animated
    assert img.getpixel((5, 5)) == (0, 255, 0)


def test_png_content_with_jpg_extension_is_fine(tmp_path, make_image):
    path = make_image(tmp_path / "really_png.jpg", fmt="PNG")
    assert open_rgb(path).size == (16, 16)


def test_describe_mode():
    assert describe_mode("RGB") is None
    assert describe_mode("L") == "grayscale"
    assert describe_mode("I;16B") == "16-bit"
    assert describe_mode("CMYK") == "CMYK"


# --- bad files --------------------------------------------------------------------------------


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert "empty (0 bytes)" in _reason(path)


def test_truncated_jpeg(tmp_path, make_image):
    path = make_image(tmp_path / "t.jpg", (64, 64))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert _reason(path) == "truncated or corrupt JPEG: re-export or delete it"


def test_jpeg_header_only(tmp_path):
    path = tmp_path / "h.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF")
    assert "corrupt JPEG" in _reason(path)


@pytest.mark.parametrize(
    ("content", "kind"),
    [
        (b"<!DOCTYPE html>\n<html><body>Access denied</body></html>", "an HTML file"),
        (b"\xef\xbb\xbf  <html><head></head></html>", "an HTML file"),
        (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10"/>', "an SVG file"),
        (b'<svg xmlns="http://www.w3.org/2000/svg"></svg>', "an SVG file"),
        (b"just some notes about this image\n", "a text file"),
        (b"%PDF-1.4 ...", "a PDF document"),
        (b"BMW photos, see the shared folder\n", "a text file"),
    ],
)
def test_non_image_named_jpg(tmp_path, content, kind):
    path = tmp_path / "fake.jpg"
    path.write_bytes(content)
    assert _reason(path).startswith(f"is {kind}, not an image")


def test_random_bytes_are_not_an_image(tmp_path):
    path = tmp_path / "noise.jpg"
    path.write_bytes(bytes(range(256)) * 4)
    assert "not a supported image format" in _reason(path)


def test_too_small(tmp_path, make_image):
    assert _reason(make_image(tmp_path / "dot.png", (1, 1), color=(0, 0, 0))).startswith(
        "image is 1x1 pixels, too small to classify"
    )


def test_decompression_bomb_is_refused_from_the_header(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(30000, 30000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning may escape either
        reason = _reason(path)
    assert "declares 30000x30000 pixels" in reason and "decompression bomb" in reason


def test_bomb_below_pillows_limit_respects_max_pixels(tmp_path):
    # 100 MP: Pillow alone would only warn; our default limit (64 MP) refuses it silently.
    data = _png_header_only(10000, 10000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "over the limit of 64 MP" in _reason(data)
    assert "over the limit of 1 MP" in _reason(_png_header_only(2000, 1000), max_pixels=1_000_000)


def test_directory_named_like_an_image(tmp_path):
    folder = tmp_path / "x.jpg"
    folder.mkdir()
    assert "is a folder" in _reason(folder)


def test_missing_file(tmp_path):
    assert "not found" in _reason(tmp_path / "gone.jpg")


def test_symlink_loop(tmp_path):
    (tmp_path / "a.jpg").symlink_to(tmp_path / "b.jpg")
    (tmp_path / "b.jpg").symlink_to(tmp_path / "a.jpg")
    assert "symbolic link loop" in _reason(tmp_path / "a.jpg")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file(tmp_path, make_image):
    path = make_image(tmp_path / "locked.jpg")
    path.chmod(0)
    try:
        assert "permission denied" in _reason(path)
    finally:
        path.chmod(0o644)


def test_non_utf8_file_name(tmp_path, make_image):
    name = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 bytes: not valid UTF-8
    path = make_image(tmp_path / name)
    assert open_rgb(path).size == (16, 16)
    path.write_bytes(b"")
    with pytest.raises(ImageError) as e:
        open_rgb(path)
    assert "caf\\xe9.jpg: file is empty" in str(e.value)
    print(e.value)  # must not raise UnicodeEncodeError


def test_bytes_errors_use_the_given_name():
    with pytest.raises(ImageError) as e:
        open_rgb(b"<html></html>", name="upload.jpg")
    assert str(e.value).startswith("upload.jpg: is an HTML file")
    assert isinstance(e.value, ImgclfError)


# --- helpers ----------------------------------------------------------------------------------


def test_file_digest(tmp_path, make_image):
    a = make_image(tmp_path / "a.png")
    b = tmp_path / "b.png"
    b.write_bytes(a.read_bytes())
    c = make_image(tmp_path / "c.png")
    assert file_digest(a) == file_digest(b) != file_digest(c)
    assert len(file_digest(a)) == 32
    with pytest.raises(ImageError):
        file_digest(tmp_path / "missing.png")


def test_image_extensions():
    assert {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"} <= IMAGE_EXTENSIONS
    assert all(e == e.lower() and e.startswith(".") for e in IMAGE_EXTENSIONS)


def test_every_pillow_mode_becomes_rgb():
    for mode in ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr", "I", "F", "I;16"):
        buf = io.BytesIO()
        img = Image.new(mode, (9, 9))
        img.save(buf, format="TIFF")
        assert open_rgb(buf.getvalue()).mode == "RGB", mode
