"""Loading real causal LMs: the offline smoke model, LoRA and its adapter-disabled reference,
the Qwen2.5-0.5B architecture built from its config, the dtype rule."""

import pytest
import torch

from minigrpo import models
from minigrpo.rollout import completion_logprobs, tokenize_prompts

TINY_QWEN = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1)


@pytest.fixture(scope="module")
def smoke():
    return models.load_smoke_model()


@pytest.mark.slow
def test_smoke_model_loads_offline_with_a_chat_template(smoke, monkeypatch):
    model, tokenizer = smoke
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
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


def test_bad_arguments_are_value_errors():
    model = models.random_model(models.qwen25_05b_config(vocab_size=64, **TINY_QWEN))
    with pytest.raises(ValueError, match="lora_rank"):
        models.prepare_for_training(model, lora_rank=-1)
    with pytest.raises(ValueError, match="policy"):
        models.AdapterDisabled(model)
