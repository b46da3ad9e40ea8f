"""notebooks/colab_tpu_demo.ipynb runs top to bottom on CPU (nbclient, a real IPython kernel): the checkout is
found, the devices probed, the demo run at a tiny size, its report table and plots displayed."""
import json
import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "colab_tpu_demo.ipynb")
# gin/demo_ci.gin cut to a few steps per stage: the notebook's cells are under test, not the demo's result
TINY = ["warm/SFTConfig.num_steps=20", "warm/SFTConfig.warmup_steps=2", "RMConfig.steps=10"]


def test_notebook_runs_top_to_bottom_on_cpu(tmp_path, monkeypatch):
  workdir = tmp_path / "demo"
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")  # a Colab CPU runtime: one device
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("COTSAFE_JAX_DEMO_WORKDIR", str(workdir))
  monkeypatch.setenv("COTSAFE_JAX_DEMO_GIN", "gin/demo_ci.gin")
  monkeypatch.setenv("COTSAFE_JAX_DEMO_PARAMS", json.dumps(TINY))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert f"checkout: {ROOT} | TPU runtime: False" in text
  assert "1 x cpu (cpu): the mesh is data=1 x fsdp=1 x tensor=1" in text
  assert "study: total" in text  # the job's own last line, streamed
  shown = [o for o in outputs if o.output_type == "display_data"]
  assert any("| policy |" in o["data"].get("text/markdown", "") for o in shown)  # the report's table
  pngs = [o for o in shown if "image/png" in o["data"]]
  assert len(pngs) >= 3  # curves, rates, entropy, reflection (entropy only when reasoning tokens were sampled)
  assert "<- CoT safety rate per policy" in text and "'ppo'" in text
  assert "parameters          7,615,616,512" in text  # model_info of R1-Distill-Qwen-7B on this mesh
  assert (workdir / "report.md").exists()
  # the demo job (gin/demo_ci.gin): the study's design for one seed with the study's fixed rates and steps
  summary = json.loads((workdir / "summary.json").read_text())
  assert list(summary["policies"]) == ["base", "sft", "rft", "ppo", "ppo_seq"] and summary["seeds"] == [0]
  assert summary["hyperparameters"]["fixed"] and summary["heldout_categories"] == ["vosh"]
  assert all("vosh" not in summary["train_categories"][k] for k in ("sft", "rm", "ppo", "rft"))
  comp = summary["compute"]
  assert comp["ppo"]["0"]["rollouts"] == comp["rft"]["0"]["rollouts"] == 2 * 16  # the same rollout budget
  with pytest.raises(StopIteration):  # no cell raised
    next(o for o in outputs if o.output_type == "error")
