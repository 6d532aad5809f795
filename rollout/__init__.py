"""Rollouts: vLLM rollout actors (vllm_worker), policy-to-vLLM weight sync (weight_sync), the reward-variance
query scheduler (scheduler) and offline batch generation (offline)."""
