"""Compression: weight sparsity (`sparsity`), int8 quantization (`quantization`), PIE audits (`audit`).

Importing the package registers `quantized_model` with gin, so gin/quantization/*.gin parse
wherever the trainer or the CLI is loaded (both import `sparsity`).
"""

from polyglot_jax.compression import quantization  # noqa: F401  (gin: quantized_model)
