"""The Ray reward worker: verifier rewards equal check_task, model scores equal in-process scoring, ZeRO-3 over 2
ranks equals one process with parameters really partitioned, and the configured weights combine the parts.

The Ray tests share one local Ray (2 CPUs, actors at 0.5 CPU and 1 torch thread each)."""

import json
import shutil

import pytest
import torch

import reward.worker
from align.actors import ActorResources
from align.data import load_rows, tokenize_pairs
from align.tasks import TaskDataConfig
from align.tiny import build_tiny
from align.tokenizer import load_tokenizer
from reward.evaluate import score_sequences
from reward.model import load_reward_model, save_reward_model
from reward.verifiers import check_task, first_occurrences
from reward.worker import (
    RewardActor,
    RewardRequest,
    RewardWorkerArgs,
    RewardWorkerGroup,
    check_requests,
    combine_rewards,
    greedy_chunks,
)

SMALL = TaskDataConfig(arithmetic_sft=20, code_sft=20, arithmetic_prompts=2, code_prompts=2, eval_per_level=6)


# ---- pure parts, no Ray ------------------------------------------------------------------------------------------


def test_combine_rewards_by_hand():
    """scores [1, 3] whiten to [-1, 1] (mean 2, population std 1); passes [1, 0]; weights model 0.5, verifier 2:
    reward = [2 * 1 + 0.5 * -1, 2 * 0 + 0.5 * 1] = [1.5, 0.5]. Raw: [2 + 0.5, 1.5] = [2.5, 1.5]. Gated, the failing
    second response has no model term and its score is ignored, so the first is whitened alone (a batch of one:
    0): [2.0, 0.0]; raw [2.5, 0.0]."""
    scores, passed = torch.tensor([1.0, 3.0]), torch.tensor([True, False])
    reward = combine_rewards(scores, passed, model_weight=0.5, verifier_weight=2.0, model_score_norm="batch")
    torch.testing.assert_close(reward, torch.tensor([1.5, 0.5]), atol=1e-5, rtol=0)
    raw = combine_rewards(scores, passed, model_weight=0.5, verifier_weight=2.0, model_score_norm="none")
    torch.testing.assert_close(raw, torch.tensor([2.5, 1.5]))
    gated = combine_rewards(scores, passed, 0.5, 2.0, "batch", combination="gated")
    torch.testing.assert_close(gated, torch.tensor([2.0, 0.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(combine_rewards(scores, passed, 0.5, 2.0, "none", "gated"), torch.tensor([2.5, 0.0]))
    # the actors leave the gated-out scores NaN (not scored): the reward is the same
    unscored = torch.tensor([1.0, float("nan")])
    torch.testing.assert_close(combine_rewards(unscored, passed, 0.5, 2.0, "batch", "gated"), gated)
    # gated whitening runs over the passing responses: [1, 3] of passes [T, T, F] whiten to [-1, 1], the third 0
    three = combine_rewards(torch.tensor([1.0, 3.0, float("nan")]), torch.tensor([True, True, False]), 0.5, 2.0,
                            "batch", "gated")
    torch.testing.assert_close(three, torch.tensor([1.5, 2.5, 0.0]))
    # gating needs both parts; with one the combination does not matter
    torch.testing.assert_close(combine_rewards(scores, None, 0.5, 2.0, "none", "gated"), torch.tensor([0.5, 1.5]))
    torch.testing.assert_close(combine_rewards(None, passed, 0.5, 2.0, "none"), torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(combine_rewards(scores, None, 0.5, 2.0, "none"), torch.tensor([0.5, 1.5]))
    assert combine_rewards(torch.tensor([4.0]), None, 1.0, 1.0, "batch").tolist() == [0.0]  # batch of one


def test_greedy_chunks_are_score_sequences_forward_calls():
    """Scoring each chunk alone is one forward call, and the chunks are the calls score_sequences makes."""

    class CountingModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.calls: list[int] = []

        def forward(self, input_ids, layout):
            self.calls.append(len(layout.cu_seqlens) - 1)
            return torch.zeros(len(layout.cu_seqlens) - 1)

    lengths = [5, 3, 9, 12, 1, 1, 4, 30, 2]
    model = CountingModel()
    score_sequences(model, [[1] * n for n in lengths], max_tokens=10)
    chunks = greedy_chunks(lengths, 10)
    assert [len(c) for c in chunks] == model.calls == [2, 1, 1, 3, 1, 1]
    assert [i for c in chunks for i in c] == list(range(len(lengths)))
    assert greedy_chunks([], 10) == []


def test_first_occurrences_by_hand():
    assert first_occurrences(["a", "b", "a", "c", "b", "a"]) == ([0, 1, 3], [0, 1, 0, 2, 1, 0])
    assert first_occurrences(["x", "y"]) == ([0, 1], [0, 1])
    assert first_occurrences([]) == ([], [])


def test_args_checks():
    with pytest.raises(ValueError, match="model_path, verifiers"):
        RewardWorkerArgs()
    with pytest.raises(ValueError, match="unknown"):
        RewardWorkerArgs(verifiers=("nope",))
    with pytest.raises(ValueError, match="zero3"):
        RewardWorkerArgs(verifiers=("task",), zero3=True)
    with pytest.raises(ValueError, match="model_score_norm"):
        RewardWorkerArgs(verifiers=("task",), model_score_norm="group")
    with pytest.raises(ValueError, match="combination"):
        RewardWorkerArgs(verifiers=("task",), combination="product")
    args = RewardWorkerArgs(verifiers=("task",))
    with pytest.raises(ValueError, match="row 1: field 'task'"):
        check_requests([RewardRequest("hi", "x", {"family": "arithmetic", "answer": "1"}), RewardRequest("hi", "x")],
                       args)
    with pytest.raises(ValueError, match=r"row 0: field 'prompt\[0\].role'"):
        check_requests([RewardRequest([{"role": "robot", "content": "hi"}], "x", {"family": "code"})], args)


# ---- with real Ray -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward-worker")
    tiny = build_tiny(root / "tiny", tasks=SMALL)
    model = load_reward_model(tiny, seed=3)
    save_reward_model(model.config, model.state_dict(), root / "rm", pad_token_id=0)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, root / "rm" / name)
    return root / "rm", tiny / "data" / "pairs_eval.jsonl"


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


def requests_from_pairs(pairs_file, per_family: int) -> tuple[list[RewardRequest], list[dict]]:
    """Chosen (correct) and rejected answers of the first correctness pairs of each family, and a non-answer."""
    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    picked = []
    for subset in ("arithmetic-correct", "code-correct"):
        picked += [r for r in rows if r["subset"] == subset][:per_family]
    requests = [RewardRequest(r["prompt"], r[side][-1]["content"], r)
                for r in picked for side in ("chosen", "rejected")]
    requests.append(RewardRequest(picked[0]["prompt"], "I am not sure.", picked[0]))
    return requests, picked


def expected_scores(rm, requests: list[RewardRequest]) -> torch.Tensor:
    """The same conversations scored in-process the way reward-eval does (tokenize_pairs, score_sequences)."""
    rows = [{"prompt": r.prompt, "chosen": r.response, "rejected": r.response} for r in requests]
    pairs, _ = tokenize_pairs(rows, load_tokenizer(rm), 4096, "test")
    return score_sequences(load_reward_model(rm), [p.chosen_ids for p in pairs], max_tokens=4096)


@pytest.mark.slow
def test_verifier_worker_matches_check_task(rm_dir, ray_session):
    _, pairs_file = rm_dir
    requests, _ = requests_from_pairs(pairs_file, per_family=2)
    expected = [check_task(r.task, r.response) for r in requests]
    args = RewardWorkerArgs(verifiers=("task",), resources=ActorResources(num_actors=2, num_cpus=0.5))
    with RewardWorkerGroup(args) as group:
        scored = group.score(requests)
        assert group.score([]).reward.shape == (0,)
    assert scored.model_score is None
    assert scored.verifier_pass.tolist() == [v.passed for v in expected]
    assert list(scored.reason) == [v.reason for v in expected]
    assert scored.reward.tolist() == [float(v.passed) for v in expected]
    # correct answers pass and wrong ones fail, in both families: the verifier really ran
    assert scored.verifier_pass.tolist() == [True, False] * 4 + [False]


@pytest.mark.slow
def test_model_worker_scores_and_combined_reward(rm_dir, ray_session):
    rm, pairs_file = rm_dir
    requests, _ = requests_from_pairs(pairs_file, per_family=2)
    requests.append(RewardRequest("What is 2 + 3?", "\\boxed{5}", {"family": "arithmetic", "answer": "5"}))
    args = RewardWorkerArgs(model_path=str(rm), verifiers=("task",), model_weight=0.5, verifier_weight=2.0,
                            model_score_norm="batch", resources=ActorResources(num_cpus=0.5), batch_tokens=256)
    with RewardWorkerGroup(args) as group:
        scored = group.score(requests)
    expected = expected_scores(rm, requests)
    torch.testing.assert_close(scored.model_score, expected, atol=1e-5, rtol=0)
    assert scored.model_score.std() > 0
    passed = torch.tensor([check_task(r.task, r.response).passed for r in requests])
    assert torch.equal(scored.verifier_pass, passed)
    # reward = 2 * pass + 0.5 * (s - mean) / std, with the population std
    whitened = (expected - expected.mean()) / expected.std(correction=0)
    torch.testing.assert_close(scored.reward, 2.0 * passed.float() + 0.5 * whitened, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_zero3_two_ranks_equal_one_process_and_partition(rm_dir, ray_session):
    rm, pairs_file = rm_dir
    requests, _ = requests_from_pairs(pairs_file, per_family=3)
    # Rank 0's slice is all long conversations, rank 1's short ones: with 300-token chunks the ranks need
    # different numbers of forward calls, which the dummy calls must even out (else the gathers would hang).
    requests = sorted(requests, key=lambda r: -len(r.response))
    args = RewardWorkerArgs(model_path=str(rm), resources=ActorResources(num_actors=2, num_cpus=0.5), zero3=True,
                            batch_tokens=300, collective_timeout_s=120)
    with RewardWorkerGroup(args) as group:
        scored = group.score(requests)
        single = group.score(requests[:1])  # rank 1 gets nothing and only follows rank 0's calls
        sizes = group.partition_sizes()
    expected = expected_scores(rm, requests)
    torch.testing.assert_close(scored.model_score, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(single.model_score, expected[:1], atol=1e-5, rtol=0)
    torch.testing.assert_close(scored.reward, scored.model_score)  # model only, weight 1, no normalisation
    assert len(sizes) == 2
    for rank_sizes in sizes:
        local, full = rank_sizes["model.embed_tokens.weight"]
        assert local == full // 2 and full > 0  # each rank holds half of it (an even size)
        assert all(local < full for local, full in rank_sizes.values() if full > 1)
    total_local = sum(local for rank_sizes in sizes for local, _ in rank_sizes.values())
    total_full = sum(full for _, full in sizes[0].values())
    assert total_full <= total_local < total_full + 2 * len(sizes[0])  # partitions cover each tensor once (+padding)


def test_repeated_requests_are_scored_once(rm_dir, monkeypatch):
    """An in-process actor given each request three times over runs one verifier check and scores one sequence per
    distinct request, and returns for every position what scoring it alone gives."""
    rm, pairs_file = rm_dir
    distinct, _ = requests_from_pairs(pairs_file, per_family=2)
    # same prompt and response but another task row: a different request (its answer decides the verdict)
    other_task = dict(distinct[0].task, answer="-1")
    distinct.append(RewardRequest(distinct[0].prompt, distinct[0].response, other_task))
    requests = [distinct[i] for i in [0, 1, 0, 2, 3, 0] + list(range(len(distinct))) + [9, 1, 9]]
    checked, scored_sequences = [], []

    def counting_check(task, response):
        checked.append((json.dumps(task, sort_keys=True), response))
        return check_task(task, response)

    def counting_score(model, sequences, max_tokens):
        scored_sequences.extend(map(tuple, sequences))
        return score_sequences(model, sequences, max_tokens)

    monkeypatch.setitem(reward.worker.VERIFIERS, "task", counting_check)
    monkeypatch.setattr(reward.worker, "score_sequences", counting_score)
    actor = RewardActor(RewardWorkerArgs(model_path=str(rm), verifiers=("task",)))
    actor.load_model()
    scored = actor.score(requests)
    assert len(checked) == len(set(checked)) == len(distinct)
    assert len(scored_sequences) == len(distinct)
    torch.testing.assert_close(scored.model_score, expected_scores(rm, requests), atol=1e-5, rtol=0)
    expected = [check_task(r.task, r.response) for r in requests]
    assert scored.verifier_pass.tolist() == [v.passed for v in expected]
    assert list(scored.reason) == [v.reason for v in expected]
    assert expected[0].passed and not check_task(other_task, distinct[0].response).passed


def test_gated_actor_scores_only_passing_responses(rm_dir, monkeypatch):
    """With combination "gated" the reward model scores exactly the responses the verifier passed (the others come
    back NaN), and the combined reward is the one full scoring gives."""
    rm, pairs_file = rm_dir
    requests, _ = requests_from_pairs(pairs_file, per_family=2)
    scored_sequences = []

    def counting_score(model, sequences, max_tokens):
        scored_sequences.extend(map(tuple, sequences))
        return score_sequences(model, sequences, max_tokens)

    monkeypatch.setattr(reward.worker, "score_sequences", counting_score)
    args = RewardWorkerArgs(model_path=str(rm), verifiers=("task",), combination="gated")
    actor = RewardActor(args)
    actor.load_model()
    scored = actor.score(requests)
    passed = torch.tensor([check_task(r.task, r.response).passed for r in requests])
    assert 0 < int(passed.sum()) < len(requests)  # both kinds, or the test would prove nothing
    assert torch.equal(scored.verifier_pass, passed)
    assert len(scored_sequences) == int(passed.sum())
    expected = expected_scores(rm, requests)
    torch.testing.assert_close(scored.model_score[passed], expected[passed], atol=1e-5, rtol=0)
    assert scored.model_score[~passed].isnan().all()
    rewards = combine_rewards(scored.model_score, passed, 0.2, 1.0, "batch", "gated")
    torch.testing.assert_close(rewards, combine_rewards(expected, passed, 0.2, 1.0, "batch", "gated"))


def test_requests_match_reward_eval_rows(rm_dir):
    """The conversations the worker scores are reward-eval's: a pairs row's chosen side is its chosen request."""
    from reward.worker import conversation_ids

    rm, pairs_file = rm_dir
    rows = load_rows(pairs_file)
    tokenizer = load_tokenizer(rm)
    pairs, _ = tokenize_pairs(rows, tokenizer, 4096, "x")
    for index in range(3):
        request = RewardRequest(rows[index]["prompt"], rows[index]["chosen"][-1]["content"])
        assert conversation_ids(request, tokenizer, index) == pairs[index].chosen_ids
