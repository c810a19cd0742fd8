"""Per-user LoRA on the FLUX transformer's attention projections: the baseline a team would pick instead.

A user is a LoRA (peft, injected through diffusers' own adapter API) fitted on the user's history
images with exactly stage 2's loop (`premier.training.fit_loop`: the same flow-matching loss,
optimizer, step budget, batches and held-out early stopping), starting from the base model
(B = 0). Files are diffusers' LoRA format (`FluxPipeline.save_lora_weights`, safetensors); reading
one checks it against the model before diffusers loads it: only safetensors, every tensor a LoRA
matrix of a projection this model has, of the configured rank and finite.

`LoraBank` serves many LoRA users from one transformer in the two ways multi-tenant LoRA servers do:
one active adapter at a time (requests of different users serialized), or a mixed batch where each
sample names its adapter (peft's `adapter_names`, one forward for all).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

from premier.errors import InvalidRequestError
from premier.training.config import Stage2Config
from premier.training.fit_loop import fit_summary, rows, run_fit_loop, split_holdout
from premier.training.objective import FixedDrawLoss, FlowObjective
from premier.training.prepared import Batch
from premier.transformer import PremierTransformer
from premier.users import validate_user_id

LORA_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)
"""The attention projections of FLUX's double blocks (image and text streams) and single blocks."""
LORA_FILE = "pytorch_lora_weights.safetensors"
MAX_RANK = 256


def adapter_name(user_id: str) -> str:
    """peft adapter names become module keys: a user id may hold characters they cannot."""
    return "user_" + hashlib.sha256(user_id.encode()).hexdigest()[:16]


def lora_config(rank: int):
    from peft import LoraConfig

    check_rank(rank)
    return LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(LORA_TARGETS))


def check_rank(rank: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_RANK:
        raise InvalidRequestError("rank", f"must be an integer in [1, {MAX_RANK}], got {rank!r}")


def lora_parameters(transformer: FluxTransformer2DModel, rank: int) -> int:
    """Trainable numbers of one user's LoRA on this transformer: r x (in + out) per targeted projection."""
    return sum(rank * (m.in_features + m.out_features) for _, m in targeted_linears(transformer))


def targeted_linears(transformer: FluxTransformer2DModel) -> Iterator[tuple[str, torch.nn.Linear]]:
    for name, module in transformer.named_modules():
        if any(name.endswith(t) for t in LORA_TARGETS):
            base = getattr(module, "base_layer", module)
            if isinstance(base, torch.nn.Linear):
                yield name, base


def random_lora_state(transformer: FluxTransformer2DModel, rank: int, seed: int, scale: float = 0.02):
    """A LoRA of this transformer with random A and B (benchmarks and tests: a real, non-zero update), in the
    names `LoraFit.state_dict` uses."""
    check_rank(rank)
    g = torch.Generator("cpu").manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, base in targeted_linears(transformer):
        out[f"{name}.lora_A.weight"] = torch.randn(rank, base.in_features, generator=g) * scale
        out[f"{name}.lora_B.weight"] = torch.randn(base.out_features, rank, generator=g) * scale
    return out


@dataclass
class LoraFit:
    user_id: str
    rank: int
    state_dict: dict[str, torch.Tensor]  # peft names without the adapter ("blocks.0.attn.to_q.lora_A.weight")
    fit: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def parameters(self) -> int:
        return sum(v.numel() for v in self.state_dict.values())


def fit_lora(
    flux: FluxTransformer2DModel,
    samples: Batch,
    user_id: str,
    rank: int,
    config: Stage2Config = Stage2Config(),
    progress: bool = False,
) -> LoraFit:
    """Fit one user's LoRA on its encoded images; the transformer is left as it was (the adapter removed)."""
    from peft.utils import get_peft_model_state_dict

    validate_user_id(user_id)
    check_rank(rank)
    config.check()
    n = samples.latents.shape[0]
    if n == 0:
        raise InvalidRequestError("images", "no usable images to fit the user on")
    flux.requires_grad_(False).eval()
    if config.precision == "bf16":
        flux.to(torch.bfloat16)
    objective = FlowObjective(
        PremierTransformer(flux, None),
        None,
        config.guidance,
        config.precision,
        config.timestep_sampling,
        config.logit_mean,
        config.logit_std,
    )
    name = adapter_name(user_id)
    before = active_adapters(flux)
    with torch.random.fork_rng(devices=[]):  # A's random init from the fit's seed: the same fit twice is the same
        torch.manual_seed(config.seed)
        flux.add_adapter(lora_config(rank), adapter_name=name)
    try:
        flux.set_adapters([name])
        params = [p for n_, p in flux.named_parameters() if f".{name}." in n_]
        for p in params:
            p.data = p.data.float()
            p.requires_grad_(True)
        g = torch.Generator("cpu").manual_seed(config.seed)
        train, held = split_holdout(n, config, g)
        evaluator = (
            FixedDrawLoss(objective, rows(samples, held), config.eval_samples, config.seed + 1) if held else None
        )

        def snapshot() -> dict[str, torch.Tensor]:
            return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(flux, adapter_name=name).items()}

        loop = run_fit_loop(
            parameters=params,
            loss_of=lambda b, t, noise: objective.loss(b.latents, b.text, b.pooled, None, t, noise),
            held_out=(lambda: evaluator(None)) if evaluator is not None else None,
            snapshot=snapshot,
            objective=objective,
            samples=samples,
            train=train,
            generator=g,
            config=config,
            desc=f"lora r{rank} {user_id}",
            progress=progress,
        )
    finally:
        if before:
            flux.delete_adapters(name)
            flux.set_adapters(before)
        else:  # no other adapter: the projections become plain Linear layers again
            flux.unload_lora()
    fit = {
        "kind": "lora",
        "rank": rank,
        **fit_summary(loop, n, train, config),
        "held_out_image": held[0] if held else None,
    }
    return LoraFit(user_id, rank, loop.best, fit, loop.history)


