"""Stage 2 as one library call: a new user's captioned images in, the fitted `UserRecord` out.

`fit_new_user` does the whole fit: it reads and checks the images and captions, loads the stage-1
checkpoint (default: the embedded demo checkpoint) and the base model, encodes what decodes, fits
(`premier.training.stage2.fit_user`) and returns the record; writing it is the caller's. The
`premier fit-user` command (premier.training.cli) and the server's fit job (serving.fit_job) both
call it. It raises the core's error types, which every front end maps the same way
(premier.commands.exit_code): InvalidRequestError or InvalidEmbeddingError for bad images,
captions, ids or options (exit 2), ModelLoadError or CheckpointError for a model or checkpoint that
cannot be loaded (exit 3), TrainingError for a fit that stopped (exit 4).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from premier.checkpoint import PremierModel
from premier.errors import InvalidRequestError
from premier.models.embedded import build_embedded_premier
from premier.training.base_model import default_resolution, load_pipeline, resolve_device
from premier.training.config import OptimConfig, Stage2Config
from premier.training.dataset import CAPTIONS_FILE, read_user_folder
from premier.training.prepared import Batch, DataEncoder, load_image
from premier.training.stage2 import fit_user
from premier.user_record import UserRecord
from premier.users import validate_user_id

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")
ImageSource = str | Path | tuple[str, bytes]
"""One image: a file path, or (file name, encoded bytes) as uploaded."""


def fit_new_user(
    user_id: str,
    images: str | Path | Sequence[ImageSource],
    captions: Sequence[str] | None = None,
    *,
    model: str | Path | None = None,
    checkpoint: str | Path | None = None,
    mode: str = "coefficients",
    steps: int = 5000,
    batch_size: int = 2,
    eval_every: int = 50,
    patience: int = 10,
    early_stop: bool = False,
    init: str | None = None,
    resolution: int | None = None,
    precision: str = "fp32",
    seed: int = 0,
    optimizer: str | None = None,
    lr: float | None = None,
    weight_decay: float | None = 0.0,
    grad_clip: float | None = None,
    device: str | None = None,
    dtype: str | None = None,
    progress: bool = False,
    on_skip: Callable[[str, str], None] | None = None,
) -> UserRecord:
    """Fit `user_id` on its captioned images against a stage-1 checkpoint; returns the record (not written).

    `images`: a user folder (images + captions.jsonl, `captions` omitted), or a list of image paths or
    (file name, bytes) pairs with one caption each in `captions`, in order. `model`: a local diffusers
    FLUX folder (default: the embedded tiny model; a FLUX folder needs its stage-1 `checkpoint`).
    The options are `premier fit-user`'s, with its defaults (None: the stage-2 default). Images that
    do not decode are skipped and passed to `on_skip(file, reason)` (default: logged); if none
    decodes, or an option, the id or the captions are bad, InvalidRequestError is raised.
    """
    validate_user_id(user_id)
    files, sources, prompts, where = _read_images(user_id, images, captions)
    optim = {
        n: v
        for n, v in (("optimizer", optimizer), ("lr", lr), ("weight_decay", weight_decay), ("grad_clip", grad_clip))
        if v is not None
    }
    config = Stage2Config(
        mode=mode,
        steps=steps,
        batch_size=batch_size,
        eval_every=eval_every,
        patience=patience,
        early_stop=early_stop,
        init=init,
        precision=precision,
        seed=seed,
        optim=OptimConfig(**optim),
    )
    config.check()
    if dtype is not None and dtype not in DTYPES:
        raise InvalidRequestError("dtype", f"must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if checkpoint:
        premier, checkpoint_id = PremierModel.load(checkpoint)
    elif model is None:
        premier = build_embedded_premier()
        checkpoint_id = premier.checkpoint_id()
    else:
        raise InvalidRequestError(
            "checkpoint", "--checkpoint is required with --model (a stage-1 checkpoint for that model)"
        )
    torch_device = resolve_device(device)
    pipe = load_pipeline(model, torch_device, getattr(torch, dtype) if dtype else None)
    premier.config.check_fits(pipe.transformer.config)
    premier.to(torch_device)
    encoder = DataEncoder(pipe, resolution or default_resolution(model))

    decoded, kept = [], []
    for i, source in enumerate(sources):
        stream = io.BytesIO(source) if isinstance(source, bytes) else None
        image, reason = load_image(stream or source)
        if stream is not None:
            reason = reason.replace(repr(stream), repr(files[i]))  # name the file, not the in-memory stream
        if image is None:
            (on_skip or _log_skip)(files[i], reason)
            continue
        decoded.append(image)
        kept.append(i)
    if not kept:
        raise InvalidRequestError("images", f"none of the {len(sources)} images{where} could be decoded")
    latents = encoder.encode_images(decoded)
    text, pooled = encoder.encode_prompts([prompts[i] for i in kept])
    samples = Batch(latents, text, pooled, torch.zeros(len(kept), dtype=torch.long))
    result = fit_user(
        pipe.transformer,
        premier,
        checkpoint_id,
        samples,
        user_id,
        config,
        files=[files[i] for i in kept],
        progress=progress,
    )
    return result.record


def _read_images(
    user_id: str, images: str | Path | Sequence[ImageSource], captions: Sequence[str] | None
) -> tuple[list[str], list[Path | bytes], list[str], str]:
    """(file names, sources: paths or bytes, prompts, ' in FOLDER' or '') of a folder or of a list with captions."""
    if isinstance(images, (str, Path)):
        if captions is not None:
            raise InvalidRequestError("captions", f"{images} is a user folder: its {CAPTIONS_FILE} holds the captions")
        examples = read_user_folder(images, user_id=user_id)
        return [e.file for e in examples], [e.path for e in examples], [e.prompt for e in examples], f" in {images}"
    images = list(images)
    if not images:
        raise InvalidRequestError("images", "at least one image is needed to fit a user")
    captions = list(captions) if captions is not None else []
    if len(captions) != len(images):
        raise InvalidRequestError(
            "captions", f"{len(captions)} captions for {len(images)} images: give one caption per image, in order"
        )
    files: list[str] = []
    sources: list[Path | bytes] = []
    for i, item in enumerate(images):
        if isinstance(item, (str, Path)):
            name, source = Path(item).name, Path(item)
        elif (
            isinstance(item, tuple)
            and len(item) == 2
            and isinstance(item[0], str)
            and isinstance(item[1], (bytes, bytearray))
        ):
            name, source = item[0], bytes(item[1])
            if Path(name).name != name or name in ("", ".", ".."):
                raise InvalidRequestError(f"images[{i}]", f"file name {name!r} must be a plain file name (no folders)")
        else:
            raise InvalidRequestError(f"images[{i}]", "must be a file path or a (file name, bytes) pair")
        if name in files:
            raise InvalidRequestError(f"images[{i}]", f"file name {name!r} is used twice")
        if not isinstance(captions[i], str):
            raise InvalidRequestError(f"captions[{i}]", "must be a string")
        files.append(name)
        sources.append(source)
    return files, sources, captions, ""


def _log_skip(file: str, reason: str) -> None:
    log.warning("skipped %s: %s", file, reason)


__all__ = ["fit_new_user", "ImageSource"]
