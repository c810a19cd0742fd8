"""The user basis a process serves: the one loader behind the user store, the serving ingress and fit jobs.

Above both `premier.checkpoint` (a checkpoint folder) and `premier.models.embedded` (the shipped
demo checkpoint), so neither imports the other to answer "which users does this process serve".
"""

from __future__ import annotations

from pathlib import Path

from premier.checkpoint import PremierModel, load_user_basis
from premier.models.embedded import build_embedded_premier
from premier.users import UserEmbeddingTable


def load_served_basis(checkpoint: str | Path | None, *, verify: bool = False) -> tuple[UserEmbeddingTable, str]:
    """The user basis (training-user table) and checkpoint id of the checkpoint a process serves.

    `checkpoint` is a Premier checkpoint folder or None for the embedded demo checkpoint (built in
    memory). A folder is read light by default
    (`load_user_basis`: the users file and its recorded id); with `verify` it is loaded whole and
    its content id recomputed (`PremierModel.load`), refusing a corrupt checkpoint. The one loader
    behind both the user store (`UserStore.open`) and the serving ingress.
    """
    if checkpoint is None:
        model = build_embedded_premier()
        return model.users, model.checkpoint_id()
    if verify:
        model, ckpt_id = PremierModel.load(checkpoint)
        return model.users, ckpt_id
    return load_user_basis(checkpoint)


__all__ = ["load_served_basis"]
