"""Two real accelerate processes (gloo on CPU): groups span processes, controllers stay identical."""

import os
import subprocess
import sys

import pytest
import torch

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "two_process_train.py")


def reference_advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """Single-process GRPO advantages on the gathered rewards: centred per group, scaled by the batch std."""
    r = rewards.sum(dim=1)
    centred = r - r.view(-1, group).mean(dim=1).repeat_interleave(group)
    return centred / (r.std() + 1e-4)


@pytest.mark.slow
def test_two_processes_train_identically(tmp_path):
    # accelerate 1.15 starts a single process for `--cpu --num_processes 2`; `--multi_gpu` starts two
    # (torchrun), and the config's use_cpu=True makes them a gloo group on the CPU.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", SCRIPT, str(tmp_path)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{i}.pt", weights_only=False) for i in range(2)]
    assert ranks[0]["world_size"] == 2
    for key, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][key]), key
    for rec0, rec1 in zip(ranks[0]["records"], ranks[1]["records"]):
        assert torch.equal(rec0["rewards"], rec1["rewards"])  # both processes hold the gathered rewards
        assert len(rec0["advantages"]) == len(rec0["prompts"]) == 4  # each keeps its own rows
        assert rec0["rewards"].shape[0] == 8  # one group of 8 over two processes
        together = torch.cat([rec0["advantages"], rec1["advantages"]])
        assert torch.allclose(together, reference_advantages(rec0["rewards"], group=8), atol=1e-5)
