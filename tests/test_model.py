"""The decoder against transformers' Qwen2ForCausalLM: logits, gradients, packing, chunked log-probs, I/O."""

import json

import pytest
import torch
import transformers

from align.model import PackedLayout, Qwen2Config, Qwen2ForCausalLM, load_pretrained, token_logprobs
from align.model import attention as attention_module

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}

# (query heads, kv heads, tied embeddings, rope scaling): GQA 4/2 and Qwen2.5-0.5B's 14/2, MHA, YaRN.
CONFIGS = {
    "gqa4/2-tied": (4, 2, True, None),
    "gqa14/2-untied": (14, 2, False, None),
    "mha4/4-untied": (4, 4, False, None),
    "gqa4/2-yarn": (4, 2, True, YARN),
}


def tiny_config(heads=4, kv_heads=2, tied=True, rope_scaling=None, **overrides) -> Qwen2Config:
    fields = dict(
        vocab_size=101, hidden_size=heads * 8, intermediate_size=56, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tied,
        rope_scaling=rope_scaling, rope_theta=10_000.0, max_position_embeddings=128,
    )
    return Qwen2Config(**(fields | overrides))


def hf_twin(model: Qwen2ForCausalLM) -> transformers.Qwen2ForCausalLM:
    """transformers' Qwen2ForCausalLM holding the same weights."""
    hf_config = transformers.Qwen2Config(**model.config.to_hf_dict())
    twin = transformers.Qwen2ForCausalLM(hf_config).to(model.config.dtype)
    twin.load_state_dict(model.state_dict(), strict=True)
    return twin.eval()


def packed_sequences(lengths, vocab=101, seed=0):
    generator = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, vocab, (n,), generator=generator) for n in lengths]
    flat = torch.cat(seqs)[None]  # [1, T]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]  # [1, T]
    return seqs, flat, positions


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_and_gradients_match_transformers(name):
    model = Qwen2ForCausalLM.from_config(tiny_config(*CONFIGS[name]), seed=1)
    twin = hf_twin(model)
    ids = torch.randint(0, 101, (2, 80), generator=torch.Generator().manual_seed(2))  # 80 > YaRN's original 32
    ours, theirs = model(ids), twin(ids).logits
    assert (ours - theirs).abs().max() <= 1e-5

    probe = torch.randn(ours.shape, generator=torch.Generator().manual_seed(3))
    (ours * probe).sum().backward()
    (theirs * probe).sum().backward()
    their_grads = dict(twin.named_parameters())
    for param_name, param in model.named_parameters():
        assert torch.allclose(param.grad, their_grads[param_name].grad, atol=1e-5, rtol=1e-4), param_name


def test_yarn_changes_long_positions():
    ids = torch.randint(0, 101, (1, 80), generator=torch.Generator().manual_seed(0))
    plain = Qwen2ForCausalLM.from_config(tiny_config(), seed=1)
    yarn = Qwen2ForCausalLM.from_config(tiny_config(rope_scaling=YARN), seed=1)
    assert (plain(ids) - yarn(ids)).abs().max() > 1e-3


def test_bf16_matches_transformers():
    model = Qwen2ForCausalLM.from_config(tiny_config(14, 2, False).replace(torch_dtype="bfloat16"), seed=1)
    twin = hf_twin(model)
    ids = torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(2))
    ours, theirs = model(ids), twin(ids).logits
    assert ours.dtype == torch.bfloat16
    assert (ours.float() - theirs.float()).abs().max() <= 0.02


