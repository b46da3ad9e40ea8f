"""The bad-input catalogue: each bad checkpoint, tokenizer, data file, gin binding, mesh, workdir or resumed
checkpoint is one `cotsafe_jax:` line on stderr naming the place, exit code 2 from launch/tpu_run.py, and
nothing half-written.

Every case runs the launcher's main() in a process of its own, with its own stderr and exit code. Starting
`python launch/tpu_run.py` costs 6-10 s of imports on a busy 2-core machine (7 min for the catalogue), so the
cases marked `cold` start it exactly so, and the others are forked from one process that did the imports once
(before any JAX backend exists, so each child still sets its own device count). Each case stops before or at
its first compile.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from typing import Callable

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_TOKENIZER = os.path.join(ROOT, "data", "tiny_tokenizer")
SFT = ("--gin_file=gin/experiments/tiny_sft_cpu.gin", "--gin_param=SFTConfig.num_steps=1",
       "--gin_param=SFTConfig.batch_size=1", "--gin_param=SFTConfig.warmup_steps=0",
       "--gin_param=sft_train.export_hf=False")
PPO = ("--gin_file=gin/experiments/tiny_ppo_cpu.gin", "--gin_param=PolicySpec.config=None",
       "--gin_param=PPOConfig.epochs=1", "--gin_param=PPOConfig.num_minibatches=1",
       "--gin_param=AdvantageConfig.estimator='grpo'", "--gin_param=AdvantageConfig.group_size=2",
       "--gin_param=RolloutConfig.samples_per_prompt=2", "--gin_param=ppo_train.prompts_per_step=1",
       "--gin_param=RolloutConfig.max_new_tokens=4", "--gin_param=ppo_train.export_hf=False")


@dataclasses.dataclass(frozen=True)
class Assets:
  """Inputs shared by the cases, built once: a tiny HF checkpoint with its tokenizer, SFT rows, prompt rows."""
  root: str
  hf: str          # qwen2, vocab 640, tokenizer data/tiny_tokenizer (576 tokens)
  hf_small: str    # the same family with vocab 512: smaller than the tokenizer
  sft: str
  prompts: str


@dataclasses.dataclass(frozen=True)
class Case:
  """build(assets, case_dir) -> (launcher args, the place the error line must name). cold: run as `python
  launch/tpu_run.py`. empty_ok: files the job may have created before failing, which must hold no record
  (an empty metrics.jsonl, a TensorBoard file without scalars, a checkpoints dir without steps)."""
  id: str
  build: Callable[[Assets, str], tuple[list[str], str]]
  devices: int = 1
  cold: bool = False
  empty_ok: tuple[str, ...] = ()


def _write(path: str, data: bytes | str) -> str:
  with open(path, "wb") as f:
    f.write(data.encode() if isinstance(data, str) else data)
  return path


def _jsonl(path: str, rows: list) -> str:
  return _write(path, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def _copy_hf(assets: Assets, d: str) -> str:
  dst = os.path.join(d, "ckpt")
  shutil.copytree(assets.hf, dst)
  return dst


def _export(hf_dir: str, *extra: str) -> list[str]:
  return ["--gin_file=gin/export_hf.gin", f"--gin_param=export_hf.hf_dir='{hf_dir}'", *extra]


def _edit_weights(d: str, edit) -> None:
  from safetensors.numpy import load_file, save_file
  path = os.path.join(d, "model.safetensors")
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path, metadata={"format": "pt"})


def _edit_config(d: str, edit) -> None:
  path = os.path.join(d, "config.json")
  with open(path) as f:
    cfg = json.load(f)
  edit(cfg)
  _write(path, json.dumps(cfg))


# ---- checkpoints ----------------------------------------------------------------------------------------------
def _ckpt_truncated(a, d):
  c = _copy_hf(a, d)
  path = os.path.join(c, "model.safetensors")
  data = open(path, "rb").read()
  _write(path, data[:len(data) // 2])  # an interrupted download
  return _export(c), f"{path}: not a readable safetensors file"


def _ckpt_empty(a, d):
  c = _copy_hf(a, d)
  path = _write(os.path.join(c, "model.safetensors"), b"")
  return _export(c), f"{path}: not a readable safetensors file"


def _ckpt_int_dtype(a, d):
  c = _copy_hf(a, d)
  _edit_weights(c, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].astype(np.int32)}))
  return _export(c), f"{c}: checkpoint does not match config.json (qwen2): non-float tensors: model.norm.weight I32"


def _ckpt_missing_shard(a, d):
  c = _copy_hf(a, d)
  from safetensors.numpy import load_file, save_file
  tensors = load_file(os.path.join(c, "model.safetensors"))
  names = sorted(tensors)
  os.remove(os.path.join(c, "model.safetensors"))
  save_file({n: tensors[n] for n in names[:5]}, os.path.join(c, "model-00001-of-00002.safetensors"))
  weight_map = {n: f"model-0000{1 + (i >= 5)}-of-00002.safetensors" for i, n in enumerate(names)}
  _write(os.path.join(c, "model.safetensors.index.json"), json.dumps({"weight_map": weight_map}))
  return _export(c), f"{c}/model.safetensors.index.json: names shard model-00002-of-00002.safetensors, which is missing"


def _ckpt_bad_index(a, d):
  c = _copy_hf(a, d)
  os.remove(os.path.join(c, "model.safetensors"))
  path = _write(os.path.join(c, "model.safetensors.index.json"), '{"weights": {}}')
  return _export(c), f"{path}: not a safetensors index (expected a 'weight_map')"


def _ckpt_no_model_type(a, d):
  c = _copy_hf(a, d)
  _edit_config(c, lambda cfg: cfg.pop("model_type"))
  return _export(c), f"unknown model_type None in {c}/config.json"


def _ckpt_config_not_json(a, d):
  c = _copy_hf(a, d)
  _write(os.path.join(c, "config.json"), '{"model_type": "qwen2",')
  return _export(c), f"{c}/config.json"


def _ckpt_misshaped(a, d):
  c = _copy_hf(a, d)
  _edit_weights(c, lambda t: t.update({"model.norm.weight": np.ones(63, np.float32)}))
  return _export(c), f"{c}: checkpoint does not match config.json (qwen2): mis-shaped tensors: model.norm.weight [63]"


def _ckpt_pickle_only(a, d):
  c = _copy_hf(a, d)
  os.rename(os.path.join(c, "model.safetensors"), os.path.join(c, "pytorch_model.bin"))
  return _export(c), f"{c}: no model.safetensors or model.safetensors.index.json (found pytorch_model.bin"


def _ckpt_missing_dir(a, d):
  return _export(os.path.join(d, "nowhere")), f"{d}/nowhere: model dir not found"


# ---- tokenizers -------------------------------------------------------------------------------------------------
def _tok_missing(a, d):
  return _export(a.hf, f"--gin_param=export_hf.tokenizer_dir='{d}/no_tok'"), f"{d}/no_tok: no tokenizer.json"


def _tok_larger_than_model(a, d):
  return (_export(a.hf_small, f"--gin_param=export_hf.tokenizer_dir='{TINY_TOKENIZER}'"),
          f"{TINY_TOKENIZER}: tokenizer has 576 tokens but the model's vocab_size is 512")


def _tok_corrupt(a, d):
  tok = os.path.join(d, "tok")
  shutil.copytree(TINY_TOKENIZER, tok)
  _write(os.path.join(tok, "tokenizer.json"), '{"model": {"type": "BPE", "vocab": ')
  return _export(a.hf, f"--gin_param=export_hf.tokenizer_dir='{tok}'"), f"{tok}: cannot load a tokenizer"


# ---- data -------------------------------------------------------------------------------------------------------
def _sft(path: str, *extra: str) -> list[str]:
  return [*SFT, f"--gin_param=sft_train.data='{path}'", *extra]


GOOD_SFT = {"prompt": "What is 2+3?", "response": "<think>\n2+3=5\n</think>\n\n5"}


def _data_missing(a, d):
  return _sft(f"{d}/none.jsonl"), f"{d}/none.jsonl: no such file"


def _data_empty(a, d):
  path = _write(os.path.join(d, "empty.jsonl"), "")
  return _sft(path), f"{path}: no valid sft rows (0 skipped)"


def _data_wrong_columns(a, d):
  path = _jsonl(os.path.join(d, "cols.jsonl"), [{"question": "What is 2+3?", "solution": "5"}])
  return _sft(path), f'{path}:1: field "prompt" missing'


def _data_not_utf8(a, d):
  path = _write(os.path.join(d, "latin1.jsonl"),
                json.dumps(GOOD_SFT).encode() + b"\n" + '{"prompt": "café", "response": "ok"}\n'.encode("latin-1"))
  return _sft(path), f"{path}:2: not UTF-8"


def _data_bad_json(a, d):
  path = _jsonl(os.path.join(d, "broken.jsonl"), [GOOD_SFT, '{"prompt": "x", "response": '])
  return _sft(path), f"{path}:2: invalid JSON"


def _data_unknown_kind(a, d):
  path = _jsonl(os.path.join(d, "kind.jsonl"), [GOOD_SFT, {**GOOD_SFT, "kind": "toxic"}])
  return _sft(path), f'{path}:2: field "kind" is "toxic", expected harmful|benign|reasoning'


def _data_too_long(a, d):
  path = _jsonl(os.path.join(d, "long.jsonl"), [GOOD_SFT, {**GOOD_SFT, "response": "five " * 200}])
  return _sft(path, "--gin_param=SFTConfig.truncate='error'", "--gin_param=SFTConfig.max_len=64"), path


def _data_unknown_type(a, d):
  path = _write(os.path.join(d, "rows.txt"), "What is 2+3?\n")
  return _sft(path), f"{path}: unknown file type '.txt'"


def _data_unknown_preset(a, d):
  return _sft(a.sft, "--gin_param=sft_train.columns='gsm9k'"), "unknown column preset 'gsm9k'"


def _ppo(prompts: str, *extra: str, hf: str) -> list[str]:
  return [*PPO, f"--gin_param=PolicySpec.hf_dir='{hf}'", f"--gin_param=ppo_train.prompts='{prompts}'", *extra]


def _prompts_unknown_kind(a, d):
  path = _jsonl(os.path.join(d, "prompts.jsonl"), [{"prompt": "hi", "kind": "benign"}, {"prompt": "x", "kind": "evil"}])
  return _ppo(path, hf=a.hf), f'{path}:2: field "kind" is "evil"'


def _prompt_too_long(a, d):
  path = _jsonl(os.path.join(d, "prompts.jsonl"), [{"prompt": "safe " * 100, "kind": "benign", "id": "p-long"}])
  return (_ppo(path, "--gin_param=RolloutConfig.truncate='error'", "--gin_param=RolloutConfig.max_prompt_len=16",
               hf=a.hf), "prompt p-long: ")


# ---- gin --------------------------------------------------------------------------------------------------------
def _gin_unknown_configurable(a, d):
  return ["--gin_file=gin/model_info_tiny.gin", "--gin_param=model_inf.dtype='float32'"], "'model_inf'"


def _gin_unknown_parameter(a, d):
  return ["--gin_file=gin/model_info_tiny.gin", "--gin_param=model_info.dtyp='float32'"], "'model_info' has no parameter 'dtyp'"


def _gin_wrong_type(a, d):
  return (["--gin_file=gin/model_info_tiny.gin", "--gin_param=tiny/ModelConfig.num_layers='two'"],
          "gin: tiny/ModelConfig.num_layers = 'two' is a str, expected int")


def _gin_missing_required(a, d):
  return ["--gin_file=gin/export_hf.gin"], "gin: export_hf.hf_dir required but not bound"


def _gin_file_missing(a, d):
  return [f"--gin_file={d}/nope.gin"], f"{d}/nope.gin: gin file not found"


def _gin_syntax(a, d):
  path = _write(os.path.join(d, "bad.gin"), "include 'gin/model_info_tiny.gin'\nmodel_info.dtype = = 'x'\n")
  return [f"--gin_file={path}"], f"gin: {path}:2: "


def _gin_no_job(a, d):
  path = _write(os.path.join(d, "nojob.gin"), "# nothing bound\ninclude 'gin/models/tiny.gin'\n")
  return [f"--gin_file={path}"], "no job bound: set run.job"


# ---- meshes -----------------------------------------------------------------------------------------------------
def _mesh_not_dividing(a, d):
  return (["--gin_file=gin/model_info_tiny.gin", "--gin_param=model_info.mesh=@make_mesh()",
           "--gin_param=make_mesh.data=3"], "make_mesh: data=3 x fsdp=-1 x tensor=1 does not divide the 8 devices")


def _mesh_batch_not_dividing(a, d):
  return (_sft(a.sft, "--gin_param=SFTConfig.batch_size=3"),
          "SFTConfig.microbatch_rows_per_device=1: batch_size=3 does not split into micro-batches of 1 row(s) on "
          "each of 8 data x fsdp devices")


# ---- workdirs ---------------------------------------------------------------------------------------------------
def _workdir_under_file(a, d):
  blocker = _write(os.path.join(d, "blocker"), "a file\n")  # unwritable for root too: nothing goes under a file
  return ["--gin_file=gin/model_info_tiny.gin", f"--workdir={blocker}/w"], f"workdir {blocker}/w: {blocker} is a file"


def _workdir_is_file(a, d):
  blocker = _write(os.path.join(d, "w"), "a file\n")
  return ["--gin_file=gin/model_info_tiny.gin", f"--workdir={blocker}"], f"workdir {blocker}: a file is in the way"


# ---- a checkpoint of another model ------------------------------------------------------------------------------
def _resume_other_model(a, d):
  """An SFT run of a hidden-32 model leaves step 1 in the workdir; the tiny.gin model (hidden 64) resumes there."""
  from cotsafe_jax import models
  from cotsafe_jax.parallel import make_mesh
  from cotsafe_jax.train import sft_trainer
  work = os.path.join(d, "work")
  sft_trainer.sft_train(workdir=work, data=a.sft, model=models.tiny_config("qwen2", vocab_size=640, hidden_size=32),
                        tokenizer_dir=TINY_TOKENIZER, export_hf=False, save_interval_steps=1, async_checkpoint=False,
                        config=sft_trainer.SFTConfig(num_steps=1, max_len=32, batch_size=1, schedule="constant"),
                        mesh=make_mesh(1, 1, 1, devices=__import__("jax").devices()[:1]))
  assert os.listdir(os.path.join(work, "checkpoints")) == ["1"]
  return (_sft(a.sft, f"--workdir={work}"),
          f"{work}/checkpoints/1: checkpoint does not fit this run's state (params/embed is [640, 32] in the "
          "checkpoint, [640, 64] in this run; ")


CASES = [
    Case("checkpoint-truncated-safetensors", _ckpt_truncated, cold=True),
    Case("checkpoint-empty-safetensors", _ckpt_empty),
    Case("checkpoint-int-dtype-safetensors", _ckpt_int_dtype),
    Case("checkpoint-index-names-missing-shard", _ckpt_missing_shard),
    Case("checkpoint-index-without-weight-map", _ckpt_bad_index),
    Case("checkpoint-config-without-model-type", _ckpt_no_model_type),
    Case("checkpoint-config-not-json", _ckpt_config_not_json),
    Case("checkpoint-misshaped-tensor", _ckpt_misshaped),
    Case("checkpoint-pickle-only", _ckpt_pickle_only),
    Case("checkpoint-dir-missing", _ckpt_missing_dir),
    Case("tokenizer-missing", _tok_missing),
    Case("tokenizer-vocab-larger-than-model", _tok_larger_than_model),
    Case("tokenizer-corrupt-json", _tok_corrupt),
    Case("data-missing-file", _data_missing),
    Case("data-empty-file", _data_empty),
    Case("data-wrong-columns", _data_wrong_columns),
    Case("data-non-utf8-line", _data_not_utf8, cold=True),
    Case("data-invalid-json-line", _data_bad_json),
    Case("data-unknown-kind", _data_unknown_kind),
    Case("data-row-too-long-truncate-error", _data_too_long),
    Case("data-unknown-file-type", _data_unknown_type),
    Case("data-unknown-column-preset", _data_unknown_preset),
    Case("prompts-unknown-kind", _prompts_unknown_kind),
    # the trainer meets the long prompt in its first step, after opening its logs and checkpoint dir
    Case("prompts-too-long-truncate-error", _prompt_too_long,
         empty_ok=("metrics.jsonl", "events.out.tfevents", "checkpoints")),
    Case("gin-unknown-configurable", _gin_unknown_configurable),
    Case("gin-unknown-parameter", _gin_unknown_parameter),
    Case("gin-mistyped-value", _gin_wrong_type, cold=True),
    Case("gin-missing-required-binding", _gin_missing_required),
    Case("gin-file-missing", _gin_file_missing),
    Case("gin-syntax-error", _gin_syntax),
    Case("gin-no-job", _gin_no_job),
    Case("mesh-sizes-not-dividing-devices", _mesh_not_dividing, devices=8),
    Case("mesh-batch-not-dividing-devices", _mesh_batch_not_dividing, devices=8),
    Case("workdir-under-a-file", _workdir_under_file, cold=True),
    Case("workdir-is-a-file", _workdir_is_file),
    Case("checkpoint-of-another-model", _resume_other_model),
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Assets:
  from cotsafe_jax import models
  from tests.models.hf_fixtures import make_hf_model
  root = str(tmp_path_factory.mktemp("bad_inputs"))
  tok = models.load_tokenizer(TINY_TOKENIZER)
  hf, hf_small = os.path.join(root, "hf"), os.path.join(root, "hf_small")
  make_hf_model("qwen2", hf, vocab_size=640)
  tok.save_pretrained(hf)
  make_hf_model("qwen2", hf_small, vocab_size=512)
  sft = _jsonl(os.path.join(root, "sft.jsonl"), [GOOD_SFT] * 4)
  prompts = _jsonl(os.path.join(root, "prompts.jsonl"), [{"prompt": "hi", "kind": "benign"}])
  return Assets(root=root, hf=hf, hf_small=hf_small, sft=sft, prompts=prompts)


def _snapshot(d: str) -> dict[str, tuple[int, int]]:
  out = {}
  for base, dirs, files in os.walk(d):
    for name in dirs + files:
      p = os.path.join(base, name)
      st = os.stat(p)
      out[p] = (st.st_size, st.st_mtime_ns) if name in files else (-1, 0)
  return out


def _env(devices: int) -> dict[str, str]:
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
              PYTHONPATH=ROOT)


def _launch_cold(args: list[str], devices: int) -> tuple[int, str]:
  r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "tpu_run.py"), *args], cwd=ROOT,
                     env=_env(devices), capture_output=True, text=True, timeout=600)
  return r.returncode, r.stderr


# One process imports the launcher and every job once, then forks a child per case that runs main(argv) with
# stdout / stderr on a file and exits with main's code; an exception main lets through is printed as Python
# prints it, exit 1. Up to `workers` children at a time.
_FORK_RUNNER = r"""
import importlib.util, json, os, sys, traceback
root, spec_path, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
spec = importlib.util.spec_from_file_location("tpu_run", os.path.join(root, "launch", "tpu_run.py"))
tpu_run = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tpu_run)
from cotsafe_jax import jobs  # noqa: F401  the imports every child would repeat
from jax._src import xla_bridge
assert not xla_bridge._backends, "a JAX backend exists before the fork"
cases, running, codes = json.load(open(spec_path)), {}, {}

