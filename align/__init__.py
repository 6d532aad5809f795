"""qwen-align: post-training for Qwen2.5 (SFT, DPO, reward models, GRPO)."""