@pytest.mark.parametrize("name", ["gqa4/2-tied", "gqa14/2-untied"])
def test_packed_equals_each_sequence_alone(name):
    model = Qwen2ForCausalLM.from_config(tiny_config(*CONFIGS[name]), seed=1)
    lengths = [5, 17, 33, 2, 60, 1, 9]  # several length buckets, and a one-token sequence
    seqs, flat, positions = packed_sequences(lengths)
    packed = model(flat, positions)[0]
    alone = torch.cat([model(s[None])[0] for s in seqs])
    assert (packed - alone).abs().max() <= 1e-5

    probe = torch.randn(packed.shape, generator=torch.Generator().manual_seed(4))
    grads_packed = torch.autograd.grad((packed * probe).sum(), list(model.parameters()))
    grads_alone = torch.autograd.grad((alone * probe).sum(), list(model.parameters()))
    for a, b in zip(grads_packed, grads_alone, strict=True):
        # Relative to the tensor's scale, not per element: an embedding-gradient entry is a sum of terms up to ~100
        # that cancels to ~1e-3, where float32 summation order alone moves it by ~1e-5 (torch 2.13 does).
        assert (a - b).abs().max() <= 1e-6 * b.abs().max() + 1e-5


def test_packed_layout_argument_and_several_rows():
    model = Qwen2ForCausalLM.from_config(tiny_config(), seed=1)
    lengths = [7, 9, 12, 4]
    seqs, flat, positions = packed_sequences(lengths)
    by_positions = model(flat, positions)
    by_layout = model(flat, layout=PackedLayout.from_lengths(lengths))
    assert torch.equal(by_positions, by_layout)
    # Two rows of 16 tokens, each holding two sequences: boundaries come from row starts and position resets.
    rows = flat.view(2, 16)
    row_positions = positions.view(2, 16)
    alone = torch.cat([model(s[None])[0] for s in seqs])
    assert (model(rows, row_positions).reshape(32, -1) - alone).abs().max() <= 1e-5


def test_plain_batch_uses_fused_kernel_without_mask_or_repeated_kv(monkeypatch):
    calls = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        calls.append((q.shape, k.shape, kwargs))
        return real_sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", spy)
    model = Qwen2ForCausalLM.from_config(tiny_config(14, 2, False), seed=1)
    model(torch.zeros(2, 9, dtype=torch.long))
    assert len(calls) == 2  # one per layer
    for q_shape, k_shape, kwargs in calls:
        assert kwargs.get("attn_mask") is None and kwargs["is_causal"] and kwargs["enable_gqa"]
        assert q_shape[1] == 14 and k_shape[1] == 2  # K/V keep their 2 heads


def test_bf16_attention_on_cpu_computes_in_float32_and_returns_bf16(monkeypatch):
    dtypes = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        dtypes.append(q.dtype)
        return real_sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", spy)
    model = Qwen2ForCausalLM.from_config(tiny_config().replace(torch_dtype="bfloat16"), seed=1)
    reference = Qwen2ForCausalLM.from_config(tiny_config(), seed=1)
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    _, flat, positions = packed_sequences([7, 20, 3])
    out = model(flat, positions)
    assert out.dtype == torch.bfloat16 and set(dtypes) == {torch.float32}
    assert (out.float() - reference(flat, positions)).abs().max() <= 0.05  # bf16 rounding of the projections
    out.float().sum().backward()
    assert all(p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all() for p in model.parameters())


def test_gradient_checkpointing_gives_same_gradients():
    model = Qwen2ForCausalLM.from_config(tiny_config(), seed=1)
    ids = torch.randint(0, 101, (2, 20), generator=torch.Generator().manual_seed(0))
    plain = torch.autograd.grad(model(ids).square().mean(), list(model.parameters()))
    model.gradient_checkpointing_enable()
    model.train()
    checkpointed = torch.autograd.grad(model(ids).square().mean(), list(model.parameters()))
    for a, b in zip(plain, checkpointed, strict=True):
        assert torch.allclose(a, b, atol=1e-7)


