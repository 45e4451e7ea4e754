"""Multi-host start-up: every host present, the same setup everywhere, then `jax.distributed`.

Every process of a multi-host job runs the same command. On a Cloud TPU slice JAX finds the
coordinator, the number of processes and this process's id itself; elsewhere (several CPU or
GPU machines, or several processes on one machine in tests) they come from the CLI flags
`--coordinator_address`, `--num_processes`, `--process_id` or JAX's environment variables
(JAX_COORDINATOR_ADDRESS, ...). After it, `jax.devices()` lists every process's devices and
`jax.process_index()` / `jax.process_count()` pick each host's data shard.

Two checks turn a pod's usual start-up failures into one line each on every host:
- `rendezvous`: before JAX's coordination service starts, process 0 waits on the coordinator's
  port until every other process has checked in. A host that never starts makes all the
  others exit naming it (JAX itself would abort with a C++ stack trace after 300 s).
- `check_same_setup`: after start-up, every process compares its local device count and kind,
  its parsed gin config and its package versions with every other's, through the coordination
  service's key-value store, and all of them exit naming the first difference.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import socket
import time

import jax

import polyglot_jax

DEFAULT_STARTUP_TIMEOUT = 300  # Seconds; JAX's own initialization_timeout default.
_KEY = "polyglot_jax/startup/{}"


class StartupError(ValueError):
  """A multi-host job cannot start: a host is missing or differs; the message says which."""


def _tpu_runtime_installed() -> bool:
  """libtpu is present and JAX_PLATFORMS does not exclude TPUs."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  return importlib.util.find_spec("libtpu") is not None and (not platforms or "tpu" in platforms)


