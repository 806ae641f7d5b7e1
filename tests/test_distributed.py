"""``minigrpo.distributed``'s refusals: a process launched as one of several without a process
group, and a model that is not where the NCCL backend's collectives need it.  (Two real gloo
ranks: ``tests/test_ddp.py`` and ``tests/test_split_invariance.py``.)"""

import pytest
import torch
import torch.distributed as dist

from minigrpo import distributed
from minigrpo.config import GRPOConfig
from minigrpo.tiny import TinyModelConfig, build_model, build_tokenizer

SMALL = TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)


@pytest.fixture
def no_process_group():
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialised in this process")


def test_one_process_without_a_launcher_is_rank_0_of_1(monkeypatch, no_process_group):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.dist_info() == (0, 1)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.dist_info() == (0, 1)


def test_a_launched_process_without_a_process_group_is_an_error(monkeypatch, no_process_group):
    """torchrun only sets WORLD_SIZE, RANK, …: a script that builds the trainer without
    init_distributed() would run as K independent copies; the trainer refuses instead."""
    from minigrpo.trainer import GRPOTrainer

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(RuntimeError, match=r"WORLD_SIZE=2.*init_distributed\(\)"):
        distributed.dist_info()
    tokenizer = build_tokenizer()
    examples = [{"prompt": "1+2=", "answer": "3"}]
    with pytest.raises(RuntimeError, match="not initialised"):
        GRPOTrainer(build_model(tokenizer, SMALL), tokenizer, examples, examples,
                    GRPOConfig(prompts_per_step=2, group_size=2))


@pytest.fixture
def two_ranks(monkeypatch):
    """This process as rank 0 of 2 under a backend of the test's choosing; the collectives
    record what they are given instead of communicating."""
    calls = []
    monkeypatch.setattr(distributed, "dist_info", lambda: (0, 2))
    monkeypatch.setattr(dist, "broadcast", lambda tensor, src: calls.append(("broadcast", tensor.device)))
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, *a, **k: calls.append(("all_reduce", tensor.device)))

    def backend(name):
        monkeypatch.setattr(dist, "get_backend", lambda *a: name)
        device = torch.device("cuda", 0) if name == "nccl" else torch.device("cpu")
        monkeypatch.setattr(distributed, "_dist_device", lambda: device)
        return calls

    return backend


def test_nccl_refuses_a_model_on_the_cpu_before_any_collective(two_ranks):
    """init_distributed picks NCCL whenever CUDA is available; a model left on the CPU would
    send CPU tensors to NCCL collectives.  A clear error instead, and nothing sent."""
    calls = two_ranks("nccl")
    model = build_model(build_tokenizer(), SMALL)
    with pytest.raises(ValueError, match=r"parameters are on cpu.*NCCL.*cuda:0"):
        distributed.broadcast_parameters(model)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match=r"gradients are on cpu.*NCCL"):
        distributed.sum_gradients(list(model.parameters()))
    assert calls == []


def test_gloo_takes_the_model_on_the_cpu(two_ranks):
    calls = two_ranks("gloo")
    model = build_model(build_tokenizer(), SMALL)
    params = list(model.parameters())
    distributed.broadcast_parameters(model)
    assert len(calls) == len(params) + len(list(model.buffers()))
    distributed.sum_gradients(params)  # missing gradients become zeros, one bucket: one all-reduce
    assert calls[-1] == ("all_reduce", torch.device("cpu")) and calls[-2][0] == "broadcast"
    assert all(p.grad is not None for p in params)
