"""`premier users ...`: every action end to end, and exit codes 2 (bad input) and 3 (checkpoint/store problems)."""

from __future__ import annotations

import json

import pytest
import torch

from premier.cli import EXIT_BAD_INPUT, EXIT_LOAD_ERROR, build_parser, main
from premier.user_record import UserRecord

_FOUR_USERS: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def four_user_checkpoint(tmp_path_factory) -> str:
    """A 4-user checkpoint (the random pre-world embedded one), so coefficient vectors stay short to write;
    the shipped world checkpoint has 200 training users."""
    from premier.models.embedded import DEMO_USERS, build_embedded_premier

    folder = tmp_path_factory.mktemp("ckpt") / "four-users"
    _FOUR_USERS["path"] = str(folder)
    return build_embedded_premier(user_ids=DEMO_USERS).save(folder)


@pytest.fixture(scope="module")
def demo_checkpoint_id(four_user_checkpoint) -> str:
    return four_user_checkpoint


def users(store, action: str, *args: str) -> list[str]:
    return ["users", action, "--checkpoint", _FOUR_USERS["path"], *args, "--store", str(store)]


def test_users_group_is_registered():
    parser = build_parser()
    choices = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert "users" in choices
    actions = choices["users"]._subparsers._group_actions[0].choices
    assert {"put", "get", "delete", "list", "nearest", "export", "import"} <= set(actions)


def test_every_action_round_trip(tmp_path, capsys, demo_checkpoint_id):
    store = tmp_path / "store"
    assert (
        main(
            users(
                store,
                "put",
                "--user",
                "alice",
                "--coefficients",
                "[0.1, 0.2, 0.3, 0.4]",
                "--fit",
                '{"images": 8, "final_loss": 0.2}',
            )
        )
        == 0
    )
    assert "stored alice (coefficients, (4,)" in capsys.readouterr().out
    (tmp_path / "c.json").write_text("[0.4, 0.3, 0.2, 0.1]")
    assert main(users(store, "put", "--user", "bob", "--coefficients", f"@{tmp_path / 'c.json'}")) == 0
    record = UserRecord("carol", "direct", torch.randn(8, 32), demo_checkpoint_id, {"images": 20})
    record.save(tmp_path / "carol.safetensors")
    assert main(users(store, "put", "--record", str(tmp_path / "carol.safetensors"))) == 0
    capsys.readouterr()

    assert main(users(store, "get", "alice", "--json")) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["vector"] == pytest.approx([0.1, 0.2, 0.3, 0.4]) and got["fit"] == {"images": 8, "final_loss": 0.2}
    assert got["servable"] is True and got["checkpoint_id"] == demo_checkpoint_id
    assert main(users(store, "get", "carol", "-o", str(tmp_path / "out.safetensors"))) == 0
    assert "mode        direct (8, 32)" in capsys.readouterr().out
    assert torch.equal(UserRecord.load(tmp_path / "out.safetensors").vector, record.vector)

    assert main(users(store, "list")) == 0
    assert [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()] == ["alice", "bob", "carol"]
    assert main(users(store, "list", "--after", "alice", "--limit", "1", "--json")) == 0
    assert json.loads(capsys.readouterr().out)["user_id"] == "bob"

    assert main(users(store, "nearest", "alice", "-k", "2", "--json")) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 2 and "alice" not in {h["user_id"] for h in hits}
    assert main(users(store, "nearest", "--coefficients", "[0.4, 0.3, 0.2, 0.1]", "-k", "1")) == 0
    assert capsys.readouterr().out.split() == ["+1.0000", "bob"]

    assert main(users(store, "export", str(tmp_path / "exp"))) == 0
    assert main(users(store, "delete", "alice")) == 0
    assert main(users(store, "get", "alice")) == EXIT_BAD_INPUT
    assert "unknown user 'alice'" in capsys.readouterr().err
    assert main(users(tmp_path / "fresh", "import", str(tmp_path / "exp"))) == 0
    assert "imported 3 users" in capsys.readouterr().out
    assert main(users(tmp_path / "fresh", "stats", "--json")) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["users"] == 3 and stats["index"]["vectors"] == 3 and stats["index"]["kind"] == "exact"


