"""Frozen, validated settings of the pipeline, converted once from the experiment's ConfigDict.

Every section of the ConfigDict becomes one dataclass here. Unknown or missing keys raise an error
that names the section and lists the valid keys, and each dataclass checks its values, so a bad
override fails before any work starts. Library code reads these dataclasses, never the ConfigDict.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from llama2_jax.config import ModelConfig, get_model_config
from llama2_jax.data.sources import SourceFile

USER_DATASETS = ("sft_dialogues", "helpfulness_pairs", "safety_pairs", "rl_prompts")


def _require(section: str, name: str, valid: bool, value: Any, rule: str) -> None:
  if not valid:
    raise ValueError(f"config.{section}.{name} is {value!r}; it must be {rule}.")


def _positive(section: str, obj, *names: str) -> None:
  for name in names:
    value = getattr(obj, name)
    _require(section, name, isinstance(value, int) and value > 0, value, "a positive integer")


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """One training stage: pretraining, SFT, a reward model or rejection-sampling fine-tuning."""

  steps: int
  batch_size: int
  max_length: int
  learning_rate: float
  warmup_steps: int
  num_microbatches: int = 1
  packing: bool = False
  section: str = "train"

  def __post_init__(self):
    _positive(self.section, self, "steps", "batch_size", "max_length", "num_microbatches")
    _require(self.section, "learning_rate", self.learning_rate >= 0, self.learning_rate, ">= 0")
    _require(self.section, "warmup_steps", 0 <= self.warmup_steps < self.steps,
             self.warmup_steps, f"in [0, steps={self.steps})")
    _require(self.section, "batch_size", self.batch_size % self.num_microbatches == 0,
             self.batch_size, f"a multiple of num_microbatches={self.num_microbatches}")


@dataclasses.dataclass(frozen=True)
class RewardSettings:
  """Both reward models: training settings and the rating margin preset."""

  train: TrainSettings
  margin: str
  eval_pairs: int

  def __post_init__(self):
    _require("reward", "margin", self.margin in ("none", "small", "large"), self.margin,
             'one of "none", "small", "large"')
    _positive("reward", self, "eval_pairs")


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
  """Sampling settings of one stage."""

  temperature: float
  top_p: float
  max_prompt_length: int
  max_new_tokens: int
  section: str = "sampling"

  def __post_init__(self):
    _require(self.section, "temperature", self.temperature >= 0, self.temperature, ">= 0")
    _require(self.section, "top_p", 0 < self.top_p <= 1, self.top_p, "in (0, 1]")
    _positive(self.section, self, "max_prompt_length", "max_new_tokens")


@dataclasses.dataclass(frozen=True)
class RejectionSamplingSettings:
  """Best-of-K sampling over RL prompts, then fine-tuning on the best samples."""

  num_prompts: int
  num_samples: int
  prompt_batch_size: int
  sampling: SamplingSettings
  finetune: TrainSettings

  def __post_init__(self):
    _positive("rejection_sampling", self, "num_prompts", "num_samples", "prompt_batch_size")


@dataclasses.dataclass(frozen=True)
class PPOSettings:
  """PPO iterations: each samples a rollout of `rollout_size` prompts and updates on it."""

  iterations: int
  rollout_size: int
  minibatch_size: int
  epochs: int
  learning_rate: float
  value_learning_rate: float
  kl_coef: float
  kl_estimator: str
  gamma: float
  lam: float
  clip_epsilon: float
  value_clip_epsilon: float
  entropy_coef: float
  safety_threshold: float
  sampling: SamplingSettings

  def __post_init__(self):
    _positive("ppo", self, "iterations", "rollout_size", "minibatch_size", "epochs")
    _require("ppo", "minibatch_size", self.rollout_size % self.minibatch_size == 0,
             self.minibatch_size, f"a divisor of rollout_size={self.rollout_size}")
    for name in ("learning_rate", "value_learning_rate", "kl_coef", "entropy_coef"):
      _require("ppo", name, getattr(self, name) >= 0, getattr(self, name), ">= 0")
    _require("ppo", "kl_estimator", self.kl_estimator in ("k1", "k3"), self.kl_estimator,
             'one of "k1", "k3"')
    _require("ppo", "clip_epsilon", 0 < self.clip_epsilon < 1, self.clip_epsilon, "in (0, 1)")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """Held-out evaluation of the policies and reward models."""

  num_prompts: int
  num_safe_borderline_prompts: int
  best_of_k: int
  temperatures: tuple[float, ...]
  samples_per_temperature: int
  answers_in_report: int
  sampling: SamplingSettings

  def __post_init__(self):
    _positive("eval", self, "num_prompts", "num_safe_borderline_prompts", "best_of_k",
              "samples_per_temperature")
    _require("eval", "temperatures", len(self.temperatures) > 0
             and all(t >= 0 for t in self.temperatures), self.temperatures,
             "a non-empty list of temperatures >= 0")


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
  """AdamW settings shared by every stage; learning rates and schedules are per stage."""

  b1: float
  b2: float
  eps: float
  weight_decay: float
  max_grad_norm: float
  final_learning_rate_fraction: float

  def __post_init__(self):
    for name in ("b1", "b2"):
      _require("optim", name, 0 <= getattr(self, name) < 1, getattr(self, name), "in [0, 1)")
    for name in ("eps", "max_grad_norm"):
      _require("optim", name, getattr(self, name) > 0, getattr(self, name), "> 0")
    _require("optim", "weight_decay", self.weight_decay >= 0, self.weight_decay, ">= 0")
    _require("optim", "final_learning_rate_fraction",
             0 <= self.final_learning_rate_fraction <= 1, self.final_learning_rate_fraction,
             "in [0, 1]")


def parse_sources(dataset: str, text: str) -> tuple[SourceFile, ...]:
  """Parses "format:path[:safety]" entries separated by commas into `SourceFile`s."""
  sources = []
  for entry in filter(None, (part.strip() for part in text.split(","))):
    fields = entry.split(":")
    is_safety = len(fields) > 2 and fields[-1] == "safety"
    if is_safety:
      fields = fields[:-1]
    if len(fields) < 2 or not fields[0] or not fields[1]:
      raise ValueError(
          f"config.data.{dataset} entry {entry!r} is invalid; write \"format:path\" (for "
          "example \"jsonl:/data/mine.jsonl\"), with \":safety\" at the end for safety prompts.")
    sources.append(SourceFile(format=fields[0], path=":".join(fields[1:]), is_safety=is_safety))
  return tuple(sources)


@dataclasses.dataclass(frozen=True)
class PipelineSettings:
  """The whole run."""

  seed: int
  model: ModelConfig
  init_from: str
  init_format: str
  tokenizer: str
  data_dir: str
  data_sources: Mapping[str, tuple[SourceFile, ...]]
  optim: OptimizerSettings
  mesh: Mapping[str, int]
  distributed: Mapping[str, Any]
  checkpoint_every: int
  keep_checkpoints: int
  log_every: int
  rlhf_rounds: int
  pretrain: TrainSettings | None
  sft: TrainSettings
  reward: RewardSettings
  rejection_sampling: RejectionSamplingSettings
  ppo: PPOSettings
  eval: EvalSettings

  def __post_init__(self):
    _positive("log", self, "checkpoint_every", "keep_checkpoints", "log_every")
    if not (isinstance(self.rlhf_rounds, int) and self.rlhf_rounds > 0):
      raise ValueError(f"config.rlhf_rounds is {self.rlhf_rounds!r}; it must be a positive "
                       "integer.")


def _section(config, name: str, cls, **extra):
  """Builds `cls` from a ConfigDict section, naming the section on a missing or unknown key."""
  values = dict(config[name]) if not isinstance(config[name], dict) else dict(config[name])
  fields = [f.name for f in dataclasses.fields(cls) if f.name not in extra and f.name != "section"]
  unknown = sorted(set(values) - set(fields))
  missing = sorted(set(fields) - set(values))
  if unknown or missing:
    raise ValueError(f"config.{name}: unknown keys {unknown}, missing keys {missing}; valid keys "
                     f"are {fields}.")
  if "section" in {f.name for f in dataclasses.fields(cls)}:
    extra["section"] = name
  return cls(**values, **extra)


def _train(config, name: str) -> TrainSettings:
  return _section(config, name, TrainSettings)


def _sampling(config, name: str) -> SamplingSettings:
  return _section(config, name, SamplingSettings)


def settings_from_config(config, vocab_size: int) -> PipelineSettings:
  """Converts the experiment ConfigDict into `PipelineSettings`.

  Args:
    config: the ConfigDict of `experiments/configs/pipeline.py`.
    vocab_size: the tokenizer's vocabulary size, which sets the model's when `config.model` does
      not fix it (vocab_size 0).
  """
  model_section = config.model
  overrides = {key: model_section[key] for key in ("dtype", "param_dtype", "remat",
                                                    "max_seq_len")}
  overrides["vocab_size"] = model_section.vocab_size or vocab_size
  model = get_model_config(model_section.preset, **overrides)
  reward = config.reward
  rs = config.rejection_sampling
  ppo = config.ppo
  evaluation = config.eval
  return PipelineSettings(
      seed=config.seed, model=model, init_from=config.init_from, init_format=config.init_format,
      tokenizer=config.data.tokenizer, data_dir=config.data.data_dir,
      data_sources={name: parse_sources(name, config.data[name]) for name in USER_DATASETS
                    if config.data[name]},
      optim=_section(config, "optim", OptimizerSettings), mesh=dict(config.mesh),
      distributed=dict(config.distributed), checkpoint_every=config.log.checkpoint_every,
      keep_checkpoints=config.log.keep_checkpoints, log_every=config.log.log_every,
      rlhf_rounds=config.rlhf_rounds,
      pretrain=None if config.init_from else _train(config, "pretrain"),
      sft=_train(config, "sft"),
      reward=RewardSettings(train=_train(reward, "train"), margin=reward.margin,
                            eval_pairs=reward.eval_pairs),
      rejection_sampling=RejectionSamplingSettings(
          num_prompts=rs.num_prompts, num_samples=rs.num_samples,
          prompt_batch_size=rs.prompt_batch_size, sampling=_sampling(rs, "sampling"),
          finetune=_train(rs, "finetune")),
      ppo=PPOSettings(**{key: ppo[key] for key in ppo if key != "sampling"},
                      sampling=_sampling(ppo, "sampling")),
      eval=EvalSettings(**{key: (tuple(evaluation[key]) if key == "temperatures"
                                 else evaluation[key]) for key in evaluation if key != "sampling"},
                        sampling=_sampling(evaluation, "sampling")))
