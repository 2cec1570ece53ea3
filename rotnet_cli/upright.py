"""Writing one image file turned upright, as faithfully as its format allows.

``write_upright(source, target, correction)`` turns the picture a viewer shows (EXIF
orientation applied) counter-clockwise by ``correction`` degrees and writes it atomically
to ``target`` (which may be ``source`` itself, after a backup). It returns a note that says
exactly how the file was made, and claims "pixels turned losslessly (checked)" only after the
written file was decoded again and compared with the turned original, every frame and every
bit. (Whether the turn itself was the right one only the prediction can say: predict's report
adds what it predicted and how sure it was.) The routes:

- lossless formats through PIL (PNG, TIFF, BMP, GIF, lossless WebP ...), every frame of an
  animation or multi-page file, metadata kept: lossless, checked;
- 16-bit-per-channel PNGs, which PIL decodes to 8 bits: decoded by torchvision, turned,
  written as 16-bit PNG with every other chunk kept: lossless, checked;
- JPEG: re-encoded (lossy, quality 95) by default; ``jpeg="lossless"`` moves the DCT blocks
  with libjpeg-turbo's lossless transform (the optional ``turbojpeg`` package), which is
  only possible when the edges that move are whole JPEG blocks ("lossless-trim" then drops
  the partial edge blocks, up to 15 pixels); ``jpeg="orientation-tag"`` leaves every pixel
  byte as it is and sets the EXIF Orientation tag, which viewers apply;
- other angles than multiples of 90 are resampled (bicubic, canvas expanded).

A file that cannot be turned raises ``NotWritten`` (or ``UnreadableImage``) with the reason
as its message; nothing is written then.
"""

from __future__ import annotations

import errno
import io
import os
import re
import shutil
import stat
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .atomicfiles import atomic_write, os_error_behind
from .config import JPEG_ROUTES
from .errors import ConfigError
from .rotations import is_exact

JPEG_QUALITY = 95
ORIENTATION = 0x0112  # the EXIF tag
LOSSLESS_EXTRA = "pip install 'rotnet-cli[jpeg]'"
LOSSY_FORMATS = ("JPEG", "AVIF")  # always re-encoded: PIL writes AVIF lossy (its pixels would not compare equal)
LOSSLESS_CHECKED = "pixels turned losslessly (checked)"  # decoded again and compared, every frame and every bit

# A flip and rotation of the pixel grid as (mirror, turns): mirror left-right first (when
# True), then turn counter-clockwise by turns x 90 degrees. Turning it further by c is
# (mirror, turns + c). EXIF orientation N means a viewer shows the stored pixels through
# ORIENTATIONS[N] (the table PIL's ImageOps.exif_transpose applies; tests check they agree).
ORIENTATIONS = {
    1: (False, 0),
    2: (True, 0),
    3: (False, 2),
    4: (True, 2),
    5: (True, 1),
    6: (False, 3),
    7: (True, 3),
    8: (False, 1),
}
_ORIENTATION_OF = {grid: n for n, grid in ORIENTATIONS.items()}
# The same eight as PIL Transpose names, and as libjpeg-turbo's transform ops (whose ROT90 is clockwise).
_PIL_METHOD = {
    (False, 1): "ROTATE_90",
    (False, 2): "ROTATE_180",
    (False, 3): "ROTATE_270",
    (True, 0): "FLIP_LEFT_RIGHT",
    (True, 1): "TRANSPOSE",
    (True, 2): "FLIP_TOP_BOTTOM",
    (True, 3): "TRANSVERSE",
}
_TJ_OP = {
    (False, 0): "NONE",
    (False, 1): "ROT270",
    (False, 2): "ROT180",
    (False, 3): "ROT90",
    (True, 0): "HFLIP",
    (True, 1): "TRANSPOSE",
    (True, 2): "VFLIP",
    (True, 3): "TRANSVERSE",
}
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
# description, make, model, software, date and time, artist, copyright
_TIFF_DESCRIPTIVE_TAGS = (270, 271, 272, 305, 306, 315, 33432)


