"""jax.distributed start-up decisions (TPU VM detection, the TPU metadata server, explicit flags) and the
cross-process helpers in one process (their multi-process behaviour: tests/parallel/test_multiprocess.py)."""
import http.server
import importlib.util
import os
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

from cotsafe_jax import parallel
from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.parallel import distributed

from tests.parallel import multiproc

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (the detection requires it)")
def test_tpu_vm_is_detected_from_chips_device_files_or_tpu_variables(tmp_path):
  assert distributed.tpu_vm_reason(environ={}, sys_root=str(tmp_path)) is None  # libtpu alone: not a TPU VM
  dev = tmp_path / "sys/bus/pci/devices/0000:00:05.0"
  dev.mkdir(parents=True)
  (dev / "vendor").write_text("0x8086\n")  # an Intel device
  (dev / "device").write_text("0x0063\n")
  assert distributed.tpu_vm_reason(environ={}, sys_root=str(tmp_path)) is None
  (dev / "vendor").write_text("0x1ae0\n")  # Google's, but gVNIC (any GCE VM's network card): not a TPU
  (dev / "device").write_text("0x0042\n")
  assert distributed.tpu_vm_reason(environ={}, sys_root=str(tmp_path)) is None
  (dev / "device").write_text("0x0063\n")  # a TPU v5e chip
  assert "1 TPU v5e chip(s) on the PCI bus" in distributed.tpu_vm_reason(environ={}, sys_root=str(tmp_path))
  other = tmp_path / "other"
  (other / "dev/vfio").mkdir(parents=True)
  (other / "dev/vfio/0").write_text("")
  assert "TPU device file" in distributed.tpu_vm_reason(environ={}, sys_root=str(other))
  assert "TPU_WORKER_ID" in distributed.tpu_vm_reason(environ={"TPU_WORKER_ID": "3"}, sys_root=str(tmp_path / "x"))


class _Metadata(http.server.BaseHTTPRequestHandler):
  """The GCE metadata server as a TPU VM of a 4-worker slice sees it."""
  def do_GET(self):  # noqa: N802 - http.server's name
    want = "/computeMetadata/v1/instance/attributes/worker-network-endpoints"
    if self.path != want or self.headers.get("Metadata-Flavor") != "Google":
      self.send_response(404)
      self.end_headers()
      return
    body = b"w0:0:10.0.0.2,w1:1:10.0.0.3,w2:2:10.0.0.4,w3:3:10.0.0.5"
    self.send_response(200)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def log_message(self, *args):
    pass


def test_tpu_worker_count_from_gke_variables_or_the_metadata_server():
  assert distributed.tpu_worker_count(environ={"TPU_WORKER_HOSTNAMES": "h0,h1,h2"}) == 3
  assert distributed.tpu_worker_count(environ={"TPU_PROCESS_ADDRESSES": "a:1,b:1"}) == 2
  server = http.server.HTTPServer(("127.0.0.1", 0), _Metadata)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    env = {"GCE_METADATA_IP": f"127.0.0.1:{server.server_port}"}
    assert distributed.tpu_worker_count(environ=env) == 4  # a gcloud-created pod sets no variable
    assert distributed.tpu_worker_count(environ={**env, "TPU_SKIP_MDS_QUERY": "1"}) is None
  finally:
    server.shutdown()
  # no metadata server (a Colab TPU runtime, a laptop): unknown, so one process
  assert distributed.tpu_worker_count(environ={"GCE_METADATA_IP": f"127.0.0.1:{multiproc.free_port()}"},
                                      timeout=2) is None


def test_cluster_reasons():
  assert "SLURM" in distributed._cluster_reason({"SLURM_NTASKS": "4"})
  assert "Open MPI" in distributed._cluster_reason({"OMPI_COMM_WORLD_SIZE": "2"})
  assert distributed._cluster_reason({"SLURM_NTASKS": "1", "TPU_SKIP_MDS_QUERY": "1"}) is None


