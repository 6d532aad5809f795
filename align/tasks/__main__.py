"""`python -m align.tasks --output DIR [--seed N] [--code-sft 500 ...]`: writes the task splits.

One flag per TaskDataConfig field; tuple fields take comma-separated values.
"""

import argparse
import dataclasses

from align.tasks.data import TaskDataConfig, write_task_data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m align.tasks", description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="directory for sft.jsonl, prompts.jsonl, eval.jsonl")
    parser.add_argument("--seed", type=int, default=0)
    for f in dataclasses.fields(TaskDataConfig):
        if isinstance(f.default, tuple):
            kind = str if f.name == "families" else float
            parse = lambda text, kind=kind: tuple(kind(v) for v in text.split(","))
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=parse, default=f.default)
        else:
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=f.default)
    args = vars(parser.parse_args(argv))
    output, seed = args.pop("output"), args.pop("seed")
    for split, path in write_task_data(output, TaskDataConfig(**args), seed).items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
