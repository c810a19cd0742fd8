"""Stage 1 on 2 Ray Train workers (gloo, CPU) against the same trainer in one process.

One local Ray cluster for the module (2 CPUs, no dashboard), shut down at the end. The runs are a
few steps of the embedded tiny FLUX on generated colour users (tests/training_data.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from training_data import PixelEncoder, make_raw_dataset

from premier.checkpoint import PremierModel
from premier.cli import EXIT_BAD_INPUT, main
from premier.models.embedded import build_embedded_flux, embedded_premier_config
from premier.training.collectives import TorchComm, assign_users, chunk
from premier.training.config import Stage1Config
from premier.training.distributed import run_distributed
from premier.training.losses import dispersion_loss
from premier.training.metrics import MetricsLog
from premier.training.prepared import PreparedDataset, prepare_dataset
from premier.training.stage1 import Stage1Trainer, latest_checkpoint

COLOURS = ((220, 40, 40), (40, 200, 60), (40, 60, 220), (235, 235, 235), (200, 200, 40), (40, 200, 200))
# 6 users of 3 images (shards of 2: users span several shards); dispersion over 3 users splits 2 + 1.
SETTINGS = dict(
    steps=6,
    batch_size=4,
    dispersion_users=3,
    checkpoint_every=2,
    keep_checkpoints=5,
    optim={"optimizer": "adamw", "lr": 1e-2, "weight_decay": 0.0},
)
TOL = dict(rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist-users")
    raw = make_raw_dataset(root / "raw", per_user=3, colours=COLOURS)
    prepare_dataset(raw, root / "prep", PixelEncoder(build_embedded_flux(), 64), shard_size=2)
    return root / "prep"


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    here = Path(__file__).resolve()
    tests = f"{here.parent}{os.pathsep}{here.parents[2]}"
    # workers import this module (probe_loop) and tests/training_data.py by name
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": tests}}, log_to_driver=False)
    yield ray
    ray.shutdown()


def config(**overrides) -> Stage1Config:
    return Stage1Config.from_dict({**SETTINGS, **overrides})


@pytest.fixture(scope="module")
def single(data, tmp_path_factory) -> Path:
    """The reference: the same settings in one process, no Ray."""
    out = tmp_path_factory.mktemp("single")
    Stage1Trainer(
        build_embedded_flux().transformer, PreparedDataset(data), out, config(), embedded_premier_config()
    ).run(progress=False)
    return out


@pytest.fixture(scope="module")
def two_workers(data, ray_cluster, tmp_path_factory) -> Path:
    """`premier train --num-workers 2` (on the module's cluster, which the CLI reuses when connected),
    each worker's share of a batch in micro-batches of 1 image."""
    out = tmp_path_factory.mktemp("two")
    assert (
        main(
            [
                "train",
                "--data",
                str(data),
                "--out",
                str(out),
                "--num-workers",
                "2",
                "--micro-batch",
                "1",
                "--no-progress",
                "--steps",
                "6",
                "--batch-size",
                "4",
                "--dispersion-users",
                "3",
                "--checkpoint-every",
                "2",
                "--keep-checkpoints",
                "5",
                "--optimizer",
                "adamw",
                "--lr",
                "0.01",
                "--weight-decay",
                "0",
            ]
        )
        == 0
    )
    assert ray_cluster.is_initialized()  # the CLI left the cluster it did not start
    return out


def losses(out: Path) -> list[dict]:
    return MetricsLog.read(out / "metrics.jsonl")


# ----------------------------------------------------------------------------- pure helpers
def test_user_assignment_and_chunks():
    assert assign_users([3, 3, 3, 3, 3, 3], 2).tolist() == [0, 1, 0, 1, 0, 1]
    assert assign_users([10, 1, 1, 1, 5], 2).tolist() == [0, 1, 1, 1, 1]  # balanced by examples, not users
    assert assign_users([4, 2], 1).tolist() == [0, 0]
    assert [chunk(3, r, 2) for r in range(2)] == [(0, 2), (2, 3)]
    assert [chunk(1, r, 2) for r in range(2)] == [(0, 1), (1, 1)]
    from premier.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError):
        assign_users([3], 2)


