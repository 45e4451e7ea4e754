"""polyglot_jax: JAX/TPU-native pretraining and finetuning of multilingual language models."""

__version__ = "0.1.0"
