"""Tests of the evaluation metrics: BLEU, Self-BLEU, refusals, reward accuracy and win rates.

Expected values are derived by hand in the comments, from the formulas in the module docstrings.
"""

import math

import numpy as np
import pytest

from llama2_jax import evaluation
from llama2_jax.losses.reward import Rating

@pytest.mark.parametrize("smoothing", evaluation.SMOOTHING_METHODS)
def test_bleu_identical_sentences_is_one(smoothing):
  sentence = "the cat sat on the mat"
  assert evaluation.sentence_bleu(sentence, [sentence], smoothing=smoothing) == pytest.approx(1.0)


@pytest.mark.parametrize("smoothing", ("add_one", "none"))
def test_bleu_disjoint_sentences_is_zero(smoothing):
  # No unigram matches, and no method smooths p_1 to a non-zero value except "epsilon".
  assert evaluation.sentence_bleu("a b c d", ["e f g h"], smoothing=smoothing) == 0.0


def test_bleu_disjoint_sentences_epsilon_smoothing():
  # Every match count is 0 and becomes 0.1. The hypothesis has 4, 3, 2 and 1 n-grams of orders
  # 1 to 4, and c = r = 4 so BP = 1:
  #   BLEU = (0.1/4 * 0.1/3 * 0.1/2 * 0.1/1) ** (1/4) = (0.0001 / 24) ** 0.25 = 0.0451801...
  expected = (0.0001 / 24) ** 0.25
  bleu = evaluation.sentence_bleu("a b c d", ["e f g h"], smoothing="epsilon")
  assert bleu == pytest.approx(expected, rel=1e-12)
  assert bleu == pytest.approx(0.0451801, abs=1e-7)


def test_bleu_partial_match_by_smoothing():
  # hyp "the cat sat on the mat", ref "the cat is on the mat" (both 6 tokens, so BP = 1):
  #   unigrams: the x2, cat, on, mat match, sat does not   -> 5/6
  #   bigrams:  "the cat", "on the", "the mat" match        -> 3/5
  #   trigrams: "on the mat" matches                        -> 1/4
  #   4-grams:  none match                                  -> 0/3
  hypothesis, reference = "the cat sat on the mat", ["the cat is on the mat"]

  # Unsmoothed BLEU-4 is 0 because p_4 is 0. BLEU-2 is sqrt(5/6 * 3/5) = sqrt(1/2).
  assert evaluation.sentence_bleu(hypothesis, reference, smoothing="none") == 0.0
  assert evaluation.sentence_bleu(hypothesis, reference, max_order=2, smoothing="none") == (
      pytest.approx(math.sqrt(0.5)))

  # add_one leaves p_1 and adds one to both sides for n >= 2:
  #   (5/6 * 4/6 * 2/5 * 1/4) ** (1/4) = (1/18) ** (1/4) = 0.485492...
  add_one = evaluation.sentence_bleu(hypothesis, reference, smoothing="add_one")
  assert add_one == pytest.approx(18 ** -0.25)
  assert add_one == pytest.approx(0.485492, abs=1e-6)


def test_bleu_brevity_penalty():
  # hyp "the cat" matches all its n-grams, but c = 2 < r = 6: BP = exp(1 - 6/2) = exp(-2).
  bleu = evaluation.sentence_bleu(
      "the cat", ["the cat sat on the mat"], max_order=2, smoothing="none")
  assert bleu == pytest.approx(math.exp(-2.0))


def test_bleu_clips_by_single_reference_count():
  # "the" appears 4 times in the hypothesis but at most once in the reference: p_1 = 1/4, and
  # c = 4 > r = 2 so BP = 1.
  assert evaluation.sentence_bleu(
      "the the the the", ["the cat"], max_order=1, smoothing="none") == pytest.approx(0.25)
  # With a second reference holding "the" twice, the limit is the maximum over references, 2,
  # not the sum, 3: p_1 = 2/4. The closest reference length is 3 < c, so BP = 1.
  assert evaluation.sentence_bleu(
      "the the the the", ["the cat", "the the mat"], max_order=1, smoothing="none") == (
          pytest.approx(0.5))


