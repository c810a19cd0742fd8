"""The embedded model and loading real FLUX from a local diffusers folder."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from premier.errors import ModelLoadError
from premier.models import build_embedded_flux, build_embedded_premier, load_flux_folder
from premier.models.tokenizers import build_t5_tokenizer
from premier.pipeline import PremierPipeline
from premier.requests import GenerationRequest


def _state(pipe):
    out = {}
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        out.update({f"{name}.{k}": v for k, v in getattr(pipe, name).state_dict().items()})
    return out


def test_embedded_model_is_deterministic_from_its_seed():
    a, b, c = build_embedded_flux(0), build_embedded_flux(0), build_embedded_flux(1)
    sa, sb, sc = _state(a), _state(b), _state(c)
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert build_embedded_premier().checkpoint_id() == build_embedded_premier().checkpoint_id()
    # Building does not disturb the caller's random stream.
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    build_embedded_flux(0)
    assert torch.equal(torch.rand(3), expected)


def test_tokenizer_is_built_in_code_and_tokenizes_anything():
    tok = build_t5_tokenizer(32)
    ids = tok("A red circle, top-left; naïve 42!").input_ids
    assert ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids
    assert tok("red").input_ids == [tok.convert_tokens_to_ids("red"), tok.eos_token_id]


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("flux") / "tiny-flux"
    build_embedded_flux(0).save_pretrained(path, safe_serialization=True)
    return path


def test_folder_round_trip_gives_the_same_images(saved_folder, embedded_pipeline):
    flux = load_flux_folder(saved_folder, dtype=torch.float32)
    assert _state(flux).keys() == _state(embedded_pipeline.flux_pipe).keys()
    loaded = PremierPipeline(
        flux, embedded_pipeline.premier, embedded_pipeline.profile, embedded_pipeline.checkpoint_id
    )
    req = [GenerationRequest("a red circle", "u0000", 3), GenerationRequest("blue squares", None, 4)]
    settings = embedded_pipeline.default_settings(steps=3, height=64, width=64)
    a = embedded_pipeline(req, settings, output_type="np")
    b = loaded(req, settings, output_type="np")
    for x, y in zip(a, b):
        assert (x.image.astype(int) - y.image.astype(int)).__abs__().max() <= 1


def test_pipeline_load_from_folder_with_checkpoint(saved_folder, tmp_path):
    premier = build_embedded_premier()
    premier.save(tmp_path / "ckpt")
    pipe = PremierPipeline.load(model=saved_folder, checkpoint=tmp_path / "ckpt", device="cpu", dtype=torch.float32)
    assert pipe.checkpoint_id == premier.checkpoint_id()
    assert pipe.profile.max_size == 2048  # a folder model gets the real-FLUX limits
    out = pipe([GenerationRequest("a red circle", "u0001", 0)], pipe.default_settings(height=256, width=256, steps=1))
    assert out[0].image.size == (256, 256)


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda p: (p / "model_index.json").unlink(), "model_index.json is missing"),
        (lambda p: shutil.rmtree(p / "transformer"), "missing the folder transformer/"),
        (lambda p: (p / "vae" / "config.json").unlink(), "vae is missing config.json"),
        (
            lambda p: [f.unlink() for f in (p / "text_encoder_2").glob("*.safetensors")],
            "text_encoder_2 has no .safetensors",
        ),
        (lambda p: [f.unlink() for f in (p / "tokenizer").iterdir()], "tokenizer has no tokenizer files"),
        (lambda p: (p / "scheduler" / "scheduler_config.json").unlink(), "scheduler_config.json"),
    ],
)
def test_broken_folder_errors_name_what_is_missing(saved_folder, tmp_path, breakage, message):
    broken = tmp_path / "broken"
    shutil.copytree(saved_folder, broken)
    breakage(broken)
    with pytest.raises(ModelLoadError, match=message):
        load_flux_folder(broken)


def test_pickle_weights_are_not_loaded(saved_folder, tmp_path):
    broken = tmp_path / "pickled"
    shutil.copytree(saved_folder, broken)
    for f in (broken / "vae").glob("*.safetensors"):
        f.unlink()
    (broken / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelLoadError, match="only pickle weights"):
        load_flux_folder(broken)


def test_index_listing_a_component_as_null(saved_folder, tmp_path):
    broken = tmp_path / "nulled"
    shutil.copytree(saved_folder, broken)
    index = json.loads((broken / "model_index.json").read_text())
    index["text_encoder"] = [None, None]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="'text_encoder' component"):
        load_flux_folder(broken)


def test_missing_folder():
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_flux_folder("/nonexistent/flux")