def _detect_cloud_tpu(timeout: int) -> tuple[str, int, int] | None:
  """Coordinator, process count and id on a Cloud TPU VM, as `jax.distributed` would find them."""
  from jax._src import clusters  # pylint: disable=import-outside-toplevel
  try:
    address, count, index, _ = clusters.ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, None, None, timeout)
  except (ValueError, RuntimeError, OSError):  # libtpu is installed but this is no TPU VM.
    return None
  if address is None or count is None or index is None:
    return None
  return address, count, index


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None,
               startup_timeout: int = DEFAULT_STARTUP_TIMEOUT) -> bool:
  """Joins the multi-process job when one is configured; returns whether it did.

  Explicit arguments (or JAX_COORDINATOR_ADDRESS) need all three values. Without them, on a
  TPU VM JAX's own cluster detection fills them in; anywhere else the process runs alone.
  Every process waits at most `startup_timeout` seconds for the others.
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
  elif _tpu_runtime_installed() and (found := _detect_cloud_tpu(startup_timeout)):
    coordinator_address, num_processes, process_id = found
  else:
    return False
  if num_processes > 1:
    rendezvous(coordinator_address, num_processes, process_id, startup_timeout)
  jax.distributed.initialize(coordinator_address, num_processes, process_id,
                             initialization_timeout=startup_timeout)
  return True


def rendezvous(address: str, num_processes: int, process_id: int, timeout: float) -> None:
  """Returns once all `num_processes` processes have checked in at `address`.

  Process 0 listens on the coordinator's port (free until JAX's coordination service binds it
  right after) and answers every other process "go" once all are there, or "abort" with the
  missing ids at the deadline. Raises StartupError naming what is missing.
  """
  host, port = address.rsplit(":", 1)
  deadline = time.monotonic() + timeout
  if process_id == 0:
    _wait_for_peers(int(port), num_processes, deadline, address, timeout)
  else:
    _check_in(host.strip("[]"), int(port), process_id, deadline, address, timeout)


def _wait_for_peers(port: int, num_processes: int, deadline: float, address: str,
                    timeout: float) -> None:
  peers: dict[int, socket.socket] = {}
  dualstack = socket.has_dualstack_ipv6()
  with socket.create_server(("", port), family=socket.AF_INET6 if dualstack else socket.AF_INET,
                            dualstack_ipv6=dualstack) as server:
    try:
      while len(peers) < num_processes - 1:
        server.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
          conn, _ = server.accept()
        except socket.timeout:
          missing = sorted(set(range(1, num_processes)) - set(peers))
          message = (f"process(es) {missing} of {num_processes} did not start within "
                     f"{timeout:.0f} s (process 0 waited for them at {address}): start the same "
                     "command on every host, or raise --startup_timeout.")
          for conn in peers.values():
            conn.sendall(b"abort " + message.encode() + b"\n")
          raise StartupError(message) from None
        conn.settimeout(max(deadline - time.monotonic(), 1.0))
        peer = int(_read_line(conn))
        if peer in peers or not 0 < peer < num_processes:
          conn.sendall(f"abort another process already checked in as {peer}, or it is not in "
                       f"[1, {num_processes}): give every host its own --process_id.\n".encode())
          conn.close()
          continue
        peers[peer] = conn
      for conn in peers.values():
        conn.sendall(b"go\n")
      for conn in peers.values():  # Each peer closes first, so this port is free for JAX at once.
        _read_line(conn)
    finally:
      for conn in peers.values():
        conn.close()


def _check_in(host: str, port: int, process_id: int, deadline: float, address: str,
              timeout: float) -> None:
  while True:
    try:
      conn = socket.create_connection((host, port), timeout=max(deadline - time.monotonic(), 0.1))
      break
    except OSError:
      if time.monotonic() > deadline:
        raise StartupError(
            f"process {process_id} could not reach process 0 at {address} within {timeout:.0f} "
            "s: start process 0 (the coordinator) too, check the address and that its port is "
            "open, or raise --startup_timeout.") from None
      time.sleep(0.5)
  with conn:
    conn.sendall(f"{process_id}\n".encode())
    conn.settimeout(max(deadline - time.monotonic(), 1.0) + 5.0)  # Process 0 answers by then.
    try:
      reply = _read_line(conn)
    except socket.timeout:
      reply = ""
    if reply != "go":
      raise StartupError(reply.removeprefix("abort ") or
                         f"process 0 at {address} did not answer within {timeout:.0f} s.")


def _read_line(conn: socket.socket) -> str:
  data = b""
  while not data.endswith(b"\n"):
    chunk = conn.recv(4096)
    if not chunk:
      break
    data += chunk
  return data.decode().strip()


def _digest(text: str) -> str:
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def local_setup(config: str) -> dict[str, str]:
  """What must be equal on every host: devices, the parsed gin config, package versions."""
  devices = jax.local_devices()
  return {"local devices": f"{len(devices)} x {devices[0].device_kind}",
          "gin config": _digest(config),
          "versions": f"polyglot_jax {polyglot_jax.__version__}, jax {jax.__version__}"}


def check_same_setup(config: str, timeout: int = DEFAULT_STARTUP_TIMEOUT) -> None:
  """Raises StartupError on every process when any host's `local_setup` differs from process 0's.

  Needs `jax.distributed` up; a no-op for a single process. `config` is the parsed gin config
  (gin.config_str()), so a different gin file or --gin binding on one host is caught.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed as jax_distributed  # pylint: disable=import-outside-toplevel
  client = jax_distributed.global_state.client  # The coordination service's key-value store.
  client.key_value_set(_KEY.format(jax.process_index()), json.dumps(local_setup(config)))
  setups = [json.loads(client.blocking_key_value_get(_KEY.format(i), timeout * 1000))
            for i in range(jax.process_count())]
  for index, setup in enumerate(setups[1:], start=1):
    for what, value in setup.items():
      if value != setups[0][what]:
        hint = {"local devices": "every host must see all of its accelerators (is another "
                                 "program holding some?)",
                "gin config": "run the same command, with the same gin files and --gin bindings, "
                              "on every host",
                "versions": "install the same checkout on every host (tpu/pod.py install)"}[what]
        raise StartupError(f"process {index} differs from process 0 in its {what} ({value} vs "
                           f"{setups[0][what]}): {hint}.")
