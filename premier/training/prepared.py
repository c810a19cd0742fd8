"""Encode a raw dataset once into safetensors shards, so training never runs the encoders.

    PREPARED/
      dataset.json                 manifest: model signature, resolution, users, shards (written last, atomically)
      empty_prompt.safetensors     T5 states and pooled CLIP of the empty prompt (for the dispersion loss)
      shards/<user>-<k>.safetensors
          latents (n, C, h, w)     VAE latent mean, already shifted and scaled as FLUX expects
          text    (n, T, C_t5)     T5 token states, padded to the model's max sequence length
          pooled  (n, P)           pooled CLIP vector
          metadata: user, files, prompts (JSON)
      skipped.jsonl                images that could not be decoded, with the reason

Images are resized and centre-cropped to one square resolution (diffusers' VaeImageProcessor,
resize_mode="crop"). A shard is written atomically and then recorded in the manifest with a
fingerprint of its source files, so a prepare that stops (or is killed) resumes at the first
shard not yet recorded, and a shard whose sources changed is encoded again.

Sizes at FLUX.1-dev scale, bf16: T5 states 4 MiB per image at 512 tokens, latents 0.5 MiB at 1024 px.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open

from premier.errors import InvalidRequestError
from premier.files import atomic_save_safetensors, atomic_write_bytes, read_safetensors
from premier.training.dataset import DatasetError, Example, read_dataset

MANIFEST = "dataset.json"
EMPTY_PROMPT_FILE = "empty_prompt.safetensors"
SHARDS_DIR = "shards"
SKIPPED_FILE = "skipped.jsonl"
FORMAT = "premier-prepared"
FORMAT_VERSION = 1


def model_signature(pipe: Any, max_sequence_length: int) -> dict[str, Any]:
    """What must match between the model that encoded a dataset and the one that trains on it."""
    t, vae = pipe.transformer.config, pipe.vae.config
    return {
        "in_channels": int(t.in_channels),
        "joint_attention_dim": int(t.joint_attention_dim),
        "pooled_projection_dim": int(t.pooled_projection_dim),
        "latent_channels": int(vae.latent_channels),
        "vae_scaling_factor": float(vae.scaling_factor),
        "vae_shift_factor": float(vae.shift_factor or 0.0),
        "vae_scale_factor": int(pipe.vae_scale_factor),
        "max_sequence_length": int(max_sequence_length),
    }


def check_signature(signature: dict[str, Any], transformer_config: Any) -> None:
    """Refuse to train a transformer on latents or text states it cannot take."""
    problems = []
    if signature["latent_channels"] * 4 != transformer_config.in_channels:
        problems.append(
            f"latent channels {signature['latent_channels']} (x4 packed) vs transformer in_channels {transformer_config.in_channels}"
        )
    if signature["joint_attention_dim"] != transformer_config.joint_attention_dim:
        problems.append(f"T5 width {signature['joint_attention_dim']} vs {transformer_config.joint_attention_dim}")
    if signature["pooled_projection_dim"] != transformer_config.pooled_projection_dim:
        problems.append(
            f"pooled width {signature['pooled_projection_dim']} vs {transformer_config.pooled_projection_dim}"
        )
    if problems:
        raise DatasetError("the prepared dataset was encoded for another model: " + "; ".join(problems))


class DataEncoder:
    """The frozen encoders of a FluxPipeline: images -> latents, prompts -> (T5 states, pooled)."""

    def __init__(
        self,
        pipe: Any,
        resolution: int,
        max_sequence_length: int | None = None,
        batch_size: int = 8,
        storage_dtype: torch.dtype | None = None,
    ):
        multiple = pipe.vae_scale_factor * 2
        if resolution <= 0 or resolution % multiple:
            raise InvalidRequestError("resolution", f"must be a positive multiple of {multiple}, got {resolution}")
        model_max = int(getattr(pipe.tokenizer_2, "model_max_length", 512) or 512)
        self.max_sequence_length = min(max_sequence_length or model_max, model_max, 512)
        self.pipe = pipe
        self.resolution = resolution
        self.batch_size = batch_size
        self.device = pipe.transformer.device
        self.storage_dtype = storage_dtype or pipe.transformer.dtype

    @property
    def signature(self) -> dict[str, Any]:
        return model_signature(self.pipe, self.max_sequence_length)

    @torch.inference_mode()
    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pipe, out = self.pipe, []
        for i in range(0, len(images), self.batch_size):
            chunk = [im.convert("RGB") for im in images[i : i + self.batch_size]]
            pixels = pipe.image_processor.preprocess(
                chunk, height=self.resolution, width=self.resolution, resize_mode="crop"
            )
            latents = pipe.vae.encode(pixels.to(self.device, pipe.vae.dtype)).latent_dist.mode()
            latents = (latents - (pipe.vae.config.shift_factor or 0.0)) * pipe.vae.config.scaling_factor
            out.append(latents.to("cpu", self.storage_dtype))
        return torch.cat(out)

    @torch.inference_mode()
    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        texts, pooled = [], []
        for i in range(0, len(prompts), self.batch_size):
            chunk = list(prompts[i : i + self.batch_size])
            embeds, pool, _ = self.pipe.encode_prompt(
                prompt=chunk, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
            )
            texts.append(embeds.to("cpu", self.storage_dtype))
            pooled.append(pool.to("cpu", self.storage_dtype))
        return torch.cat(texts), torch.cat(pooled)

    def encode_examples(
        self, examples: Sequence[Example]
    ) -> tuple[dict[str, torch.Tensor], list[Example], list[dict[str, str]]]:
        """Encode what decodes; return (tensors, kept examples, skipped [{user, file, reason}])."""
        images, kept, skipped = [], [], []
        for ex in examples:
            image, reason = load_image(ex.path)
            if image is None:
                skipped.append({"user": ex.user_id, "file": ex.file, "reason": reason})
                continue
            images.append(image)
            kept.append(ex)
        if not kept:
            return {}, kept, skipped
        latents = self.encode_images(images)
        text, pooled = self.encode_prompts([ex.prompt for ex in kept])
        return {"latents": latents, "text": text, "pooled": pooled}, kept, skipped


def load_image(path: Path | BinaryIO) -> tuple[Image.Image | None, str]:
    """Decode fully (truncated files fail here, not in the VAE); (None, reason) if the file is unusable.

    `path`: a file, or an open binary stream of one (e.g. io.BytesIO of uploaded bytes)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                return im.convert("RGB"), ""
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return None, f"{type(e).__name__}: {e}"


