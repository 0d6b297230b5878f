"""Tests of checkpoint import and export (Meta, Hugging Face, orbax) and their command lines."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama2_jax import _atomic
from llama2_jax import checkpoint_io
from llama2_jax import convert
from llama2_jax import generate
from llama2_jax import hf_io
from llama2_jax import meta_io
from llama2_jax import param_layout
from llama2_jax.config import get_model_config
from llama2_jax.model import Llama

torch = pytest.importorskip("torch")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# Axis along which each rank of Meta's reference (fairscale model parallelism) stores a slice:
# ColumnParallelLinear splits dim 0 of the torch weight, RowParallelLinear and ParallelEmbedding
# dim 1; norms are replicated (None). Written out here, independently of meta_io.shard_axis.
_META_SPLIT_AXES = {
    "attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0,
    "attention.wo.weight": 1, "feed_forward.w1.weight": 0, "feed_forward.w2.weight": 1,
    "feed_forward.w3.weight": 0, "attention_norm.weight": None, "ffn_norm.weight": None,
    "tok_embeddings.weight": 1, "norm.weight": None, "output.weight": 0, "rope.freqs": None,
}


def _random_meta_tensors(config, seed=0):
  """Returns full (unsplit) float32 tensors named and shaped as in Meta's checkpoints."""
  rng = np.random.RandomState(seed)
  D, F, V = config.dim, config.hidden_dim, config.vocab_size
  q_rows, kv_rows = config.n_heads * config.head_dim, config.kv_heads * config.head_dim

  def normal(*shape):
    return (rng.standard_normal(shape) * shape[-1] ** -0.5).astype(np.float32)

  def scale(dim):
    return (1.0 + 0.2 * rng.standard_normal(dim)).astype(np.float32)

  tensors = {"tok_embeddings.weight": rng.standard_normal((V, D)).astype(np.float32),
             "norm.weight": scale(D), "output.weight": normal(V, D),
             # A buffer that some Meta checkpoints contain and the import ignores.
             "rope.freqs": np.ones(config.head_dim // 2, np.float32)}
  for layer in range(config.n_layers):
    prefix = f"layers.{layer}."
    tensors.update({
        prefix + "attention.wq.weight": normal(q_rows, D),
        prefix + "attention.wk.weight": normal(kv_rows, D),
        prefix + "attention.wv.weight": normal(kv_rows, D),
        prefix + "attention.wo.weight": normal(D, q_rows),
        prefix + "feed_forward.w1.weight": normal(F, D),
        prefix + "feed_forward.w2.weight": normal(D, F),
        prefix + "feed_forward.w3.weight": normal(F, D),
        prefix + "attention_norm.weight": scale(D),
        prefix + "ffn_norm.weight": scale(D),
    })
  return tensors


def _random_params(config):
  """Returns a random parameter tree without compiling the model's init."""
  tensors = _random_meta_tensors(config)
  dtype = param_layout.numpy_dtype(config.param_dtype)
  return param_layout.params_from_meta(tensors.__getitem__, config, dtype)


def _write_meta_checkpoint(directory, config, tensors, n_shards, torch_dtype=torch.float32):
  directory.mkdir(parents=True, exist_ok=True)
  for rank in range(n_shards):
    shard = {}
    for name, full in tensors.items():
      axis = _META_SPLIT_AXES[name.split(".", 2)[-1] if name.startswith("layers.") else name]
      piece = full if axis is None else np.split(full, n_shards, axis=axis)[rank]
      shard[name] = torch.from_numpy(piece.copy()).to(torch_dtype)
    torch.save(shard, directory / f"consolidated.{rank:02d}.pth")
  # Llama 2's params.json gives vocab_size -1; the vocabulary comes from the embedding.
  params = {"dim": config.dim, "multiple_of": config.multiple_of, "n_heads": config.n_heads,
            "n_layers": config.n_layers, "norm_eps": config.norm_eps, "vocab_size": -1}
  if config.n_kv_heads is not None:
    params["n_kv_heads"] = config.n_kv_heads
  (directory / "params.json").write_text(json.dumps(params))
  return directory


def _rms_norm(x, weight, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def _rotate_complex(x_BxLxHxDh, theta):
  """Meta's apply_rotary_emb: adjacent pairs as complex numbers times exp(i * pos * freq)."""
  B, L, H, Dh = x_BxLxHxDh.shape
  frequencies = 1.0 / theta ** (np.arange(0, Dh, 2)[: Dh // 2] / Dh)
  cis_LxR = np.exp(1j * np.outer(np.arange(L), frequencies))
  pairs = x_BxLxHxDh.reshape(B, L, H, Dh // 2, 2)
  rotated = (pairs[..., 0] + 1j * pairs[..., 1]) * cis_LxR[None, :, None, :]
  return np.stack([rotated.real, rotated.imag], axis=-1).reshape(B, L, H, Dh)


def _meta_forward(tensors, config, tokens_BxL):
  """Logits [B, L, V] of Meta's reference model, in float64 numpy, without padding."""
  t = {name: value.astype(np.float64) for name, value in tensors.items()}
  B, L = tokens_BxL.shape
  H, K, Dh, eps = config.n_heads, config.kv_heads, config.head_dim, config.norm_eps
  causal_LxL = np.triu(np.full((L, L), -np.inf), k=1)
  h = t["tok_embeddings.weight"][tokens_BxL]
  for layer in range(config.n_layers):
    w = {name.split(".", 2)[-1]: value for name, value in t.items()
         if name.startswith(f"layers.{layer}.")}
    x = _rms_norm(h, w["attention_norm.weight"], eps)
    q = _rotate_complex((x @ w["attention.wq.weight"].T).reshape(B, L, H, Dh), config.rope_theta)
    k = _rotate_complex((x @ w["attention.wk.weight"].T).reshape(B, L, K, Dh), config.rope_theta)
    v = (x @ w["attention.wv.weight"].T).reshape(B, L, K, Dh)
    # repeat_kv: key/value head j serves query heads j * H / K ... (j + 1) * H / K - 1.
    k, v = np.repeat(k, H // K, axis=2), np.repeat(v, H // K, axis=2)
    scores = np.einsum("blhd,bshd->bhls", q, k) / np.sqrt(Dh) + causal_LxL
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    attention = np.einsum("bhls,bshd->blhd", probs, v).reshape(B, L, H * Dh)
    h = h + attention @ w["attention.wo.weight"].T
    x = _rms_norm(h, w["ffn_norm.weight"], eps)
    gate = x @ w["feed_forward.w1.weight"].T
    h = h + (gate / (1 + np.exp(-gate)) * (x @ w["feed_forward.w3.weight"].T)) @ \
        w["feed_forward.w2.weight"].T
  return _rms_norm(h, t["norm.weight"], eps) @ t["output.weight"].T


def _assert_trees_equal(actual, expected):
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
    assert a.dtype == b.dtype, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  assert jax.tree.structure(actual) == jax.tree.structure(expected)


@pytest.mark.parametrize("preset", ["test_mha", "test_gqa"])
def test_meta_import_matches_numpy_reference(tmp_path, preset):
  config = get_model_config(preset)
  tensors = _random_meta_tensors(config)
  _write_meta_checkpoint(tmp_path, config, tensors, n_shards=2)
  tokens = np.random.RandomState(1).randint(0, config.vocab_size, (2, 9))

  loaded_config, params = meta_io.load_meta(tmp_path)
  logits = np.asarray(Llama(loaded_config).apply(params, jnp.asarray(tokens)))
  expected = _meta_forward(tensors, config, tokens)

  assert loaded_config.max_seq_len == 4096  # Llama 2's; params.json does not state it.
  assert loaded_config.replace(max_seq_len=config.max_seq_len) == config
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_meta_one_and_two_shards_agree(tmp_path):
  config = get_model_config("test_gqa")
  tensors = _random_meta_tensors(config)
  _, single_shard = meta_io.load_meta(
      _write_meta_checkpoint(tmp_path / "single", config, tensors, 1))
  _, two_shards = meta_io.load_meta(_write_meta_checkpoint(tmp_path / "two", config, tensors, 2))
  _assert_trees_equal(two_shards, single_shard)


def _random_hf_model(config, seed=0):
  transformers = pytest.importorskip("transformers")
  hf_config = transformers.LlamaConfig(
      vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.hidden_dim,
      num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
      num_key_value_heads=config.kv_heads, rms_norm_eps=config.norm_eps,
      rope_theta=config.rope_theta, max_position_embeddings=config.max_seq_len,
      tie_word_embeddings=False)
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(hf_config).eval()
  with torch.no_grad():
    for weight in model.parameters():  # Larger than the default init, so errors show.
      weight.normal_(0.0, 0.3)
  return model


@pytest.mark.parametrize("preset", ["test_mha", "test_gqa"])
def test_hf_import_matches_transformers(tmp_path, preset):
  config = get_model_config(preset)
  reference = _random_hf_model(config)
  reference.save_pretrained(tmp_path, max_shard_size="40KB")
  tokens = np.random.RandomState(1).randint(0, config.vocab_size, (2, 9))
  with torch.no_grad():
    expected = reference(torch.tensor(tokens)).logits.numpy()

  loaded_config, params = hf_io.load_hf(tmp_path)
  logits = np.asarray(Llama(loaded_config).apply(params, jnp.asarray(tokens)))

  assert (tmp_path / hf_io.INDEX_FILE).is_file()
  assert loaded_config.replace(multiple_of=config.multiple_of, ffn_hidden_dim=None) == config
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_hf_export_loads_in_transformers(tmp_path):
  transformers = pytest.importorskip("transformers")
  config = get_model_config("test_gqa")
  reference = _random_hf_model(config)
  reference.save_pretrained(tmp_path / "reference")
  loaded_config, params = hf_io.load_hf(tmp_path / "reference")

  hf_io.save_hf(params, loaded_config, tmp_path / "exported", max_shard_bytes=50_000)
  exported = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "exported")

  assert (tmp_path / "exported" / hf_io.INDEX_FILE).is_file()
  assert exported.config.rope_parameters["rope_theta"] == config.rope_theta
  expected_state = reference.state_dict()
  for name, value in exported.state_dict().items():
    assert torch.equal(value, expected_state[name]), name


@pytest.mark.parametrize("torch_dtype", [torch.float32, torch.bfloat16])
def test_meta_to_hf_and_back_bit_exact(tmp_path, torch_dtype):
  config = get_model_config("test_gqa")
  tensors = _random_meta_tensors(config)
  meta_dir = _write_meta_checkpoint(tmp_path / "meta", config, tensors, 2, torch_dtype)
  expected = {name: meta_io._to_numpy(torch.from_numpy(value).to(torch_dtype))
              for name, value in tensors.items() if name != "rope.freqs"}

  meta_config, meta_params = meta_io.load_meta(meta_dir)
  hf_io.save_hf(meta_params, meta_config, tmp_path / "hf", max_shard_bytes=20_000)
  hf_config, hf_params = hf_io.load_hf(tmp_path / "hf")
  round_trip = dict(param_layout.iter_meta_tensors(hf_params, hf_config))

  dtype_name = str(torch_dtype).removeprefix("torch.")
  assert meta_config.param_dtype == dtype_name
  assert hf_config.param_dtype == dtype_name
  assert sorted(round_trip) == sorted(expected)
  for name, value in expected.items():
    assert round_trip[name].dtype == value.dtype, name
    assert round_trip[name].tobytes() == value.tobytes(), name


def test_orbax_round_trip_and_format_detection(tmp_path):
  config = get_model_config("test_gqa", param_dtype="bfloat16")
  params = _random_params(config)

  checkpoint_io.save_orbax(params, config, tmp_path / "orbax")
  loaded_config, loaded = checkpoint_io.load_orbax(tmp_path / "orbax")

  assert loaded_config == config
  _assert_trees_equal(loaded, params)
  assert checkpoint_io.detect_format(tmp_path / "orbax") == "orbax"


def test_orbax_config_mismatch_names_tensor_and_shapes(tmp_path):
  config = get_model_config("test_gqa")  # 2 key/value heads.
  checkpoint_io.save_orbax(_random_params(config), config, tmp_path / "orbax")
  config_path = tmp_path / "orbax" / checkpoint_io.MODEL_CONFIG_FILE
  fields = json.loads(config_path.read_text())
  fields["n_kv_heads"] = 4
  config_path.write_text(json.dumps(fields))

  with pytest.raises(ValueError) as error:
    checkpoint_io.load_orbax(tmp_path / "orbax")
  message = str(error.value)
  assert "['params']['layers']['attention']['wk']" in message
  assert "(2, 64, 2, 16)" in message
  assert "(2, 64, 4, 16)" in message


def test_orbax_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"model_config.json not found"):
    checkpoint_io.load_orbax(tmp_path)


def test_load_checkpoint_unknown_format(tmp_path):
  with pytest.raises(ValueError, match=r"Unknown checkpoint format 'gguf'"):
    checkpoint_io.load_checkpoint(tmp_path, "gguf")
  with pytest.raises(ValueError, match=r"Cannot tell the format of"):
    checkpoint_io.detect_format(tmp_path)


def test_meta_missing_params_json(tmp_path):
  with pytest.raises(FileNotFoundError, match="params.json not found"):
    meta_io.load_meta(tmp_path)


def test_meta_missing_shards(tmp_path):
  config = get_model_config("test_mha")
  _write_meta_checkpoint(tmp_path, config, _random_meta_tensors(config), 2)
  (tmp_path / "consolidated.00.pth").unlink()
  with pytest.raises(FileNotFoundError, match=r"lacks the shards of ranks \[0\]"):
    meta_io.load_meta(tmp_path)
  (tmp_path / "consolidated.01.pth").unlink()
  with pytest.raises(FileNotFoundError, match="No consolidated.NN.pth files"):
    meta_io.load_meta(tmp_path)


def test_meta_config_mismatch_names_tensor_and_shapes(tmp_path):
  config = get_model_config("test_mha")  # Feed-forward width 192.
  _write_meta_checkpoint(tmp_path, config, _random_meta_tensors(config), 2)
  params_json = json.loads((tmp_path / "params.json").read_text())
  params_json["multiple_of"] = 256  # Rounds the width up to 256.
  (tmp_path / "params.json").write_text(json.dumps(params_json))

  with pytest.raises(ValueError) as error:
    meta_io.load_meta(tmp_path)
  message = str(error.value)
  assert "'layers.0.feed_forward.w1.weight'" in message
  assert "(192, 64)" in message
  assert "(256, 64)" in message


def test_meta_missing_tensor_named(tmp_path):
  config = get_model_config("test_mha")
  _write_meta_checkpoint(tmp_path, config, _random_meta_tensors(config), 1)
  params_json = json.loads((tmp_path / "params.json").read_text())
  params_json["n_layers"] = 3
  (tmp_path / "params.json").write_text(json.dumps(params_json))
  with pytest.raises(param_layout.MissingTensorError, match="'layers.2.attention.wq.weight'"):
    meta_io.load_meta(tmp_path)


def test_meta_without_torch_names_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # Makes `import torch` raise ImportError.
  with pytest.raises(ImportError, match=r"llama2_jax\[meta\]"):
    meta_io.import_torch()


def test_meta_params_rejects_unknown_field():
  with pytest.raises(ValueError, match="use_scaled_rope"):
    meta_io.config_from_meta_params({"dim": 64, "n_layers": 1, "n_heads": 4, "vocab_size": 128,
                                     "use_scaled_rope": True})
  with pytest.raises(ValueError, match=r"\['qk_norm'\]"):
    meta_io.config_from_meta_params({"dim": 64, "n_layers": 1, "n_heads": 4, "vocab_size": 128,
                                     "qk_norm": True})


def _hf_config_dict(**changes):
  hf_config = hf_io.config_to_hf(get_model_config("test_gqa"), "float32")
  hf_config.update(changes)
  return hf_config


def test_hf_unknown_model_type(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(_hf_config_dict(model_type="gpt2")))
  with pytest.raises(ValueError, match="Unsupported model_type 'gpt2'"):
    hf_io.load_hf(tmp_path)


def test_hf_rejects_other_architectures():
  with pytest.raises(ValueError, match="LlamaForSequenceClassification"):
    hf_io.config_from_hf(_hf_config_dict(architectures=["LlamaForSequenceClassification"]))


def test_hf_export_rejects_reward_params(tmp_path):
  config = get_model_config("test_gqa")
  params = _random_params(config)
  del params["params"]["output"]
  params["params"]["score_head"] = np.zeros(config.dim, np.float32)
  with pytest.raises(ValueError, match="language-model head"):
    hf_io.save_hf(params, config, tmp_path / "hf")
  assert not (tmp_path / "hf").exists()


def test_hf_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json not found"):
    hf_io.load_hf(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(_hf_config_dict()))
  (tmp_path / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match=r"model.safetensors.*pytorch_model.bin"):
    hf_io.load_hf(tmp_path)


def test_hf_config_mismatch_names_tensor_and_shapes(tmp_path):
  config = get_model_config("test_gqa")
  params = _random_params(config)
  hf_io.save_hf(params, config, tmp_path / "hf")
  hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
  hf_config["num_key_value_heads"] = 4
  (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_config))

  with pytest.raises(ValueError) as error:
    hf_io.load_hf(tmp_path / "hf")
  message = str(error.value)
  assert "'model.layers.0.self_attn.k_proj.weight'" in message
  assert "(32, 64)" in message
  assert "(64, 64)" in message


def test_hf_rope_theta_in_both_config_versions():
  legacy = _hf_config_dict(rope_theta=5e5)
  del legacy["rope_parameters"]
  current = _hf_config_dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6})
  assert hf_io.config_from_hf(legacy).rope_theta == 5e5
  assert hf_io.config_from_hf(current).rope_theta == 1e6
  scaled = _hf_config_dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5})
  with pytest.raises(ValueError, match="'llama3'"):
    hf_io.config_from_hf(scaled)


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
  with pytest.raises(RuntimeError):
    with _atomic.atomic_directory(tmp_path / "out") as temporary:
      (temporary / "partial").write_text("x")
      raise RuntimeError("killed mid-write")
  assert os.listdir(tmp_path) == []

  with _atomic.atomic_directory(tmp_path / "out") as temporary:
    (temporary / "first").write_text("1")
  with pytest.raises(FileExistsError, match="overwrite"):
    with _atomic.atomic_directory(tmp_path / "out"):
      pass
  with _atomic.atomic_directory(tmp_path / "out", overwrite=True) as temporary:
    (temporary / "second").write_text("2")
  assert os.listdir(tmp_path) == ["out"]
  assert os.listdir(tmp_path / "out") == ["second"]