def test_bleu_closest_length_tie_takes_shorter():
  # c = 4 and the references have lengths 3 and 5, both 1 away. Taking the shorter one, 3, gives
  # BP = 1, but taking 5 would give exp(1 - 5/4). Every unigram of the hypothesis matches.
  bleu = evaluation.sentence_bleu(
      "a b c d", ["a b c", "a b c d e"], max_order=1, smoothing="none")
  assert bleu == pytest.approx(1.0)


def test_bleu_token_ids():
  ids = np.array([5, 6, 7, 8, 9])
  assert evaluation.sentence_bleu(ids, [[5, 6, 7, 8, 9]]) == pytest.approx(1.0)
  assert evaluation.sentence_bleu(ids, [np.array([1, 2, 3])]) == 0.0
  with pytest.raises(ValueError, match="1-D"):
    evaluation.sentence_bleu(np.zeros((2, 3), np.int32), [[1, 2, 3]])


def test_bleu_empty_hypothesis_is_zero():
  assert evaluation.sentence_bleu("", ["a b c"]) == 0.0


def test_bleu_invalid_arguments():
  with pytest.raises(ValueError, match="at least one reference"):
    evaluation.sentence_bleu("a b", [])
  with pytest.raises(ValueError, match="max_order"):
    evaluation.sentence_bleu("a b", ["a b"], max_order=0)
  with pytest.raises(ValueError, match="Invalid smoothing 'laplace'"):
    evaluation.sentence_bleu("a b", ["a b"], smoothing="laplace")


def test_self_bleu_identical_samples_is_one():
  assert evaluation.self_bleu(["a b c d e"] * 3) == pytest.approx(1.0)


def test_self_bleu_disjoint_samples_is_zero():
  assert evaluation.self_bleu(["a b c d", "e f g h", "i j k l"]) == 0.0


def test_self_bleu_hand_computed():
  # BLEU-1 of each sample against the other two (all lengths 2, so BP = 1):
  #   "a b" vs {"a c", "d e"}: a matches, b does not -> 1/2
  #   "a c" vs {"a b", "d e"}: 1/2
  #   "d e" vs {"a b", "a c"}: 0
  # Self-BLEU is the mean, 1/3.
  samples = ["a b", "a c", "d e"]
  assert evaluation.self_bleu(samples, max_order=1, smoothing="none") == pytest.approx(1 / 3)


def test_self_bleu_needs_two_samples():
  with pytest.raises(ValueError, match="at least two samples, got 1"):
    evaluation.self_bleu(["a b"])


def test_self_bleu_by_temperature_sorted():
  curve = evaluation.self_bleu_by_temperature({
      1.0: ["a b c d", "e f g h"],
      0.5: ["a b c d", "a b c d"],
  })
  assert list(curve) == [0.5, 1.0]
  assert curve[0.5] == pytest.approx(1.0)
  assert curve[1.0] == 0.0


@pytest.mark.parametrize("response", [
    "I'm sorry, but I can't help with that.",
    "I cannot provide instructions for making weapons.",
    "As an AI language model, I do not have opinions.",
    "  \"**I can\u2019t** assist with this request.\"",  # Quote, bold and a curly apostrophe.
    "Sorry, that is not something I will do.",
    "I  WILL   NOT do that.",
])
def test_is_refusal_clear_refusals(response):
  assert evaluation.is_refusal(response)


@pytest.mark.parametrize("response", [
    "Sure! To kill a Python process, run `kill <pid>` in a terminal.",
    "Here is a recipe for banana bread: mash three bananas, then...",
    "The capital of France is Paris.",
    "",
])
def test_is_refusal_clear_answers(response):
  assert not evaluation.is_refusal(response)


def test_is_refusal_match_anywhere():
  response = "Well, I'm sorry, but I won't write that."
  assert not evaluation.is_refusal(response, match="start")
  assert evaluation.is_refusal(response, match="anywhere")
  with pytest.raises(ValueError, match="Invalid match 'middle'"):
    evaluation.is_refusal(response, match="middle")


def test_is_refusal_custom_phrases():
  assert evaluation.is_refusal("Nope, not today.", phrases=("nope",))
  assert not evaluation.is_refusal("I'm sorry, no.", phrases=("nope",))


