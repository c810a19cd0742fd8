"""A fit upload: its checks, cheapest first and before any work, and its job folder.

`check_upload` runs before anything is written or decoded: names, counts, byte sizes and captions,
then each image's format by its content (PNG, JPEG or WebP only: a GIF, BMP, TIFF or EPS is refused
with `UnsupportedMediaError`, and Pillow is never asked to open another format), then its header:
width x height against `max_image_pixels` and the job's decoded size (width x height x 4 bytes,
what Pillow holds per pixel) against `max_decoded_bytes`. A flat 8192x8192 PNG of 200 KB is refused
there, from its 33-byte header, before a pixel is decoded.

`write_upload` fills the job folder the manager reserved (JOB_DIR/images with captions.jsonl, then
JOB_DIR/job.json last): every image is decoded once, in the manager's bounded pool of decode
threads, so that a truncated image is refused now and not in the job; the job is submitted only
after the folder is complete. The fitting task checks the same limits again (`check_images`).
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Iterable
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

from PIL import Image

from premier.errors import InvalidRequestError
from premier.training.dataset import CAPTIONS_FILE, read_user_folder
from serving.fit_settings import (
    DECODED_BYTES_PER_PIXEL,
    IMAGES_DIR,
    MAX_NAME_BYTES,
    SPEC_FILE,
    FitSettings,
    FitUnavailableError,
    UnsupportedMediaError,
    UploadTooLargeError,
    public_reason,
)

_ALLOWED_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
)
_OTHER_MAGIC = (  # only to say what a refused file is
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"%!PS", "PostScript/EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"%PDF", "PDF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"8BPS", "PSD"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"qoif", "QOI"),
    (b"<?xml", "XML/SVG"),
    (b"<svg", "SVG"),
)


def sniff(data: bytes) -> str | None:
    """The format of an image by its first bytes: "PNG", "JPEG", "WEBP", or None for anything else."""
    for magic, fmt in _ALLOWED_MAGIC:
        if data.startswith(magic):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _what(data: bytes) -> str:
    for magic, fmt in _OTHER_MAGIC:
        if data.startswith(magic):
            return f"{fmt} data"
    if data[4:12] in (b"ftypavif", b"ftypheic", b"ftypheix", b"ftypmif1"):
        return "HEIF/AVIF data"
    return "not an image of a known format"


def _formats_text(s: FitSettings) -> str:
    names = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP"}
    return ", ".join(names[f] for f in s.image_formats)


def check_upload(s: FitSettings, files: list[tuple[str, bytes]], captions: list[str]) -> None:
    """Everything that can be checked before anything is written or decoded.

    Raises InvalidRequestError (400), UploadTooLargeError (413) or UnsupportedMediaError (415), naming
    the field (`images`, `images[i]`, `captions`, `captions[i]`).
    """
    if not files:
        raise InvalidRequestError("images", "at least one image is needed to fit a user")
    if len(files) > s.max_images:
        raise UploadTooLargeError("images", f"{len(files)} images; at most {s.max_images} per upload")
    if len(captions) != len(files):
        raise InvalidRequestError(
            "captions", f"{len(captions)} captions for {len(files)} images: give one caption per image, in order"
        )
    suffixes = ", ".join(s.suffixes())
    total, seen = 0, set()
    for i, (name, data) in enumerate(files):
        where = f"images[{i}]"
        if (
            not isinstance(name, str)
            or not name
            or Path(name).name != name
            or name in (".", "..")
            or "\\" in name
            or name == CAPTIONS_FILE
        ):
            raise InvalidRequestError(where, f"file name {name!r} must be a plain file name (no folders)")
        if len(name.encode()) > MAX_NAME_BYTES or not name.isprintable():
            raise InvalidRequestError(
                where, f"file name {name[:40]!r}... must be printable and at most {MAX_NAME_BYTES} bytes"
            )
        if name.startswith("."):
            raise InvalidRequestError(where, f"file name {name!r} must not be hidden and must end in one of {suffixes}")
        if Path(name).suffix.lower() not in s.suffixes():
            raise UnsupportedMediaError(
                where, f"file name {name!r} must end in one of {suffixes}: {_formats_text(s)} images only"
            )
        if name in seen:
            raise InvalidRequestError(where, f"file name {name!r} is used twice")
        seen.add(name)
        if not isinstance(data, (bytes, bytearray)) or not data:
            raise InvalidRequestError(where, f"{name!r} is empty")
        if len(data) > s.max_image_bytes:
            raise UploadTooLargeError(where, f"{name!r} is {len(data)} bytes; at most {s.max_image_bytes} allowed")
        total += len(data)
    if total > s.max_upload_bytes:
        raise UploadTooLargeError("images", f"the upload is {total} bytes; at most {s.max_upload_bytes} allowed")
    for i, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise InvalidRequestError(f"captions[{i}]", "must be a string")
        if len(caption) > s.max_caption_chars:
            raise InvalidRequestError(
                f"captions[{i}]", f"is {len(caption)} characters; at most {s.max_caption_chars} allowed"
            )
    check_images(s, files)


def check_images(s: FitSettings, files: Iterable[tuple[str, bytes]]) -> int:
    """Each image's format by its content and its size by its header; returns the decoded bytes of them all.

    Decodes nothing. UnsupportedMediaError (415) for a format not allowed, InvalidRequestError (400)
    for a header that cannot be read, UploadTooLargeError (413) for too many pixels in one image or in
    the job. The fitting task calls it again on the bytes it gets.
    """
    decoded = 0
    for i, (name, data) in enumerate(files):
        where = f"images[{i}]"
        fmt = sniff(bytes(data[:16]))
        if fmt is None or fmt not in s.image_formats:
            what = f"{fmt} data" if fmt else _what(bytes(data[:16]))
            raise UnsupportedMediaError(
                where, f"{name!r} is not a readable image of an allowed format ({what}); {_formats_text(s)} only"
            )
        width, height = _header_size(where, name, data, fmt)
        pixels = width * height
        if pixels > s.max_image_pixels:
            raise UploadTooLargeError(
                where,
                f"{name!r} is {width}x{height} = {pixels} pixels; at most {s.max_image_pixels} allowed "
                "(refused before decoding)",
            )
        decoded += pixels * DECODED_BYTES_PER_PIXEL
        if decoded > s.max_decoded_bytes:
            raise UploadTooLargeError(
                "images",
                f"the images decode to more than {s.max_decoded_bytes} bytes together (counted as width x height x "
                f"{DECODED_BYTES_PER_PIXEL}; {name!r} is {width}x{height}); send fewer or smaller images",
            )
    return decoded


def _header_size(where: str, name: str, data: bytes, fmt: str) -> tuple[int, int]:
    """(width, height) from the header only: Image.open reads no pixel data. Pillow's own bomb check, a warning
    below twice its MAX_IMAGE_PIXELS and an error above, is silenced: the limit here is the settings'."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[fmt]) as im:
                return im.width, im.height
    except Image.DecompressionBombError as e:
        raise UploadTooLargeError(
            where, f"{name!r} has too many pixels ({_plain(e)}); refused before decoding"
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError) as e:
        raise InvalidRequestError(
            where, f"{name!r} is not a readable image ({type(e).__name__}: {_plain(e)})"
        ) from None