def test_store_from_environment_and_checkpoint_folder(tmp_path, capsys, monkeypatch):
    from premier.models.embedded import build_embedded_premier

    model = build_embedded_premier(seed=5)
    ckpt = model.save(tmp_path / "ckpt")
    monkeypatch.setenv("PREMIER_STORE", str(tmp_path / "envstore"))
    assert (
        main(["users", "put", "--checkpoint", str(tmp_path / "ckpt"), "--user", "dan", "--coefficients", "[1,0,0,0]"])
        == 0
    )
    assert f"checkpoint {ckpt[:12]}" in capsys.readouterr().out
    assert (tmp_path / "envstore" / "users.sqlite3").is_file()
    # Served against the demo checkpoint instead, dan's record belongs to another checkpoint: exit 3.
    assert main(["users", "nearest", "dan"]) == EXIT_LOAD_ERROR
    assert "refit it against this checkpoint" in capsys.readouterr().err
    assert main(["users", "get", "dan"]) == 0
    assert "NOT this store's checkpoint" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["put", "--user", "x", "--coefficients", "[1, 2, 3]"], EXIT_BAD_INPUT, "has 3 coefficients; the basis has 4"),
        (["put", "--user", "x", "--coefficients", "[1, NaN, 0, 0]"], EXIT_BAD_INPUT, "NaN or infinite"),
        (["put", "--user", "x", "--coefficients", "[1e39, 0, 0, 0]"], EXIT_BAD_INPUT, "beyond float32 range"),
        (["put", "--user", "x", "--coefficients", "not json"], EXIT_BAD_INPUT, "coefficients: is not valid JSON"),
        (["put", "--user", "x", "--coefficients", "[]"], EXIT_BAD_INPUT, "non-empty JSON list of numbers"),
        (["put", "--user", "../etc/x", "--coefficients", "[1,0,0,0]"], EXIT_BAD_INPUT, "user_id:"),
        (["put", "--user", "a" * 300, "--coefficients", "[1,0,0,0]"], EXIT_BAD_INPUT, "at most 256"),
        (["put", "--coefficients", "[1,0,0,0]"], EXIT_BAD_INPUT, "--user is required"),
        (
            ["put", "--user", "x", "--coefficients", "[1,0,0,0]", "--fit", "[1]"],
            EXIT_BAD_INPUT,
            "fit: must be a JSON object",
        ),
        (["put", "--record", "/nonexistent.safetensors"], EXIT_BAD_INPUT, "does not exist"),
        (["nearest", "nobody"], EXIT_BAD_INPUT, "unknown user 'nobody'"),
        (["nearest", "--coefficients", "[0,0,0,0]"], EXIT_BAD_INPUT, "zero embedding"),
        (["nearest", "--coefficients", "[1,0,0,0]", "-k", "0"], EXIT_BAD_INPUT, "k: must be an integer"),
        (["delete", "nobody"], EXIT_BAD_INPUT, "unknown user 'nobody'"),
        (["import", "/nonexistent"], EXIT_BAD_INPUT, "does not exist"),
        (["get", "x", "--checkpoint", "/nonexistent"], EXIT_LOAD_ERROR, "does not exist"),
    ],
)
def test_bad_input_exits_with_a_clear_message(tmp_path, capsys, args, code, message):
    store = tmp_path / "store"
    assert main(users(store, "put", "--user", "keep", "--coefficients", "[1, 0, 0, 0]")) == 0
    capsys.readouterr()
    assert main(users(store, *args)) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert main(users(store, "list")) == 0
    assert capsys.readouterr().out.split("\t")[0] == "keep"  # nothing else was written


def test_record_of_another_checkpoint_is_refused_with_exit_3(tmp_path, capsys):
    UserRecord("x", "coefficients", torch.ones(4), "ab" * 32).save(tmp_path / "x.safetensors")
    assert main(users(tmp_path / "s", "put", "--record", str(tmp_path / "x.safetensors"))) == EXIT_LOAD_ERROR
    assert "was fitted against stage-1 checkpoint abababababab" in capsys.readouterr().err


def test_missing_or_damaged_store_exits_3(tmp_path, capsys):
    assert main(users(tmp_path / "nowhere", "get", "x")) == EXIT_LOAD_ERROR
    assert "no user store at" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "users.sqlite3").write_bytes(b"garbage" * 1000)
    assert main(users(tmp_path / "bad", "list")) == EXIT_LOAD_ERROR
    assert "file is not a database" in capsys.readouterr().err
