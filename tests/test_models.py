"""Loading real causal LMs: the offline smoke model, LoRA and its adapter-disabled reference,
the Qwen2.5-0.5B architecture built from its config, the dtype rule."""

import warnings

import pytest
import torch

from minigrpo import models
from minigrpo.rollout import completion_logprobs, sample_completions, tokenize_prompts
from minigrpo.tiny import TinyModelConfig, build_model, build_tokenizer

TINY_QWEN = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1)


@pytest.fixture(scope="module")
def smoke():
    return models.load_smoke_model()


@pytest.mark.slow
def test_smoke_model_loads_offline_with_a_chat_template(smoke, monkeypatch):
    model, tokenizer = smoke
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    written = models.smollm2_135m_config()  # the memory model's copy of its architecture
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "tie_word_embeddings"):
        assert getattr(model.config, key) == getattr(written, key), key
    assert model.dtype == torch.float32
    assert tokenizer.padding_side == "left"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "1+1?"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"


@pytest.mark.slow
def test_smoke_model_is_an_ordinary_model(smoke, tmp_path):
    """No GGUF quantizer left on it: it saves, reloads to the same logits, and transformers'
    Trainer (TRL's base) accepts it for training."""
    from transformers.trainer_utils import validate_quantization_for_training

    from minigrpo.tiny import load_tiny, save_tiny

    model, tokenizer = smoke
    assert getattr(model, "hf_quantizer", None) is None
    assert not hasattr(model.config, "quantization_config")
    validate_quantization_for_training(model)  # raises for a GGUF-quantised model
    save_tiny(model, tokenizer, tmp_path)
    reloaded, _ = load_tiny(tmp_path)
    ids = tokenizer(["Carla had 15 apples"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**ids).logits, model(**ids).logits, rtol=0, atol=0)


def _perturb_adapter(model):
    """B = 0 at initialisation makes ΔW = 0; give the adapter a non-zero B to tell them apart."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(0))


@pytest.mark.slow
def test_lora_reference_is_the_base_model(smoke):
    model, tokenizer = smoke
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, ["2+2=", "The capital of France is"])
    completion_ids = torch.tensor([[19, 30, 2], [5, 6, 7]])  # (2, 3)
    mask = torch.ones_like(completion_ids)
    args = (prompt_ids, prompt_mask, completion_ids, mask)
    with torch.no_grad():
        base, _ = completion_logprobs(model, *args)  # (2, 3)
    policy = models.prepare_for_training(model, lora_rank=4)
    try:
        trainable, total = models.count_parameters(policy)
        assert 0 < trainable < total / 50
        _perturb_adapter(policy)
        with torch.no_grad():
            adapted, _ = completion_logprobs(policy, *args)
        reference, _ = completion_logprobs(models.reference_model(policy), *args)
        assert not torch.allclose(adapted, base, atol=1e-4)  # the adapter changes the policy
        torch.testing.assert_close(reference, base)  # adapter off: exactly the base model
        assert list(models.reference_model(policy).parameters()) == []  # no second copy
    finally:
        policy.unload()  # the module-scoped smoke model, back without adapter layers


def test_qwen25_05b_config_has_the_real_shapes():
    config = models.qwen25_05b_config()
    model = models.random_model(config, device="meta")  # shapes only, no 2 GB of memory
    assert sum(p.numel() for p in model.parameters()) == 494_032_768
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.weight.shape == (896, 896)
    assert attention.k_proj.weight.shape == (128, 896)  # 2 key/value heads × 64
    assert model.model.layers[0].mlp.up_proj.weight.shape == (4864, 896)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    assert len(model.model.layers) == 24


def test_small_qwen_architecture_runs_and_trains_with_lora_and_checkpointing():
    model = models.random_model(models.qwen25_05b_config(vocab_size=64, **TINY_QWEN))
    model = models.prepare_for_training(model, gradient_checkpointing=True, lora_rank=2)
    assert not model.training  # eval mode: generation keeps its KV cache
    ids = torch.randint(0, 64, (2, 5))
    model.train()
    logits = model(input_ids=ids).logits  # (2, 5, 64)
    assert logits.shape == (2, 5, 64)
    logits.float().pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("capability, lora_dtype", [((7, 5), torch.float32), ((8, 0), torch.bfloat16),
                                                     ((9, 0), torch.bfloat16)])
def test_dtype_rule(monkeypatch, capability, lora_dtype):
    """bf16 only where the GPU has it natively (compute ≥ 8.0); a T4 (7.5), whose
    is_bf16_supported() says True by emulation, trains in float32; full fine-tuning always float32."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert models.choose_dtype("cpu", lora=True) == torch.float32
    assert models.choose_dtype("cuda", lora=False) == torch.float32
    assert models.choose_dtype("cuda", lora=True) == lora_dtype


BLOCK_QWEN = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2, vocab_size=96)


def saved_bytes(model, ids, mask) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of one forward pass, each
    storage once, the parameters not counted."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=mask)
    return sum(seen.values())


