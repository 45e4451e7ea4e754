"""Test-session setup: 8 fake CPU devices (read once, before JAX initialises) and quiet TF logs."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # TensorFlow (seqio) must not claim an accelerator.
# Tests compile many tiny programs: skip XLA's slow backend optimisations (halves compile time;
# every comparison is made within one process under the same flags). Subprocesses inherit it.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")