def _run_module(*args):
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, capture_output=True,
                        text=True, timeout=300, check=False)


def test_convert_cli_round_trip(tmp_path):
  config = get_model_config("test_gqa")
  meta_dir = _write_meta_checkpoint(tmp_path / "meta", config, _random_meta_tensors(config), 2,
                                    torch.bfloat16)

  to_orbax = _run_module("llama2_jax.convert", "--from", "meta", "--to", "orbax",
                         str(meta_dir), str(tmp_path / "orbax"))
  assert to_orbax.returncode == 0, to_orbax.stderr
  convert.main(["--from", "orbax", "--to", "hf", str(tmp_path / "orbax"), str(tmp_path / "hf")])

  _, expected = meta_io.load_meta(meta_dir)
  _, converted = hf_io.load_hf(tmp_path / "hf")
  _assert_trees_equal(converted, expected)


def test_convert_cli_reports_errors(tmp_path):
  with pytest.raises(SystemExit, match="error: .*config.json not found"):
    convert.main(["--from", "hf", "--to", "orbax", str(tmp_path), str(tmp_path / "out")])


def _train_tokenizer(directory):
  sentencepiece = pytest.importorskip("sentencepiece")
  text = directory / "text.txt"
  text.write_text("\n".join([
      "The quick brown fox jumps over the lazy dog.",
      "A small model samples a few tokens from a prompt.",
      "Checkpoints come from Meta, from Hugging Face, or from orbax.",
  ] * 20))
  prefix = directory / "tokenizer"
  sentencepiece.SentencePieceTrainer.train(
      input=str(text), model_prefix=str(prefix), vocab_size=300, model_type="bpe",
      byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False,
      minloglevel=2)
  text.unlink()
  (directory / "tokenizer.vocab").unlink()
  return prefix.with_suffix(".model")


