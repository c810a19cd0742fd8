"""The raw dataset format and `prepare_dataset`: shards, resume, skipped images, format errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from training_data import make_raw_dataset, user_images

from premier.models.embedded import build_embedded_flux
from premier.training.dataset import CAPTIONS_FILE, DatasetError, read_dataset, read_user_folder
from premier.training.prepared import DataEncoder, PreparedDataset, prepare_dataset


@pytest.fixture(scope="module")
def pipe():
    return build_embedded_flux()


def test_prepare_encodes_every_image_once(tmp_path, pipe):
    raw = make_raw_dataset(tmp_path / "raw", per_user=5)
    manifest = prepare_dataset(raw, tmp_path / "prep", DataEncoder(pipe, 64), shard_size=2)
    assert manifest["num_examples"] == 20 and manifest["users"] == {f"user{k}": 5 for k in range(4)}
    assert len(manifest["shards"]) == 12  # 3 shards of <=2 images per user
    ds = PreparedDataset(tmp_path / "prep")
    assert len(ds) == 20 and ds.user_ids == [f"user{k}" for k in range(4)]
    batch = ds.get([0, 7, 19])
    assert batch.latents.shape == (3, 12, 32, 32)  # 64 px / codec factor 2, 3 x 2 x 2 channels
    assert batch.text.shape == (3, 16, 64) and batch.pooled.shape == (3, 64)
    assert batch.users.tolist() == [0, 1, 3]
    # The stored encodings are what the encoders give for that image and caption.
    user, file, prompt = ds.examples([7])[0]
    enc = DataEncoder(pipe, 64)
    from PIL import Image

    lat = enc.encode_images([Image.open(raw / user / file)])
    text, pooled = enc.encode_prompts([prompt])
    # (batched and single convolutions may differ in the last bits)
    for mine, stored in ((lat[0], batch.latents[1]), (text[0], batch.text[1]), (pooled[0], batch.pooled[1])):
        torch.testing.assert_close(mine, stored, atol=1e-5, rtol=1e-5)
    empty_text, _ = enc.encode_prompts([""])
    torch.testing.assert_close(ds.empty_text, empty_text[0], atol=1e-5, rtol=1e-5)


class _Crash(DataEncoder):
    """Dies (like a killed process) after encoding `budget` shards."""

    def __init__(self, *a, budget: int, **kw):
        super().__init__(*a, **kw)
        self.budget, self.calls = budget, 0

    def encode_examples(self, examples):
        if self.calls >= self.budget:
            raise KeyboardInterrupt("simulated kill")
        self.calls += 1
        return super().encode_examples(examples)


def test_prepare_resumes_where_it_stopped(tmp_path, pipe):
    raw = make_raw_dataset(tmp_path / "raw", per_user=4)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(raw, tmp_path / "prep", _Crash(pipe, 64, budget=3), shard_size=2)
    again = _Crash(pipe, 64, budget=100)
    manifest = prepare_dataset(raw, tmp_path / "prep", again, shard_size=2)
    assert again.calls == 8 - 3  # only the shards the first run did not finish
    full = prepare_dataset(raw, tmp_path / "fresh", DataEncoder(pipe, 64), shard_size=2)
    assert manifest["num_examples"] == full["num_examples"] == 16
    for shard in full["shards"]:
        a = load_file(str(tmp_path / "prep" / "shards" / shard["name"]))
        b = load_file(str(tmp_path / "fresh" / "shards" / shard["name"]))
        assert all(torch.equal(a[k], b[k]) for k in b)
    # A finished dataset re-run encodes nothing; a changed caption re-encodes only its shard.
    idle = _Crash(pipe, 64, budget=100)
    prepare_dataset(raw, tmp_path / "prep", idle, shard_size=2)
    assert idle.calls == 0
    cap = raw / "user2" / CAPTIONS_FILE
    lines = cap.read_text().splitlines()
    lines[0] = json.dumps({"file": "000.png", "prompt": "a completely new caption"})
    cap.write_text("\n".join(lines) + "\n")
    changed = _Crash(pipe, 64, budget=100)
    prepare_dataset(raw, tmp_path / "prep", changed, shard_size=2)
    assert changed.calls == 1


def test_corrupt_images_are_skipped_and_listed(tmp_path, pipe):
    raw = make_raw_dataset(tmp_path / "raw", per_user=3)
    (raw / "user1" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    good = raw / "user3" / "002.png"
    good.write_bytes(good.read_bytes()[:200])  # truncated
    manifest = prepare_dataset(raw, tmp_path / "prep", DataEncoder(pipe, 64))
    assert manifest["num_examples"] == 10 and manifest["num_skipped"] == 2
    skipped = [json.loads(x) for x in (tmp_path / "prep" / "skipped.jsonl").read_text().splitlines()]
    assert {(s["user"], s["file"]) for s in skipped} == {("user1", "001.png"), ("user3", "002.png")}
    assert all(s["reason"] for s in skipped)
    assert PreparedDataset(tmp_path / "prep").manifest["users"]["user1"] == 2


def test_rerun_with_other_settings_is_refused(tmp_path, pipe):
    raw = make_raw_dataset(tmp_path / "raw", per_user=1)
    prepare_dataset(raw, tmp_path / "prep", DataEncoder(pipe, 64))
    with pytest.raises(DatasetError, match="other settings"):
        prepare_dataset(raw, tmp_path / "prep", DataEncoder(pipe, 32))


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: None, "is empty"),
        (lambda d: user_images((1, 2, 3), 1, 0)[0].save(d / "a.png"), "no captions.jsonl"),
        (lambda d: (d / CAPTIONS_FILE).write_text('{"file": "a.png", "prompt": "x"}\n'), "no such image"),
        (
            lambda d: (
                user_images((1, 2, 3), 1, 0)[0].save(d / "a.png"),
                user_images((1, 2, 3), 1, 0)[0].save(d / "b.png"),
                (d / CAPTIONS_FILE).write_text('{"file": "a.png", "prompt": "x"}\n'),
            ),
            "without a caption in captions.jsonl: b.png",
        ),
        (
            lambda d: (
                user_images((1, 2, 3), 1, 0)[0].save(d / "a.png"),
                (d / CAPTIONS_FILE).write_text("{not json\n"),
            ),
            ":1: not valid JSON",
        ),
        (
            lambda d: (
                user_images((1, 2, 3), 1, 0)[0].save(d / "a.png"),
                (d / CAPTIONS_FILE).write_text('{"file": "../a.png", "prompt": "x"}\n'),
            ),
            "plain file name",
        ),
        (
            lambda d: (
                user_images((1, 2, 3), 1, 0)[0].save(d / "a.png"),
                (d / CAPTIONS_FILE).write_text('{"file": "a.png", "prompt": "x"}\n{"file": "a.png", "prompt": "y"}\n'),
            ),
            "captioned twice",
        ),
        (lambda d: (d / CAPTIONS_FILE).write_text('{"file": "a.png"}\n'), '"prompt"'),
    ],
    ids=[
        "empty-folder",
        "no-captions",
        "caption-without-image",
        "image-without-caption",
        "bad-json",
        "path-escape",
        "duplicate",
        "missing-prompt",
    ],
)
def test_dataset_format_errors_name_the_problem(tmp_path, setup, message):
    folder = tmp_path / "raw" / "someone"
    folder.mkdir(parents=True)
    setup(folder)
    with pytest.raises(DatasetError, match=message.replace("(", r"\(").replace("[", r"\[")):
        read_user_folder(folder)
    with pytest.raises(DatasetError):
        read_dataset(tmp_path / "raw")


def test_bad_user_folder_name_and_empty_root(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no user folders"):
        read_dataset(tmp_path / "empty")
    make_raw_dataset(tmp_path / "raw", per_user=1, colours=[(1, 2, 3)], names=["bad name"])
    with pytest.raises(DatasetError, match="folder name is the user id"):
        read_dataset(tmp_path / "raw")
    with pytest.raises(DatasetError, match="does not exist"):
        read_dataset(tmp_path / "nowhere")
