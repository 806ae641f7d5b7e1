"""One gradient however the batch is split: the trainer's update on one fixed batch in one pass,
in micro-batches of ``rows_per_pass`` rows, and on two gloo ranks × micro-batches moves every
parameter alike (``tests/split_update.py`` makes the updates: SGD at lr 1, so a move is the
gradient), for every loss type and the sequence ratio, CISPO, the weighted KL, overlong
filtering and the shared prefix, with the KL and entropy terms on."""

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import split_update  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def one_process():
    rows = list(range(split_update.GROUPS))
    return {(name, rpp): split_update.one_update({**options, "rows_per_pass": rpp}, rows)
            for name, options in split_update.VARIANTS.items() for rpp in split_update.ROWS_PER_PASS}


def assert_same_moves(got: dict, want: dict) -> None:
    """Equal to 1e-9 of the largest move (float64 model; RMSNorm computes in float32)."""
    largest = max(m.abs().max().item() for m in want.values())
    assert largest > 0
    for name, move in want.items():
        torch.testing.assert_close(got[name], move, rtol=0, atol=1e-9 * largest, msg=name)


@pytest.mark.parametrize("variant", list(split_update.VARIANTS))
def test_micro_batches_give_the_one_pass_gradient(one_process, variant):
    """rows_per_pass 4 and 3 run the 24 rows in 6 and 8 forward passes (with a shared prefix:
    whole groups of 4 rows, two passes each, prefix and completions) and move the parameters as
    one pass does."""
    whole = one_process[(variant, None)]
    assert whole["forward_passes"] == (2 if variant == "shared prefix" else 1)
    for rpp in (4, 3):
        split = one_process[(variant, rpp)]
        shared = variant == "shared prefix"
        assert split["forward_passes"] == (12 if shared else math.ceil(24 / rpp))
        assert_same_moves(split["moves"], whole["moves"])
        assert split["loss"] == pytest.approx(whole["loss"], rel=1e-12)


def test_mini_batches_are_whole_groups_and_an_empty_one_is_skipped():
    """Three groups in four mini-batches (as dynamic sampling can leave a rank): four mini-batches
    of whole groups, one empty and skipped, not three row chunks taken for four."""
    result = split_update.one_update({"loss_type": "dapo"}, [0, 1, 2], num_minibatches=4, lr=1e-3)
    assert result["skipped_updates"] == 1
    assert max(m.abs().max().item() for m in result["moves"].values()) > 0


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_two_ranks_give_the_one_process_gradient(one_process, tmp_path):
    """Each rank holds half the groups and divides by the whole batch's count (all ranks, all
    micro-batches): the summed gradient is the one-process gradient, for "dapo"'s token count
    too (each rank's own count would weigh the ranks' tokens differently).  Ranks with 3 and 4
    groups in 4 mini-batches run the same collectives and end identical."""
    out = tmp_path / "split.pt"
    script = Path(split_update.__file__)
    # CPU ranks: without a visible GPU init_distributed picks gloo (on a GPU machine it would pick NCCL)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script), str(out)],
                   check=True, env=env, cwd=tmp_path, capture_output=True, timeout=300)
    ranks = [torch.load(out, weights_only=True), torch.load(f"{out}.rank1", weights_only=True)]
    for name in split_update.VARIANTS:
        for rpp in split_update.ROWS_PER_PASS:
            for rank in ranks:
                assert_same_moves(rank[(name, rpp)]["moves"], one_process[(name, None)]["moves"])
    uneven = [rank["uneven"] for rank in ranks]
    assert uneven[0]["skipped_updates"] == uneven[1]["skipped_updates"] == 0  # every mini-batch had rows somewhere
    for name, move in uneven[0]["moves"].items():
        assert torch.equal(move, uneven[1]["moves"][name])