def _fingerprint(examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        st = ex.path.stat()
        h.update(json.dumps([ex.file, ex.prompt, st.st_size, st.st_mtime_ns]).encode())
    return h.hexdigest()


def prepare_dataset(
    raw: str | Path,
    out: str | Path,
    encoder: DataEncoder,
    shard_size: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Encode `raw` into `out`, resuming from whatever an earlier run recorded; returns the manifest."""
    if shard_size <= 0:
        raise InvalidRequestError("shard_size", f"must be positive, got {shard_size}")
    users = read_dataset(raw)  # every format error before any encoding
    out = Path(out)
    (out / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    settings = {
        "resolution": encoder.resolution,
        "model": encoder.signature,
        "storage_dtype": str(encoder.storage_dtype).removeprefix("torch."),
    }
    manifest = _read_manifest(out)
    if manifest is not None and manifest["settings"] != settings:
        raise DatasetError(
            f"{out} was prepared with other settings ({manifest['settings']}); use a new output folder "
            f"(these are {settings})"
        )
    done: dict[str, dict[str, Any]] = {s["name"]: s for s in (manifest or {}).get("shards", [])}
    if not (out / EMPTY_PROMPT_FILE).is_file():
        text, pooled = encoder.encode_prompts([""])
        atomic_save_safetensors({"text": text[0], "pooled": pooled[0]}, out / EMPTY_PROMPT_FILE)

    plan = [(uid, k, exs[k : k + shard_size]) for uid, exs in users.items() for k in range(0, len(exs), shard_size)]
    total = sum(len(c) for _, _, c in plan)
    shards: list[dict[str, Any]] = []
    finished = 0
    for uid, k, chunk in plan:
        name = f"{uid}-{k // shard_size:05d}.safetensors"
        fp = _fingerprint(chunk)
        prior = done.get(name)
        if (
            prior is not None
            and prior["fingerprint"] == fp
            and (prior["count"] == 0 or (out / SHARDS_DIR / name).is_file())
        ):
            shards.append(prior)
        else:
            tensors, kept, skipped = encoder.encode_examples(chunk)
            if kept:
                meta = {
                    "user": uid,
                    "files": json.dumps([e.file for e in kept]),
                    "prompts": json.dumps([e.prompt for e in kept]),
                }
                atomic_save_safetensors(tensors, out / SHARDS_DIR / name, metadata=meta)
            shards.append({"name": name, "user": uid, "count": len(kept), "fingerprint": fp, "skipped": skipped})
            written = {x["name"] for x in shards}
            _write_manifest(out, settings, shards + [s for s in done.values() if s["name"] not in written])
        finished += len(chunk)
        if progress:
            progress(finished, total)
    # Drop shards of users or chunks that are no longer in the raw dataset.
    keep = {s["name"] for s in shards}
    for f in (out / SHARDS_DIR).glob("*.safetensors"):
        if f.name not in keep:
            f.unlink()
    manifest = _write_manifest(out, settings, shards)
    lines = [json.dumps(s) for sh in shards for s in sh["skipped"]]
    atomic_write_bytes(out / SKIPPED_FILE, ("\n".join(lines) + ("\n" if lines else "")).encode())
    return manifest


def _read_manifest(out: Path) -> dict[str, Any] | None:
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path} is not valid JSON ({e.msg})") from None
    if manifest.get("format") != FORMAT:
        raise DatasetError(f"{path} is not a prepared Premier dataset")
    return manifest


def _write_manifest(out: Path, settings: dict[str, Any], shards: list[dict[str, Any]]) -> dict[str, Any]:
    users: dict[str, int] = {}
    for s in shards:
        users[s["user"]] = users.get(s["user"], 0) + s["count"]
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "settings": settings,
        "users": users,
        "num_examples": sum(users.values()),
        "num_skipped": sum(len(s["skipped"]) for s in shards),
        "shards": sorted(shards, key=lambda s: s["name"]),
    }
    atomic_write_bytes(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


@dataclass
class Batch:
    latents: torch.Tensor  # (B, C, h, w)
    text: torch.Tensor  # (B, T, C_t5)
    pooled: torch.Tensor  # (B, P)
    users: torch.Tensor  # (B,) index into PreparedDataset.user_ids


class PreparedDataset:
    """Random access to prepared examples; shards are opened lazily (a bounded set at a time)."""

    def __init__(self, folder: str | Path, max_open_shards: int = 64):
        self.folder = Path(folder)
        manifest = _read_manifest(self.folder)
        if manifest is None:
            raise DatasetError(f"{self.folder} is not a prepared dataset (no {MANIFEST}); run `premier data prepare`")
        self.manifest = manifest
        self.settings = manifest["settings"]
        self.user_ids = [u for u, n in sorted(manifest["users"].items()) if n > 0]
        if not self.user_ids:
            raise DatasetError(f"{self.folder} holds no usable images")
        user_index = {u: i for i, u in enumerate(self.user_ids)}
        self._rows: list[tuple[str, int]] = []
        user_of: list[int] = []
        for s in manifest["shards"]:
            if s["count"] == 0:
                continue
            if not (self.folder / SHARDS_DIR / s["name"]).is_file():
                raise DatasetError(f"{self.folder}: shard {s['name']} is missing; run `premier data prepare` again")
            self._rows += [(s["name"], r) for r in range(s["count"])]
            user_of += [user_index[s["user"]]] * s["count"]
        self.user_of = torch.tensor(user_of, dtype=torch.long)
        self._open: OrderedDict[str, Any] = OrderedDict()
        self._max_open = max_open_shards
        empty = self._read_file(self.folder / EMPTY_PROMPT_FILE)
        self.empty_text, self.empty_pooled = empty["text"], empty["pooled"]

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def signature(self) -> dict[str, Any]:
        return self.settings["model"]

    @property
    def resolution(self) -> int:
        return int(self.settings["resolution"])

    def indices_of(self, user_id: str) -> list[int]:
        if user_id not in self.user_ids:
            raise InvalidRequestError("user", f"user {user_id!r} has no examples in {self.folder}")
        k = self.user_ids.index(user_id)
        return [i for i, u in enumerate(self.user_of.tolist()) if u == k]

    @property
    def user_counts(self) -> list[int]:
        """Examples per user, in user_ids order (from the manifest; no shard is opened)."""
        return torch.bincount(self.user_of, minlength=len(self.user_ids)).tolist()

    def sample_shape(self, index: int) -> tuple[int, ...]:
        """Shape of one example's latents, from its shard's header (no tensor data is read)."""
        name, _ = self._rows[index]
        return tuple(self._shard(name).get_slice("latents").get_shape()[1:])

    def _shard(self, name: str) -> Any:
        handle = self._open.get(name)
        if handle is None:
            try:
                handle = safe_open(str(self.folder / SHARDS_DIR / name), framework="pt")
            except (SafetensorError, OSError) as e:
                raise DatasetError(f"shard {name} in {self.folder} is unreadable: {e}") from None
            self._open[name] = handle
            while len(self._open) > self._max_open:
                self._open.popitem(last=False)
        self._open.move_to_end(name)
        return handle

    @staticmethod
    def _read_file(path: Path) -> dict[str, torch.Tensor]:
        return read_safetensors(path, error=DatasetError)[0]

    def get(self, indices: Sequence[int]) -> Batch:
        parts: dict[str, list[torch.Tensor]] = {"latents": [], "text": [], "pooled": []}
        for i in indices:
            name, row = self._rows[i]
            shard = self._shard(name)
            for key in parts:
                parts[key].append(shard.get_slice(key)[row : row + 1])
        return Batch(*(torch.cat(parts[k]) for k in ("latents", "text", "pooled")), self.user_of[list(indices)])

    def examples(self, indices: Sequence[int]) -> list[tuple[str, str, str]]:
        """(user, file, prompt) of each index, for reports."""
        out = []
        for i in indices:
            name, row = self._rows[i]
            meta = self._shard(name).metadata()
            out.append((meta["user"], json.loads(meta["files"])[row], json.loads(meta["prompts"])[row]))
        return out
