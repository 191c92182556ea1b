"""Data-parallel training: the shards of an epoch, and ``torchrun --nproc_per_node=2 ... initscope train``
with 2 gloo processes on the CPU: the initialization is planned on rank 0 only, the ranks hold identical
weights and BatchNorm statistics after every epoch (even when rank 1 was built with different weights),
and only rank 0 writes."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from initscope.experiments.training.checkpoint import load_state
from initscope.experiments.training.distributed import DistEnv, env_from_environ, shard_batches, weights_digest

ROOT = Path(__file__).resolve().parents[1]


def test_shards_partition_the_epoch_with_equal_steps():
    x, y = torch.arange(23).float().view(23, 1), torch.arange(23)
    for world in (1, 2, 3):
        seen, steps = [], set()
        for rank in range(world):
            g = torch.Generator().manual_seed(5)  # every rank draws the same permutation
            batches = list(shard_batches(x, y, 4, g, DistEnv(rank=rank, world_size=world)))
            steps.add(tuple(len(b[1]) for b in batches))
            seen.append([int(i) for b in batches for i in b[1]])
        perm = torch.randperm(23, generator=torch.Generator().manual_seed(5)).tolist()
        usable = perm[: 23 - 23 % world]
        assert len(steps) == 1  # same number and sizes of batches on every rank
        assert sorted(sum(seen, [])) == sorted(usable) and len(set(sum(seen, []))) == len(usable)
        assert all(s == usable[r::world] for r, s in enumerate(seen)) or world == 1 and seen[0] == usable


def test_env_from_torchrun_variables():
    assert env_from_environ({}) == DistEnv() and not DistEnv().enabled
    e = env_from_environ({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"})
    assert e.enabled and not e.is_main and (e.rank, e.world_size) == (2, 4)
    with pytest.raises(ValueError, match="RANK=4 is not a rank of WORLD_SIZE=4"):
        env_from_environ({"WORLD_SIZE": "4", "RANK": "4"})


def tensor_hash(state: dict) -> str:
    """Our own hash of a state_dict's values (not weights_digest: this test checks that too)."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode() + state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# Runs `initscope train` under torchrun, logging per rank every planned initialization, every file it
# puts in place (os.replace: all of initscope's writes are atomic renames) and a hash of the weights at
# every evaluation. Rank 1's model is built with different weights: the broadcast must undo that.
DRIVER = textwrap.dedent('''
    import hashlib, json, os, sys
    import torch
    import initscope
    import initscope.experiments.training.loop as T

    rank, logdir = int(os.environ["RANK"]), sys.argv[1]

    def log(**kw):
        with open(os.path.join(logdir, f"rank{rank}.jsonl"), "a") as f:
            f.write(json.dumps(kw) + "\\n")

    def tensor_hash(state):
        h = hashlib.sha256()
        for k in sorted(state):
            h.update(k.encode() + state[k].detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    real_init, real_predict, real_build, real_replace = initscope.init_, T.predict, T.build_model, os.replace

    def init_(model, *a, **kw):
        log(event="init")
        return real_init(model, *a, **kw)

    def build_model(*a, **kw):
        model = real_build(*a, **kw)
        if rank:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(float(rank))
        return model

    def predict(model, x, *a, **kw):
        log(event="predict", n=len(x), hash=tensor_hash(model.state_dict()))
        return real_predict(model, x, *a, **kw)

    def replace(src, dst, *a, **kw):
        log(event="write", path=str(dst))
        return real_replace(src, dst, *a, **kw)

    initscope.init_, T.predict, T.build_model, os.replace = init_, predict, build_model, replace

    # which group each of initscope's collectives runs on, and which groups are destroyed
    import torch.distributed as dist
    def logged(name, real):
        def call(*a, group=None, **kw):
            log(event="collective", op=name, group=None if group is None else id(group))
            return real(*a, group=group, **kw)
        return call
    for name in ("broadcast", "all_reduce", "all_gather_object"):
        setattr(dist, name, logged(name, getattr(dist, name)))
    real_destroy = dist.destroy_process_group
    def destroy(group=None):
        log(event="destroy", group=None if group is None else id(group))
        return real_destroy(group)
    dist.destroy_process_group = destroy
    from initscope.cli import app
    app(sys.argv[2:])
''')


@pytest.mark.slow
def test_torchrun_two_gloo_ranks_stay_identical_and_only_rank0_writes(tmp_path):
    (tmp_path / "driver.py").write_text(DRIVER)
    logs, out = tmp_path / "logs", tmp_path / "runs"
    logs.mkdir()
    epochs = 2
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(tmp_path / "driver.py"), str(logs), "train", "--data", "synthetic", "--model", "resnet18", "--width", "4", "--epochs",
           str(epochs), "--batch-size", "16", "--limit", "96", "--method", "asv-forward", "--device", "cpu",
           "--out", str(out), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=400, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count(": finished; saved under") == 1  # rank 0 alone reports
    ranks = [[json.loads(line) for line in (logs / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    kinds = [[e["event"] for e in rank] for rank in ranks]
    assert kinds[0].count("init") == 1 and "init" not in kinds[1]  # planned once, on rank 0
    assert "write" not in kinds[1]  # rank 1 wrote nothing
    written = {Path(e["path"]).name for e in ranks[0] if e["event"] == "write"}
    assert {"best.safetensors", "state.pt", "result.json"} <= written
    # validation after every epoch on both ranks (rank 0 also tests): the same weights each time
    hashes = [[e["hash"] for e in rank if e["event"] == "predict"] for rank in ranks]
    assert len(hashes[1]) == epochs and hashes[0][:epochs] == hashes[1]
    assert len(set(hashes[1])) == epochs  # and they changed: the ranks trained
    (run_dir,) = out.iterdir()
    state = load_state(run_dir / "state.pt")  # safetensors since issue 14: read without unpickling
    assert tensor_hash(state["model"]) == hashes[1][-1] and state["epoch"] == epochs
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "finished" and len(result["history"]) == epochs
    # the epoch's train loss is over both shards: 96 images -> 48 per rank, batches of 16
    assert all(h["train_loss"] > 0 for h in result["history"])
    # initscope's collectives run on a group of its own, destroyed at the end, never on the default group:
    # DDP keeps the default group alive past the run, and a gloo thread that frees a collective's tensors
    # while the interpreter finalizes aborts the process (distributed.py)
    for rank in ranks:
        groups = {e["group"] for e in rank if e["event"] == "collective"}
        destroyed = [e["group"] for e in rank if e["event"] == "destroy"]
        assert {"broadcast", "all_reduce", "all_gather_object"} <= {e["op"] for e in rank if e["event"] == "collective"}
        assert None not in groups and len(groups) == 1 and groups <= set(destroyed)
    ddp = json.loads((run_dir / "ddp.json").read_text())
    assert ddp["world_size"] == 2 and ddp["backend"] == "gloo"
    assert ddp["weights_sha256"] == [ddp["weights_sha256"][0]] * 2


def test_weights_digest_sees_every_tensor():
    m = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    d = weights_digest(m)
    m[1].running_mean[0] += 1e-7
    assert weights_digest(m) != d