@pytest.mark.parametrize("dtype, lora_rank", [(torch.float32, 0), (torch.float32, 4), (torch.bfloat16, 4)])
def test_block_activations_are_what_a_block_saves(dtype, lora_rank):
    """``step_memory``'s block term against what autograd saves in one more block (a 2-block
    model less a 1-block one), on a left-padded batch as the trainer runs: within 10%."""
    torch.manual_seed(0)
    ids = torch.randint(0, 96, (3, 20))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    saved = []
    for layers in (1, 2):
        model = models.random_model(models.qwen25_05b_config(num_hidden_layers=layers, **BLOCK_QWEN), dtype=dtype)
        saved.append(saved_bytes(models.prepare_for_training(model, lora_rank=lora_rank).train(), ids, mask))
    block = models.step_memory(models.qwen25_05b_config(**BLOCK_QWEN), rows=3, prompt_tokens=20, completion_tokens=0,
                               sampled_rows=3, dtype=dtype, lora_rank=lora_rank).block
    assert saved[1] - saved[0] == pytest.approx(block, rel=0.10)


def test_step_memory_agrees_with_the_measured_cpu_peaks():
    """The memory model against ``benchmarks/update_memory.py``'s measured peaks (SmolLM2-135M,
    LoRA r = 8, checkpointing, float32), every ``rows_per_pass``: within 15%, the margin the GPU
    plan (``gsm8k.MEMORY_MODEL_MARGIN``) leaves."""
    import json
    from pathlib import Path

    measured = json.loads((Path(__file__).parents[1] / "benchmarks/results/update_memory.json").read_text())
    smollm2 = models.smollm2_135m_config()
    for run in measured["runs"]:
        m = models.step_memory(smollm2, rows=run["rows_per_pass"], prompt_tokens=run["prompt_tokens"],
                               completion_tokens=run["completion_tokens"], sampled_rows=run["rows"], lora_rank=8)
        modelled = m.update - m.moments  # AdamW's moments exist before the measured update
        assert modelled / 2**20 == pytest.approx(run["update_peak_mib"], rel=0.15), run["rows_per_pass"]


def test_bad_arguments_are_value_errors():
    model = models.random_model(models.qwen25_05b_config(vocab_size=64, **TINY_QWEN))
    with pytest.raises(ValueError, match="lora_rank"):
        models.prepare_for_training(model, lora_rank=-1)
    with pytest.raises(ValueError, match="policy"):
        models.AdapterDisabled(model)


# ---------------------------------------------------------------- merged_lora: only plain LoRA, all or nothing


SMALL = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
PROMPTS = ["1+2=", "45+67="]


def _tiny_lora(adapters=None, active=None, **config):
    """The tiny Llama in a peft LoRA adapter built from ``config`` (r = 2, every linear layer),
    or several named ``adapters`` (name → config overrides) with ``active`` switched on; every
    B (and lora bias, and modules_to_save copy) moved off its initial value under a seed, so
    the adapter differs from the base model."""
    from peft import LoraConfig, get_peft_model

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, SMALL, seed=0)
    adapters = adapters or {"default": config}

    def lora(overrides):
        return LoraConfig(**{"r": 2, "lora_alpha": 4, "target_modules": "all-linear", "lora_dropout": 0.0,
                             "task_type": "CAUSAL_LM", **overrides})

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: lora_bias on layers without a bias cannot be merged
        (first, first_config), *rest = adapters.items()
        model = get_peft_model(model, lora(first_config), adapter_name=first)
        for name, overrides in rest:
            model.add_adapter(name, lora(overrides))
        model.set_adapter(active or first)
    _move_adapter(model)
    return model.eval(), tokenizer


def _move_adapter(model):
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))


def _logits(model, tokenizer):
    ids, mask = tokenize_prompts(tokenizer, PROMPTS)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _base_weights(model):
    return [m.get_base_layer().weight for m in model.modules() if hasattr(m, "get_delta_weight")]


def _argmax_by_hand(model, ids, steps):
    """Arg-max decoding of one unpadded prompt (1, L), a full forward pass per token."""
    out = []
    with torch.no_grad():
        for _ in range(steps):
            token = model(input_ids=ids).logits[0, -1].argmax()
            out.append(int(token))
            ids = torch.cat([ids, token.view(1, 1)], dim=1)
    return out


def test_plain_lora_is_merged_and_its_weights_put_back(one_thread):
    """Plain LoRA is merged (inside the block every base weight is a new tensor W + ΔW ≠ W) and
    computes the adapter's function to float rounding; afterwards every W is the original object."""
    model, tokenizer = _tiny_lora()
    originals = _base_weights(model)
    copies = [w.clone() for w in originals]
    assert len(models.mergeable_lora_layers(model)) == len(originals) == 14  # 7 linear layers × 2 blocks
    expected = _logits(model, tokenizer)
    with models.merged_lora(model):
        inside = _base_weights(model)
        merged = _logits(model, tokenizer)
    assert all(w is not o and not torch.equal(w, c) for w, o, c in zip(inside, originals, copies))
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-5)
    assert all(w is o and torch.equal(w, c) for w, o, c in zip(_base_weights(model), originals, copies))
    assert torch.equal(_logits(model, tokenizer), expected)


