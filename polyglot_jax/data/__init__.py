"""Data layer: bundled corpora, vocabularies, seqio tasks and mixtures, the trainer's iterator.

  udhr           the bundled UDHR corpus and the train/validation (held-out articles) rule
  vocab          SentencePiece vocabularies: train on the UDHR, or load any spiece.model (or
                 a checkpoint folder's tokenizer); `check_vocabulary` against a model
  hf_vocab       Hugging Face tokenizer.json files as seqio vocabularies
  chat           chat templates, conversations -> ids and assistant-only loss weights
  preprocessors  span corruption, causal LM and prefix LM token preprocessors
  instructions   Aya-schema instruction records: UDHR translation prompts, chatterbot dialogs
  aya            reading a user's Aya-format files (JSONL(.gz), Parquet, TFRecord, TFDS dirs)
  quality        bad input: dropped and counted (`data/dropped_*`), or strict errors
  mixing         mT5 temperature and UniMax language rates, LanguageMixture, rate tables
  tasks          seqio Tasks and Mixtures over the bundled data (`register_bundled`, once),
                 per language (`udhr_lm.swh`), and `register_aya_task` / `register_chat_task`
                 for user files
  pipeline       DatasetConfig, get_dataset, iterate_batches, batch_shapes: the trainer's API
                 (each host reads only its data shards)
  pruning        perplexity-based data pruning: example ids, score files, band selection
  scoring        per-example perplexity of a task's raw examples (`polyglot-jax data score`)
  gettext_corpus `polyglot-jax data build`: a parallel corpus from installed gettext catalogs

Submodules are imported explicitly (TensorFlow loads with them), e.g.
`from polyglot_jax.data.pipeline import DatasetConfig, get_dataset`.
"""