def active_adapters(flux: FluxTransformer2DModel) -> list[str]:
    if not getattr(flux, "_hf_peft_config_loaded", False) or not getattr(flux, "peft_config", None):
        return []
    return list(flux.active_adapters())


# ---------------------------------------------------------------------- files
def save_lora(folder: str | Path, fit: LoraFit) -> Path:
    """diffusers' LoRA format (what `FluxPipeline.load_lora_weights` reads), safetensors, in `folder`."""
    FluxPipeline.save_lora_weights(
        save_directory=str(folder),
        transformer_lora_layers=fit.state_dict,
        weight_name=LORA_FILE,
        safe_serialization=True,
        transformer_lora_adapter_metadata={
            "r": fit.rank,
            "lora_alpha": fit.rank,
            "target_modules": list(LORA_TARGETS),
        },
    )
    return Path(folder) / LORA_FILE


def read_lora(path: str | Path, transformer: FluxTransformer2DModel, rank: int) -> dict[str, torch.Tensor]:
    """A LoRA file's tensors (diffusers' names, "transformer." prefix), refused with the file and tensor named
    unless each is a LoRA matrix of a projection this transformer has, of rank `rank`, and finite."""
    from safetensors import SafetensorError, safe_open

    check_rank(rank)
    path = Path(path)
    if path.suffix != ".safetensors":
        raise InvalidRequestError("lora", f"{path.name}: only .safetensors LoRA files are read")
    linears = dict(targeted_linears(transformer))
    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            for key in keys:
                out[key] = f.get_tensor(key)
    except (SafetensorError, OSError, ValueError) as e:
        raise InvalidRequestError("lora", f"{path.name}: not a readable safetensors file ({type(e).__name__})") from e
    if not out:
        raise InvalidRequestError("lora", f"{path.name}: holds no tensors")
    for key, value in out.items():
        module, kind = _split_key(key)
        if module is None or module not in linears:
            raise InvalidRequestError(
                "lora", f"{path.name}: tensor {key} is not a LoRA matrix of this model's attention projections"
            )
        base = linears[module]
        want = (rank, base.in_features) if kind == "lora_A" else (base.out_features, rank)
        if tuple(value.shape) != want:
            got_rank = value.shape[0] if kind == "lora_A" else value.shape[-1]
            what = f"rank {got_rank}, not {rank}" if value.dim() == 2 and got_rank != rank else "another model's shape"
            raise InvalidRequestError(
                "lora", f"{path.name}: tensor {key} has shape {tuple(value.shape)} ({what}); expected {want}"
            )
        if not torch.isfinite(value).all():
            raise InvalidRequestError("lora", f"{path.name}: tensor {key} holds NaN or infinite values")
    present = {_split_key(k) for k in out}
    for module, kind in sorted(present):  # type: ignore[type-var]
        other = "lora_B" if kind == "lora_A" else "lora_A"
        if (module, other) not in present:
            raise InvalidRequestError("lora", f"{path.name}: tensor transformer.{module}.{other}.weight is missing")
    return out


def _split_key(key: str) -> tuple[str | None, str | None]:
    """'transformer.blocks.0.attn.to_q.lora_A.weight' -> ('blocks.0.attn.to_q', 'lora_A')."""
    parts = key.split(".")
    if len(parts) < 4 or parts[0] != "transformer" or parts[-1] != "weight" or parts[-2] not in ("lora_A", "lora_B"):
        return None, None
    return ".".join(parts[1:-2]), parts[-2]


