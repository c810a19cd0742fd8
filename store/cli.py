"""`premier users ...`: the user store from the command line.

Registered by premier/cli.py (it imports `register`). Nothing heavy is imported at module import
(the store, torch and the checkpoint load inside each command), so `premier --help` stays fast.
Bad input exits 2 and checkpoint problems exit 3 (premier.cli.main maps the core's errors); a
store that cannot be opened or read also exits 3.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

DEFAULT_STORE = "./premier-store"
EXIT_STORE_ERROR = 3


def _common(checkpoint: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("store")
    g.add_argument(
        "--store", metavar="DIR", default=None, help=f"store folder (default: $PREMIER_STORE or {DEFAULT_STORE})"
    )
    if checkpoint:  # backup/restore copy the database as it is: no checkpoint involved
        g.add_argument(
            "--checkpoint",
            metavar="DIR",
            help="Premier checkpoint the store serves (default: the embedded demo checkpoint)",
        )
    return p


def register(subparsers: Any) -> None:
    """Add the `users` command group to the top-level `premier` parser."""
    common, store_only = _common(), _common(checkpoint=False)
    users = subparsers.add_parser(
        "users",
        help="the user store: put, get, delete, list, nearest, export, import, backup, restore",
        description="Manage the user store: durable user records and nearest-preference search.",
    )
    sub = users.add_subparsers(dest="users_command", metavar="ACTION")
    sub.required = True

    def add(
        name: str, help: str, func: Callable[[argparse.Namespace], int], parent: argparse.ArgumentParser = common
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".", parents=[parent])
        p.set_defaults(func=_wrap(func))
        return p

    p = add("put", "store a user (a record file from fitting, or coefficients given here)", cmd_put)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--record", metavar="FILE", help="a user record .safetensors file (what fitting writes)")
    src.add_argument("--coefficients", metavar="JSON|@FILE", help="coefficient list as JSON, or @file.json")
    p.add_argument("--user", help="user id (required with --coefficients; overrides the record's id)")
    p.add_argument("--fit", metavar="JSON", help="fit metadata as a JSON object (with --coefficients)")

    p = add("get", "show one user", cmd_get)
    p.add_argument("user", help="user id")
    p.add_argument("--json", action="store_true", help="print JSON (the vector included)")
    p.add_argument("-o", "--output", metavar="FILE", help="also write the record as a .safetensors file")

    p = add("delete", "delete a user", cmd_delete)
    p.add_argument("user", help="user id")
    p.add_argument("--missing-ok", action="store_true", help="succeed if the user does not exist")

    p = add("list", "list users in id order", cmd_list)
    p.add_argument("--after", metavar="ID", help="start after this id (paging)")
    p.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    p.add_argument("--json", action="store_true", help="print JSON lines")

    p = add("nearest", "users with the most similar preference embeddings", cmd_nearest)
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("user", nargs="?", help="a stored user id (left out of its own answer)")
    q.add_argument("--coefficients", metavar="JSON|@FILE", help="a query coefficient vector instead of a user")
    p.add_argument("-k", type=int, default=10, help="how many (default 10)")
    p.add_argument("--exact", action="store_true", help="exhaustive search even if the index is approximate")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = add("export", "write every user to a folder (users.safetensors + users.jsonl)", cmd_export)
    p.add_argument("folder", help="output folder")

    p = add("import", "insert or replace every user of an export folder (all or nothing)", cmd_import)
    p.add_argument("folder", help="an export folder")

    p = add("stats", "counts, index kind and sizes", cmd_stats)
    p.add_argument("--json", action="store_true", help="print JSON")

    p = add(
        "backup",
        "online backup of the store's database to BACKUP_DIR/users-<UTC time>.sqlite3 (the server may run)",
        cmd_backup,
        store_only,
    )
    p.add_argument("backup_dir", metavar="BACKUP_DIR", help="folder of backups (created if missing)")
    p.add_argument("--keep", type=int, metavar="N", help="then delete all but the newest N backups in BACKUP_DIR")

    p = add(
        "restore",
        "replace the store's database by a backup (stop every server and fit job first)",
        cmd_restore,
        store_only,
    )
    p.add_argument("backup_file", metavar="BACKUP_FILE", help="a users-<time>.sqlite3 file written by `backup`")


def _wrap(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Map store errors (which premier.cli.main does not know) to exit 3 with a one-line message."""

    def run(args: argparse.Namespace) -> int:
        from store.errors import StoreError

        try:
            return func(args)
        except StoreError as e:
            print(f"premier users {args.users_command}: error: {e}", file=sys.stderr)
            return EXIT_STORE_ERROR

    return run


def _store_path(args: argparse.Namespace) -> str:
    return args.store or os.environ.get("PREMIER_STORE") or DEFAULT_STORE


def _open(args: argparse.Namespace, create: bool = False):
    from store.user_store import UserStore

    return UserStore.open(_store_path(args), args.checkpoint, create=create)


