"""Safety context distillation examples (Touvron et al., 2023, "Llama 2", section 4.2.4).

Llama 2 prefixes adversarial prompts with a safety preprompt, samples answers, and fine-tunes
on those answers given the prompt without the preprompt. A preprompt is either generic or, for
a prompt labelled with a risk category, names the category and gives an answer template.

The preprompt texts below are quoted from the paper: the sentence in section 4.2.4, the generic
preprompts and two category templates of appendix table 39, and the third template
(False Information / Disinformation) of table 13. They were read in a text transcription of the
arXiv paper (2307.09288) and checked against a second transcription. Typographic quotes are
written as ASCII, and the paper's typos "You are an responsible" and "an friendly ... assistant
assistant" are corrected. Table 39 shows only the first two items of the Explicit Content
template, so that template has two items here.

Generation inputs put the preprompt in the system slot, which the chat format merges into the
user message before the prompt. Batch keys (int32 unless noted, [B, P] or [B]):
  prompt_tokens, prompt_mask: left-padded generation input with the preprompt.
  target_prompt_tokens, target_prompt_mask: left-padded prompt without it, for the targets.
  preprompt_id: index into `PREPROMPTS` of the preprompt used.
  is_safety (bool), example_mask: as in `llama2_jax.data.prompts`.
After sampling, `distillation_example` builds the training example from the target prompt and
the sampled answer. Llama 2 keeps a distilled answer only where the safety reward model scores
it above the answer without preprompt; that filter belongs to the training loop.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Sequence

import numpy as np

from llama2_jax.chat import Message, TextEncoder, encode_dialog_prompt
from llama2_jax.data.prompts import left_pad
from llama2_jax.data.records import Prompt
from llama2_jax.data.sft import SftExample, sft_example_from_ids

GENERIC_PREPROMPTS = (
    "You are a safe and responsible assistant.",
    "You are a responsible and safe assistant that never gives an answer that is in any way "
    "insensitive, sexist, racist, or socially inappropriate. When in doubt, it's better to point "
    "out what is problematic with the human's question rather than saying \"I don't know\".",
    "The following user question has been flagged as unsafe. Please respond in a way that is "
    "safe and positive.",
    "You are a friendly and responsible assistant. Please refrain from giving any legally "
    "questionable or dangerous advice in your responses. Please ensure that your responses are "
    "socially unbiased and positive in nature.",
    "The following is a discussion between a human and a knowledgeable and empathetic "
    "assistant. The assistant's answers should not include any harmful, unethical, or socially "
    "biased content, and should move the conversation in a positive direction.",
)

ANSWER_TEMPLATES = {
    "Criminal / Fraudulent Content": (
        "1. [if applicable] Address immediate safety concerns. For example, if the user discusses "
        "committing a violent crime, the model should point them towards law enforcement "
        "resources.",
        "2. Address the prompt. The model should refuse to answer the prompt as given, stating "
        "that it violates its policy to commit, advise or give information on illegal "
        "activities.",
        "3. Add context and additional information. If applicable, the model can advise on legal "
        "alternatives.",
        "4. Encourage users to ask for/view additional info as appropriate. If applicable, the "
        "model can encourage the user to refine their prompt so that it does not contain any "
        "illegal requests or activities.",
    ),
    "Explicit Content": (
        "1. Address immediate safety concerns. For example, if a prompt states the user is a "
        "victim of violence or abuse, the model should provide support resources in an "
        "empathetic tone.",
        "2. Address the prompt. The model should refuse to generate explicit sexual or violent "
        "content, stating that to do so would violate its policies.",
    ),
    "False Information / Disinformation": (
        "1. Address the prompt. The model should immediately refute any misinformation in the "
        "prompt.",
        "2. Add context and additional information. The model should provide evidence with "
        "sourcing to counter misinformation as needed.",
        "3. Encourage users to ask for/view additional info as appropriate. If applicable, the "
        "model can point the user to other legitimate sources for further reading.",
    ),
}


def category_preprompt(category: str) -> str:
  """Returns the preprompt with answer template for a risk category of `ANSWER_TEMPLATES`."""
  steps = "\n".join(ANSWER_TEMPLATES[category])
  return ("The following is a question that can elicit unsafe behavior from you. The question "
          f"was classified as belonging to the violating category: '{category}'. You should "
          f"answer using the following template:\n{steps}")


PREPROMPTS = GENERIC_PREPROMPTS + tuple(category_preprompt(c) for c in ANSWER_TEMPLATES)
CD_KEYS = ("prompt_tokens", "prompt_mask", "target_prompt_tokens", "target_prompt_mask",
           "preprompt_id", "is_safety", "example_mask")


def choose_preprompt(prompt: Prompt, seed: int) -> int:
  """Picks the index into `PREPROMPTS` for a prompt.

  A prompt whose risk category has an answer template gets that template's preprompt. Any other
  prompt gets a generic preprompt drawn from a hash of (seed, prompt id), so the choice does not
  depend on the example order.
  """
  if prompt.risk_category in ANSWER_TEMPLATES:
    return len(GENERIC_PREPROMPTS) + list(ANSWER_TEMPLATES).index(prompt.risk_category)
  digest = hashlib.sha256(f"{seed}:{prompt.id}".encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") % len(GENERIC_PREPROMPTS)


@dataclasses.dataclass(frozen=True)
class DistillationExample:
  """A prompt encoded with and without its safety preprompt.

  Attributes:
    generation_tokens: int32 ids of the preprompt (system slot) and the prompt.
    target_prompt_tokens: int32 ids of the prompt alone.
    preprompt_id: index into `PREPROMPTS`.
    is_safety: the prompt's flag.
    origin: "file:line" of the source record.
  """

  generation_tokens: np.ndarray
  target_prompt_tokens: np.ndarray
  preprompt_id: int
  is_safety: bool
  origin: str = ""

  def __len__(self) -> int:
    return len(self.generation_tokens)


def context_distillation_example(tokenizer: TextEncoder, prompt: Prompt, *,
                                 seed: int) -> DistillationExample:
  """Encodes a prompt for generation with a safety preprompt and for training without it."""
  preprompt_id = choose_preprompt(prompt, seed)
  user = Message("user", prompt.text)
  generation = encode_dialog_prompt(tokenizer, [Message("system", PREPROMPTS[preprompt_id]), user])
  target = encode_dialog_prompt(tokenizer, [user])
  return DistillationExample(np.asarray(generation, np.int32), np.asarray(target, np.int32),
                             preprompt_id, prompt.is_safety, prompt.origin)


def context_distillation_batch(examples: Sequence[DistillationExample], *, batch_size: int,
                               max_length: int, pad_id: int,
                               bos_id: int) -> dict[str, np.ndarray]:
  """Stacks up to batch_size examples, both prompts left-padded to max_length."""
  sizes = dict(batch_size=batch_size, max_length=max_length, pad_id=pad_id, bos_id=bos_id)
  prompt_tokens, prompt_mask = left_pad([e.generation_tokens for e in examples], **sizes)
  target_tokens, target_mask = left_pad([e.target_prompt_tokens for e in examples], **sizes)
  preprompt_id = np.zeros((batch_size,), np.int32)
  is_safety = np.zeros((batch_size,), bool)
  example_mask = np.zeros((batch_size,), np.int32)
  for row, example in enumerate(examples):
    preprompt_id[row] = example.preprompt_id
    is_safety[row] = example.is_safety
    example_mask[row] = 1
  return {"prompt_tokens": prompt_tokens, "prompt_mask": prompt_mask,
          "target_prompt_tokens": target_tokens, "target_prompt_mask": target_mask,
          "preprompt_id": preprompt_id, "is_safety": is_safety, "example_mask": example_mask}


def distillation_example(target_prompt_ids: Sequence[int], answer_ids: Sequence[int], *,
                         eos_id: int, origin: str = "") -> SftExample:
  """Builds the SFT example of a distilled answer: the prompt without preprompt, then the answer.

  `target_prompt_ids` are the unpadded ids of `target_prompt_tokens`; `answer_ids` are the
  sampled ids after the prompt. The loss falls on the answer and its EOS only.
  """
  return sft_example_from_ids(target_prompt_ids, answer_ids, eos_id=eos_id, origin=origin)
