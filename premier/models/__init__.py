"""Base models: the embedded tiny FLUX built in code, and real FLUX from a local diffusers folder."""

from premier.models.embedded import EMBEDDED_SEED, EmbeddedSpec, build_embedded_flux, build_embedded_premier
from premier.models.loading import ModelProfile, load_flux_folder, profile_for

__all__ = [
    "EMBEDDED_SEED",
    "EmbeddedSpec",
    "ModelProfile",
    "build_embedded_flux",
    "build_embedded_premier",
    "load_flux_folder",
    "profile_for",
]
