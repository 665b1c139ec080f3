"""Decoding: every mode ends as upright 8-bit RGB, sizes from headers match the decoded pixels."""

import numpy as np
import pytest
from PIL import Image

from docev.vision.image_io import EXIF_ORIENTATION, ImageLoadError, load_image, read_image_size, to_rgb


def _save(image: Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def test_rgb_png_roundtrip(tmp_path):
    src = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    out = load_image(_save(src, tmp_path / "a.png"))
    assert out.mode == "RGB" and out.size == (50, 30)
    assert np.array_equal(np.asarray(out), np.asarray(src))
    assert read_image_size(tmp_path / "a.png") == (30, 50)


@pytest.mark.parametrize(
    "mode, value, expected",
    [("RGBA", (10, 20, 30, 0), (255, 255, 255)),  # fully transparent → white paper
     ("RGBA", (10, 20, 30, 255), (10, 20, 30)),
     ("LA", (0, 128), (128, 128, 128)),  # half-transparent black over white
     ("L", 77, (77, 77, 77)),
     ("1", 1, (255, 255, 255))],
)  # fmt: skip
def test_alpha_and_grey_modes(tmp_path, mode, value, expected):
    out = load_image(_save(Image.new(mode, (4, 3), value), tmp_path / "x.png"))
    assert out.mode == "RGB"
    px = out.getpixel((1, 1))
    assert all(abs(a - b) <= 1 for a, b in zip(px, expected, strict=True)), px


def test_palette_with_and_without_transparency(tmp_path):
    p = Image.new("P", (4, 4), 0)
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.putpixel((0, 0), 1)
    assert load_image(_save(p, tmp_path / "p.png")).getpixel((0, 0)) == (0, 0, 255)
    assert load_image(tmp_path / "p.png").getpixel((2, 2)) == (255, 0, 0)
    p.info["transparency"] = 0  # index 0 (red) is transparent → white
    out = load_image(_save(p, tmp_path / "pt.png", transparency=0))
    assert out.getpixel((2, 2)) == (255, 255, 255) and out.getpixel((0, 0)) == (0, 0, 255)


def test_cmyk_jpeg(tmp_path):
    out = load_image(_save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "c.jpg", quality=95))
    r, g, b = out.getpixel((8, 8))
    assert out.mode == "RGB" and r > 230 and g < 30 and b < 30  # pure red


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "g16.png")  # opens as I;16 (or I)
    assert Image.open(path).mode in ("I;16", "I")
    out = load_image(path)
    assert [out.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (100, 100, 100), (255, 255, 255)]


def test_float_image():
    img = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")
    assert [to_rgb(img).getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


# What each EXIF orientation asks a viewer to do to the stored pixels (EXIF 2.3, tag 0x0112), written
# with numpy, independently of PIL's ImageOps.exif_transpose (which load_image uses).
REFERENCE_ROTATION = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirror left-right
    3: lambda a: a[::-1, ::-1],  # rotate 180°
    4: lambda a: a[::-1, :],  # mirror top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # transpose (about the main diagonal)
    6: lambda a: np.rot90(a, -1),  # rotate 90° clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # transverse (about the anti-diagonal)
    8: lambda a: np.rot90(a, 1),  # rotate 90° counter-clockwise
}


def _blocks() -> np.ndarray:
    """2 × 3 blocks of 16 px, six distinct colours: every orientation gives a different picture."""
    colours = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]], [[255, 255, 0], [0, 255, 255], [255, 0, 255]]])
    return np.kron(colours, np.ones((16, 16, 1))).astype(np.uint8)  # (32, 48, 3)


def test_reference_rotations_are_all_different():
    pictures = {o: f(_blocks()) for o, f in REFERENCE_ROTATION.items()}
    assert len({(p.shape, p.tobytes()) for p in pictures.values()}) == 8


@pytest.mark.parametrize("fmt", ["png", "jpg"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation(tmp_path, orientation, fmt):
    arr = _blocks()
    src = Image.fromarray(arr)
    exif = src.getexif()
    exif[EXIF_ORIENTATION] = orientation
    path = _save(src, tmp_path / f"o.{fmt}", exif=exif.tobytes(), **({"quality": 95} if fmt == "jpg" else {}))
    with Image.open(path) as stored:
        assert stored.getexif()[EXIF_ORIENTATION] == orientation
        decoded = np.asarray(stored.convert("RGB"))  # the stored pixels (JPEG: as decoded), not reoriented
    if fmt == "png":
        assert np.array_equal(decoded, arr)
    out = np.asarray(load_image(path))
    rotated = orientation >= 5
    assert out.shape[:2] == ((48, 32) if rotated else (32, 48)) == read_image_size(path)
    assert np.array_equal(out, REFERENCE_ROTATION[orientation](decoded))


def test_multi_frame_tiff_first_frame(tmp_path):
    first, second = Image.new("RGB", (8, 6), (1, 2, 3)), Image.new("RGB", (8, 6), (9, 9, 9))
    path = tmp_path / "m.tif"
    first.save(path, save_all=True, append_images=[second])
    out = load_image(path)
    assert out.getpixel((0, 0)) == (1, 2, 3) and out.size == (8, 6)


def test_errors_name_the_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ImageLoadError, match="bad.png") as exc:
        load_image(tmp_path / "bad.png")
    assert exc.value.path.endswith("bad.png")
    with pytest.raises(ImageLoadError, match="missing.png"):
        read_image_size(tmp_path / "missing.png")
    full = tmp_path / "full.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(full)
    (tmp_path / "cut.png").write_bytes(full.read_bytes()[:400])
    with pytest.raises(ImageLoadError, match="cut.png"):
        load_image(tmp_path / "cut.png")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_png_header_size_without_decoding_and_exif_after_the_pixels(tmp_path, monkeypatch):
    """A PNG's size needs no pixel decode unless it has an eXIf chunk; one after IDAT (allowed, and what some
    tools write) still turns the size, as the decoder will."""
    from PIL import ImageFile

    plain = _save(Image.fromarray(_blocks()), tmp_path / "plain.png")
    exif = Image.new("RGB", (1, 1)).getexif()
    exif[EXIF_ORIENTATION] = 6
    data = plain.read_bytes()
    late = tmp_path / "late.png"
    late.write_bytes(data[:-12] + _png_chunk(b"eXIf", exif.tobytes()[6:]) + data[-12:])  # eXIf just before IEND
    with Image.open(late) as im:
        assert "exif" not in im.info  # PIL only finds it by decoding the pixels
    assert read_image_size(late) == (48, 32) == load_image(late).size[::-1]

    def no_decode(self):
        raise AssertionError("decoded the pixels to read a size")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    assert read_image_size(plain) == (32, 48)