class NotWritten(Exception):
    """An image that is not written upright; the message says why (it goes into the report)."""


class UnreadableImage(NotWritten):
    """A file that decoded for the model but cannot be read in full for its copy."""


class DiskFull(Exception):
    """No space left: every further write would fail too."""


# ----------------------------------------------------------------------------- the one entry point


def write_upright(
    source: Path,
    target: Path,
    correction: float,
    *,
    jpeg: str = "reencode",
    backup: Path | None = None,
    pending: Callable[[Path, bytes], None] | None = None,
) -> str:
    """Write ``source`` turned counter-clockwise by ``correction`` degrees to ``target``; see the module docstring.

    ``target`` gets the source's access and modification times; with ``target == source``
    the original is first kept as ``backup`` (a hard link, else a copy) and the file keeps its
    permission bits. ``pending(target, content)`` is called before the rename. Returns the report note.
    """
    from PIL import Image

    try:
        data = source.read_bytes()
        image = Image.open(io.BytesIO(data))
        eight_bit_only = _reads_16_bits_as_8(image)  # the tiles say so until they are loaded
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # PIL raises OSError subclasses for broken files
        raise UnreadableImage(f"could not be read for its upright copy: {e}") from e
    fmt = "JPEG" if image.format == "MPO" and getattr(image, "n_frames", 1) == 1 else image.format
    grid = _turned(_orientation(image), correction) if is_exact(correction) else None
    if fmt == "JPEG" and grid is not None and jpeg == "orientation-tag":
        content, note = _retagged_jpeg(data, grid)
    elif fmt == "JPEG" and grid is not None and jpeg in ("lossless", "lossless-trim"):
        content, note = _lossless_jpeg(data, image, grid, trim=jpeg == "lossless-trim")
    elif fmt == "PNG" and grid is not None and _png_bit_depth(data) == 16:
        content, note = _png16_upright(data, grid)
    elif eight_bit_only:
        raise NotWritten(
            f"PIL reads this {fmt} with 16 bits per channel as 8 bits; not turned, so that no precision is lost"
        )
    else:
        content, note = _pil_upright(image, fmt, data, grid, correction)
        if fmt == "MPO" and jpeg != "reencode":
            note += f" ({jpeg} handles single-picture JPEGs; this MPO holds {image.n_frames} pictures)"
    _install(content, source, target, backup, pending)
    return note


def require_jpeg_route(route: str) -> None:
    """A ConfigError before any work when ``route`` needs a package that is not installed."""
    if route not in JPEG_ROUTES:
        raise ConfigError(f"--jpeg must be one of {', '.join(JPEG_ROUTES)} (got {route!r})")
    if route.startswith("lossless"):
        try:
            import turbojpeg  # noqa: F401
        except ImportError:
            raise ConfigError(
                f"--jpeg {route} needs libjpeg-turbo's lossless transform: {LOSSLESS_EXTRA}, or use --jpeg reencode"
            ) from None


# ----------------------------------------------------------------------------- orientation as a grid transform


def _orientation(image) -> int:
    value = image.getexif().get(ORIENTATION, 1)
    return value if value in ORIENTATIONS else 1


