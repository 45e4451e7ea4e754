"""`chat_task`: the gin form of `tasks.register_chat_task` (gin/runs/sft.gin binds it).

Apart from data/tasks.py so that reloading that module does not register the configurable twice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import gin

from polyglot_jax.data import tasks
from polyglot_jax.data.vocab import get_vocabulary


@gin.configurable
def chat_task(
    name: str = gin.REQUIRED,
    data: Mapping[str, str | Sequence[str]] = gin.REQUIRED,
    vocabulary: str = gin.REQUIRED,
    file_format: str | None = None,
    field_map: Mapping[str, str] | None = None,
    default_language: str | None = None,
    strict: bool = False,
    prompts: bool = False,
) -> str:
  """`tasks.register_chat_task` for gin, with the vocabulary's folder (e.g. an imported
  MODEL_DIR): registers the task and returns its name (`MIXTURE_OR_TASK_NAME = @chat_task()`)."""
  tasks.register_chat_task(name, data, get_vocabulary(vocabulary), file_format=file_format,
                           field_map=field_map, default_language=default_language,
                           strict=strict, prompts=prompts)
  return name
