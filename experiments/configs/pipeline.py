"""The Llama 2-Chat pipeline: pretrain (or import), SFT, two reward models, rejection sampling, PPO.

Launch the CPU default (about 13 minutes on 2 idle cores) and its smoke-test variant (about 1):

  python -m experiments.run_pipeline --config=experiments/configs/pipeline.py --workdir=/tmp/l2j
  python -m experiments.run_pipeline --config=experiments/configs/pipeline.py:quick \
      --workdir=/tmp/l2j_quick

Paper-scale recipes (hyper-parameters of Touvron et al., 2023, sections 3.1 to 3.2.3) build and
validate here, but need Meta or Hugging Face weights (`--config.init_from`) and a pod:

  python -m experiments.run_pipeline --config=experiments/configs/pipeline.py:7b \
      --config.init_from=/shared/llama-2-7b \
      --config.data.tokenizer=/shared/llama-2-7b/tokenizer.model --config.mesh.fsdp=-1 \
      --workdir=/shared/runs/7b

The work directory must be a path every host can write (a shared mount); see docs/pod.md. Any
field can be overridden, e.g. `--config.sft.learning_rate=1e-4`. The config is locked, so a
misspelt key fails and names the key it most resembles.
"""

import ml_collections

VARIANTS = ("tiny", "quick", "7b", "13b", "70b")


def _train(steps, batch_size, max_length, learning_rate, warmup_steps, num_microbatches=1,
           packing=False):
  return ml_collections.ConfigDict(dict(
      steps=steps,                        # optimizer steps of the stage
      batch_size=batch_size,              # rows per optimizer step, over all hosts
      max_length=max_length,              # tokens per row
      learning_rate=learning_rate,        # peak learning rate (cosine decay to 10%)
      warmup_steps=warmup_steps,          # linear warm-up steps from 0
      num_microbatches=num_microbatches,  # gradient accumulation: micro-batches per step
      packing=packing,                    # pack several examples per row (segment ids)
  ))