def reap():
  pid, status = os.wait()
  codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)

for case_id, argv, devices, log in cases:
  while len(running) >= workers:
    reap()
  sys.stdout.flush(); sys.stderr.flush()
  pid = os.fork()
  if pid == 0:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1); os.dup2(fd, 2)
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    try:
      code = tpu_run.main(argv)
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else 1
    except BaseException:
      traceback.print_exc(); code = 1
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(code)
  running[pid] = case_id
while running:
  reap()
print(json.dumps(codes))
"""


def _launch_forked(jobs: dict[str, tuple[list[str], int]], tmp: str, workers: int) -> dict[str, tuple[int, str]]:
  spec = [[cid, args, devices, os.path.join(tmp, f"{cid}.log")] for cid, (args, devices) in jobs.items()]
  with open(os.path.join(tmp, "cases.json"), "w") as f:
    json.dump(spec, f)
  r = subprocess.run([sys.executable, "-c", _FORK_RUNNER, ROOT, os.path.join(tmp, "cases.json"), str(workers)],
                     cwd=ROOT, env=_env(1), capture_output=True, text=True, timeout=1200)
  assert r.returncode == 0, r.stderr[-3000:]
  codes = json.loads(r.stdout.strip().splitlines()[-1])
  return {cid: (codes[cid], open(log).read()) for cid, _, _, log in spec}


@pytest.fixture(scope="module")
def results(request, assets, tmp_path_factory):
  """Builds the selected cases (in this process), then runs their launchers."""
  selected = {item.callspec.params["case"].id for item in request.session.items
              if getattr(item, "originalname", "") == "test_bad_input" and hasattr(item, "callspec")}
  cases = {c.id: c for c in CASES if c.id in selected}
  built = {}
  for cid, case in cases.items():
    d = str(tmp_path_factory.mktemp(cid))
    args, where = case.build(assets, d)
    if not any(a.startswith("--workdir") for a in args):
      args = [*args, f"--workdir={d}/work"]
    built[cid] = (d, args, where, _snapshot(d))
  workers = max(2, min(6, (os.cpu_count() or 2) // 2))
  forked = {cid: (built[cid][1], c.devices) for cid, c in cases.items() if not c.cold}
  out = _launch_forked(forked, str(tmp_path_factory.mktemp("forked")), workers) if forked else {}
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    cold = {cid: pool.submit(_launch_cold, built[cid][1], c.devices) for cid, c in cases.items() if c.cold}
    out.update({cid: f.result() for cid, f in cold.items()})
  return {cid: (*built[cid], *out[cid]) for cid in cases}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, results):
  d, args, where, before, code, stderr = results[case.id]
  assert code == 2, f"exit {code}\n{stderr[-3000:]}"
  lines = [line for line in stderr.splitlines() if line.startswith("cotsafe_jax:")]
  assert len(lines) == 1, stderr[-3000:]
  assert stderr.rstrip().splitlines()[-1] == lines[0]  # the last thing printed
  assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr[-3000:]
  assert where in lines[0], f"{where!r} not in {lines[0]!r}"
  # nothing half-written: nothing changed or appeared but the launcher's config.gin and the workdir itself (and
  # for a trainer that had started, its still empty logs), no temporary leftovers
  after = _snapshot(d)
  changed = {p for p, v in after.items() if before.get(p) != v}
  unexpected = sorted(p for p in changed if os.path.basename(p) not in ("config.gin", "work")
                      and not any(os.path.basename(p).startswith(n) for n in case.empty_ok))
  assert not unexpected, unexpected
  for p in changed - set(unexpected):
    name = os.path.basename(p)
    if name == "metrics.jsonl":
      assert open(p).read() == "", p
    elif name == "checkpoints":
      assert os.listdir(p) == [], p
    elif name.startswith("events.out.tfevents"):
      assert os.path.getsize(p) < 200, p  # the file header only, no scalar
  assert not [p for p in after if "tmp" in os.path.basename(p)]


def test_catalogue_size():
  assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)


def test_shipped_gin_files_pass_the_binding_type_check():
  """The launcher's plain-value type check accepts every shipped gin file (no false alarms)."""
  import glob
  import importlib.util

  import gin
  from cotsafe_jax import jobs  # noqa: F401  (registers the configurables)
  spec = importlib.util.spec_from_file_location("tpu_run", os.path.join(ROOT, "launch", "tpu_run.py"))
  tpu_run = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tpu_run)
  files = sorted(glob.glob(os.path.join(ROOT, "gin", "**", "*.gin"), recursive=True))
  assert len(files) >= 10
  try:
    for path in files:
      gin.clear_config()
      gin.add_config_file_search_path(ROOT)
      gin.parse_config_files_and_bindings([path], [], finalize_config=False)
      tpu_run._check_binding_types()
    gin.clear_config()
    gin.parse_config_files_and_bindings([os.path.join(ROOT, "gin/experiments/tiny_ppo_cpu.gin")],
                                        ["RolloutConfig.max_new_tokens = 24.5"], finalize_config=False)
    with pytest.raises(Exception, match=r"gin: RolloutConfig.max_new_tokens = 24.5 is a float, expected int"):
      tpu_run._check_binding_types()
  finally:
    gin.clear_config()