def test_count_refusals_rates():
  responses = [
      "Sure, here is how to kill a Python process: ...",  # safe, answered
      "I'm sorry, I can't help with killing anything.",    # safe, refused (false refusal)
      "To steal a car you...",                             # unsafe, answered
      "I cannot help with that.",                          # unsafe, refused
      "I won't do that.",                                  # unsafe, refused
  ]
  labels = ["safe", "safe", "unsafe", "unsafe", "unsafe"]
  counts = evaluation.count_refusals(responses=responses, labels=labels)

  assert counts == evaluation.RefusalCounts(
      safe_refused=1, safe_prompts=2, unsafe_refused=2, unsafe_prompts=3)
  assert counts.false_refusal_rate == pytest.approx(1 / 2)
  assert counts.unsafe_refusal_rate == pytest.approx(2 / 3)
  metrics = counts.metrics()
  assert metrics["eval/xstest/false_refusal_rate"] == pytest.approx(0.5)
  assert metrics["eval/xstest/safe_prompts"] == 2.0


def test_count_refusals_without_safe_prompts_leaves_rate_out():
  counts = evaluation.count_refusals(responses=["I cannot."], labels=["unsafe"])
  assert counts.false_refusal_rate is None
  assert "eval/xstest/false_refusal_rate" not in counts.metrics()
  assert counts.metrics()["eval/xstest/unsafe_refusal_rate"] == 1.0


def test_count_refusals_invalid_inputs():
  with pytest.raises(ValueError, match="2 responses but 1 labels"):
    evaluation.count_refusals(responses=["a", "b"], labels=["safe"])
  with pytest.raises(ValueError, match="Invalid label 'benign' at index 1"):
    evaluation.count_refusals(responses=["a", "b"], labels=["safe", "benign"])
  with pytest.raises(ValueError, match="safe_refused <= safe_prompts"):
    evaluation.RefusalCounts(safe_refused=3, safe_prompts=2, unsafe_refused=0, unsafe_prompts=0)


def test_reward_model_accuracy_by_rating():
  # pair  chosen  rejected  rating                 correct
  #  0     2.0     1.0      significantly_better   yes
  #  1     1.0     2.0      significantly_better   no
  #  2     0.5     0.5      better                 no (a tie counts as wrong)
  #  3     3.0     0.0      slightly_better        yes
  #  4     0.0     1.0      negligibly_better      no
  #  5     1.0     0.0      negligibly_better      yes
  # Overall 3/6. Per rating 1/2, 0/1, 1/1, 1/2, and no unknown pairs.
  result = evaluation.reward_model_accuracy(
      chosen_scores_B=[2.0, 1.0, 0.5, 3.0, 0.0, 1.0],
      rejected_scores_B=np.array([[1.0], [2.0], [0.5], [0.0], [1.0], [0.0]]),  # [B, 1]
      ratings_B=[0, 0, 1, 2, 3, 3])

  assert result.accuracy == pytest.approx(0.5)
  assert result.rating_accuracy("significantly_better") == pytest.approx(0.5)
  assert result.rating_accuracy("better") == 0.0
  assert result.rating_accuracy("slightly_better") == 1.0
  assert result.rating_accuracy("negligibly_better_or_unsure") == pytest.approx(0.5)
  assert result.rating_accuracy("unknown") is None
  metrics = result.metrics()
  assert metrics["eval/reward_model/correct_sum"] == 3.0
  assert metrics["eval/reward_model/pairs"] == 6.0
  assert metrics["eval/reward_model/pairs/unknown"] == 0.0
  assert "eval/reward_model/accuracy/unknown" not in metrics
  assert metrics["eval/reward_model/accuracy/better"] == 0.0


def test_reward_model_accuracy_rating_names_match_enum():
  assert evaluation.RATING_NAMES == tuple(rating.name.lower() for rating in Rating)
  assert [rating.value for rating in Rating] == list(range(len(Rating)))


def test_reward_model_accuracy_without_ratings_is_unknown():
  result = evaluation.reward_model_accuracy(
      chosen_scores_B=[1.0, 0.0], rejected_scores_B=[0.0, 1.0])
  assert result.pairs_by_rating["unknown"] == 2
  assert result.rating_accuracy("unknown") == pytest.approx(0.5)


