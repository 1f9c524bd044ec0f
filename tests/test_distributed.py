"""Data-parallel training with torchrun: 2 CPU processes (gloo, 127.0.0.1 only) on a small real-MNIST subset.

One uninterrupted 2-process run is shared by most tests (about 25 s); a run stopped after epoch 1 and resumed is
compared with it exactly. The pure parts (shards, draws, launch checks) are tested without starting processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from digitkit import cli, config, data, distributed, runs, train
from digitkit.distributed import World
from digitkit.errors import ConfigError

from .conftest import MNIST_DIR, ROOT

# The default recipe (augmentation, label smoothing, one-cycle AdamW, cnn3_slim with batch norm) made short, with
# an EMA of the weights so that the DDP path of every training option is exercised.
RECIPE = ["train.epochs=2", "train.batch_size=64", "train.ema_decay=0.9", "train.plots=false"]
# Test accuracy of RECIPE in one process over seeds 0-4 on this subset (1,000 test images): 96.2, 97.0, 97.1, 97.6,
# 97.1% (std 0.5 points). Two processes change the batch-norm batches and the augmentation draws, which is like
# another seed; 2 points is 4 such standard deviations.
ACCURACY_TOLERANCE = 0.02


def torchrun(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "digitkit", *args]  # fmt: skip
    full_env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(ROOT / "src"), **(env or {})}
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def subset_dir(tmp_path_factory) -> Path:
    """3,000 training images (a stratified 5% of MNIST's) and 1,000 test images, as an IDX folder."""
    out = tmp_path_factory.mktemp("mnist-subset")
    full = data.load_split(MNIST_DIR, "train")
    test = data.load_split(MNIST_DIR, "test")
    data.save_split(full.subset(data.stratified_split(full.labels, 0.05, seed=0)[1]), out, "train")
    data.save_split(test.subset(data.stratified_split(test.labels, 0.1, seed=0)[1]), out, "test")
    data.write_sums(out)
    return out


def train_args(subset_dir: Path, out: Path, *extra: str) -> list[str]:
    sets = [a for s in RECIPE for a in ("--set", s)]
    return ["train", "--config", str(ROOT / "configs" / "default.yaml"), "--data-dir", str(subset_dir),
            "--out", str(out), *sets, "--quiet", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def ddp_run(subset_dir, tmp_path_factory):
    """One uninterrupted 2-process run; each rank logs the images it trained on (DIGITKIT_SHARD_LOG)."""
    work = tmp_path_factory.mktemp("ddp")
    shards = work / "shards"
    shards.mkdir()
    done = torchrun(*train_args(subset_dir, work / "run", "--json"), cwd=work,
                    env={distributed.SHARD_LOG_ENV: str(shards)})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return {"work": work, "run": work / "run", "shards": shards, "stdout": done.stdout}


def test_torchrun_run_completes_and_only_rank_0_writes(ddp_run):
    run = ddp_run["run"]
    # Rank 1 prints nothing on stdout: one summary, as from a single process.
    lines = ddp_run["stdout"].strip().splitlines()
    assert len(lines) == 1, ddp_run["stdout"]
    summary = json.loads(lines[0])
    assert summary["finished"] and summary["processes"] == 2 and summary["epochs"] == 2
    assert json.loads((run / "summary.json").read_text())["processes"] == 2
    names = {p.name for p in run.iterdir()}
    assert {"config.yaml", "metrics.csv", "last.pt", "summary.json"} <= names
    assert len([n for n in names if n.startswith("best-")]) == 1
    # No other folder anywhere: no runs/ from rank 1, nothing beside the run and the shard log.
    assert {p.name for p in ddp_run["work"].iterdir()} == {"run", "shards"}
    assert torch.load(run / "last.pt", weights_only=True)["world_size"] == 2


def test_ranks_take_disjoint_shards_that_make_up_the_single_process_epoch(ddp_run, subset_dir):
    cfg = config.load(ROOT / "configs" / "default.yaml", RECIPE + [f"data.dir={subset_dir}"])
    n_train = len(runs.load_data(cfg)[0])
    steps = train.epoch_steps(n_train, cfg.train)
    logs = {r: [json.loads(line) for line in (ddp_run["shards"] / f"shards-rank{r}.jsonl").read_text().splitlines()]
            for r in (0, 1)}  # fmt: skip
    assert [rec["epoch"] for rec in logs[0]] == [rec["epoch"] for rec in logs[1]] == [1, 2]
    for e in (0, 1):
        a, b = logs[0][e], logs[1][e]
        assert a["shard_size"] + b["shard_size"] == n_train  # the two shards cover the epoch's permutation
        assert len(a["used"]) == len(b["used"]) == steps * cfg.train.batch_size // 2  # global batch, halved
        assert not set(a["used"]) & set(b["used"])
        # Together the ranks trained on exactly the images a single process trains on in that epoch.
        _, perm = train.epoch_draws(cfg.seed, e + 1, n_train)
        assert set(a["used"]) | set(b["used"]) == set(perm[: steps * cfg.train.batch_size].tolist())
    assert logs[0][0]["used"] != logs[0][1]["used"]  # every epoch reshuffles


def test_accuracy_is_within_noise_of_a_single_process_run(ddp_run, subset_dir, tmp_path):
    cfg = config.load(ROOT / "configs" / "default.yaml", RECIPE + [f"data.dir={subset_dir}", "train.threads=1"])
    single = runs.train_run(cfg, out=tmp_path / "single")
    ddp = json.loads((ddp_run["run"] / "summary.json").read_text())
    assert single["processes"] == 1
    assert single["test_accuracy"] > 0.93 and ddp["test_accuracy"] > 0.93  # both learned
    assert abs(ddp["test_accuracy"] - single["test_accuracy"]) <= ACCURACY_TOLERANCE, (ddp, single)
    # Same recipe, same schedule: as many steps per epoch, so the one-cycle learning rate follows the same curve.
    lr_single = [r["lr"] for r in train.read_metrics(tmp_path / "single" / "metrics.csv")]
    lr_ddp = [r["lr"] for r in train.read_metrics(ddp_run["run"] / "metrics.csv")]
    assert lr_ddp == pytest.approx(lr_single, rel=1e-5)


def test_resume_with_torchrun_ends_where_the_uninterrupted_run_did(ddp_run, subset_dir, tmp_path):
    part = tmp_path / "part"
    first = torchrun(*train_args(subset_dir, part, "--stop-after-epochs", "1"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert [r["epoch"] for r in train.read_metrics(part / "metrics.csv")] == [1]
    second = torchrun("train", "--resume", str(part), "--quiet", "--json", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]

    def rows(run: Path) -> list[dict]:  # everything but the timings
        return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")}
                for r in train.read_metrics(run / "metrics.csv")]  # fmt: skip

    assert rows(part) == rows(ddp_run["run"])
    a = torch.load(ddp_run["run"] / "last.pt", weights_only=True)
    b = torch.load(part / "last.pt", weights_only=True)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert all(torch.equal(v, b["ema"][k]) for k, v in a["ema"].items() if isinstance(v, torch.Tensor))
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert summary["test_accuracy"] == json.loads((ddp_run["run"] / "summary.json").read_text())["test_accuracy"]


def test_resuming_with_another_number_of_processes_is_refused(ddp_run, capsys):
    assert cli.main(["train", "--resume", str(ddp_run["run"]), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "trained with 2 process(es) but this launch has 1" in err and "torchrun" in err


# ----------------------------------------------------------------------------------------------------------
# Pure parts: no processes started


@pytest.mark.parametrize("n, size", [(10, 2), (11, 2), (100, 3), (7, 4)])
def test_shards_are_disjoint_cover_the_permutation_and_rebuild_each_global_batch(n, size):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    shards = [distributed.shard(perm, World(r, size)) for r in range(size)]
    flat = torch.cat(shards).tolist()
    assert sorted(flat) == list(range(n)) and len(set(flat)) == n
    batch = size * 2  # global batch; 2 per rank
    for step in range(n // batch):
        together = torch.cat([s[step * 2 : step * 2 + 2] for s in shards])
        assert sorted(together.tolist()) == sorted(perm[step * batch : (step + 1) * batch].tolist())


def test_rank_draws_differ_between_ranks_and_repeat_exactly():
    perm = torch.arange(8)
    g0, _ = distributed.rank_draws(0, 1, perm, World(0, 2))
    again, _ = distributed.rank_draws(0, 1, perm, World(0, 2))
    g1, _ = distributed.rank_draws(0, 1, perm, World(1, 2))
    g0e2, _ = distributed.rank_draws(0, 2, perm, World(0, 2))
    a, b, c, d = (torch.rand(5, generator=g) for g in (g0, again, g1, g0e2))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)


def test_one_process_is_the_plain_path(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_from_env(torch.device("cpu")) == distributed.SINGLE == distributed.world()
    ds = data.Dataset(torch.zeros(5, 1, 2, 2, dtype=torch.uint8), torch.arange(5), ["a"] * 5)
    assert distributed.shard_dataset(ds, distributed.SINGLE) is ds
    assert distributed.sum_over_ranks([1.5, 2], distributed.SINGLE) == [1.5, 2]
    assert distributed.broadcast("x", distributed.SINGLE) == "x"


def test_bad_launches_say_what_to_do(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ConfigError, match="MASTER_ADDR, MASTER_PORT are not: start data-parallel training with"):
        distributed.init_from_env(torch.device("cpu"))
    monkeypatch.setattr(torch.distributed, "is_gloo_available", lambda: False)
    with pytest.raises(ConfigError, match="needs the gloo backend"):
        distributed.backend_for(torch.device("cpu"))
    with pytest.raises(ConfigError, match="runs on the CPU \\(gloo\\) or CUDA \\(NCCL\\)"):
        distributed.backend_for(torch.device("mps"))
    with pytest.raises(ConfigError, match="use a multiple of 2 \\(e.g. 64 or 66\\)"):
        distributed.check_launch(65, World(0, 2))
    with pytest.raises(ConfigError, match="one process"):
        distributed.check_launch(64, World(0, 2), custom_step=True)
    distributed.check_launch(65, distributed.SINGLE)  # any batch in one process
    with pytest.raises(ConfigError, match="resume it without torchrun"):
        distributed.check_resume({"world_size": 1}, World(0, 2), Path("runs/x"))
    distributed.check_resume({}, distributed.SINGLE, Path("runs/x"))  # runs from before DDP: one process
