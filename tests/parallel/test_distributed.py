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
