"""`premier data prepare`, `premier train`, `premier fit-user`: end to end on the embedded model, and their errors."""

from __future__ import annotations

import json

import pytest
import torch
from training_data import make_raw_dataset

from premier.checkpoint import PremierModel
from premier.cli import EXIT_BAD_INPUT, EXIT_LOAD_ERROR, main
from premier.models.embedded import EmbeddedSpec
from premier.user_record import UserRecord


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Prepare, train 4 steps, resume to 6: the folder every test below reads."""
    root = tmp_path_factory.mktemp("cli")
    raw = make_raw_dataset(root / "raw", per_user=3)
    assert main(["data", "prepare", str(raw), str(root / "prep"), "--no-progress"]) == 0
    common = ["--data", str(root / "prep"), "--out", str(root / "run"), "--no-progress"]
    assert (
        main(
            [
                "train",
                *common,
                "--steps",
                "4",
                "--batch-size",
                "2",
                "--dispersion-users",
                "3",
                "--checkpoint-every",
                "2",
                "--optimizer",
                "adamw",
                "--lr",
                "0.01",
            ]
        )
        == 0
    )
    assert main(["train", *common, "--steps", "6", "--resume"]) == 0
    return root


def test_prepare_train_resume(run, capsys):
    manifest = json.loads((run / "prep" / "dataset.json").read_text())
    assert manifest["num_examples"] == 12 and manifest["settings"]["resolution"] == EmbeddedSpec().image_size == 32
    rows = [json.loads(x) for x in (run / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert (run / "run" / "checkpoints" / "latest").read_text() == "step-0000006"
    model, _ = PremierModel.load(run / "run" / "checkpoints" / "step-0000006")
    assert model.users.user_ids == [f"user{k}" for k in range(4)]


def test_fit_user_writes_a_record(run, tmp_path, capsys):
    ckpt = run / "run" / "checkpoints" / "step-0000006"
    out = tmp_path / "new.safetensors"
    code = main(
        [
            "fit-user",
            "--images",
            str(run / "raw" / "user2"),
            "--user-id",
            "newbie",
            "--checkpoint",
            str(ckpt),
            "-o",
            str(out),
            "--steps",
            "4",
            "--optimizer",
            "adamw",
            "--lr",
            "0.05",
            "--no-progress",
        ]
    )
    assert code == 0
    record = UserRecord.load(out)
    model, ckpt_id = PremierModel.load(ckpt)
    assert record.user_id == "newbie" and record.mode == "coefficients" and record.checkpoint_id == ckpt_id
    assert record.vector.shape == (4,) and record.fit["images"] == 3 and record.fit["steps"] == 4
    assert record.fit["files"] == ["000.png", "001.png", "002.png"]
    assert torch.isfinite(record.materialise(model.users, ckpt_id)).all()
    assert "record:" in capsys.readouterr().out
    direct = tmp_path / "direct.safetensors"
    flags = ["--mode", "direct", "--init", "mean", "--early-stop", "--steps", "2", "--no-progress"]
    images = ["--images", str(run / "raw" / "user2"), "--checkpoint", str(ckpt)]
    assert main(["fit-user", *images, "--user-id", "d", "-o", str(direct), *flags]) == 0
    fit = UserRecord.load(direct).fit
    assert fit["init"] == "mean" and fit["mode"] == "direct" and fit["steps"] == 2


def test_cli_errors(run, tmp_path, capsys):
    (tmp_path / "raw" / "empty").mkdir(parents=True)
    assert main(["data", "prepare", str(tmp_path / "raw"), str(tmp_path / "prep"), "--no-progress"]) == EXIT_BAD_INPUT
    assert "is empty" in capsys.readouterr().err
    assert (
        main(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--no-progress"])
        == EXIT_BAD_INPUT
    )
    assert "not a prepared dataset" in capsys.readouterr().err
    common = ["--data", str(run / "prep"), "--out", str(tmp_path / "fresh"), "--no-progress"]
    assert main(["train", *common, "--resume"]) == EXIT_BAD_INPUT
    assert "no checkpoint to resume" in capsys.readouterr().err
    assert main(["train", *common, "--steps", "0"]) == EXIT_BAD_INPUT
    assert "steps" in capsys.readouterr().err
    assert (
        main(
            ["train", "--data", str(run / "prep"), "--out", str(run / "run"), "--resume", "--tau", "3", "--no-progress"]
        )
        == EXIT_BAD_INPUT
    )
    assert "tau" in capsys.readouterr().err
    fit = ["fit-user", "--images", str(run / "raw" / "user1"), "-o", str(tmp_path / "r.safetensors"), "--no-progress"]
    assert main([*fit, "--user-id", "../evil"]) == EXIT_BAD_INPUT
    assert main([*fit, "--user-id", "ok", "--checkpoint", str(tmp_path / "missing")]) == EXIT_LOAD_ERROR
    assert "does not exist" in capsys.readouterr().err
    assert main([*fit, "--user-id", "ok", "--steps", "-3"]) == EXIT_BAD_INPUT
    assert not (tmp_path / "r.safetensors").exists()
