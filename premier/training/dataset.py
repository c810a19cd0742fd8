"""The raw dataset format an application exports from its logs, and its checks.

    DATA/
      <user_id>/                  one folder per user; the folder name is the user id
        captions.jsonl            one line per image: {"file": "0001.png", "prompt": "a red barn"}
        0001.png                  images (PNG, JPEG, WebP, ...; any size: they are resized and cropped)
        ...

Every image must have a caption line and every caption line an image; a folder with neither
is an error, so mistakes in an export are caught before hours of encoding. Files that exist
but cannot be decoded are not errors here: `premier data prepare` skips and lists them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from premier.errors import InvalidRequestError
from premier.users import validate_user_id

CAPTIONS_FILE = "captions.jsonl"
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


class DatasetError(InvalidRequestError):
    """A dataset folder that does not follow the format; the message names the file and line."""

    def __init__(self, message: str):
        super().__init__("dataset", message)


@dataclass(frozen=True)
class Example:
    user_id: str
    path: Path
    prompt: str

    @property
    def file(self) -> str:
        return self.path.name


def read_user_folder(folder: str | Path, user_id: str | None = None) -> list[Example]:
    """A user's captioned images, in caption-file order; raises DatasetError on any mismatch."""
    folder = Path(folder)
    user_id = validate_user_id(user_id if user_id is not None else folder.name)
    if not folder.is_dir():
        raise DatasetError(f"{folder} is not a folder")
    captions = folder / CAPTIONS_FILE
    images = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not captions.is_file():
        if not images:
            raise DatasetError(f"user folder {folder} is empty: it needs images and a {CAPTIONS_FILE}")
        raise DatasetError(f"user folder {folder} has {len(images)} images but no {CAPTIONS_FILE}")
    examples: list[Example] = []
    seen: set[str] = set()
    for lineno, line in enumerate(captions.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{captions}:{lineno}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{where}: not valid JSON ({e.msg})") from None
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("file"), str)
            or not isinstance(entry.get("prompt"), str)
        ):
            raise DatasetError(f'{where}: each line must be {{"file": "...", "prompt": "..."}}')
        name = entry["file"]
        if Path(name).name != name or name in ("", ".", ".."):
            raise DatasetError(f"{where}: file {name!r} must be a plain file name inside the user folder")
        if name in seen:
            raise DatasetError(f"{where}: {name!r} is captioned twice")
        if not (folder / name).is_file():
            raise DatasetError(f"{where}: caption for {name!r}, but there is no such image in {folder}")
        seen.add(name)
        examples.append(Example(user_id, folder / name, entry["prompt"]))
    uncaptioned = [n for n in images if n not in seen]
    if uncaptioned:
        shown = ", ".join(uncaptioned[:5]) + (", ..." if len(uncaptioned) > 5 else "")
        raise DatasetError(f"{folder}: {len(uncaptioned)} image(s) without a caption in {CAPTIONS_FILE}: {shown}")
    if not examples:
        raise DatasetError(f"user folder {folder} is empty: {CAPTIONS_FILE} lists no images")
    return examples


def read_dataset(root: str | Path) -> dict[str, list[Example]]:
    """Every user folder under `root` (sorted by user id)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DatasetError(f"dataset folder {root} has no user folders")
    users: dict[str, list[Example]] = {}
    for folder in folders:
        try:
            validate_user_id(folder.name)
        except InvalidRequestError as e:
            raise DatasetError(f"user folder {folder}: the folder name is the user id, and {e.message}") from None
        users[folder.name] = read_user_folder(folder)
    return users


def write_user_folder(folder: str | Path, items: list[tuple[str, object, str]]) -> Path:
    """Write (file name, PIL image, prompt) triples in the format above (for exports and tests)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / CAPTIONS_FILE, "w", encoding="utf-8") as fh:
        for name, image, prompt in items:
            image.save(folder / name)  # type: ignore[attr-defined]
            fh.write(json.dumps({"file": name, "prompt": prompt}) + "\n")
    return folder