def test_generate_cli_samples_text(tmp_path, capsys):
  checkpoint = tmp_path / "checkpoint"
  tokenizer_path = _train_tokenizer(tmp_path)
  config = get_model_config("test_gqa", vocab_size=320)
  params = _random_params(config)
  hf_io.save_hf(params, config, checkpoint)
  shutil.move(tokenizer_path, checkpoint / "tokenizer.model")  # Found beside the weights.

  # In this process, because a second one would spend seconds importing JAX.
  generate.main(["--checkpoint", str(checkpoint), "--chat", "--prompt", "Name a fox.",
                 "--prompt", "Hello", "--temperature", "0.7", "--max_new_tokens", "6"])

  printed = capsys.readouterr().out
  assert "=== Name a fox.\n" in printed
  assert "=== Hello\n" in printed


def test_generate_cli_rejects_reward_checkpoint(tmp_path):
  config = get_model_config("test_gqa", vocab_size=320)
  params = _random_params(config)
  tree = dict(params["params"])
  del tree["output"]
  tree["score_head"] = np.zeros((config.dim,), np.float32)
  tree["score_bias"] = np.zeros((), np.float32)
  checkpoint_io.save_orbax({"params": tree}, config, tmp_path / "reward")

  with pytest.raises(SystemExit, match=r"has no language-model head \(params\['output'\]\)"):
    generate.main(["--checkpoint", str(tmp_path / "reward"), "--prompt", "Hello"])
