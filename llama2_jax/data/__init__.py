"""Data for every stage of the Llama 2-Chat pipeline: datasets, batches and iterators.

Typical use:

  tokenizer = llama2_jax.tokenizer.Tokenizer()            # the shipped 4,096-piece model
  dataset = DatasetConfig(name="sft_dialogues", data_dir="/tmp/llama2_jax_data")
  batches = BatchConfig(batch_size=8, max_length=512, packing=True)
  iterator = BatchIterator(load(dataset, "train"), SftBatcher(tokenizer, batches), batches)
  batch = next(iterator)             # numpy dict: tokens, targets, loss_mask, ...
  state = iterator.get_state()       # dict of ints, saved with the training state

Modules: `config` (frozen dataclasses), `sources` (file formats and shipped defaults), the
readers `hh_rlhf`, `oasst`, `self_instruct`, `prompt_sets`, `jsonl_formats`, `splits`,
`builders` (tfds), the example and batch builders `sft`, `pairs`, `prompts`,
`context_distillation`, `batchers`, and `iterators`.
"""

from llama2_jax.data.batchers import (ContextDistillationBatcher, PromptBatcher, RewardBatcher,
                                      SftBatcher)
from llama2_jax.data.builders import load, prepare
from llama2_jax.data.config import BatchConfig, DatasetConfig
from llama2_jax.data.errors import BadRecordHandler, DataError
from llama2_jax.data.iterators import BatchIterator
from llama2_jax.data.records import (RATING_NAMES, Dialogue, PreferencePair, Prompt,
                                     TruthfulQAQuestion, XSTestPrompt)
from llama2_jax.data.sources import SourceFile
