"""One optimiser step of the GRPO trainer on a fixed batch, split every way the trainer splits it.

    python tests/split_update.py OUT.pt                             # one process
    torchrun --nproc-per-node 2 tests/split_update.py OUT.pt        # two gloo ranks

For every variant in ``VARIANTS`` (each loss type, the sequence-level ratio, CISPO, the
importance-weighted KL, overlong filtering, the shared prefix; β and α on throughout) and every
``rows_per_pass`` in ``ROWS_PER_PASS``, the trainer takes one update on the same 6 groups of
G = 4 completions (rank r of K holds groups r·6/K …), with plain SGD at lr 1 and no clipping, so
each parameter moves by exactly its gradient.  ``OUT.pt`` (per rank: ``OUT.pt.rank1`` …) holds
those moves, the forward passes each update ran, and an uneven case (rank 0 with 3 groups,
rank 1 with 4, 4 mini-batches) that must neither hang nor let the replicas part.
``tests/test_split_invariance.py`` runs this and compares.
"""

from __future__ import annotations

import sys

import torch

from minigrpo.config import GRPOConfig
from minigrpo.distributed import dist_info, init_distributed
from minigrpo.rollout import Rollout, select_groups
from minigrpo.tiny import TinyModelConfig, build_model, build_tokenizer
from minigrpo.trainer import GRPOTrainer

G, GROUPS, L, T = 4, 6, 5, 6
ROWS_PER_PASS = (None, 4, 3)
VARIANTS = {
    **{loss_type: dict(loss_type=loss_type) for loss_type in ("grpo", "dapo", "dr_grpo")},
    **{f"{loss_type}, sequence ratio": dict(loss_type=loss_type, ratio_level="sequence")
       for loss_type in ("grpo", "dapo")},
    "cispo": dict(surrogate="cispo", loss_type="dapo"),
    "k3 weighted by the ratio": dict(kl_bias_correction=True, loss_type="dapo"),
    "overlong filtering": dict(mask_truncated=True, loss_type="dapo"),
    "shared prefix": dict(shared_prefill=True, loss_type="dapo"),
}
SMALL = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


def fixed_batch(groups: int = GROUPS + 1) -> tuple[Rollout, torch.Tensor]:
    """A made-up rollout (no sampling, so every process builds the same one): left-padded
    prompts of different lengths, completions of 1 … T tokens (some cut at T), old and
    reference log-probs away from the policy's (so ratios and clipping act), advantages."""
    g = torch.Generator().manual_seed(0)
    n = groups * G
    prompt_lengths = torch.randint(2, L + 1, (groups,), generator=g).repeat_interleave(G)
    prompt_mask = (torch.arange(L) >= L - prompt_lengths[:, None]).long()  # (N, L), left padding
    prompt_ids = torch.randint(4, 16, (groups, L), generator=g).repeat_interleave(G, 0) * prompt_mask
    lengths = torch.randint(1, T + 1, (n,), generator=g)
    completion_mask = (torch.arange(T) < lengths[:, None]).long()  # (N, T)
    completion_ids = torch.randint(4, 16, (n, T), generator=g) * completion_mask
    old = -2.5 + 0.5 * torch.randn(n, T, generator=g, dtype=torch.float64)
    batch = Rollout(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
        completion_mask=completion_mask, truncated=lengths == T, old_logprobs=old,
        ref_logprobs=old + 0.3 * torch.randn(n, T, generator=g, dtype=torch.float64),
        completions=[""] * n, answers=[""] * n,
    )
    return batch, torch.randn(n, generator=g, dtype=torch.float64)


def one_update(options: dict, rank_groups: list[int], num_minibatches: int = 1, lr: float = 1.0) -> dict:
    """The parameter moves (name → tensor) and forward-pass count of one update on the groups
    ``rank_groups`` of the fixed batch; on every rank the trainer sees its own groups only.
    Several mini-batches take several steps: keep ``lr`` small then, or the later ones diverge."""
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, SMALL, seed=0).double()
    prompts = GROUPS if num_minibatches == 1 else num_minibatches * dist_info()[1]  # only what the checks need
    config = GRPOConfig(prompts_per_step=prompts, group_size=G, max_new_tokens=T, beta=0.04, alpha=0.01,
                        max_grad_norm=None, num_minibatches=num_minibatches, **options)
    trainer = GRPOTrainer(model, tokenizer, [{"prompt": "1+1=", "answer": "2"}], [], config)
    trainer.optimizer = torch.optim.SGD(trainer.trainable, lr=lr)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    batch, advantages = fixed_batch()
    rows = torch.tensor([g * G + j for g in rank_groups for j in range(G)])
    torch.manual_seed(dist_info()[0])  # the mini-batches' order
    metrics = trainer.policy_updates(select_groups(batch, rank_groups, G), advantages[rows])
    return {"moves": {name: p.detach() - start[name] for name, p in model.named_parameters()},
            "forward_passes": len(calls), "skipped_updates": metrics["skipped_updates"], "loss": metrics["loss"]}


def main(out: str) -> None:
    init_distributed()
    rank, world_size = dist_info()
    share = GROUPS // world_size
    mine = list(range(rank * share, (rank + 1) * share))
    results = {(name, rows): one_update({**options, "rows_per_pass": rows}, mine)
               for name, options in VARIANTS.items() for rows in ROWS_PER_PASS}
    if world_size == 2:  # 3 groups on rank 0, 4 on rank 1 (as dynamic sampling can leave them), 4 mini-batches
        results["uneven"] = one_update({"loss_type": "dapo"}, [0, 1, 2] if rank == 0 else [3, 4, 5, 6],
                                       num_minibatches=4, lr=1e-3)
    torch.save(results, out if rank == 0 else f"{out}.rank{rank}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
