"""Rollouts: vLLM generation (offline batches now; Ray rollout workers, weight sync and query scheduling later)."""