def naive_token_stats(hidden, weight, targets, temperature):
    logits = (hidden @ weight.T).float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, targets[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_equal_naive_in_value_and_gradient(temperature):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 50, 16, generator=generator, requires_grad=True)
    weight = torch.randn(300, 16, generator=generator, requires_grad=True)
    targets = torch.randint(0, 300, (3, 50), generator=generator)
    lp, ent = token_logprobs(hidden, weight, targets, temperature, chunk_size=16, with_entropy=True)
    ref_lp, ref_ent = naive_token_stats(hidden, weight, targets, temperature)
    assert torch.allclose(lp, ref_lp, atol=1e-5) and torch.allclose(ent, ref_ent, atol=1e-5)

    w_lp, w_ent = torch.randn(3, 50, generator=generator), torch.randn(3, 50, generator=generator)
    ours = torch.autograd.grad((lp * w_lp + ent * w_ent).sum(), (hidden, weight))
    ref = torch.autograd.grad((ref_lp * w_lp + ref_ent * w_ent).sum(), (hidden, weight))
    for a, b in zip(ours, ref, strict=True):  # entries up to ~15; entropy is log Z - E[z] here, -sum p log p there
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-5)


def test_model_scores_targets_like_its_logits():
    model = Qwen2ForCausalLM.from_config(tiny_config(), seed=1)
    seqs, flat, positions = packed_sequences([9, 14, 6])
    targets = torch.roll(flat, -1, dims=1)
    scored = model(flat, positions, target_ids=targets, with_entropy=True)
    hidden = model.model(flat, positions, PackedLayout.from_position_ids(positions))
    ref_lp, ref_ent = naive_token_stats(hidden, model.lm_head.weight, targets, 1.0)
    assert torch.allclose(scored.logprobs, ref_lp, atol=1e-6)
    assert torch.allclose(scored.entropy, ref_ent, atol=1e-6)
    assert torch.allclose(scored.logprobs, torch.log_softmax(model(flat, positions), -1).gather(
        -1, targets[..., None]).squeeze(-1), atol=1e-5)


@pytest.mark.parametrize("sharded", [False, True])
def test_save_loads_in_transformers_and_back(tmp_path, sharded):
    model = Qwen2ForCausalLM.from_config(tiny_config(14, 2, False, YARN), seed=5)
    model.save_pretrained(tmp_path, max_shard_size=20_000 if sharded else 5 * 2**30)
    assert (tmp_path / "model.safetensors.index.json").is_file() == sharded
    ids = torch.randint(0, 101, (2, 50), generator=torch.Generator().manual_seed(0))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (theirs(ids).logits - model(ids)).abs().max() <= 1e-5
    reloaded = load_pretrained(tmp_path)
    assert reloaded.config == model.config
    assert torch.equal(reloaded(ids), model(ids))


def test_transformers_checkpoint_loads_here(tmp_path):
    hf_config = transformers.Qwen2Config(**tiny_config(4, 2, True).to_hf_dict())
    torch.manual_seed(0)
    theirs = transformers.Qwen2ForCausalLM(hf_config).eval()
    theirs.save_pretrained(tmp_path)  # transformers 5 writes rope_parameters, not rope_theta
    ours = load_pretrained(tmp_path)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = torch.randint(0, 101, (1, 30), generator=torch.Generator().manual_seed(0))
    assert (ours(ids) - theirs(ids).logits).abs().max() <= 1e-5
    assert load_pretrained(tmp_path, dtype="bfloat16")(ids).dtype == torch.bfloat16


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        load_pretrained(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path)
    Qwen2ForCausalLM.from_config(tiny_config(), seed=0).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="missing.*layers.2"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config | {"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type='llama'"):
        load_pretrained(tmp_path)


def test_auto_dtype_is_bf16_only_with_native_bf16(tmp_path, monkeypatch):
    from align.model import config as config_module

    amx, avx2 = tmp_path / "amx", tmp_path / "avx2"
    amx.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
    avx2.write_text("flags\t\t: fpu avx2 fma\n")
    assert config_module.has_fast_bf16(amx) and not config_module.has_fast_bf16(avx2)
    assert not config_module.has_fast_bf16(tmp_path / "absent")
    for fast, expected in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(config_module, "has_fast_bf16", lambda fast=fast: fast)
        assert config_module.resolve_dtype("auto") == expected
        assert config_module.resolve_dtype("float32") == "float32"
    with pytest.raises(ValueError, match="'fp8'"):
        config_module.resolve_dtype("fp8")
