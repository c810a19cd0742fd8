"""A fit upload: its checks before anything is written, and its job folder written whole or not at all.

The job folder (JOB_DIR/{job.json, images/ with captions.jsonl}) is written beside its final place,
every image is decoded once, and it is renamed into place, so a job never sees half an upload.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image

from premier.errors import InvalidRequestError
from premier.training.dataset import CAPTIONS_FILE, IMAGE_SUFFIXES, read_user_folder
from premier.training.prepared import load_image
from serving.fit_settings import (
    IMAGES_DIR,
    MAX_NAME_BYTES,
    SPEC_FILE,
    FitSettings,
    FitUnavailableError,
    UploadTooLargeError,
)


def check_upload(s: FitSettings, files: list[tuple[str, bytes]], captions: list[str]) -> None:
    """Names, counts, sizes and captions, before anything is written (InvalidRequestError / UploadTooLargeError)."""
    s = s
    if not files:
        raise InvalidRequestError("images", "at least one image is needed to fit a user")
    if len(files) > s.max_images:
        raise UploadTooLargeError("images", f"{len(files)} images; at most {s.max_images} per upload")
    if len(captions) != len(files):
        raise InvalidRequestError(
            "captions", f"{len(captions)} captions for {len(files)} images: give one caption per image, in order"
        )
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
        if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
            raise InvalidRequestError(
                where, f"file name {name!r} must end in one of {', '.join(sorted(IMAGE_SUFFIXES))}"
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


def write_upload(
    settings: FitSettings,
    job_dir: Path,
    user_id: str,
    files: list[tuple[str, bytes]],
    captions: list[str],
    spec: dict[str, Any],
) -> Path:
    """JOB_DIR/{job.json, images/} written beside, checked (every image decodes), then renamed into place."""
    try:
        job_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{job_dir.name}.", dir=job_dir.parent))
    except OSError as e:
        raise FitUnavailableError(f"cannot store uploads in {job_dir.parent}: {e.strerror}") from None
    try:
        images = tmp / IMAGES_DIR
        images.mkdir()
        for name, data in files:
            (images / name).write_bytes(data)
        lines = [json.dumps({"file": name, "prompt": caption}) for (name, _), caption in zip(files, captions)]
        (images / CAPTIONS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
        for i, (name, _) in enumerate(files):
            reason = undecodable(settings, images / name).replace(
                str(images / name), name
            )  # no server paths in replies
            if reason:
                raise InvalidRequestError(f"images[{i}]", f"{name!r} is not a readable image ({reason})")
        read_user_folder(images, user_id=user_id)  # the job reads it the same way
        (tmp / SPEC_FILE).write_text(json.dumps(spec, indent=1) + "\n")
        os.replace(tmp, job_dir)
        return job_dir
    except OSError as e:  # a full or read-only disk: the server's trouble, not the request's
        shutil.rmtree(tmp, ignore_errors=True)
        raise FitUnavailableError(f"cannot store the upload: {e.strerror}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def undecodable(settings: FitSettings, path: Path) -> str:
    """Why the image cannot be used ('' if it can): it must decode fully and stay within the pixel limit."""
    try:
        with Image.open(path) as im:
            if im.width * im.height > settings.max_image_pixels:
                return f"{im.width}x{im.height} pixels; at most {settings.max_image_pixels} allowed"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return f"{type(e).__name__}: {e}"
    image, reason = load_image(path)
    return "" if image is not None else reason


__all__ = ["check_upload", "write_upload", "undecodable"]
