"""Device mesh, logical-axis rules, shardings, and multi-process initialisation and data movement."""
from cotsafe_jax.parallel.distributed import (any_process, barrier, describe, global_array, host_local_to_global,
                                              initialize, is_main_process, to_host)
from cotsafe_jax.parallel.mesh import (LOGICAL_AXIS_RULES, MESH_AXES, batch_sharding, logical_sharding,
                                       logical_to_spec, make_mesh, replicated, single_device_mesh,
                                       tree_shardings)

__all__ = ["LOGICAL_AXIS_RULES", "MESH_AXES", "any_process", "barrier", "batch_sharding", "describe",
           "global_array", "host_local_to_global", "initialize", "is_main_process", "logical_sharding",
           "logical_to_spec", "make_mesh", "replicated", "single_device_mesh", "to_host", "tree_shardings"]