def _plain(e: BaseException) -> str:
    """An exception's message without the repr of an in-memory stream (Pillow names the file it was given)."""
    text = str(e)
    start = text.find("<_io.BytesIO object at ")
    if start >= 0:
        end = text.find(">", start)
        text = text[:start] + "the upload" + text[end + 1 :]
    return text


def decode_problem(s: FitSettings, name: str, data: bytes) -> str:
    """Why the image does not decode fully ('' if it does). Checked for format and size first: the limits hold."""
    fmt = sniff(bytes(data[:16]))
    if fmt is None or fmt not in s.image_formats:
        return f"{_what(bytes(data[:16]))}; {_formats_text(s)} only"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[fmt]) as im:
                if im.width * im.height > s.max_image_pixels:
                    return f"{im.width}x{im.height} pixels; at most {s.max_image_pixels} allowed"
                im.load()
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, Image.DecompressionBombError) as e:
        return f"{type(e).__name__}: {_plain(e)}"
    return ""


def write_upload(
    settings: FitSettings,
    job_dir: Path,
    user_id: str,
    files: list[tuple[str, bytes]],
    captions: list[str],
    spec: dict[str, Any],
    decoder: Executor | None = None,
) -> Path:
    """Decode every image once (in `decoder`'s threads), then write JOB_DIR/images and JOB_DIR/job.json (last).

    `job_dir` exists (the manager reserved it); the caller removes it if this fails. InvalidRequestError
    (naming images[i]) for an image that does not decode; FitUnavailableError for a disk that cannot be
    written (the server's trouble: its message names no path).
    """
    names = [name for name, _ in files]
    if decoder is not None:
        problems = list(decoder.map(lambda f: decode_problem(settings, *f), files))
    else:
        problems = [decode_problem(settings, *f) for f in files]
    for i, (name, reason) in enumerate(zip(names, problems)):
        if reason:
            raise InvalidRequestError(f"images[{i}]", f"{name!r} is not a readable image ({reason})")
    try:
        images = job_dir / IMAGES_DIR
        images.mkdir()
        for name, data in files:
            (images / name).write_bytes(data)
        lines = [json.dumps({"file": name, "prompt": caption}) for name, caption in zip(names, captions)]
        (images / CAPTIONS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
        try:
            read_user_folder(images, user_id=user_id)  # the job reads it the same way
        except InvalidRequestError as e:  # its messages name the folder: not in a reply
            raise InvalidRequestError("images", public_reason(e.message)) from None
        (job_dir / SPEC_FILE).write_text(json.dumps(spec, indent=1) + "\n")
    except OSError as e:  # a full or read-only disk: the server's trouble, not the request's
        raise FitUnavailableError(f"cannot store the upload: {e.strerror or type(e).__name__}") from None
    return job_dir


__all__ = ["check_upload", "check_images", "decode_problem", "write_upload", "sniff"]
