"""Premier checkpoints: a folder with a JSON config and safetensors files, named by content.

    premier_config.json      PremierConfig
    adapters.safetensors     both preference adapters
    users.safetensors        the training-user table ("weight", K x N x U); ids in its metadata

The checkpoint id is a SHA-256 over the config and every tensor (name, dtype, shape, bytes),
so it names the content, not the files: later records (fitted users, store entries) refer to
it to say which basis and adapters they were fitted against.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from premier.adapters import PremierAdapters
from premier.config import CONFIG_NAME, PremierConfig
from premier.errors import CheckpointError
from premier.files import read_safetensors
from premier.users import UserEmbeddingTable

ADAPTERS_FILE = "adapters.safetensors"
USERS_FILE = "users.safetensors"
FORMAT_VERSION = "1"


def content_id(config: PremierConfig, tensors: dict[str, torch.Tensor], user_ids: list[str]) -> str:
    h = hashlib.sha256()
    h.update(config.to_json().encode())
    h.update(json.dumps(user_ids).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class PremierModel(nn.Module):
    """What stage 1 trains and a Premier checkpoint holds: both adapters and the training-user table."""

    def __init__(
        self,
        config: PremierConfig,
        user_ids: list[str],
        adapters: PremierAdapters | None = None,
        users: UserEmbeddingTable | None = None,
    ):
        super().__init__()
        self.config = config
        self.adapters = adapters if adapters is not None else PremierAdapters(config)
        self.users = users if users is not None else UserEmbeddingTable(config, user_ids)

    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {f"adapters.{k}": v for k, v in self.adapters.state_dict().items()}
        out["users.weight"] = self.users.weight.detach()
        return out

    def checkpoint_id(self) -> str:
        return content_id(self.config, self._tensors(), self.users.user_ids)

    def save(self, folder: str | Path) -> str:
        """Write atomically (a temporary sibling folder renamed into place); return the checkpoint id."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        ckpt_id = self.checkpoint_id()
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            self.config.save(tmp)
            meta = {"format": "premier", "format_version": FORMAT_VERSION, "checkpoint_id": ckpt_id}
            adapters = {k: v.detach().contiguous().cpu() for k, v in self.adapters.state_dict().items()}
            save_file(adapters, str(tmp / ADAPTERS_FILE), metadata=meta)
            users_meta = dict(meta, user_ids=json.dumps(self.users.user_ids))
            save_file(
                {"weight": self.users.weight.detach().contiguous().cpu()}, str(tmp / USERS_FILE), metadata=users_meta
            )
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            if folder.exists():
                old = folder.with_name(f".{folder.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                folder.rename(old)
                tmp.rename(folder)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return ckpt_id

    @classmethod
    def load(cls, folder: str | Path, verify: bool = True) -> tuple[PremierModel, str]:
        """Load a checkpoint folder; with `verify`, recompute the content id and refuse a mismatch."""
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"Premier checkpoint folder {folder} does not exist")
        config = PremierConfig.load(folder)
        missing = [n for n in (ADAPTERS_FILE, USERS_FILE) if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(f"Premier checkpoint {folder} is missing {', '.join(missing)}")

        def unreadable(msg: str) -> CheckpointError:
            return CheckpointError(f"Premier checkpoint file {msg}")

        users, meta = _read_users(folder, config)
        adapters_state, _ = read_safetensors(folder / ADAPTERS_FILE, error=unreadable)
        user_ids = users.user_ids
        with torch.device("meta"):  # no throwaway random init of ~700M parameters at FLUX scale
            adapters = PremierAdapters(config)
        _load_strict(adapters, adapters_state, folder / ADAPTERS_FILE)
        model = cls(config, user_ids, adapters=adapters, users=users)
        ckpt_id = meta.get("checkpoint_id", "")
        if verify:
            actual = model.checkpoint_id()
            if ckpt_id and actual != ckpt_id:
                raise CheckpointError(
                    f"Premier checkpoint {folder} is corrupt: content id {actual[:12]} != recorded {ckpt_id[:12]}"
                )
            ckpt_id = actual
        return model, ckpt_id


def load_user_basis(folder: str | Path) -> tuple[UserEmbeddingTable, str]:
    """Only the training-user table and the checkpoint id (as recorded at save), without the adapters.

    For processes that resolve users but run no model (the serving ingress). The id is the one the
    checkpoint recorded; a checkpoint without one is loaded whole (and verified) to compute it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"Premier checkpoint folder {folder} does not exist")
    config = PremierConfig.load(folder)
    if not (folder / USERS_FILE).is_file():
        raise CheckpointError(f"Premier checkpoint {folder} is missing {USERS_FILE}")
    users, meta = _read_users(folder, config)
    ckpt_id = meta.get("checkpoint_id", "")
    if not ckpt_id:
        model, ckpt_id = PremierModel.load(folder)
        return model.users, ckpt_id
    return users, ckpt_id


def _read_users(folder: Path, config: PremierConfig) -> tuple[UserEmbeddingTable, dict[str, str]]:
    """The training-user table of a checkpoint folder and the users file's metadata."""
    users_state, meta = read_safetensors(
        folder / USERS_FILE, error=lambda msg: CheckpointError(f"Premier checkpoint file {msg}")
    )
    try:
        user_ids = json.loads(meta.get("user_ids", "[]"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{folder / USERS_FILE} has unreadable user ids: {e}") from None
    if "weight" not in users_state:
        raise CheckpointError(f"{folder / USERS_FILE} has no 'weight' tensor")
    weight = users_state["weight"]
    try:
        users = UserEmbeddingTable(config, user_ids, weight=weight.float() if weight.dtype == torch.float64 else weight)
    except ValueError as e:
        raise CheckpointError(f"{folder / USERS_FILE}: {e}") from e
    return users, meta


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """load_state_dict with one error that names every missing, unexpected or mis-shaped tensor."""
    own = module.state_dict()
    problems = [f"missing {k}" for k in own if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in own]
    problems += [
        f"{k}: checkpoint {tuple(v.shape)} vs config {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; ... ({len(problems)} problems)" if len(problems) > 6 else "")
        raise CheckpointError(f"{source} does not match its config: {shown}")
    module.load_state_dict(state, assign=True)


__all__ = ["PremierModel", "content_id", "load_user_basis", "CONFIG_NAME", "ADAPTERS_FILE", "USERS_FILE"]
