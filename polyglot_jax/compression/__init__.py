"""Compression algorithms: weight sparsity (`sparsity`), int8 quantization (`quantization`), PIE
audits (`audit`). Their commands (prune, sparsity_report, audit) live in `commands/`."""