def _vector_arg(text: str, field: str):
    import torch

    from premier.errors import InvalidRequestError

    if text.startswith("@"):
        try:
            with open(text[1:]) as fh:
                text = fh.read()
        except OSError as e:
            raise InvalidRequestError(field, f"cannot read {text[1:]}: {e.strerror}") from None
    try:
        values = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidRequestError(field, f"is not valid JSON: {e}") from None
    if (
        not isinstance(values, list)
        or not values
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    ):
        raise InvalidRequestError(field, "must be a non-empty JSON list of numbers")
    return torch.tensor(values, dtype=torch.float64)


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ----------------------------------------------------------------------------- commands
def cmd_put(args: argparse.Namespace) -> int:
    from premier.errors import InvalidRequestError
    from premier.user_record import UserRecord

    with _open(args, create=True) as store:
        if args.record:
            record = UserRecord.load(args.record)
            if args.user:
                record = record.touched(user_id=args.user)
        else:
            if not args.user:
                raise InvalidRequestError("user", "--user is required with --coefficients")
            fit: Any = {}
            if args.fit:
                try:
                    fit = json.loads(args.fit)
                except json.JSONDecodeError as e:
                    raise InvalidRequestError("fit", f"is not valid JSON: {e}") from None
                if not isinstance(fit, dict):
                    raise InvalidRequestError("fit", "must be a JSON object")
            record = UserRecord(
                args.user, "coefficients", _vector_arg(args.coefficients, "coefficients"), store.checkpoint_id, fit
            )
        stored = store.put(record)
    print(
        f"stored {stored.user_id} ({stored.mode}, {tuple(stored.vector.shape)}, checkpoint {stored.checkpoint_id[:12]})"
    )
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    with _open(args) as store:
        r = store.get(args.user)
        servable = r.checkpoint_id == store.checkpoint_id
    if args.output:
        r.save(args.output)
    if args.json:
        print(
            json.dumps(
                {
                    "user_id": r.user_id,
                    "mode": r.mode,
                    "checkpoint_id": r.checkpoint_id,
                    "servable": servable,
                    "fit": r.fit,
                    "created_at": r.created_at,
                    "updated_at": r.updated_at,
                    "shape": list(r.vector.shape),
                    "vector": r.vector.flatten().tolist(),
                }
            )
        )
        return 0
    v = r.vector
    print(f"user        {r.user_id}")
    print(
        f"mode        {r.mode} {tuple(v.shape)}  norm {float(v.norm()):.4g}  first {[round(x, 4) for x in v.flatten()[:4].tolist()]}"
    )
    print(f"checkpoint  {r.checkpoint_id}" + ("" if servable else "  (NOT this store's checkpoint: not servable)"))
    print(f"fit         {json.dumps(r.fit, sort_keys=True)}")
    print(f"created     {_when(r.created_at)}   updated {_when(r.updated_at)}")
    if args.output:
        print(f"wrote {args.output}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    with _open(args) as store:
        existed = store.delete(args.user, missing_ok=args.missing_ok)
    print(f"deleted {args.user}" if existed else f"{args.user} was not stored")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with _open(args) as store:
        rows = store.list_users(after=args.after, limit=args.limit)
        ckpt = store.checkpoint_id
    for s in rows:
        if args.json:
            print(json.dumps(s.to_json(), sort_keys=True))
        else:
            flag = "" if s.checkpoint_id == ckpt else "  (other checkpoint)"
            print(f"{s.user_id}\t{s.mode}\t{'x'.join(map(str, s.shape))}\t{_when(s.updated_at)}{flag}")
    return 0


def cmd_nearest(args: argparse.Namespace) -> int:
    with _open(args) as store:
        query = args.user if args.user else _vector_arg(args.coefficients, "coefficients")
        hits = store.nearest(query, k=args.k, exact=args.exact)
    if args.json:
        print(json.dumps([{"user_id": u, "similarity": s} for u, s in hits]))
    else:
        for u, s in hits:
            print(f"{s:+.4f}\t{u}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from store.transfer import export_store

    with _open(args) as store:
        n = export_store(store, args.folder)
    print(f"exported {n} users to {args.folder}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from store.transfer import import_store

    with _open(args, create=True) as store:
        n = import_store(store, args.folder)
    print(f"imported {n} users from {args.folder}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    with _open(args) as store:
        store.ensure_index()
        stats = store.stats()
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        for key, value in stats.items():
            print(f"{key:24s} {value}")
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    from store.backup import backup

    result = backup(_store_path(args), args.backup_dir, keep=args.keep)
    print(
        f"backed up {result.users} users to {result.path}"
        + (f" (pruned {len(result.pruned)} older)" if result.pruned else "")
    )
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from store.backup import restore

    store = _store_path(args)
    result = restore(args.backup_file, store)
    print(
        f"restored {result.users} users into {store}"
        + (f" (previous files in {result.moved_to})" if result.moved_to else "")
    )
    return 0