def _turned(orientation: int, correction: float) -> tuple[bool, int]:
    """The flip/turn from the stored pixels to the upright picture: the viewer's, then ``correction``."""
    mirror, turns = ORIENTATIONS[orientation]
    return mirror, (turns + int(correction // 90)) % 4


def apply_grid(pixels: np.ndarray, grid: tuple[bool, int]) -> np.ndarray:
    """(H, W, ...) array through a (mirror, turns) transform."""
    mirror, turns = grid
    return np.ascontiguousarray(np.rot90(pixels[:, ::-1] if mirror else pixels, turns, axes=(0, 1)))


def _transpose(frame, grid: tuple[bool, int]):
    from PIL import Image

    method = _PIL_METHOD.get(grid)
    return frame.transpose(Image.Transpose[method]) if method else frame.copy()


# ----------------------------------------------------------------------------- PIL: every frame, checked


def _pil_upright(image, fmt: str, data: bytes, grid: tuple[bool, int] | None, correction: float) -> tuple[bytes, str]:
    from PIL import Image, ImageSequence

    Image.init()  # registers every writer, so SAVE is complete
    if fmt not in Image.SAVE:
        raise NotWritten(f"PIL reads {fmt} files but cannot write them; not turned")
    frames, durations, disposals = [], [], []
    for frame in ImageSequence.Iterator(image):
        durations.append(frame.info.get("duration"))
        disposals.append(getattr(frame, "disposal_method", None))
        if grid is not None:
            frames.append(_transpose(frame, grid))
        else:  # upright as a viewer shows it, then resampled
            upright = _transpose(frame, ORIENTATIONS[_orientation(image)])
            frames.append(upright.rotate(correction, resample=Image.Resampling.BICUBIC, expand=True))
    params = _save_params(image, fmt, data, swapped=grid is not None and grid[1] % 2 == 1)
    if len(frames) > 1:
        if fmt not in Image.SAVE_ALL:
            raise NotWritten(f"PIL cannot write the {len(frames)} frames of this {fmt}; not turned")
        params.update(save_all=True, append_images=frames[1:])
        if any(d is not None for d in durations):
            params["duration"] = [d or 0 for d in durations]
        if fmt == "GIF" and any(d is not None for d in disposals):
            params["disposal"] = [d or 0 for d in disposals]
    buffer = io.BytesIO()
    try:
        frames[0].save(buffer, format=fmt, **params)
    except (OSError, ValueError, KeyError, TypeError) as e:  # a mode or option this writer does not take
        raise NotWritten(f"PIL could not write it as {fmt}: {e}; not turned") from e
    content = buffer.getvalue()
    notes = [] if grid is not None else [f"resampled (bicubic) for {correction:g} degrees"]
    if fmt in LOSSY_FORMATS or (fmt == "WEBP" and not params.get("lossless")) or params.get("compression") == "jpeg":
        notes.append(f"re-encoded as {fmt} (lossy, quality {JPEG_QUALITY})")
    elif grid is not None:
        notes.append(_compare_frames(frames, content))
    return content, ", ".join(notes)


def _reads_16_bits_as_8(image) -> bool:
    """PIL decodes 16-bit colour (RGB;16B and the like) into 8-bit modes; its raw modes tell."""
    if image.mode in _SIXTEEN_BIT_MODES:
        return False
    for tile in image.tile or []:
        args = tile[3]
        rawmode = args[0] if isinstance(args, tuple) and args else args
        if isinstance(rawmode, str) and "16" in rawmode:
            return True
    return False


def _save_params(image, fmt: str, data: bytes, swapped: bool) -> dict:
    """What describes the picture: ICC profile, transparency, dpi (swapped when the picture
    turns by 90), loop, comment, XMP and EXIF without orientation; JPEG at quality 95 with the
    original chroma subsampling, WebP lossless when the original was, TIFF's compression."""
    from PIL import JpegImagePlugin

    keys = ("icc_profile", "transparency", "dpi", "loop", "background", "comment", "compression")
    params = {key: image.info[key] for key in keys if image.info.get(key) is not None}
    if "dpi" in params and swapped:
        params["dpi"] = tuple(reversed(params["dpi"]))
    if fmt == "TIFF":  # its EXIF is the file's own structure (strips, sizes): keep only what describes the picture
        params["tiffinfo"] = {tag: image.tag_v2[tag] for tag in _TIFF_DESCRIPTIVE_TAGS if tag in image.tag_v2}
    elif exif := image.getexif():
        exif.pop(ORIENTATION, None)  # the pixels of the copy are upright
        params["exif"] = exif.tobytes()
    xmp = image.info.get("xmp") or image.info.get("XML:com.adobe.xmp")
    if xmp:
        params["xmp"] = _xmp_upright(xmp if isinstance(xmp, bytes) else xmp.encode())
    if fmt in ("JPEG", "WEBP", "MPO", "AVIF"):
        params["quality"] = JPEG_QUALITY
    if fmt == "WEBP" and _webp_is_lossless(data):  # a lossless WebP stays lossless
        params["lossless"] = True
    if fmt in ("JPEG", "MPO") and (image.info.get("progressive") or image.info.get("progression")):
        params["progressive"] = True  # a progressive JPEG stays progressive (web pages load it coarse-to-fine)
    if fmt in ("JPEG", "MPO") and isinstance(image, JpegImagePlugin.JpegImageFile):
        sampling = JpegImagePlugin.get_sampling(image)
        if sampling != -1:
            params["subsampling"] = sampling
    return params


def _webp_is_lossless(data: bytes) -> bool:
    """Whether a WebP's (first) image is VP8L, lossless, rather than VP8: its RIFF chunks say."""
    pos = 12
    while pos + 8 <= len(data):
        kind, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        if kind in (b"VP8L", b"VP8 "):
            return kind == b"VP8L"
        if kind == b"ANMF":  # an animation frame: a 16-byte header, then the frame's own chunks
            return _webp_is_lossless(b"\0" * 12 + data[pos + 24 : pos + 8 + size])
        pos += 8 + size + size % 2
    return False


def _compare_frames(expected: list, content: bytes) -> str:
    """Decode what was written and compare it with what was meant, frame by frame, every bit."""
    from PIL import Image, ImageSequence

    with Image.open(io.BytesIO(content)) as written:
        got = [frame.copy() for frame in ImageSequence.Iterator(written)]
    if len(got) != len(expected):
        return f"{len(expected)} frames written as {len(got)} (PIL merged or dropped frames)"
    worst = 0
    for want, have in zip(expected, got):
        if want.mode != have.mode and (want.mode in _SIXTEEN_BIT_MODES or have.mode in _SIXTEEN_BIT_MODES):
            return f"written as mode {have.mode} instead of {want.mode}"
        same = want.mode == have.mode and want.mode not in ("P", "PA")  # palettes may be reordered: compare colours
        a, b = (np.asarray(x if same else x.convert("RGBA")) for x in (want, have))
        if a.shape != b.shape:
            return f"written as {b.shape} instead of {a.shape}"
        worst = max(worst, float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max(initial=0)))
    frames = f", {len(got)} frames" if len(got) > 1 else ""
    if worst == 0:
        return f"{LOSSLESS_CHECKED}{frames}"
    return f"not lossless: pixel values differ by up to {worst:g}{frames}"


# ----------------------------------------------------------------------------- 16-bit PNG


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, pos = [], 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunks.append((kind, data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
        if kind == b"IEND":
            break
    return chunks


def _png_bit_depth(data: bytes) -> int | None:
    return data[24] if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" else None


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _decode_png16(data: bytes):
    """(C, H, W) uint16 tensor of a 16-bit PNG, by torchvision (PIL keeps only 8 of the 16 bits).

    torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec; until rotnet
    moves, the warning is rotnet's business, not the user's. Without them the image is not turned.
    """
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            from torchvision.io import ImageReadMode, decode_png
        except ImportError:
            raise NotWritten("16 bits per channel, and this torchvision cannot decode them; not turned") from None
        return decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)


def _png16_upright(data: bytes, grid: tuple[bool, int]) -> tuple[bytes, str]:
    """A 16-bit PNG turned at full precision: torchvision decodes it, the pixels are turned,
    and the file is written again with every other chunk as it was (pHYs swapped when the
    picture turns by 90, EXIF orientation reset)."""
    chunks = _png_chunks(data)
    if any(kind == b"acTL" for kind, _ in chunks):
        raise NotWritten("an animated 16-bit PNG; not turned")
    try:
        pixels = _decode_png16(data)
    except RuntimeError as e:
        raise UnreadableImage(f"could not be read for its upright copy: {e}") from e
    upright = apply_grid(pixels.permute(1, 2, 0).numpy(), grid)  # (H, W, C) uint16
    height, width, channels = upright.shape
    ihdr = bytearray(dict(chunks)[b"IHDR"])
    if channels != {0: 1, 2: 3, 4: 2, 6: 4}.get(ihdr[9]):  # the decoder added or dropped a channel
        raise NotWritten(f"a 16-bit PNG of colour type {ihdr[9]} decoded to {channels} channels; not turned")
    rows = upright.astype(">u2").view(np.uint8).reshape(height, width * channels * 2)
    # PNG's "Up" filter (type 2): each byte minus the byte above it, mod 256; it compresses photos well
    above = np.vstack([np.zeros_like(rows[:1]), rows[:-1]])
    filtered = np.hstack([np.full((height, 1), 2, np.uint8), rows - above])
    ihdr[0:8] = struct.pack(">II", width, height)
    ihdr[12] = 0  # not interlaced
    out = [b"\x89PNG\r\n\x1a\n", _png_chunk(b"IHDR", bytes(ihdr))]
    wrote_pixels = False
    for kind, body in chunks:
        if kind in (b"IHDR", b"IEND"):
            continue
        if kind == b"IDAT":
            if not wrote_pixels:
                out.append(_png_chunk(b"IDAT", zlib.compress(filtered.tobytes(), 6)))
                wrote_pixels = True
            continue
        if kind == b"pHYs" and grid[1] % 2:
            body = body[4:8] + body[0:4] + body[8:]
        elif kind == b"eXIf":
            body = _tiff_with_orientation(body, 1)
        out.append(_png_chunk(kind, body))
    out.append(_png_chunk(b"IEND", b""))
    content = b"".join(out)
    if not np.array_equal(_decode_png16(content).permute(1, 2, 0).numpy(), upright):
        raise NotWritten("its 16-bit copy did not decode to the turned pixels; not turned")
    return content, f"{LOSSLESS_CHECKED}, 16 bits per channel"


# ----------------------------------------------------------------------------- JPEG without re-encoding


def _lossless_jpeg(data: bytes, image, grid: tuple[bool, int], trim: bool) -> tuple[bytes, str]:
    """libjpeg-turbo's lossless transform: DCT blocks are moved, nothing is re-encoded.

    Only whole blocks (8 or 16 pixels, by chroma subsampling) can move: when an edge that
    moves is a partial block the transform is not perfect; ``trim`` then drops that edge,
    otherwise the image is re-encoded, and the note says which.
    """
    import turbojpeg

    op = getattr(turbojpeg.OP, _TJ_OP[grid])
    width, height = image.size
    progressive = bool(image.info.get("progressive") or image.info.get("progression"))  # stays as it was
    try:
        content = turbojpeg.transform(data, op=op, perfect=True, progressive=progressive)
        note = "lossless (JPEG blocks turned, not re-encoded)"
    except RuntimeError as perfect_error:
        if not trim or "not perfect" not in str(perfect_error):
            reason = (
                (
                    f"{width}x{height} is not a whole number of JPEG blocks, so a lossless turn would lose the "
                    "edge blocks (--jpeg lossless-trim trims them)"
                )
                if "not perfect" in str(perfect_error)
                else str(perfect_error)
            )
            content, note = _pil_upright(image, "JPEG", data, grid, 0)
            return content, f"{note}: {reason}"
        content = turbojpeg.transform(data, op=op, perfect=False, trim=True, progressive=progressive)
        note = None
    content = _jpeg_with_orientation(content, 1)  # markers were copied: the tag still says how the old pixels lay
    if note is None:
        from PIL import Image

        with Image.open(io.BytesIO(content)) as written:
            size = written.size
        full = (height, width) if grid[1] % 2 else (width, height)
        note = f"lossless (JPEG blocks turned), trimmed from {full[0]}x{full[1]} to {size[0]}x{size[1]}: partial edge blocks cannot be turned"
    return content, note


def _retagged_jpeg(data: bytes, grid: tuple[bool, int]) -> tuple[bytes, str]:
    value = _ORIENTATION_OF[grid]
    return _jpeg_with_orientation(data, value), (
        f"EXIF Orientation set to {value}: pixels untouched; viewers show it upright, software that ignores EXIF does not"
    )


def _jpeg_segments(data: bytes):
    """(marker, start, end) of each marker segment of a JPEG before its image data."""
    pos = 2  # after SOI
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xDA, 0xD9):  # start of scan, end of image
            return
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        yield marker, pos, end
        pos = end


_EXIF_HEADER = b"Exif\x00\x00"
_XMP_HEADER = b"http://ns.adobe.com/xap/1.0/\x00"


def _jpeg_with_orientation(data: bytes, value: int) -> bytes:
    """The JPEG with its EXIF (and XMP) Orientation set to ``value``; image data byte for byte as it was."""
    exif_at = None
    out = data
    for marker, start, end in list(_jpeg_segments(data)):
        body = data[start + 4 : end]
        if marker == 0xE1 and body.startswith(_EXIF_HEADER) and exif_at is None:
            exif_at = (start, end)
        elif marker == 0xE1 and body.startswith(_XMP_HEADER):  # same length: offsets after it stay valid
            out = out[: start + 4] + _xmp_upright(body, value) + out[end:]
    if exif_at is None:
        if value == 1:
            return out
        from PIL import Image

        exif = Image.Exif()
        exif[ORIENTATION] = value
        segment = _app1(exif.tobytes())
        insert = 2
        first = next(_jpeg_segments(out), None)
        if first and first[0] == 0xE0:  # JFIF's APP0 must stay first
            insert = first[2]
        return out[:insert] + segment + out[insert:]
    start, end = exif_at
    head = start + 4 + len(_EXIF_HEADER)
    tiff = out[head:end]
    patched = _tiff_with_orientation(tiff, value)
    if len(patched) == len(tiff):
        return out[:head] + patched + out[end:]
    return out[:start] + _app1(_EXIF_HEADER + patched) + out[end:]


def _app1(body: bytes) -> bytes:
    if len(body) + 2 > 0xFFFF:
        raise NotWritten("its EXIF block would exceed the 64 KB a JPEG segment holds; not turned")
    return b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body


def _tiff_with_orientation(tiff: bytes, value: int) -> bytes:
    """TIFF-structured EXIF with Orientation ``value``: the two bytes of an existing tag are
    changed in place (every offset, maker notes included, stays valid); a missing tag makes
    PIL write the block anew."""
    from PIL import Image

    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if order and len(tiff) >= 8:
        ifd = struct.unpack(order + "I", tiff[4:8])[0]
        if ifd + 2 <= len(tiff):
            count = struct.unpack(order + "H", tiff[ifd : ifd + 2])[0]
            for entry in range(ifd + 2, min(ifd + 2 + 12 * count, len(tiff) - 11), 12):
                tag, kind, n = struct.unpack(order + "HHI", tiff[entry : entry + 8])
                if tag == ORIENTATION and kind == 3 and n == 1:  # one SHORT, stored in the entry itself
                    return tiff[: entry + 8] + struct.pack(order + "H", value) + tiff[entry + 10 :]
    if value == 1:
        return tiff  # no tag means 1 already
    exif = Image.Exif()
    exif.load(_EXIF_HEADER + tiff)
    exif[ORIENTATION] = value
    return exif.tobytes()[len(_EXIF_HEADER) :]


def _xmp_upright(xmp: bytes, value: int = 1) -> bytes:
    """XMP's tiff:Orientation (attribute or element) set to ``value``, one digit for one: same length."""
    return re.sub(rb'(tiff:Orientation(?:="|>))[1-8]', lambda m: m.group(1) + str(value).encode(), xmp)


# ----------------------------------------------------------------------------- writing the file


def _install(
    content: bytes,
    source: Path,
    target: Path,
    backup: Path | None,
    pending: Callable[[Path, bytes], None] | None = None,
) -> None:
    """Write ``content`` to ``target`` atomically with the source's file times (and, in place,
    its owner, group, mode and extended attributes, after keeping the original as ``backup``).

    A turn that fails leaves the folder as it was: the backup it made is removed again."""
    before = source.stat()
    made_backup = False

    def write(tmp: Path) -> None:
        nonlocal made_backup
        tmp.write_bytes(content)
        if backup is not None:
            _keep_backup(source, backup)
            made_backup = True
            _keep_ownership(source, tmp, before)  # on the temp file: the rename then installs it whole
        if pending is not None:
            pending(target, content)  # before the rename: a kill right after leaves a copy known by its content

    try:
        atomic_write(target, write)
        if made_backup and not before.st_mode & stat.S_IWUSR:
            os.chmod(target, before.st_mode & 0o7777)  # the temp file needed its owner's write bit for its fsync
        os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    except BaseException as e:
        if made_backup and not _replaced(target, before):
            try:
                backup.unlink(missing_ok=True)  # the original is still in place: its backup would block every later run
            except OSError:
                pass  # an append-only folder: the backup is identical to the file, so the next run removes it
        if isinstance(e, NotWritten) or not isinstance(e, Exception):
            raise
        cause = os_error_behind(e)  # atomic_write names disk-full and permission errors; the rest are OSErrors
        if cause is not None and cause.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise DiskFull(f"disk full while writing {target}") from e
        if cause is None:
            raise
        raise NotWritten(f"cannot write {target}: {cause.strerror or cause}") from e


def _replaced(target: Path, before: os.stat_result) -> bool:
    """Whether ``target`` is no longer the file ``before`` described (the rename happened)."""
    try:
        now = target.stat()
    except OSError:
        return True
    return (now.st_dev, now.st_ino) != (before.st_dev, before.st_ino)


def _keep_ownership(source: Path, tmp: Path, before: os.stat_result) -> None:
    """The original's owner, group, permission bits and extended attributes (ACLs among them) on
    the file that replaces it. Where they cannot be kept (not root) the file stays the writer's;
    the caller compares and says so."""
    try:
        shutil.copystat(source, tmp)  # mode, times and xattrs
    except OSError:
        pass
    try:
        os.chown(tmp, before.st_uid, before.st_gid)
    except OSError:
        pass
    try:
        os.chmod(tmp, before.st_mode & 0o7777 | stat.S_IWUSR)  # again: chown clears set-id bits
    except OSError:
        pass


def _keep_backup(source: Path, backup: Path) -> None:
    """The original under its backup name: a hard link (same bytes, times and inode), else a copy."""
    try:
        os.link(source, backup)
    except FileExistsError:
        raise NotWritten(f"its backup {backup.name} exists; move it away or choose another --backup-suffix") from None
    except OSError:  # a file system without hard links (or an immutable file)
        try:
            shutil.copy2(source, backup)
        except BaseException:
            backup.unlink(missing_ok=True)  # half a backup would block every later run, and keep nothing
            raise


def copy_unchanged(source: Path, target: Path, pending: Callable[[Path, bytes], None] | None = None) -> None:
    """``source`` byte for byte at ``target`` (atomically, with its file times)."""
    if not stat.S_ISREG(os.stat(source).st_mode):  # a fifo given by name: reading it would block
        raise NotWritten("not a regular file (a fifo, socket or device)")
    _install(source.read_bytes(), source, target, None, pending)


__all__ = [
    "write_upright",
    "copy_unchanged",
    "require_jpeg_route",
    "apply_grid",
    "NotWritten",
    "UnreadableImage",
    "DiskFull",
    "JPEG_ROUTES",
    "ORIENTATIONS",
]
