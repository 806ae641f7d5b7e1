"""``torchrun --nproc-per-node 2 -m minigrpo arithmetic`` on the CPU (gloo) at tiny settings:
each rank samples its share of the prompts, the gradients are summed over ranks, and both ranks end
with the same parameters."""

import json
import os
import shutil
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
@pytest.mark.parametrize("options", [[], ["--set", "shared_prefill=True"]], ids=["plain", "shared_prefill"])
def test_two_ranks_end_with_identical_parameters(tmp_path, options):
    """With ``shared_prefill`` the update's prefix pass is a second forward inside the same
    graph: its gradient must be summed over ranks too, or the ranks' parameters would part."""
    out = tmp_path / "ddp.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "minigrpo",
               "arithmetic", "--tiny", "--steps", "3", "--no-progress", "--seed", "1", "--out", str(out), *options]
    # CPU ranks: without a visible GPU init_distributed picks gloo (on a GPU machine it would pick NCCL)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run(command, check=True, env=env, cwd=tmp_path, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert result["world_size"] == 2
    assert result["config"]["shared_prefill"] == bool(options)
    assert result["steps"] == 3 and result["config"]["prompts_per_step"] == 4  # 2 prompts per rank
    ranks = result["params_sha256_per_rank"]
    assert len(ranks) == 2 and ranks[0] == ranks[1] == result["params_sha256"]
    assert any(h["grad_norm"] > 0 for h in result["history"])  # the ranks had gradients to share
    # each rank evaluated half the held-out problems; the result covers all of them
    assert all(e["n"] == result["config"]["eval_size"] for e in result["evals"])
    assert all(h["ratio_min"] <= h["ratio_mean"] <= h["ratio_max"] for h in result["history"])
