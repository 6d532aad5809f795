"""align.policy_worker: its pure parts (mini-batches of whole groups, the ratio's denominator, metric merging), and
a real bf16 mixed-precision step and export."""

import math

import pytest
import torch

from align.policy_worker import TrainSample, add_step_metrics, sampling_logprobs, split_groups


def samples(num_groups: int, group_size: int) -> list[TrainSample]:
    return [TrainSample([g, j, 0], 1, float(j)) for g in range(num_groups) for j in range(group_size)]


def test_split_groups_keeps_groups_whole_and_order():
    batch = samples(5, 4)
    parts = split_groups(batch, 4, 2)
    assert [len(p) for p in parts] == [12, 8]  # 3 groups, then 2
    assert [s for p in parts for s in p] == batch
    for part in parts:
        assert {s.token_ids[0] for s in part[:4]} == {part[0].token_ids[0]}


def test_split_groups_never_makes_empty_mini_batches():
    assert [len(p) for p in split_groups(samples(2, 3), 3, 4)] == [3, 3]
    assert [len(p) for p in split_groups(samples(3, 2), 2, 1)] == [6]


def test_split_groups_refuses_partial_groups():
    with pytest.raises(ValueError, match="whole groups"):
        split_groups(samples(2, 4)[:-1], 4, 2)


def test_sampling_logprobs_uses_the_rollout_values_where_given():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, 0.0]], requires_grad=True)
    work = [TrainSample([0, 1, 2, 3], 1, 0.0, [-0.5, -0.6, -0.7]), TrainSample([0, 1, 2], 1, 0.0)]
    old = sampling_logprobs(logprobs, work)
    torch.testing.assert_close(old, torch.tensor([[-0.5, -0.6, -0.7], [-4.0, -5.0, 0.0]]))
    assert not old.requires_grad


def test_add_step_metrics_sums_mins_maxes_and_keeps_nan_grad_norms():
    a = {"tokens": 10.0, "ratio_min": 0.9, "ratio_max": 1.1, "grad_norm": 2.0, "skipped": 0.0, "lr": 1e-5}
    b = {"tokens": 5.0, "ratio_min": 0.8, "ratio_max": 1.05, "grad_norm": 3.0, "skipped": 1.0, "lr": 2e-5}
    total = add_step_metrics(add_step_metrics({}, a), b)
    assert total == {"tokens": 15.0, "ratio_min": 0.8, "ratio_max": 1.1, "grad_norm": 3.0, "skipped": 1.0,
                     "lr": 2e-5}
    assert math.isnan(add_step_metrics(a, {"grad_norm": math.nan})["grad_norm"])
    assert math.isnan(add_step_metrics({"grad_norm": math.nan}, a)["grad_norm"])


def test_bf16_policy_trains_and_exports_its_float32_master_weights(tmp_path):
    """Real Ray and DeepSpeed: a one-rank bf16 mixed-precision step, then export. The exported weights are the
    optimizer's float32 masters: moved by the step, and not all representable in bfloat16."""
    ray = pytest.importorskip("ray")
    from align.actors import ActorResources
    from align.model import Qwen2Config, Qwen2ForCausalLM, load_pretrained, save_pretrained
    from align.policy_worker import LossArgs, PolicyArgs, PolicyWorkerGroup

    model_dir = tmp_path / "start"
    save_pretrained(Qwen2ForCausalLM.from_config(Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128), seed=0), model_dir)
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        group = PolicyWorkerGroup(PolicyArgs(model_path=str(model_dir), dtype="bfloat16", lr=1e-3,
                                             resources=ActorResources(torch_threads=2)), LossArgs(), total_steps=1)
        batch = [TrainSample(list(range(3, 60)), 10, advantage) for advantage in (1.0, -1.0, 0.5, -0.5)]
        metrics = group.train_step(batch)
        group.export(tmp_path / "final")
        group.close()
    finally:
        ray.shutdown()
    assert metrics["skipped"] == 0.0 and math.isfinite(metrics["grad_norm"])
    start, final = load_pretrained(model_dir), load_pretrained(tmp_path / "final")
    assert final.config.torch_dtype == "float32"
    weight, before = final.model.layers[0].mlp.up_proj.weight, start.model.layers[0].mlp.up_proj.weight
    assert not torch.equal(weight, before)
    assert not torch.equal(weight, weight.bfloat16().float())


def test_leaving_out_zero_advantage_samples_makes_the_same_updates(tmp_path):
    """Real Ray and DeepSpeed, float32, one rank: two steps with and without skip_zero_advantage from the same start
    end at the same weights. Step 1 mixes zero and non-zero advantages (the left-out samples' tokens still count in
    the normaliser); step 2 is all zero advantage, where only Adam's moments move the weights."""
    ray = pytest.importorskip("ray")
    from align.actors import ActorResources
    from align.model import Qwen2Config, Qwen2ForCausalLM, load_pretrained, save_pretrained
    from align.policy_worker import LossArgs, PolicyArgs, PolicyWorkerGroup

    model_dir = tmp_path / "start"
    save_pretrained(Qwen2ForCausalLM.from_config(Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128), seed=0), model_dir)
    mixed = [TrainSample(list(range(3, 30 + 5 * i)), 10, advantage)
             for i, advantage in enumerate((1.0, 0.0, -1.0, 0.0, 0.0, 0.5))]
    zero = [TrainSample(list(range(5, 50)), 8, 0.0) for _ in range(3)]
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    metrics = {}
    try:
        for skip in (True, False):
            group = PolicyWorkerGroup(PolicyArgs(model_path=str(model_dir), lr=1e-2, skip_zero_advantage=skip,
                                                 resources=ActorResources(torch_threads=2)), LossArgs(),
                                      total_steps=2)
            metrics[skip] = [group.train_step(mixed), group.train_step(zero)]
            group.export(tmp_path / f"skip-{skip}")
            group.close()
    finally:
        ray.shutdown()
    assert [m["zero_advantage_skipped"] for m in metrics[True]] == [3.0, 3.0]
    assert [m["zero_advantage_skipped"] for m in metrics[False]] == [0.0, 0.0]
    assert metrics[True][0]["grad_norm"] == pytest.approx(metrics[False][0]["grad_norm"], rel=1e-5)
    start = load_pretrained(model_dir).state_dict()
    skipped, trained = (load_pretrained(tmp_path / f"skip-{s}").state_dict() for s in (True, False))
    for name, weight in trained.items():
        # Adam divides by the root of its second moment, which magnifies float rounding in tiny gradients: a
        # tolerance of 0.2% of a step (lr 1e-2).
        torch.testing.assert_close(skipped[name], weight, rtol=1e-4, atol=2e-5)
    assert not torch.equal(trained["model.layers.0.mlp.up_proj.weight"], start["model.layers.0.mlp.up_proj.weight"])