# ----------------------------------------------------------------------------- 2 workers vs 1 process
def test_two_workers_match_one_process(single, two_workers):
    out = two_workers
    a, b = losses(single), losses(out)
    assert [r["step"] for r in b] == list(range(1, 7))
    for key in ("loss", "fm", "disp_shared", "disp_distinct", "grad_norm"):
        torch.testing.assert_close(torch.tensor([r[key] for r in b]), torch.tensor([r[key] for r in a]), **TOL, msg=key)
    one, _ = PremierModel.load(latest_checkpoint(single))
    two, _ = PremierModel.load(latest_checkpoint(out))
    diff = torch.cat([(p - q).detach().abs().flatten() for p, q in zip(one.parameters(), two.parameters())])
    # AdamW divides by sqrt(v): an element whose gradient is ~0 moves by up to lr on rounding noise
    # alone, so a few elements may differ by a fraction of a step (lr 1e-2); the rest agree to rounding.
    assert float(diff.max()) < 1e-3 and float((diff > 1e-5).float().mean()) < 0.01
    assert latest_checkpoint(out).name == "step-0000006"
    assert len(list((out / "ray").iterdir())) == 1  # Ray Train's run folder (pointer checkpoints)
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == [f"step-{s:07d}" for s in (2, 4, 6)]


def test_resume_two_worker_checkpoint_on_one_process(data, two_workers, tmp_path):
    out = two_workers
    resumed = Stage1Trainer.resume(
        build_embedded_flux().transformer, PreparedDataset(data), out, checkpoint=out / "checkpoints" / "step-0000002"
    )
    assert resumed.step == 2 and resumed.comm.world_size == 1
    tail = [resumed.train_step() for _ in range(4)]
    ref = [r for r in losses(out) if r["step"] > 2]
    torch.testing.assert_close(torch.tensor([r["loss"] for r in tail]), torch.tensor([r["loss"] for r in ref]), **TOL)


# ----------------------------------------------------------------------------- dispersion gather, table consistency
def probe_loop(cfg: dict) -> None:
    """On each worker: the gathered dispersion (value and gradients) vs the single-process value on
    the same users, then a few steps checking the user table is identical on every rank and that only
    the rows of a step's users got gradients."""
    import torch.distributed as dist

    comm = TorchComm()
    ds = PreparedDataset(cfg["data"])
    tr = Stage1Trainer(
        build_embedded_flux().transformer,
        ds,
        cfg["out"],
        config(dispersion_users=2, batch_size=2),
        embedded_premier_config(),
        comm=comm,
    )
    users = torch.tensor([4, 0, 5])  # 2 + 1 rows: uneven chunks
    lo, hi = chunk(len(users), comm.rank, comm.world_size)
    text = tr._empty_text.unsqueeze(0).expand(len(users), -1, -1)
    report: dict = {"rank": comm.rank}
    for kind in ("shared", "distinct"):
        tr.optimizer.zero_grad(set_to_none=True)
        mine = getattr(tr.model.adapters(text[lo:hi], tr.model.users(users[lo:hi])), kind)
        gathered = dispersion_loss(comm.gather_rows(mine), 0.5)
        (gathered / comm.world_size).backward()
        comm.all_reduce_grads(tr.params)
        dist_grads = [p.grad.clone() for p in tr.params]
        tr.optimizer.zero_grad(set_to_none=True)
        whole = dispersion_loss(getattr(tr.model.adapters(text, tr.model.users(users)), kind), 0.5)
        whole.backward()
        report[kind] = [float(gathered.detach()), float(whole.detach())]
        report[kind + "_grad_diff"] = max(
            float((a - (b if b is not None else 0)).abs().max())
            for a, b in zip(dist_grads, [p.grad for p in tr.params])
        )
    report["tables_equal"], report["untouched_rows_zero"] = [], []
    for _ in range(3):
        g = torch.Generator().manual_seed(0)
        g.set_state(tr.generator.get_state())
        idx = torch.randint(len(ds), (2,), generator=g)
        tr.objective.draw_shape((2, *tr._sample_shape), g)
        chosen = torch.randperm(len(ds.user_ids), generator=g)[:2]
        step_users = set(ds.user_of[idx].tolist()) | set(chosen.tolist())
        tr.train_step()
        grad = tr.model.users.weight.grad
        others = [u for u in range(len(ds.user_ids)) if u not in step_users]
        report["untouched_rows_zero"].append(bool(all(float(grad[u].abs().max()) == 0.0 for u in others)))
        table = tr.model.users.weight.detach().contiguous()
        tables = [torch.empty_like(table) for _ in range(comm.world_size)]
        dist.all_gather(tables, table)
        report["tables_equal"].append(all(torch.equal(t, tables[0]) for t in tables))
    Path(cfg["out"], f"probe-{comm.rank}.json").write_text(json.dumps(report))


