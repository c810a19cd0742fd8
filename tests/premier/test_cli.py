"""The `premier` command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from premier.cli import EXIT_BAD_INPUT, EXIT_LOAD_ERROR, build_parser, main

SUBCOMMANDS = ["generate", "demo", "info", "data", "train", "fit-user", "users", "world", "eval", "eval-seeds", "serve"]


def test_every_subcommand_has_help():
    out = subprocess.run([sys.executable, "-m", "premier", "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in SUBCOMMANDS:
        assert cmd in out
        sub = subprocess.run([sys.executable, "-m", "premier", cmd, "--help"], capture_output=True, text=True)
        assert sub.returncode == 0 and f"usage: premier {cmd}" in sub.stdout
    parser_cmds = set(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    assert parser_cmds == set(SUBCOMMANDS)


def test_generate_writes_a_png(tmp_path, capsys):
    out = tmp_path / "sub" / "img.png"
    code = main(
        [
            "generate",
            "--user",
            "alice",
            "--prompt",
            "a red circle",
            "--seed",
            "3",
            "--steps",
            "2",
            "--height",
            "64",
            "--width",
            "48",
            "-o",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    img = Image.open(out)
    assert img.size == (48, 64) and img.format == "PNG"
    assert f"wrote {out}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--user", "mallory"], "unknown user 'mallory'"),
        (["--height", "50"], "height: 50 is not a multiple of 4"),
        (["--steps", "0"], "steps: 0 is outside"),
        (["--guidance", "99"], "guidance: 99.0 is outside"),
        (["--prompt", " "], "prompt: is empty"),
        (["--user", "../x"], "user_id:"),
    ],
)
def test_generate_bad_input_exits_2_with_a_message(tmp_path, capsys, args, message):
    base = {"--prompt": "a red circle", "--steps": "1", "--height": "32", "--width": "32"}
    argv = ["generate", "-o", str(tmp_path / "x.png"), "--device", "cpu"]
    for k, v in base.items():
        if k not in args:
            argv += [k, v]
    assert main(argv + args) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_missing_model_folder_exits_3(tmp_path, capsys):
    code = main(["generate", "--prompt", "x", "--model", str(tmp_path / "nope"), "-o", str(tmp_path / "x.png")])
    assert code == EXIT_LOAD_ERROR
    assert "does not exist" in capsys.readouterr().err


def test_bad_checkpoint_exits_3(tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    assert main(["info", "--checkpoint", str(tmp_path / "ckpt"), "--device", "cpu"]) == EXIT_LOAD_ERROR
    assert "premier_config.json" in capsys.readouterr().err


def test_demo_writes_every_user_and_a_sheet(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(
        [
            "demo",
            "--out",
            str(out),
            "--users",
            "alice,bob",
            "--prompt",
            "a red circle",
            "--prompt",
            "two squares",
            "--steps",
            "1",
            "--height",
            "32",
            "--width",
            "32",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        ["contact_sheet.png"] + [f"prompt{i}_{u}.png" for i in (0, 1) for u in ("alice", "bob", "none")]
    )
    assert Image.open(out / "contact_sheet.png").size == (96, 64)
    assert str(out.resolve()) in capsys.readouterr().out


def test_info_json(capsys):
    assert main(["info", "--json", "--device", "cpu"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["training_users"] == 200 and info["bytes_per_user"] == 8 * 32 * 4  # the world's training users
    assert info["adapter_bytes"] == 4 * (info["adapter_shared_params"] + info["adapter_distinct_params"])
    assert len(info["checkpoint_id"]) == 64
    assert main(["info", "--reference", "--json"]) == 0
    ref = json.loads(capsys.readouterr().out)
    assert ref["bytes_per_user"] == 30 * 1024 * 2 and ref["modulated_double_blocks"] == 19


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as e:
        main(["generate"])  # --prompt is required
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["generate", "--prompt", "x", "--steps", "many"])
    assert e.value.code == 2