def test_explicit_flags_must_come_together():
  with pytest.raises(CotsafeError, match="must be given together"):
    distributed.initialize(num_processes=2)
  with pytest.raises(CotsafeError, match=r"process_id=2 outside \[0, num_processes=2\)"):
    distributed.initialize(coordinator_address="127.0.0.1:1", num_processes=2, process_id=2)
  assert distributed.initialize(coordinator_address="127.0.0.1:1", num_processes=1, process_id=0) is None


def test_launcher_rejects_partial_flags_in_one_line(tmp_path):
  r = subprocess.run([sys.executable, multiproc.LAUNCHER, "--gin_file=gin/model_info_tiny.gin",
                      f"--workdir={tmp_path}", "--num_processes=2"], cwd=multiproc.ROOT, capture_output=True,
                     text=True, timeout=300, env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1"))
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1].startswith("cotsafe_jax: distributed: --coordinator_address, "
                                                      "--num_processes and --process_id must be given together")


def test_helpers_in_one_process_are_the_plain_jax_calls():
  mesh = parallel.make_mesh()
  s = parallel.batch_sharding(mesh, 2, (8, 3))
  x = np.arange(24, dtype=np.int32).reshape(8, 3)
  for g in (parallel.global_array(x, s), parallel.host_local_to_global({"x": x}, {"x": s})["x"]):
    assert g.sharding == s and g.shape == (8, 3)
    np.testing.assert_array_equal(parallel.to_host(g), x)
  assert distributed._row_span(s, (8, 3)) == (0, 8)  # one process holds every row
  rep = parallel.global_array(np.float32(2.5), parallel.replicated(mesh))
  assert parallel.to_host({"a": rep})["a"] == np.float32(2.5)
  assert parallel.any_process(True) and not parallel.any_process(False)
  parallel.barrier("one process: no-op")
  assert parallel.describe() == f"process 0 of 1: {jax.local_device_count()} local / {jax.device_count()} global " \
                                f"{jax.devices()[0].platform} devices"


_TWO_PROCESS_SCRIPT = r'''
import sys
import numpy as np
from cotsafe_jax.parallel import distributed
distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from cotsafe_jax import parallel
p = jax.process_index()
full = np.arange(16 * 3, dtype=np.int32).reshape(16, 3)  # the global batch; process p holds rows [8p, 8p + 8)
local = full[8 * p:8 * (p + 1)]
devs = jax.devices()
layouts = {
    "fsdp over all devices": parallel.make_mesh(),
    "batch replicated (tensor=8)": parallel.make_mesh(data=1, fsdp=1, tensor=8),
    "devices interleaved across processes": Mesh(np.asarray([devs[i // 2 + 4 * (i % 2)] for i in range(8)])
                                                 .reshape(1, 8, 1), parallel.MESH_AXES),
}
for name, mesh in layouts.items():
  s = parallel.batch_sharding(mesh, 2, full.shape)
  g = parallel.host_local_to_global(local, s)
  assert g.shape == full.shape and g.sharding == s, name
  np.testing.assert_array_equal(parallel.to_host(g), full, err_msg=name)
  np.testing.assert_array_equal(parallel.to_host(parallel.global_array(full, s)), full, err_msg=name)
  for shard in g.addressable_shards:  # each device holds exactly its rows of the global batch
    np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index], err_msg=name)
assert parallel.any_process(p == 1) and not parallel.any_process(False)
np.testing.assert_array_equal(parallel.to_host(np.full(2, p), tiled=True), [0, 0, 1, 1])
parallel.barrier("done")
print("ok", p)
'''


def test_helpers_across_two_processes(tmp_path):
  """host_local_to_global / global_array / to_host / any_process as 2 processes x 4 devices, for a mesh that
  splits the batch by process, one that replicates it, and one whose devices alternate between processes."""
  script = tmp_path / "two.py"
  script.write_text(_TWO_PROCESS_SCRIPT)
  address = f"127.0.0.1:{multiproc.free_port()}"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
             PYTHONPATH=multiproc.ROOT)
  procs = [subprocess.Popen([sys.executable, str(script), address, str(i)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  results = multiproc.wait(procs, timeout=300)
  for i, r in enumerate(results):
    assert r.returncode == 0 and f"ok {i}" in r.stdout, r.stderr[-3000:]