def test_a_failure_part_way_through_the_merge_leaves_the_model_as_it_was(one_thread, monkeypatch):
    """Out of memory at the 3rd layer's copy: the error propagates, and every base weight is the
    original tensor, unchanged, and the model computes what it did before (no W + 2ΔW)."""
    model, tokenizer = _tiny_lora()
    layers = [m for m in model.modules() if hasattr(m, "get_delta_weight")]
    originals = _base_weights(model)
    copies = [w.clone() for w in originals]
    expected = _logits(model, tokenizer)

    def out_of_memory(adapter):
        raise torch.OutOfMemoryError("injected")

    monkeypatch.setattr(layers[2], "get_delta_weight", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError), models.merged_lora(model):
        pytest.fail("the block ran although the merge failed")
    assert all(w is o and torch.equal(w, c) for w, o, c in zip(_base_weights(model), originals, copies))
    assert torch.equal(_logits(model, tokenizer), expected)


def test_a_dora_adapter_samples_from_its_own_distribution(one_thread):
    """DoRA rescales W + ΔW by its magnitude vector, which W + get_delta_weight leaves out: it runs
    unmerged, so the logits and greedy completions inside the block are the adapter's own."""
    model, tokenizer = _tiny_lora(use_dora=True)
    expected = _logits(model, tokenizer)
    with model.disable_adapter():
        base = _logits(model, tokenizer)
    assert not torch.allclose(expected, base, atol=1e-3)  # the adapter is not the base model
    with models.merged_lora(model):
        inside = _logits(model, tokenizer)
    torch.testing.assert_close(inside, expected, rtol=0, atol=1e-6)
    ids, _ = tokenize_prompts(tokenizer, ["45+67="])
    completion, _, _ = sample_completions(model, tokenizer, ids, torch.ones_like(ids), group_size=1,
                                          temperature=1.0, max_new_tokens=6, greedy=True)
    assert completion[0].tolist() == _argmax_by_hand(model, ids, 6)
    assert models.mergeable_lora_layers(model) is None


@pytest.mark.parametrize("adapters, active", [
    ({"default": dict(lora_bias=True)}, None),
    ({"default": dict(modules_to_save=["norm"])}, None),
    ({"default": {}, "other": dict(target_modules=["q_proj"])}, "default"),
    ({"default": {}, "other": dict(target_modules=["q_proj"])}, "other"),
], ids=["lora_bias", "modules_to_save", "two_adapters_first_active", "two_adapters_second_active"])
def test_lora_it_cannot_merge_runs_unmerged(one_thread, adapters, active):
    """lora_bias (B's bias is not in get_delta_weight), modules_to_save (switching the adapter off
    switches the trained copy off) and a second adapter all run the adapter's own forward,
    with the base weights untouched."""
    model, tokenizer = _tiny_lora(adapters, active)
    originals = _base_weights(model)
    expected = _logits(model, tokenizer)
    with model.disable_adapter():
        assert not torch.allclose(_logits(model, tokenizer), expected, atol=1e-3)
    with models.merged_lora(model):
        assert all(w is o for w, o in zip(_base_weights(model), originals))
        inside = _logits(model, tokenizer)
    torch.testing.assert_close(inside, expected, rtol=0, atol=1e-6)
    assert models.mergeable_lora_layers(model) is None


def test_adapters_off_already_merged_or_with_active_dropout_are_not_merged(one_thread):
    model, tokenizer = _tiny_lora(lora_dropout=0.5)
    assert models.mergeable_lora_layers(model) is not None  # eval mode: the dropout does nothing
    model.train()
    assert models.mergeable_lora_layers(model) is None
    model.eval()
    with model.disable_adapter():
        assert models.mergeable_lora_layers(model) is None
        base = _logits(model, tokenizer)
        with models.merged_lora(model):
            torch.testing.assert_close(_logits(model, tokenizer), base, rtol=0, atol=1e-6)
    model.merge_adapter()
    try:
        assert models.mergeable_lora_layers(model) is None
    finally:
        model.unmerge_adapter()
    assert models.mergeable_lora_layers(build_model(build_tokenizer(), SMALL)) is None  # no adapter


def test_transformers_own_adapter_runs_unmerged(one_thread):
    """An adapter attached by transformers' integration (``add_adapter`` on the bare model) is no
    peft model: it runs as it is, its base weights untouched."""
    from peft import LoraConfig, inject_adapter_in_model

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, SMALL, seed=0)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    try:
        model.add_adapter(config)
    except ValueError as error:  # transformers 5 asks for peft ≥ 0.22: what add_adapter does, by hand
        assert "PEFT" in str(error)
        model._hf_peft_config_loaded = True
        inject_adapter_in_model(config, model, "default")
    assert model._hf_peft_config_loaded and hasattr(model, "peft_config")
    _move_adapter(model)
    originals = _base_weights(model)
    expected = _logits(model, tokenizer)
    with models.merged_lora(model):
        assert all(w is o for w, o in zip(_base_weights(model), originals))
        inside = _logits(model, tokenizer)
    torch.testing.assert_close(inside, expected, rtol=0, atol=1e-6)
    assert models.mergeable_lora_layers(model) is None
