"""align.pipeline on the real recipes: SFT then the reward model on a tiny model, the pipeline SIGKILLed while the
reward model trains, then run again. The rerun must skip SFT (never written to again) and resume the reward model
from its checkpoint. tests/test_pipeline.py covers the stage logic with stand-in recipes; this is the real thing.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from align.pipeline import DONE, STAGES, RunPaths
from align.tasks import TaskDataConfig
from align.tiny import build_tiny

SMALL = TaskDataConfig(arithmetic_sft=120, code_sft=40, arithmetic_prompts=4, code_prompts=4, eval_per_level=2)
EXTRA = {"sft": ["--max-steps", "4", "--save-every", "2", "--data-micro-batch-tokens", "1024",
                 "--data-max-length", "512", "--eval-per-level", "1"],
         "rm": ["--max-steps", "60", "--save-every", "10", "--data-max-length", "512"]}
DRIVER = """
import json, sys
from pathlib import Path
from align.pipeline import STAGES, RunPaths, run_pipeline
run_dir, base, extra = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
run_pipeline([s for s in STAGES if s.name in ("sft", "rm")], RunPaths(run_dir, base), extra)
"""


def start_pipeline(run_dir: Path, base: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(run_dir), str(base), json.dumps(EXTRA)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_killed_pipeline_skips_finished_stages_and_resumes_the_interrupted_one(tmp_path):
    assert [s.name for s in STAGES][:2] == ["sft", "rm"]
    base = build_tiny(tmp_path / "base", seed=0, tasks=SMALL)
    run_dir = tmp_path / "run"
    paths = RunPaths(run_dir, base)

    first = start_pipeline(run_dir, base)
    deadline = time.time() + 900
    while not list((run_dir / "rm").glob("checkpoint-*/trainer_state.json")):
        assert first.poll() is None, f"the pipeline ended before it was killed:\n{first.stdout.read()[-4000:]}"
        assert time.time() < deadline
        time.sleep(0.05)
    first.kill()
    first.wait()
    first.stdout.close()
    assert paths.finished("sft") and not paths.finished("rm")
    sft_done = (run_dir / "sft" / DONE).read_bytes()
    sft_files = {p: p.stat().st_mtime_ns for p in (run_dir / "sft").rglob("*")}

    second = start_pipeline(run_dir, base)
    out, _ = second.communicate(timeout=900)
    assert second.returncode == 0, out[-4000:]
    assert "sft: finished earlier" in out and "rm: resuming" in out
    assert (run_dir / "sft" / DONE).read_bytes() == sft_done
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "sft").rglob("*")} == sft_files  # not written to
    rm_done = json.loads((run_dir / "rm" / DONE).read_text())
    assert rm_done["resumed"] and "--resume" in rm_done["command"]
    steps = [json.loads(line)["step"] for line in (run_dir / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 60 and steps == sorted(set(steps))  # one curve, continued, no step logged twice
    assert (run_dir / "rm" / "final" / "config.json").is_file() and (run_dir / "rm" / "eval.json").is_file()
    assert not (run_dir / "interrupted").exists()