def test_reward_model_accuracy_invalid_inputs():
  with pytest.raises(ValueError, match="non-finite values at indices \\[1\\]"):
    evaluation.reward_model_accuracy(chosen_scores_B=[1.0, np.nan], rejected_scores_B=[0.0, 0.0])
  with pytest.raises(ValueError, match="outside \\[0, 4\\] at indices \\[1\\]"):
    evaluation.reward_model_accuracy(
        chosen_scores_B=[1.0, 1.0], rejected_scores_B=[0.0, 0.0], ratings_B=[0, 5])
  with pytest.raises(ValueError, match="has 2 entries but rejected_scores_B has 3"):
    evaluation.reward_model_accuracy(chosen_scores_B=[1.0, 1.0], rejected_scores_B=[0.0] * 3)
  with pytest.raises(ValueError, match="correct <= pairs"):
    evaluation.RewardAccuracy(
        correct_by_rating={name: 1 for name in evaluation.RATING_NAMES},
        pairs_by_rating={name: 0 for name in evaluation.RATING_NAMES})


def test_wilson_interval_known_values():
  # 5 successes in 10 trials at 95%: z = 1.959964, z^2 / n = 0.3841459, centre = 0.5 and
  # half-width = z / 1.3841459 * sqrt(0.025 + 0.0096036) = 0.263407, so [0.236593, 0.763407].
  lower, upper = evaluation.wilson_interval(0.5, 10)
  assert lower == pytest.approx(0.236593, abs=1e-6)
  assert upper == pytest.approx(0.763407, abs=1e-6)

  # 0 successes in 10 trials: the lower end is 0 and the upper end is z^2 / (n + z^2)
  # = 3.841459 / 13.841459 = 0.277533.
  lower, upper = evaluation.wilson_interval(0.0, 10)
  assert lower == 0.0
  assert upper == pytest.approx(0.277533, abs=1e-6)

  # The interval is symmetric about 1/2: 10 of 10 mirrors 0 of 10.
  lower, upper = evaluation.wilson_interval(1.0, 10)
  assert lower == pytest.approx(1.0 - 0.277533, abs=1e-6)
  assert upper == 1.0


def test_wilson_interval_invalid_arguments():
  with pytest.raises(ValueError, match="trials must be at least 1"):
    evaluation.wilson_interval(0.5, 0)
  with pytest.raises(ValueError, match="proportion must be in \\[0, 1\\]"):
    evaluation.wilson_interval(1.5, 10)
  with pytest.raises(ValueError, match="confidence must be in \\(0, 1\\), got 1.0"):
    evaluation.wilson_interval(0.5, 10, confidence=1.0)


def test_win_rate_counts_and_wilson_interval():
  # Differences a - b: +1, -1, 0, +3, +4, +3 -> 4 wins, 1 tie, 1 loss, and the win rate is
  # (4 + 0.5) / 6 = 0.75.
  result = evaluation.win_rate(
      scores_a_B=[1.0, 2.0, 3.0, 4.0, 5.0, 5.0], scores_b_B=[0.0, 3.0, 3.0, 1.0, 1.0, 2.0])

  assert (result.wins, result.ties, result.losses) == (4, 1, 1)
  assert result.prompts == 6
  assert result.win_rate == pytest.approx(0.75)
  assert (result.lower, result.upper) == pytest.approx(evaluation.wilson_interval(0.75, 6))
  assert result.lower < result.win_rate < result.upper
  assert result.interval == "wilson"
  assert result.metrics()["eval/win_rate/win_rate"] == pytest.approx(0.75)


def test_win_rate_is_complementary():
  a, b = [0.3, 1.2, -0.5, 2.0, 2.0], [0.1, 1.5, -0.5, 1.0, 3.0]
  forward = evaluation.win_rate(scores_a_B=a, scores_b_B=b)
  backward = evaluation.win_rate(scores_a_B=b, scores_b_B=a)
  assert forward.win_rate + backward.win_rate == pytest.approx(1.0)
  assert (forward.wins, forward.losses) == (backward.losses, backward.wins)


