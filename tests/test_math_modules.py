"""The math modules (losses, advantages, KL estimators, merging rules) are pure functions of tensors: importing
them pulls in no distributed or serving machinery, and their source never reaches for torch.distributed."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MATH_MODULES = ("align.losses", "align.grpo", "align.dpo", "align.merging", "align.stats")
MACHINERY = ("ray", "vllm", "deepspeed", "accelerate", "transformers", "align.engine", "rollout", "reward")


def test_importing_the_math_modules_loads_no_machinery():
    # A fresh interpreter per module's import order: what each one brings in on its own (torch itself loads
    # torch.distributed, so that is checked in the source below instead).
    script = (
        "import importlib, json, sys\n"
        f"machinery = {MACHINERY!r}\n"
        "found = {}\n"
        f"for name in {MATH_MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "    found[name] = sorted(m for m in sys.modules if m.split('.')[0] in machinery or m in machinery)\n"
        "print(json.dumps(found))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found == {name: [] for name in MATH_MODULES}


@pytest.mark.parametrize("module", MATH_MODULES)
def test_math_source_never_uses_torch_distributed(module):
    tree = ast.parse((REPO / (module.replace(".", "/") + ".py")).read_text())
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    imported += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    attributes = [ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.Attribute)]
    assert not [name for name in imported if name.startswith("torch.distributed")]
    assert not [name for name in attributes if name.startswith("torch.distributed") or name.startswith("dist.")]
