"""Sample from a model directory with the real vLLM and write the sampled ids and log-probs as JSON.

    python tests/scripts/vllm_logprobs.py MODEL_DIR OUT_JSON [--tokenizer]

Run in its own process: vLLM spawns workers and keeps global state a pytest process should not carry.
"""

import json
import sys

from vllm import LLM, SamplingParams


def main() -> None:
    model_dir, out_path = sys.argv[1], sys.argv[2]
    use_tokenizer = "--tokenizer" in sys.argv
    llm = LLM(
        model=model_dir, skip_tokenizer_init=not use_tokenizer, dtype="float32", max_model_len=512,
        enforce_eager=True, gpu_memory_utilization=0.15, seed=0,
    )
    if use_tokenizer:
        prompts = [{"prompt": text} for text in ("What is 2 + 3?", "Write a Python function")]
    else:
        prompts = [{"prompt_token_ids": [5, 6, 7, 8]}, {"prompt_token_ids": [9, 10, 11]}]
    params = SamplingParams(n=2, temperature=1.0, max_tokens=16, logprobs=0, seed=0, ignore_eos=True)
    results = []
    for output in llm.generate(prompts, params):
        for completion in output.outputs:
            results.append({
                "prompt_ids": list(output.prompt_token_ids),
                "completion_ids": list(completion.token_ids),
                "logprobs": [lp[t].logprob for lp, t in zip(completion.logprobs, completion.token_ids, strict=True)],
                "text": completion.text if use_tokenizer else None,
            })
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