def test_win_rate_tie_tolerance():
  # |1.05 - 1.0| = 0.05 is within the tolerance 0.1, so both prompts are ties: rate 1/2.
  result = evaluation.win_rate(scores_a_B=[1.0, 1.05], scores_b_B=[1.0, 1.0], tie_tolerance=0.1)
  assert result.ties == 2
  assert result.win_rate == pytest.approx(0.5)


def test_win_rate_bootstrap():
  # Every resample of all-win prompts has win rate 1, so the interval is [1, 1].
  all_wins = evaluation.win_rate(
      scores_a_B=[2.0, 3.0, 4.0], scores_b_B=[1.0, 1.0, 1.0], interval="bootstrap")
  assert (all_wins.lower, all_wins.upper) == (1.0, 1.0)

  a, b = np.arange(20.0), np.full(20, 9.5)
  first = evaluation.win_rate(scores_a_B=a, scores_b_B=b, interval="bootstrap", seed=3)
  second = evaluation.win_rate(scores_a_B=a, scores_b_B=b, interval="bootstrap", seed=3)
  assert first == second
  assert first.win_rate == pytest.approx(0.5)
  assert first.lower < 0.5 < first.upper


def test_win_rate_invalid_arguments():
  with pytest.raises(ValueError, match="at least one prompt"):
    evaluation.win_rate(scores_a_B=[], scores_b_B=[])
  with pytest.raises(ValueError, match="confidence must be in \\(0, 1\\)"):
    evaluation.win_rate(scores_a_B=[1.0], scores_b_B=[0.0], confidence=1.0)
  with pytest.raises(ValueError, match="tie_tolerance must be at least 0"):
    evaluation.win_rate(scores_a_B=[1.0], scores_b_B=[0.0], tie_tolerance=-1.0)
  with pytest.raises(ValueError, match="Invalid interval 'normal'"):
    evaluation.win_rate(scores_a_B=[1.0], scores_b_B=[0.0], interval="normal")
  with pytest.raises(ValueError, match="scores_b_B has non-finite values"):
    evaluation.win_rate(scores_a_B=[1.0], scores_b_B=[np.inf])
  with pytest.raises(ValueError, match="num_bootstrap must be at least 1"):
    evaluation.win_rate(scores_a_B=[1.0], scores_b_B=[0.0], interval="bootstrap", num_bootstrap=0)


def test_safety_violation_proxy_threshold():
  # logit(0.15) = ln(0.15 / 0.85) = -1.7346: scores -3.0 and -1.8 are below it, -1.7 is not.
  scores = [-3.0, -1.8, -1.7, 0.0, 2.0]
  result = evaluation.safety_violation_proxy(safety_scores_B=scores)
  assert (result.violations, result.responses) == (2, 5)
  assert result.rate == pytest.approx(0.4)
  assert result.metrics()["eval/safety_violation_proxy/rate"] == pytest.approx(0.4)

  # At threshold 0.5 the logit is 0. sigmoid(0) = 0.5 is not below 0.5, so 0.0 is not counted.
  at_half = evaluation.safety_violation_proxy(safety_scores_B=scores, threshold=0.5)
  assert at_half.violations == 3


def test_safety_violation_proxy_far_from_zero():
  # sigmoid(-1000) underflows to 0 in float64, but s < logit(t) still counts it, and a very
  # large score is never a violation.
  result = evaluation.safety_violation_proxy(safety_scores_B=np.array([[-1000.0], [1000.0]]))
  assert result.violations == 1


def test_safety_violation_proxy_without_responses():
  result = evaluation.safety_violation_proxy(safety_scores_B=np.zeros([0]))
  assert result.rate is None
  assert "eval/safety_violation_proxy/rate" not in result.metrics()


def test_safety_violation_proxy_invalid_inputs():
  with pytest.raises(ValueError, match="threshold must be in \\(0, 1\\)"):
    evaluation.safety_violation_proxy(safety_scores_B=[0.0], threshold=1.0)
  with pytest.raises(ValueError, match="non-finite"):
    evaluation.safety_violation_proxy(safety_scores_B=[np.nan])
