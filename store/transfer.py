"""Export and import: a folder with `users.safetensors` (the vectors) and `users.jsonl` (one line per user).

Vectors are grouped by (mode, shape) into stacked tensors named e.g. "coefficients/1000" or
"direct/30x1024", so a million users is a handful of tensors, not a million header entries; each
JSONL line names its tensor and row. The safetensors metadata records the format, the count and
the SHA-256 of the JSONL file, so a mismatched or truncated pair is refused. Export reads one
consistent database snapshot; import is all-or-nothing (one transaction) and keeps the times.
Only safetensors and JSON are read: nothing executable comes from the files.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from premier.errors import InvalidRequestError
from premier.files import atomic_save_safetensors, atomic_write_bytes, read_safetensors
from premier.user_record import UserRecord
from store.user_store import UserStore

TENSORS_FILE = "users.safetensors"
LINES_FILE = "users.jsonl"
EXPORT_FORMAT = "premier-user-export"
EXPORT_VERSION = "1"


def _group(record: UserRecord) -> str:
    return f"{record.mode}/{'x'.join(str(s) for s in record.vector.shape)}"


def export_store(store: UserStore, folder: str | Path) -> int:
    """Write every record (all checkpoints) to `folder`; returns the number of users."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InvalidRequestError("folder", f"{folder} exists and is not a folder")
    groups: dict[str, list[torch.Tensor]] = {}
    lines: list[bytes] = []
    for record in store.iter_records():
        name = _group(record)
        rows = groups.setdefault(name, [])
        line = {
            "user_id": record.user_id,
            "mode": record.mode,
            "checkpoint_id": record.checkpoint_id,
            "fit": record.fit,
            "created_at": record.created_at,
            "updated_at": record.updated_at,
            "tensor": name,
            "row": len(rows),
        }
        rows.append(record.vector)
        lines.append(json.dumps(line, sort_keys=True).encode() + b"\n")
    body = b"".join(lines)
    tensors = {name: torch.stack(rows) for name, rows in groups.items()}
    groups.clear()
    meta = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_VERSION,
        "count": str(len(lines)),
        "jsonl_sha256": hashlib.sha256(body).hexdigest(),
    }
    atomic_write_bytes(folder / LINES_FILE, body)
    atomic_save_safetensors(tensors, folder / TENSORS_FILE, metadata=meta)
    return len(lines)


def read_export(folder: str | Path) -> Iterator[UserRecord]:
    """Validated records from an export folder; any problem raises InvalidRequestError naming the line."""
    folder = Path(folder)
    tpath, lpath = folder / TENSORS_FILE, folder / LINES_FILE
    for p in (tpath, lpath):
        if not p.is_file():
            raise InvalidRequestError(
                "import", f"{p} does not exist (an export folder holds {TENSORS_FILE} and {LINES_FILE})"
            )
    tensors, meta = read_safetensors(tpath, error=lambda msg: InvalidRequestError("import", msg))
    if meta.get("format") != EXPORT_FORMAT or meta.get("format_version") != EXPORT_VERSION:
        raise InvalidRequestError("import", f"{tpath} is not a Premier user export (format {meta.get('format')!r})")
    body = lpath.read_bytes()
    if hashlib.sha256(body).hexdigest() != meta.get("jsonl_sha256"):
        raise InvalidRequestError(
            "import", f"{lpath} does not match {tpath} (checksum differs: a mixed or edited pair)"
        )
    seen: set[str] = set()
    for n, raw in enumerate(body.splitlines(), 1):
        where = f"{lpath.name} line {n}"
        try:
            line = json.loads(raw)
            name, row = line["tensor"], line["row"]
            if name not in tensors or not isinstance(row, int) or not 0 <= row < tensors[name].shape[0]:
                raise ValueError(f"tensor {name!r} row {row!r} does not exist")
            record = UserRecord(
                line["user_id"],
                line["mode"],
                tensors[name][row],
                line["checkpoint_id"],
                line.get("fit", {}),
                line["created_at"],
                line["updated_at"],
            )
        except (ValueError, KeyError, TypeError) as e:
            raise InvalidRequestError("import", f"{where}: {e}") from None
        if _group(record) != name:
            raise InvalidRequestError("import", f"{where}: a {record.mode} record cannot live in tensor {name!r}")
        if record.user_id in seen:
            raise InvalidRequestError("import", f"{where}: user {record.user_id!r} appears twice")
        seen.add(record.user_id)
        yield record
    if len(seen) != int(meta.get("count", -1)):
        raise InvalidRequestError("import", f"{lpath} holds {len(seen)} users; the export says {meta.get('count')}")


def import_store(store: UserStore, folder: str | Path) -> int:
    """Insert or replace every user of an export in one transaction (nothing is written on any error)."""
    return store.put_many(read_export(folder), keep_times=True)


__all__ = ["export_store", "import_store", "read_export", "TENSORS_FILE", "LINES_FILE"]
