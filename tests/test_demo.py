"""The CPU demo is the study's design for one seed: gin/demo_cpu.gin and gin/study_cpu.gin bind one design
(gin/study_base.gin) and differ only in seeds and how rates are chosen. The demo job itself runs end to end in CI
through the Colab notebook (tests/test_notebook.py, gin/demo_ci.gin); the design's every stage, resuming and a
changed configuration refused run in tests/test_study.py (gin/study_ci.gin)."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bindings(path):
  out = {}
  with open(os.path.join(ROOT, path)) as f:
    for line in f:
      m = re.match(r"([\w/.]+) = (.+)", line)
      if m:
        out[m.group(1)] = m.group(2).strip()
  return out


def test_demo_and_study_share_one_design():
  demo, study = _bindings("gin/demo_cpu.gin"), _bindings("gin/study_cpu.gin")
  # the design lives in gin/study_base.gin; each job file only names its job, seeds and how rates are chosen (the
  # study also pads SFT batches to their longest row: the same maths, tests/train/test_sft_trainer.py)
  assert {k for k in demo if not k.startswith(("run.", "demo."))} == {"TaskConfig.seed", "Tuning.fixed"}
  assert {k for k in study if not k.startswith(("run.", "study."))} == {
      "Tuning.sft_learning_rates", "Tuning.sft_steps", "Tuning.ppo_learning_rates", "Tuning.ppo_eval_every",
      "Tuning.val_samples_per_prompt", "warm/SFTConfig.pad_to_multiple", "arm/SFTConfig.pad_to_multiple"}
  assert {k[5:]: v for k, v in demo.items() if k.startswith("demo.")} == {
      k[6:]: v for k, v in study.items() if k.startswith("study.") and k != "study.seeds"}
  for path in ("gin/demo_cpu.gin", "gin/study_cpu.gin"):
    with open(os.path.join(ROOT, path)) as f:
      assert "include 'gin/study_base.gin'" in f.read()