def test_gathered_dispersion_and_consistent_tables(data, ray_cluster, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    TorchTrainer(
        probe_loop,
        train_loop_config={"data": str(data), "out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2),
        run_config=RunConfig(storage_path=str(tmp_path / "ray")),
    ).fit()
    reports = [json.loads((tmp_path / f"probe-{r}.json").read_text()) for r in range(2)]
    for rep in reports:
        for kind in ("shared", "distinct"):
            gathered, whole = rep[kind]
            assert gathered == pytest.approx(whole, rel=1e-5, abs=1e-6), (kind, rep)
            assert rep[kind + "_grad_diff"] < 1e-5, rep
        assert rep["tables_equal"] == [True] * 3
        assert rep["untouched_rows_zero"] == [True] * 3
    assert reports[0]["shared"] == reports[1]["shared"]


# ----------------------------------------------------------------------------- fault tolerance
def test_killed_worker_restarts_from_last_checkpoint(data, ray_cluster, single, tmp_path):
    flag = tmp_path / "killed.txt"
    out = tmp_path / "run"
    result = run_distributed(
        data,
        out,
        SETTINGS,
        num_workers=2,
        premier_config=embedded_premier_config().to_dict(),
        max_failures=1,
        fault={"rank": 1, "step": 3, "flag": str(flag)},
    )
    assert flag.is_file()  # rank 1 really died after step 3 (after the step-2 checkpoint)
    state = out / "checkpoints" / "step-0000002" / "trainer_state.safetensors"
    # the restarted workers resumed from step 2: its checkpoint was written before the kill and never again
    assert (
        state.stat().st_mtime_ns < flag.stat().st_mtime_ns < (out / "checkpoints" / "step-0000004").stat().st_mtime_ns
    )
    assert Path(result["checkpoint"]).name == "step-0000006" and latest_checkpoint(out).name == "step-0000006"
    model, _ = PremierModel.load(result["checkpoint"])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # restarted from step 2: the log tells one run, and it is the uninterrupted run
    rows = losses(out)
    assert [r["step"] for r in rows] == list(range(1, 7))
    torch.testing.assert_close(
        torch.tensor([r["loss"] for r in rows]), torch.tensor([r["loss"] for r in losses(single)]), **TOL
    )


def test_cli_distributed_errors(data, ray_cluster, tmp_path, capsys):
    common = ["train", "--data", str(data), "--out", str(tmp_path / "o"), "--no-progress"]
    assert main([*common, "--num-workers", "7"]) == EXIT_BAD_INPUT  # 6 users
    assert "at least 7 training users" in capsys.readouterr().err
    assert main([*common, "--num-workers", "0"]) == EXIT_BAD_INPUT
    assert main([*common, "--num-workers", "2", "--resume"]) == EXIT_BAD_INPUT
    assert "no checkpoint to resume" in capsys.readouterr().err
    assert main([*common, "--use-gpu"]) == EXIT_BAD_INPUT
    assert "--num-workers" in capsys.readouterr().err
