"""Data layer: bundled corpora, vocabularies, seqio tasks and the trainer's batch iterator.

  udhr           the bundled UDHR corpus and the train/validation (held-out articles) rule
  vocab          SentencePiece vocabularies: train on the UDHR, or load any spiece.model
  preprocessors  span corruption, causal LM and prefix LM token preprocessors
  tasks          seqio Tasks over the UDHR (registered on import)
  pipeline       DatasetConfig, get_dataset, iterate_batches: what the trainer calls

Submodules are imported explicitly (TensorFlow loads with them), e.g.
`from polyglot_jax.data.pipeline import DatasetConfig, get_dataset`.
"""