def _sampling(temperature, top_p, max_prompt_length, max_new_tokens):
  return ml_collections.ConfigDict(dict(
      temperature=temperature,              # 0 is greedy
      top_p=top_p,                          # nucleus threshold; 1 disables it
      max_prompt_length=max_prompt_length,  # prompts are left-padded to this many tokens
      max_new_tokens=max_new_tokens,        # length limit of each response
  ))


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  """Returns the pipeline config of a variant in `VARIANTS`."""
  variant = variant or "tiny"
  if variant not in VARIANTS:
    raise ValueError(f"Unknown pipeline variant {variant!r}; expected one of {VARIANTS}.")
  c = ml_collections.ConfigDict()
  c.seed = 0                       # seeds initialisation, data order and sampling
  c.init_from = ""                 # Meta or Hugging Face checkpoint dir; empty: pretrain first
  c.init_format = ""               # "meta", "hf" or "orbax"; empty: detect from the files
  c.rlhf_rounds = 1                # rounds of rejection sampling then PPO, each from the last
  c.data = ml_collections.ConfigDict(dict(
      tokenizer="",                # sentencepiece model; empty: the shipped 4,096-piece model
      data_dir="",                 # where tfds writes prepared data; empty: <workdir>/data
      # Your own files per dataset, replacing the shipped subset: "format:path" entries separated
      # by commas, with ":safety" at the end to mark a prompt file as safety prompts. Formats are
      # in docs/data.md, e.g. "jsonl:/data/my_dialogues.jsonl,oasst1:/data/oasst.jsonl.gz".
      sft_dialogues="",
      helpfulness_pairs="",
      safety_pairs="",
      rl_prompts="",
  ))
  c.optim = ml_collections.ConfigDict(dict(
      b1=0.9,                      # AdamW first-moment decay (Llama 2: 0.9)
      b2=0.95,                     # AdamW second-moment decay (Llama 2: 0.95)
      eps=1e-5,                    # AdamW epsilon (Llama 2: 1e-5)
      weight_decay=0.1,            # decoupled weight decay (Llama 2: 0.1)
      max_grad_norm=1.0,           # global-norm gradient clipping (Llama 2: 1.0)
      final_learning_rate_fraction=0.1,  # cosine decay ends at this fraction of the peak
  ))

  c.model = ml_collections.ConfigDict(dict(
      preset="tiny",               # a key of llama2_jax.config.PRESETS
      vocab_size=0,                # 0: the tokenizer's vocabulary size
      max_seq_len=512,             # context length
      dtype="float32",             # compute dtype
      param_dtype="float32",       # parameter dtype
      remat="none",                # "none", "full" or "dots" rematerialisation per block
  ))
  c.mesh = ml_collections.ConfigDict(dict(
      data=1,                      # data-parallel axis size
      fsdp=-1,                     # fully sharded axis size; -1 takes the remaining devices
      tensor=1,                    # tensor-parallel axis size
  ))
  c.distributed = ml_collections.ConfigDict(dict(
      enabled=False,               # call jax.distributed.initialize (multi-host pods)
      coordinator_address="",      # host:port of process 0; empty lets JAX detect it
      num_processes=0,             # 0 lets JAX detect it
      process_id=-1,               # -1 lets JAX detect it
  ))
  c.log = ml_collections.ConfigDict(dict(
      log_every=10,                # steps between metric records
      checkpoint_every=50,         # steps between checkpoints of a stage
      keep_checkpoints=2,          # newest checkpoints kept per stage
  ))

  c.pretrain = _train(steps=300, batch_size=8, max_length=256, learning_rate=3e-3,
                      warmup_steps=20, packing=True)
  c.sft = _train(steps=100, batch_size=8, max_length=256, learning_rate=1e-3, warmup_steps=10,
                 packing=True)
  c.reward = ml_collections.ConfigDict()
  c.reward.train = _train(steps=80, batch_size=8, max_length=256, learning_rate=5e-4,
                          warmup_steps=5)
  c.reward.margin = "small"        # rating margin preset: "none", "small" or "large"
  c.reward.eval_pairs = 192        # held-out pairs for reward-model accuracy
  c.rejection_sampling = ml_collections.ConfigDict()
  c.rejection_sampling.num_prompts = 96         # RL prompts sampled in the round
  c.rejection_sampling.num_samples = 4          # K samples per prompt
  c.rejection_sampling.prompt_batch_size = 32   # prompts per sampling call
  c.rejection_sampling.sampling = _sampling(temperature=1.0, top_p=1.0, max_prompt_length=96,
                                            max_new_tokens=64)
  c.rejection_sampling.finetune = _train(steps=30, batch_size=8, max_length=160,
                                         learning_rate=3e-4, warmup_steps=4)
  c.ppo = ml_collections.ConfigDict(dict(
      iterations=16,               # rollouts; each is followed by `epochs` passes over it
      rollout_size=16,             # prompts per rollout
      minibatch_size=8,            # rows per PPO update
      epochs=2,                    # passes over each rollout
      learning_rate=2e-5,          # policy learning rate, constant
      value_learning_rate=1e-4,    # value-model learning rate, constant
      kl_coef=0.01,                # beta of the KL penalty in the reward
      kl_estimator="k1",           # "k1" or "k3"
      gamma=1.0,                   # discount
      lam=0.95,                    # GAE lambda
      clip_epsilon=0.2,            # ratio clipping
      value_clip_epsilon=0.2,      # value clipping, in reward units
      entropy_coef=0.0,            # entropy bonus weight
      safety_threshold=0.15,       # use the safety score when sigmoid(score) is below this
  ))
  c.ppo.sampling = _sampling(temperature=1.0, top_p=1.0, max_prompt_length=96,
                             max_new_tokens=64)
  c.eval = ml_collections.ConfigDict(dict(
      num_prompts=64,                        # held-out RL prompts scored per policy
      num_safe_borderline_prompts=64,        # XSTest safe prompts for false refusals
      best_of_k=8,                           # largest K of the best-of-K curve
      temperatures=[0.0, 0.7, 1.0, 1.3],     # Self-BLEU against temperature
      samples_per_temperature=16,            # samples per temperature for Self-BLEU
      answers_in_report=4,                   # sampled answers shown per policy
  ))
  c.eval.sampling = _sampling(temperature=0.7, top_p=0.9, max_prompt_length=96,
                              max_new_tokens=64)

  if variant == "quick":
    _make_quick(c)
  elif variant in ("7b", "13b", "70b"):
    _make_paper_scale(c, variant)
  c.lock()
  return c