# ---------------------------------------------------------------------- serving many LoRA users
@contextlib.contextmanager
def _transformer_only() -> Iterator[None]:
    """`load_lora_weights` also looks for text-encoder LoRA and logs a warning per load when there is none,
    which a file of transformer LoRA never has: that one notice is silenced while loading."""
    log = logging.getLogger("diffusers.loaders.lora_base")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def lora_tensors(
    source: str | Path | dict[str, torch.Tensor], transformer: FluxTransformer2DModel, rank: int
) -> dict[str, torch.Tensor]:
    """What `load_lora_weights` takes: a file, checked by `read_lora`, or tensors in memory (a fit's names),
    copied: peft adopts the tensors it is given as its parameters, so without the copy a later hot-swap
    (an in-place copy into them) would overwrite the caller's first user."""
    if not isinstance(source, dict):
        return read_lora(source, transformer, rank)
    return {k if k.startswith("transformer.") else f"transformer.{k}": v.detach().clone() for k, v in source.items()}


class LoraSlot:
    """One adapter whose weights each request replaces in place (diffusers' hotswap): the way a compiled
    transformer serves many LoRA users without recompiling, one user per forward."""

    NAME = "slot"

    def __init__(self, flux_pipe: FluxPipeline, rank: int, first: str | Path | dict[str, torch.Tensor]):
        check_rank(rank)
        self.flux_pipe, self.rank = flux_pipe, rank
        flux_pipe.enable_lora_hotswap(target_rank=rank)
        with _transformer_only():
            flux_pipe.load_lora_weights(lora_tensors(first, flux_pipe.transformer, rank), adapter_name=self.NAME)

    def swap(self, source: str | Path | dict[str, torch.Tensor]) -> None:
        with _transformer_only():
            self.flux_pipe.load_lora_weights(
                lora_tensors(source, self.flux_pipe.transformer, self.rank), adapter_name=self.NAME, hotswap=True
            )


class LoraBank:
    """LoRA users resident on one FLUX pipeline's transformer, served one at a time or in mixed batches."""

    def __init__(self, flux_pipe: FluxPipeline, rank: int):
        check_rank(rank)
        self.flux_pipe, self.rank = flux_pipe, rank
        self.users: dict[str, str] = {}  # user id -> adapter name

    @property
    def transformer(self) -> FluxTransformer2DModel:
        return self.flux_pipe.transformer

    def load(self, user_id: str, source: str | Path | dict[str, torch.Tensor]) -> None:
        """Load the adapter of `user_id` (a file is checked first by `read_lora`)."""
        if user_id in self.users:
            raise InvalidRequestError("lora", f"user {user_id!r} already has an adapter here")
        with warnings.catch_warnings(), _transformer_only():  # many adapters on one model is what a bank is for
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            self.flux_pipe.load_lora_weights(
                lora_tensors(source, self.transformer, self.rank), adapter_name=adapter_name(user_id)
            )
        self.users[user_id] = adapter_name(user_id)

    def unload(self, user_id: str) -> None:
        name = self.users.pop(user_id)
        self.transformer.delete_adapters(name)

    def activate(self, user_id: str | None) -> None:
        """One user's adapter on (None: the base model) for the next forwards."""
        if user_id is None:
            self.transformer.disable_adapters()
            return
        self.transformer.enable_adapters()
        self.transformer.set_adapters([self.users[user_id]])

    @contextlib.contextmanager
    def mixed(self, user_ids: list[str | None]) -> Iterator[None]:
        """Each sample of the next forwards through its own user's adapter (None: the base model), the way
        peft's `adapter_names` batches mix adapters: one forward, the LoRA matrices applied per sample group."""
        from peft.tuners.lora.layer import LoraLayer
        from peft.tuners.lora.model import _adapter_names_pre_forward_hook

        names = ["__base__" if u is None else self.users[u] for u in user_ids]
        self.transformer.enable_adapters()
        hooks = [
            m.register_forward_pre_hook(partial(_adapter_names_pre_forward_hook, adapter_names=names), with_kwargs=True)
            for m in self.transformer.modules()
            if isinstance(m, LoraLayer)
        ]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()

    def resident_bytes(self) -> int:
        return sum(
            p.numel() * p.element_size()
            for n, p in self.transformer.named_parameters()
            if any(f".{a}." in n for a in self.users.values())
        )


__all__ = [
    "LORA_FILE",
    "LORA_TARGETS",
    "LoraBank",
    "LoraFit",
    "LoraSlot",
    "adapter_name",
    "fit_lora",
    "lora_tensors",
    "lora_parameters",
    "random_lora_state",
    "read_lora",
    "save_lora",
]
