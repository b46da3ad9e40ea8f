"""Will it fit? Every program of a run compiled ahead of time for a TPU slice or NVIDIA GPUs, on a CPU host."""
from cotsafe_jax.plan.planner import ALL_PROGRAMS, ProgramPlan, forward_flops
from cotsafe_jax.plan.run import plan
from cotsafe_jax.plan.targets import Target, devices, parse_target

__all__ = ["ALL_PROGRAMS", "ProgramPlan", "Target", "devices", "forward_flops", "parse_target", "plan"]