def _make_quick(c):
  """Shrinks everything so the whole pipeline runs in about 3 minutes (smoke tests)."""
  c.model.preset = "test_gqa"
  c.model.max_seq_len = 128
  c.log.checkpoint_every = 5
  for section in (c.pretrain, c.sft, c.reward.train, c.rejection_sampling.finetune):
    section.steps, section.batch_size, section.max_length = 6, 4, 96
    section.warmup_steps = 1
  c.reward.eval_pairs = 16
  c.rejection_sampling.num_prompts = 8
  c.rejection_sampling.num_samples = 2
  c.rejection_sampling.prompt_batch_size = 8
  for sampling in (c.rejection_sampling.sampling, c.ppo.sampling, c.eval.sampling):
    sampling.max_prompt_length, sampling.max_new_tokens = 48, 12
  c.ppo.iterations, c.ppo.rollout_size, c.ppo.minibatch_size, c.ppo.epochs = 2, 4, 2, 1
  c.eval.num_prompts = 8
  c.eval.num_safe_borderline_prompts = 8
  c.eval.best_of_k = 2
  c.eval.temperatures = [0.0, 1.0]
  c.eval.samples_per_temperature = 4
  c.eval.answers_in_report = 2


def _make_paper_scale(c, variant):
  """Llama 2-Chat hyper-parameters (Touvron et al., 2023, sections 3.1 and 3.2).

  NOTE: the values below were written from the paper's text as recalled, not re-checked against
  a copy of the paper in this repository; check them before a paper-scale run.
  """
  c.model.preset = f"llama2_{variant}"
  c.model.max_seq_len = 4096
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  c.log.checkpoint_every = 200

  # SFT: batch 64, sequence length 4096, lr 2e-5, weight decay 0.1, 2 epochs (section 3.1).
  c.sft = _train(steps=1700, batch_size=64, max_length=4096, learning_rate=2e-5,
                 warmup_steps=50, num_microbatches=8, packing=True)

  # Reward models: one epoch, batch 512 pairs, lr 5e-6 for 70B and 1e-5 otherwise, 3% warm-up.
  reward_lr = 5e-6 if variant == "70b" else 1e-5
  c.reward.train = _train(steps=2000, batch_size=512, max_length=4096, learning_rate=reward_lr,
                          warmup_steps=60, num_microbatches=64)
  c.reward.eval_pairs = 4096

  # PPO: batch 512, minibatch 64, one gradient step per minibatch, lr 1e-6, clip 0.2,
  # beta 0.01 (7B, 13B) or 0.005 (34B, 70B), 200 to 400 iterations.
  c.ppo.iterations = 200
  c.ppo.rollout_size = 512
  c.ppo.minibatch_size = 64
  c.ppo.epochs = 1
  c.ppo.learning_rate = 1e-6
  c.ppo.value_learning_rate = 1e-6
  c.ppo.kl_coef = 0.005 if variant == "70b" else 0.01

  for sampling in (c.rejection_sampling.sampling, c.ppo.sampling, c.eval.sampling):
    sampling.max_prompt_length, sampling.max_new_tokens = 1024, 1024

  c.rejection_sampling.num_prompts = 10000
  c.rejection_sampling.num_samples = 10
  c.rejection_sampling.prompt_batch_size = 64
  c.rejection_sampling.finetune = _train(steps=1000, batch_size=64, max_length=2048,
                                         learning_rate=2e-5, warmup_steps=30,
                                         num_microbatches=8)
