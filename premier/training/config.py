"""Training and fitting settings, with the reference release's values as defaults."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from premier.errors import InvalidRequestError
from premier.training.losses import DISPERSION_SCALES

OPTIMIZERS = ("prodigy", "adamw")
PRECISIONS = ("fp32", "bf16")
TIMESTEP_SCHEMES = ("logit_normal", "uniform")


@dataclass(frozen=True)
class OptimConfig:
    """Prodigy (lr 1.0, bias correction, safeguard warm-up, weight decay 1e-4) as in the paper; AdamW optional."""

    optimizer: str = "prodigy"
    lr: float = 1.0
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 0.5

    def check(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise InvalidRequestError("optimizer", f"must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        _positive("lr", self.lr)
        _non_negative("weight_decay", self.weight_decay)
        _positive("grad_clip", self.grad_clip)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise InvalidRequestError("betas", f"must be two numbers in [0, 1), got {self.betas}")


@dataclass(frozen=True)
class Stage1Config:
    steps: int = 1000
    batch_size: int = 16  # DiT batch (images per step)
    dispersion_users: int = 32  # users per step in the empty-prompt dispersion pass (independent of the DiT batch)
    dispersion_tokens: int | None = (
        None  # leading empty-prompt token rows used (None: all); the adapters treat tokens independently
    )
    lambda_shared: float = 0.1
    lambda_distinct: float = 0.1
    tau: float = 1.0
    dispersion_scale: str = (
        "dim"  # the dispersion form: dim (the paper's) | diag | mean | none (losses.dispersion_loss)
    )
    timestep_sampling: str = "logit_normal"
    logit_mean: float = 1.0
    logit_std: float = 1.0
    guidance: float = 1.0  # FLUX.1-dev's distilled-guidance input during training
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 1
    seed: int = 0
    optim: OptimConfig = OptimConfig()

    def check(self, num_users: int | None = None) -> None:
        for name in ("steps", "batch_size", "checkpoint_every", "keep_checkpoints", "log_every"):
            _positive(name, getattr(self, name))
        if self.dispersion_users < 2 and (self.lambda_shared or self.lambda_distinct):
            raise InvalidRequestError("dispersion_users", "needs at least 2 users (or set both lambdas to 0)")
        if self.dispersion_tokens is not None:
            _positive("dispersion_tokens", self.dispersion_tokens)
        _non_negative("lambda_shared", self.lambda_shared)
        _non_negative("lambda_distinct", self.lambda_distinct)
        _positive("tau", self.tau)
        if self.dispersion_scale not in DISPERSION_SCALES:
            raise InvalidRequestError(
                "dispersion_scale", f"must be one of {', '.join(DISPERSION_SCALES)}, got {self.dispersion_scale!r}"
            )
        _positive("logit_std", self.logit_std)
        if self.timestep_sampling not in TIMESTEP_SCHEMES:
            raise InvalidRequestError("timestep_sampling", f"must be one of {', '.join(TIMESTEP_SCHEMES)}")
        if self.precision not in PRECISIONS:
            raise InvalidRequestError("precision", f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if num_users is not None and num_users < 2 and (self.lambda_shared or self.lambda_distinct):
            raise InvalidRequestError(
                "dataset", f"the dispersion loss needs at least 2 training users; the dataset has {num_users}"
            )
        self.optim.check()

    @property
    def dispersion_enabled(self) -> bool:
        return bool(self.lambda_shared or self.lambda_distinct)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Stage1Config:
        d = dict(d)
        if "normalise_dispersion" in d:  # runs written before dispersion_scale existed
            d.setdefault("dispersion_scale", "dim" if d.pop("normalise_dispersion") else "none")
        return _from_dict(cls, d)


@dataclass(frozen=True)
class Stage2Config:
    mode: str = "coefficients"  # or "direct"
    steps: int = 5000
    batch_size: int = 2
    # the paper's stage 2 runs a fixed number of steps; `early_stop` holds one image out (from `holdout_min_images`
    # images up) and keeps the parameters that score best on it, stopping after `patience` evaluations without gain
    early_stop: bool = False
    holdout_min_images: int = 4
    # where direct mode starts: "scratch", drawn as a stage-1 user was (the paper's direct baseline), or "mean", the
    # mean training user (the uniform mix that linear combination starts from); None: the mode's default (direct:
    # scratch). Linear combination always starts from the uniform mix.
    init: str | None = None
    eval_every: int = 50
    patience: int = 10  # evaluations without improvement before stopping
    eval_samples: int = 8  # fixed (t, noise) draws per held-out image
    timestep_sampling: str = "logit_normal"
    logit_mean: float = 1.0
    logit_std: float = 1.0
    guidance: float = 1.0
    precision: str = "fp32"
    seed: int = 0
    optim: OptimConfig = OptimConfig(weight_decay=0.0)
    # the fast path (premier.training.multifit; ignored by stage2.fit_user): a warm start from the `warm_start`
    # training users whose embeddings give the images the lowest loss (0: the uniform mix), scored on
    # `warm_examples` (training image, fixed draw) pairs, cycling through the images; a fit converged when its monitored loss has not improved
    # by more than `min_delta` (relative) in `patience` evaluations
    warm_start: int = 0
    warm_examples: int = 2
    warm_candidates: int = 4096  # training users scored at most (a strided subset beyond): cost K x examples
    min_delta: float = 0.0

    @classmethod
    def fast(cls, **overrides: Any) -> Stage2Config:
        """The onboarding preset (docs/onboarding.md): warm start, AdamW, frequent evaluations, short patience."""
        values: dict[str, Any] = dict(
            steps=300,
            batch_size=2,
            eval_every=10,
            patience=2,
            eval_samples=4,
            warm_start=4,
            warm_examples=1,
            min_delta=5e-3,
            early_stop=True,
            init="mean",
            optim=OptimConfig("adamw", lr=0.02, weight_decay=0.0),
        )
        values.update(overrides)
        return cls(**values)

    def check(self) -> None:
        if self.mode not in ("coefficients", "direct"):
            raise InvalidRequestError("mode", f"must be 'coefficients' or 'direct', got {self.mode!r}")
        for name in ("steps", "batch_size", "eval_every", "patience", "eval_samples", "holdout_min_images"):
            _positive(name, getattr(self, name))
        if self.warm_start < 0 or self.warm_examples < 1 or self.warm_candidates < 1 or not 0 <= self.min_delta < 1:
            raise InvalidRequestError(
                "warm_start", "warm_start >= 0, warm_examples >= 1, warm_candidates >= 1 and 0 <= min_delta < 1"
            )
        if self.init not in (None, "scratch", "mean"):
            raise InvalidRequestError("init", f"must be 'scratch' or 'mean', got {self.init!r}")
        if self.init == "scratch" and self.mode == "coefficients":
            raise InvalidRequestError(
                "init", "linear combination starts from the uniform mix; 'scratch' applies to direct mode only"
            )
        if not isinstance(self.early_stop, bool):
            raise InvalidRequestError("early_stop", f"must be true or false, got {self.early_stop!r}")
        if self.holdout_min_images < 2:
            raise InvalidRequestError("holdout_min_images", "must be at least 2 (one image is always kept for fitting)")
        if self.timestep_sampling not in TIMESTEP_SCHEMES:
            raise InvalidRequestError("timestep_sampling", f"must be one of {', '.join(TIMESTEP_SCHEMES)}")
        if self.precision not in PRECISIONS:
            raise InvalidRequestError("precision", f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        self.optim.check()

    @property
    def direct_init(self) -> str:
        """Where direct mode starts ("scratch" unless `init` says "mean")."""
        return self.init or "scratch"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Stage2Config:
        return _from_dict(cls, d)


def _from_dict(cls: Any, d: dict[str, Any]) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise InvalidRequestError("config", f"unknown setting(s): {', '.join(sorted(unknown))}")
    values = dict(d)
    if isinstance(values.get("optim"), dict):
        optim = dict(values["optim"])
        if "betas" in optim:
            optim["betas"] = tuple(optim["betas"])
        values["optim"] = OptimConfig(**optim)
    return cls(**values)


def _positive(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise InvalidRequestError(name, f"must be a positive number, got {value!r}")


def _non_negative(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
        raise InvalidRequestError(name, f"must be >= 0, got {value!r}")
