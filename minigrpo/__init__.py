"""minigrpo: Group Relative Policy Optimization, term by term.

    L_GRPO(θ) = E_{q~P(Q), {o_i}~π_θold} [ L_PG(·|θ) + β·L_KL(·,θ,θ_ref) + α·L_Entropy(·,θ) ]

The ground floor (``logprobs``, ``advantages``, ``losses``) imports only torch; ``rewards`` adds
math-verify; ``data``, ``tiny``, ``rollout`` and ``trainer`` bring in transformers.  This module
exports the API contract; import the upper floors explicitly (``from minigrpo import trainer``).
"""

from minigrpo.advantages import group_advantages
from minigrpo.logprobs import token_entropy, token_logprobs, token_logprobs_and_entropy
from minigrpo.losses import LossOutput, aggregate, grpo_loss, kl_penalty
from minigrpo.rewards import correctness_reward, format_reward

__version__ = "0.1.0"

__all__ = [
    "LossOutput",
    "aggregate",
    "correctness_reward",
    "format_reward",
    "group_advantages",
    "grpo_loss",
    "kl_penalty",
    "token_entropy",
    "token_logprobs",
    "token_logprobs_and_entropy",
]
