"""Rewards: rule-based verifiers now; reward models, the reward-eval CLI and the Ray reward worker later."""
