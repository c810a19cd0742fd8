"""`premier world build` and `premier eval` end to end on a tiny configuration, and their bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from premier.cli import EXIT_BAD_INPUT, main


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    from premier.world.build import BuildConfig, build

    root = tmp_path_factory.mktemp("world")
    record = build(root / "out", root / "work", BuildConfig.quick(), progress=False, log=lambda *_: None)
    return root, record


def test_build_writes_the_shipped_layout(tiny_world):
    from premier.checkpoint import PremierModel
    from premier.models.embedded import DEMO_USERS, build_embedded_flux
    from premier.user_record import UserRecord

    root, record = tiny_world
    out = root / "out"
    assert set(record["steps"]) == {"data", "base", "stage1", "users", "probe"}
    assert (
        json.loads((out / "world.json").read_text())["steps"]["stage1"]["checkpoint_id"]
        == record["steps"]["stage1"]["checkpoint_id"]
    )
    premier, ckpt = PremierModel.load(out / "premier")
    assert ckpt == record["steps"]["stage1"]["checkpoint_id"] and len(premier.users) == 4
    for uid in DEMO_USERS:
        rec = UserRecord.load(out / "users" / f"{uid}.safetensors")
        assert rec.mode == "coefficients" and rec.checkpoint_id == ckpt and rec.vector.shape == (4,)
    assert (out / "probe" / "probe.safetensors").is_file()
    build_embedded_flux(weights=out)  # the base loads as the embedded transformer
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))  # safetensors and JSON only


def test_eval_runs_end_to_end_and_writes_its_report(tiny_world, tmp_path, capsys):
    root, _ = tiny_world
    docs = tmp_path / "docs"
    code = main(
        [
            "eval",
            "--quick",
            "--world",
            str(root / "out"),
            "--work",
            str(root / "work"),
            "--docs",
            str(docs),
            "--variants",
            "premier,no_ppm,no_shared",
            "--quiet",
            "--threads",
            "1",
        ]
    )
    assert code == 0
    report = (docs / "eval.md").read_text()
    for row in (
        "ground-truth renders",
        "base model, no user",
        "Premier (full)",
        "w/o PPM",
        "w/o block-shared adapter",
        "linear combination",
        "direct fitting",
    ):
        assert row in report
    assert "premier eval --quick" in report or "Command:" in report
    results = json.loads((docs / "eval.json").read_text())
    assert set(results["rows"]) == {"ground_truth", "base", "start", "premier", "no_ppm", "no_shared"}
    assert "Premier, no history (stage 2's starting point" in report and "What fitting adds" in report
    assert set(results["sweep"]) == {"coefficients", "direct", "fast"} and set(results["sweep"]["direct"]) == {"1", "2"}
    assert set(results["sweep"]["fast"]) == {"1", "2"} and "fast fit (onboarding" in report
    assert "onboarding: fast fit minus full linear combination" in report  # the paired reading, per history size
    for row in results["rows"].values():
        assert 0 <= row["alignment"] <= 1 and 0 <= row["text"] <= 1 and row["distance"] >= 0
    # Per-(user, prompt) alignments behind every row, whose means are the rows' alignments.
    for name in ("base", "start", "premier", "no_ppm", "no_shared"):
        assert len(results["pairs"][name]) == 2  # 1 test user x 2 test prompts
        assert sum(results["pairs"][name]) / len(results["pairs"][name]) == pytest.approx(
            results["rows"][name]["alignment"], abs=1e-4
        )
    # one test user: the difference, and no interval (it would be over images, which share the user's fit)
    assert "w/o PPM (empty prompt into the adapters) vs full Premier: alignment " in report
    assert "(one user: no interval)" in report and " ± " not in report
    for png in ("eval_fitting.png", "eval_table.png", "eval_examples.png"):
        assert (docs / png).stat().st_size > 0
    # The ablation runs are kept in WORK, and finished rows are reused by the next eval with the same settings.
    assert (root / "work" / "stage1-no_ppm" / "checkpoints" / "latest").is_file()
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                "--quick",
                "--world",
                str(root / "out"),
                "--work",
                str(root / "work"),
                "--docs",
                str(docs),
                "--variants",
                "premier,no_ppm",
                "--baseline",
                "lora",
                "--lora-ranks",
                "2",
                "--quiet",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "eval: premier from the cache" in out and "eval: sweep-direct-2-users1 from the cache" in out
    report = (docs / "eval.md").read_text()
    assert "results reused from earlier runs' cache" in report
    # The LoRA baseline's rows: the same users, prompts and seeds, with what each user costs.
    results = json.loads((docs / "eval.json").read_text())
    lora = results["sweep"]["lora-r2"]
    assert set(lora) == {"1", "2"} and "per-user LoRA, rank 2" in report
    assert "baseline: LoRA rank 2 minus Premier's linear combination" in report
    for row in lora.values():
        assert 0 <= row["alignment"] <= 1 and row["fit_seconds"] > 0 and row["fit_steps"] >= 1
        assert row["parameters_per_user"] > 0 and row["bytes_on_disk_per_user"] > 4 * row["parameters_per_user"] // 2
    assert len(results["pairs"]["sweep-lora-r2-1"]) == 2
    # A finished ablation run made with other settings is refused, not reused because its step count fits.
    claim = root / "work" / "stage1-no_ppm" / "eval-run.json"
    saved = claim.read_text()
    changed = json.loads(saved)
    changed["stage1"]["tau"] = 0.5
    claim.write_text(json.dumps(changed))
    argv = ["eval", "--quick", "--world", str(root / "out"), "--work", str(root / "work"), "--docs", str(docs)]
    # (another denoising step count: the rows are not in the cache, so the run is needed)
    assert main([*argv, "--variants", "premier,no_ppm", "--denoise-steps", "3", "--quiet"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "stage1.tau 0.5 (now 1.0)" in err and "use another --work" in err
    claim.write_text(saved)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--variants", "premier,bogus"], "unknown 'bogus'"),
        (["eval", "--variants", "premier:diag:tau=0"], "tau in 'premier:diag:tau=0' must be a finite number"),
        (["eval", "--variants", "premier:diag,premier:diag"], "a variant is given twice"),
        (["eval", "--history", "99"], "history sizes must be in"),
        (["eval", "--baseline", "lora", "--lora-ranks", "999"], "rank: must be an integer in [1, 256], got 999"),
        (["world", "build", "--only", "data,nope"], "unknown step(s) nope"),
        (["world", "validate-probe", "--world", "/nonexistent/world"], "does not exist"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(tiny_world, argv, message, capsys):
    root, _ = tiny_world
    if argv[0] == "eval":
        argv = argv + [
            "--quick",
            "--world",
            str(root / "out"),
            "--work",
            str(root / "work"),
            "--docs",
            str(root / "docs"),
        ]
    if argv[:2] == ["world", "build"]:
        argv = argv + ["--out", str(root / "never"), "--work", str(root / "never-work")]
    assert main(argv) == EXIT_BAD_INPUT
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv", [["eval", "--test-users", "0"], ["eval", "--sweep", "2,x"], ["world", "show", "--users", "-1"]]
)
def test_bad_arguments_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == EXIT_BAD_INPUT
    assert "error" in capsys.readouterr().err


def test_world_show_writes_a_contact_sheet(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "world.png"
    assert main(["world", "show", "-o", str(out), "--users", "2", "--prompts", "3", "--scale", "1"]) == 0
    assert Image.open(out).size == (3 * 32, 6 * 32)  # 4 demo users + 2 training users
    assert "alice" in capsys.readouterr().out


def test_readings_give_intervals_over_users_never_over_images():
    """Alignment differences in the reading: paired over (user, prompt), interval by a bootstrap over users. A user's
    prompts share one fit, so a difference that one user carries is wide however many prompts it has."""
    from premier.world.report import findings

    users = {"base": [0.4] * 8, "premier": [0.6, 0.6, 0.7, 0.7, 0.6, 0.6, 0.7, 0.7], "no_ppm": [0.9] * 2 + [0.6] * 6}
    rows = {k: {"alignment": sum(v) / 8, "win_rate": 0.5, "text": 0.5, "distance": 0.5} for k, v in users.items()}
    text = "\n".join(findings(rows, {}, users, prompts_per_user=2))  # 4 users x 2 prompts
    assert "Premier (full): alignment +0.250 [+0.200, +0.300] over 4 users (higher)" in text
    assert "w/o PPM (empty prompt into the adapters) vs full Premier: alignment +0.025 [" in text
    assert "over 4 users (within noise)" in text and "±" not in text
    one = "\n".join(findings(rows, {}, {k: v[:2] for k, v in users.items()}, prompts_per_user=2))
    assert "alignment +0.200 (one user: no interval)" in one
    unknown = "\n".join(findings(rows, {}, users))
    assert "(no interval: prompts per user unknown)" in unknown


def test_sweep_comparisons_carry_an_interval_over_users():
    """A baseline's sweep row against Premier's: the paired difference with its bootstrap over users (a user's
    prompts share one fit), which is wide when one user carries the difference."""
    from premier.world.report import findings, user_bootstrap

    lc = [0.5] * 6  # 3 users x 2 prompts
    lora = [0.9, 0.9, 0.5, 0.5, 0.5, 0.5]  # only the first user differs
    sweep = {m: {"1": {"alignment": sum(v) / 6, "distance": 0.5}} for m, v in (("coefficients", lc), ("lora-r4", lora))}
    text = "\n".join(
        findings(
            {"base": {"alignment": 0.4, "text": 0.5, "distance": 0.5}},
            sweep,
            {"sweep-coefficients-1": lc, "sweep-lora-r4-1": lora},
            prompts_per_user=2,
        )
    )
    assert (
        "1 history images, baseline: LoRA rank 4 minus Premier's linear combination +0.133 [+0.000, +0.400] over 3 users"
        in text
    )
    mean, lo, hi = user_bootstrap([0.1, 0.1, 0.1])
    assert mean == pytest.approx(0.1) and lo == pytest.approx(0.1) and hi == pytest.approx(0.1)


def test_an_interrupted_ablation_run_resumes_from_its_last_checkpoint(tiny_world, tmp_path, capsys):
    """Stage-1 runs of the ablations take tens of minutes at full size: a stopped eval continues them from their last
    checkpoint (made with the same settings, recorded when the run started) instead of starting over."""
    import shutil
    from dataclasses import replace

    from premier.models.embedded import build_embedded_flux, embedded_premier_config
    from premier.training.config import Stage1Config
    from premier.training.prepared import PreparedDataset
    from premier.training.stage1 import latest_checkpoint
    from premier.world.build import read_world
    from premier.world.stages import build_trainer

    root, _ = tiny_world
    work = tmp_path / "work"
    shutil.copytree(root / "work" / "prepared", work / "prepared")
    info = read_world(root / "out")
    stage1 = Stage1Config.from_dict(info["config"]["stage1"])
    run = work / "stage1-no_dispersion"
    flux = build_embedded_flux(weights=root / "out").transformer
    half = replace(stage1, steps=1, checkpoint_every=1)  # what a run stopped after its first checkpoint left
    build_trainer(flux, PreparedDataset(work / "prepared"), run, "no_dispersion", half, embedded_premier_config()).run(
        progress=False
    )
    settings = {"variant": "no_dispersion", "world": info["config"]["world"], "stage1": stage1.to_dict()}
    (run / "eval-run.json").write_text(json.dumps(settings))
    assert int(latest_checkpoint(run).name.split("-")[-1]) == 1
    argv = ["eval", "--quick", "--world", str(root / "out"), "--work", str(work), "--docs", str(tmp_path / "docs")]
    capsys.readouterr()
    assert main([*argv, "--variants", "no_dispersion", "--quiet", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "eval: resuming stage 1 'no_dispersion' at step 1" in out
    assert int(latest_checkpoint(run).name.split("-")[-1]) == stage1.steps == 2
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # the first step from the interrupted run, the second from the resumed one


def test_other_seeds_train_their_own_stage1_and_fit_with_their_own_seed(tiny_world, tmp_path, capsys):
    """Seeds for the statistics: another stage-1 seed trains Premier too (into WORK, once), another fit seed refits;
    neither reuses the shipped checkpoint's rows, and bad seeds are refused naming the flag's field."""
    root, _ = tiny_world
    work, docs = tmp_path / "work", tmp_path / "docs"
    argv = ["eval", "--quick", "--world", str(root / "out"), "--work", str(work), "--docs", str(docs), "--quiet"]
    assert main([*argv, "--variants", "premier", "--stage1-seed", "7", "--fit-seed", "3", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "eval: trained stage 1 'premier'" in out and "from the cache" not in out
    run = work / "stage1-premier-seed7"
    assert json.loads((run / "eval-run.json").read_text())["stage1"]["seed"] == 7
    results = json.loads((docs / "eval.json").read_text())
    assert results["config"]["stage1_seed"] == 7 and results["config"]["fit_seed"] == 3
    assert "Stage-1 seed: 7; stage-2 (fitting) seed: 3." in (docs / "eval.md").read_text()
    # The same seeds again: everything from the cache and the finished run.
    assert main([*argv, "--variants", "premier", "--stage1-seed", "7", "--fit-seed", "3", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "eval: premier from the cache" in out and "trained stage 1" not in out
    for flag, value in (("--stage1-seed", "-1"), ("--fit-seed", str(2**31))):
        assert main([*argv, flag, value]) == EXIT_BAD_INPUT
        assert f"{flag[2:].replace('-', '_')}: must be in [0, 2^31)" in capsys.readouterr().err


def test_a_variant_with_other_dispersion_settings_trains_its_own_run_and_row(tiny_world, tmp_path, capsys):
    """The dispersion comparisons (forms and the lambda sweep): `premier:diag:lambda=0.5` is its own stage-1 run,
    trained with those settings and named by them, and its own row, read against full Premier."""
    root, _ = tiny_world
    work, docs = tmp_path / "work", tmp_path / "docs"
    argv = ["eval", "--quick", "--world", str(root / "out"), "--work", str(work), "--docs", str(docs), "--quiet"]
    assert main([*argv, "--variants", "premier,premier:lambda=0.50:diag", "--threads", "1"]) == 0
    assert "eval: trained stage 1 'premier:diag:lambda=0.5'" in capsys.readouterr().out
    saved = json.loads((work / "stage1-premier-diag-lambda0.5" / "eval-run.json").read_text())
    assert saved["variant"] == "premier:diag:lambda=0.5"
    from premier.files import read_safetensors
    from premier.training.stage1 import TRAINER_STATE, latest_checkpoint

    _, meta = read_safetensors(latest_checkpoint(work / "stage1-premier-diag-lambda0.5") / TRAINER_STATE, RuntimeError)
    stage1 = json.loads(meta["config"])  # what the trainer ran with
    assert stage1["dispersion_scale"] == "diag" and stage1["lambda_shared"] == stage1["lambda_distinct"] == 0.5
    results = json.loads((docs / "eval.json").read_text())
    assert set(results["rows"]) >= {"premier", "premier:diag:lambda=0.5"}
    md = (docs / "eval.md").read_text()
    assert "| Premier (full), dispersion diag, λ 0.5 |" in md
    assert "- Premier (full), dispersion diag, λ 0.5 vs full Premier: alignment" in md


def test_a_report_links_the_world_doc_from_wherever_it_is_written(tmp_path):
    import re

    from premier.world.report import world_doc_link

    repo = Path(__file__).resolve().parents[3]
    for docs in (repo / "docs", repo / "docs" / "eval-v2" / "stage1-seed1", tmp_path / "elsewhere"):
        link = re.fullmatch(r"\[docs/world\.md\]\((.+)\)", world_doc_link(docs))
        assert link is not None
        assert (docs / link.group(1)).resolve() == repo / "docs" / "world.md"
    assert world_doc_link(repo / "docs") == "[docs/world.md](world.md)"
