"""The README's fine-tuning code runs as written: the block under "## Fine-tune", executed in a fresh
process in a temporary directory (it writes outputs/, lora_model/, merged_model/ there)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A few seconds of training, the imports and three loads: well under a minute on 2 cores.
TIMEOUT_S = 600


def fine_tune_block() -> str:
    section = ROOT.joinpath("README.md").read_text().split("## Fine-tune", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the Fine-tune section must hold exactly one python block"
    return blocks[0]


def test_the_fine_tune_section_runs_as_written(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    done = subprocess.run([sys.executable, "-c", fine_tune_block()], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    merged = tmp_path / "merged_model"
    assert (merged / "config.json").is_file() and any(merged.glob("*.safetensors")), sorted(os.listdir(tmp_path))
    assert (tmp_path / "lora_model" / "adapter_config.json").is_file()


def several_gpus_blocks() -> tuple[str, str]:
    section = ROOT.joinpath("README.md").read_text().split("## Several GPUs", 1)[1].split("\n## ", 1)[0]
    python, bash = re.findall(r"```python\n(.*?)```", section, re.S), re.findall(r"```bash\n(.*?)```", section, re.S)
    assert len(python) == 1 and len(bash) == 1, "the Several GPUs section must hold one python and one bash block"
    return python[0], bash[0]


def test_the_several_gpus_section_runs_as_written(tmp_path):
    """Both commands on this CPU machine: device_map="auto" spilling to disk, and 2 gloo ranks under torchrun
    (~25 s). `.venv/bin/` is the environment running the tests."""
    python, bash = several_gpus_blocks()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    placed = subprocess.run([sys.executable, "-c", python], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    assert placed.returncode == 0, placed.stderr[-4000:]
    assert "disk" in placed.stdout and "model.vision_tower" in placed.stdout, placed.stdout
    command = bash.strip().replace(".venv/bin/", f"{Path(sys.executable).parent}/")
    trained = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=TIMEOUT_S)
    assert trained.returncode == 0, (trained.stdout + trained.stderr)[-4000:]
    assert (tmp_path / "ddp_lora" / "adapter_model.safetensors").is_file() and "world size 2" in trained.stdout
