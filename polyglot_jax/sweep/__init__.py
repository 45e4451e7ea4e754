"""Sweeps: a grid of training runs over gin bindings, their results, scaling fits and plots.

  grid.py     the spec (base command + axes) and its expansion into named runs
  launch.py   training the runs one after another locally, or printing their commands
  results.py  one row per run from its MODEL_DIR: CSV and Markdown tables
  scaling.py  power-law fits of loss against training compute
  plots.py    matplotlib figures
  command.py  `polyglot-jax sweep`, tying them together
"""
