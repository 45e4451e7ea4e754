"""Multi-host start-up: `jax.distributed.initialize` before anything touches a device.

Every process of a multi-host job runs the same command. On a Cloud TPU slice JAX finds the
coordinator, the number of processes and this process's id itself; elsewhere (several CPU or
GPU machines, or several processes on one machine in tests) they come from the CLI flags
`--coordinator_address`, `--num_processes`, `--process_id` or JAX's environment variables
(JAX_COORDINATOR_ADDRESS, ...). After it, `jax.devices()` lists every process's devices and
`jax.process_index()` / `jax.process_count()` pick each host's data shard.
"""

from __future__ import annotations

import importlib.util
import os

import jax


def _tpu_runtime_installed() -> bool:
  """libtpu is present and JAX_PLATFORMS does not exclude TPUs."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  return importlib.util.find_spec("libtpu") is not None and (not platforms or "tpu" in platforms)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Joins the multi-process job when one is configured; returns whether it did.

  Explicit arguments (or JAX_COORDINATOR_ADDRESS) need all three values. Without them, on a
  TPU VM JAX's own cluster detection fills them in; anywhere else the process runs alone.
  """
  given = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in given) or os.environ.get("JAX_COORDINATOR_ADDRESS"):
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None or process_id is None:
      raise ValueError("a multi-process run needs --coordinator_address (or "
                       "JAX_COORDINATOR_ADDRESS), --num_processes and --process_id together; "
                       f"got {coordinator_address=}, {num_processes=}, {process_id=}.")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} must be in [0, --num_processes="
                       f"{num_processes}).")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True
  if _tpu_runtime_installed():
    try:
      jax.distributed.initialize()
    except ValueError:  # libtpu is installed but this is no TPU VM: run as a single process.
      return False
    return True
  return False
