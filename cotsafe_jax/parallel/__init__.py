"""Device mesh, logical-axis rules, shardings, and multi-process initialisation."""
from cotsafe_jax.parallel.distributed import host_local_to_global, initialize, is_main_process
from cotsafe_jax.parallel.mesh import (LOGICAL_AXIS_RULES, MESH_AXES, batch_sharding, logical_sharding,
                                       logical_to_spec, make_mesh, replicated, single_device_mesh,
                                       tree_shardings)

__all__ = ["LOGICAL_AXIS_RULES", "MESH_AXES", "batch_sharding", "host_local_to_global", "initialize",
           "is_main_process", "logical_sharding", "logical_to_spec", "make_mesh", "replicated",
           "single_device_mesh", "tree_shardings"]
