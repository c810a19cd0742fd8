"""The batched personalized pipeline: many (prompt, user, seed) requests, one forward per step.

Per call: validate -> encode prompts (cached per prompt) -> adapters once per request ->
denoise with one transformer forward per step for the whole batch -> VAE decode.
diffusers' FluxPipeline supplies the helpers (prompt encoding, latent packing, image ids,
timestep shift, scheduler, image post-processing); the loop is ours because the transformer
takes per-sample, per-token deltas.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import FluxPipeline
from PIL import Image

from premier.checkpoint import PremierModel
from premier.errors import InvalidRequestError
from premier.models.embedded import build_embedded_flux, build_embedded_premier
from premier.models.loading import ModelProfile, load_flux_folder, profile_for
from premier.requests import (
    GenerationRequest,
    GenerationResult,
    GenerationSettings,
    PreparedBatch,
    check_prompt_tokens,
    count_prompt_tokens,
)
from premier.stepping import Clock, StepEngine
from premier.transformer import PremierTransformer
from premier.users import validate_user_embedding


class TextEncodingCache:
    """LRU of (T5 token states (T, C), pooled CLIP vector (P,)) per prompt; thread-safe."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        with self._lock:
            item = self._items.get(prompt)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(prompt)
            self.hits += 1
            return item

    def put(self, prompt: str, value: tuple[torch.Tensor, torch.Tensor]) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._items[prompt] = value
            self._items.move_to_end(prompt)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class PremierPipeline:
    def __init__(
        self,
        flux_pipe: FluxPipeline,
        premier: PremierModel | None,
        profile: ModelProfile,
        checkpoint_id: str | None = None,
        text_cache_size: int = 256,
    ):
        self.flux_pipe = flux_pipe
        self.premier = premier
        self.profile = profile
        self.checkpoint_id = checkpoint_id
        if premier is not None:
            premier.config.check_fits(flux_pipe.transformer.config)
            premier.to(device=flux_pipe.transformer.device, dtype=flux_pipe.transformer.dtype)
        self.transformer = PremierTransformer(flux_pipe.transformer, premier.config if premier else None)
        self.text_cache = TextEncodingCache(text_cache_size)
        self.engine = StepEngine(self)
        self.embedded = False
        """The embedded tiny base model (set by `load`): its packaged step profile applies."""

    # ----------------------------------------------------------------- loading
    @classmethod
    def load(
        cls,
        model: str | Path | None = None,
        checkpoint: str | Path | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        text_cache_size: int = 256,
        compile: bool | str | None = None,
        quantize: str | None = None,
    ) -> PremierPipeline:
        """`model=None` is the embedded tiny model (with its demo checkpoint unless `checkpoint` is given).

        compile: True or 'regional' (per repeated block, short start-up) or 'full'; quantize: 'int8',
        'float8' or 'float8-dynamic' (see `optimize`).
        """
        device = torch.device(device) if device is not None else default_device()
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if model is None:
            flux_pipe = build_embedded_flux()
        else:
            flux_pipe = load_flux_folder(model, dtype=dtype)
        flux_pipe.to(device=device, dtype=dtype)
        premier, checkpoint_id = None, None
        if checkpoint is not None:
            premier, checkpoint_id = PremierModel.load(checkpoint)
        elif model is None:
            premier = build_embedded_premier()
            checkpoint_id = premier.checkpoint_id()
        if premier is not None:
            premier.config.check_fits(flux_pipe.transformer.config)
        pipe = cls(flux_pipe, premier, profile_for(flux_pipe, embedded=model is None), checkpoint_id, text_cache_size)
        pipe.embedded = model is None
        return pipe.optimize(compile=compile, quantize=quantize)

    def optimize(
        self, compile: bool | str | None = None, quantize: str | None = None, **compile_kwargs
    ) -> PremierPipeline:
        """Quantize the FLUX block weights (torchao) and/or compile the transformer, in place; returns self.

        Quantization comes first so that the compiled graphs see the quantized weights. Compilation
        is lazy: each (batch size, resolution, text length) bucket compiles on its first batch, and
        changing users never recompiles (their deltas are data). `compile_kwargs` go to
        `premier.compile.compile_transformer` (backend, dynamic, options).
        """
        if quantize:
            from premier.quantize import quantize_flux

            quantize_flux(self.flux_pipe.transformer, quantize)
        if compile:
            from premier.compile import compile_transformer

            mode = "regional" if compile is True else compile
            self.transformer = compile_transformer(self.transformer, mode, **compile_kwargs)
        return self

    # ----------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        # A parameter's, not ModelMixin.device: that one walks every submodule for offload hooks, on every call
        # (5 % of a small forward, which asks several times per step).
        return next(self.flux_pipe.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.flux_pipe.transformer.dtype

    @property
    def user_ids(self) -> list[str]:
        return list(self.premier.users.user_ids) if self.premier is not None else []

    def default_settings(self, **overrides) -> GenerationSettings:
        p = self.profile
        values = dict(height=p.default_size, width=p.default_size, steps=p.default_steps, guidance=p.default_guidance)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return GenerationSettings(**values)

    # ----------------------------------------------------------------- validation
    def count_tokens(self, prompt: str) -> int:
        return count_prompt_tokens(self.flux_pipe.tokenizer_2, prompt)

    def prepare(
        self, requests: Sequence[GenerationRequest], settings: GenerationSettings, checked: bool = False
    ) -> PreparedBatch:
        """Validate a batch once and resolve each request's user tokens: what `__call__` runs.

        Raises InvalidRequestError (naming the field and, in a batch, the request) for the first bad
        input. `checked=True` is for requests a front end already validated (settings, prompt, seed
        and token count, as the server's ingress does): only the users are resolved and checked.
        """
        if not requests:
            raise InvalidRequestError("requests", "the batch is empty")
        if not checked:
            settings.validate(self.profile)
        tokens = []
        for i, req in enumerate(requests):
            where = f"requests[{i}]." if len(requests) > 1 else ""
            try:
                if not checked:
                    req.validate_basic()
                    check_prompt_tokens(self.flux_pipe.tokenizer_2, req.prompt, self.profile.max_sequence_length)
                tokens.append(self._user_tokens(req.user))
            except InvalidRequestError as e:
                raise e.located(where) from None
            except ValueError as e:  # InvalidEmbeddingError
                raise InvalidRequestError(where + "user", str(e)) from None
        return PreparedBatch(list(requests), settings, tokens)

    def validate(
        self, requests: Sequence[GenerationRequest], settings: GenerationSettings
    ) -> list[torch.Tensor | None]:
        """Each request's user tokens (N, U) on the pipeline's device, or None; raises on the first bad input."""
        return self.prepare(requests, settings).user_tokens

    def _user_tokens(self, user: str | torch.Tensor | None) -> torch.Tensor | None:
        if user is None:
            return None
        if self.premier is None:
            raise InvalidRequestError("user", "no Premier checkpoint is loaded, so only user=None is served")
        if isinstance(user, str):
            return self.premier.users.get(user)
        return validate_user_embedding(user, self.premier.config).to(self.device, self.dtype)

    # ----------------------------------------------------------------- stages
    @torch.inference_mode()
    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(T5 states (B, T, C), pooled (B, P), text ids (T, 3)), encoding only prompts not in the cache."""
        cached = {p: self.text_cache.get(p) for p in dict.fromkeys(prompts)}
        missing = [p for p, v in cached.items() if v is None]
        if missing:
            embeds, pooled, _ = self.flux_pipe.encode_prompt(
                prompt=missing, prompt_2=None, device=self.device, max_sequence_length=self.profile.max_sequence_length
            )
            for i, p in enumerate(missing):
                cached[p] = (embeds[i], pooled[i])
                self.text_cache.put(p, cached[p])
        embeds = torch.stack([cached[p][0] for p in prompts]).to(self.dtype)
        pooled = torch.stack([cached[p][1] for p in prompts]).to(self.dtype)
        text_ids = torch.zeros(embeds.shape[1], 3, device=self.device, dtype=self.dtype)
        return embeds, pooled, text_ids

    @torch.inference_mode()
    def compute_deltas(self, text_states: torch.Tensor, tokens: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
        """Per-request text deltas (B, n_blocks, T, D) from validated user tokens (None: no user).

        Computed once per request, before the denoising loop; None if no request has a user.
        """
        active = [i for i, t in enumerate(tokens) if t is not None]
        if not active:
            return None
        assert self.premier is not None
        user_tokens = torch.stack([tokens[i] for i in active]).to(self.device, self.dtype)
        rows = self.premier.adapters.text_deltas(text_states[active], user_tokens)
        deltas = rows.new_zeros((len(tokens), *rows.shape[1:]))
        deltas[active] = rows
        return deltas

    @torch.inference_mode()
    def __call__(
        self,
        requests: Sequence[GenerationRequest] | PreparedBatch,
        settings: GenerationSettings | None = None,
        output_type: str = "pil",
    ) -> list[GenerationResult]:
        """Generate one image per request. All requests share `settings`; users and prompts may differ.

        `requests` may be a `PreparedBatch` (from `prepare`), which is not validated again.
        """
        if output_type not in ("pil", "np"):
            raise InvalidRequestError("output_type", f"{output_type!r} is not 'pil' or 'np'")
        batch = (
            requests
            if isinstance(requests, PreparedBatch)
            else self.prepare(requests, settings or self.default_settings())
        )
        clock = Clock(self.device)
        engine = self.engine
        states = engine.start(batch)
        while not states[0].done:  # one settings for all: they finish together
            engine.step(states)
        timings = {"batch_size": float(len(states)), **states[0].timings}
        timings["denoise_s"] = clock.lap() - timings["encode_s"] - timings["adapters_s"]
        images = engine.finish(states)
        timings["decode_s"] = clock.lap()
        timings["total_s"] = clock.total()
        results = []
        for req, img in zip(batch.requests, images):
            out = Image.fromarray(img) if output_type == "pil" else img
            results.append(GenerationResult(out, req.prompt, req.user_label, req.seed, dict(timings)))
        return results

    def decode(self, latents: torch.Tensor, height: int, width: int) -> np.ndarray:
        """Packed latents -> (B, H, W, 3) uint8."""
        pipe = self.flux_pipe
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        image = pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]
        image = pipe.image_processor.postprocess(image, output_type="pt")
        return (image.float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
