"""Next-token sampling: every filter narrows the candidates as documented, and draws follow softmax."""

import numpy as np
import pytest

from ondevice.sampling import SamplingParams, apply_repetition_penalty, sample


def random_logits(seed: int, vocab: int = 50) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(vocab) * 2).astype(np.float32)


def draws(logits: np.ndarray, params: SamplingParams, n: int, seed: int = 0, seen=None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.array([sample(logits, params, rng, seen) for _ in range(n)])


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.mark.parametrize("seed", range(5))
def test_temperature_zero_is_the_argmax(seed):
    logits = random_logits(seed)
    assert sample(logits, SamplingParams(temperature=0.0), np.random.default_rng(0)) == int(np.argmax(logits))


@pytest.mark.parametrize("seed", range(5))
def test_top_k_1_equals_greedy_at_any_temperature(seed):
    logits = random_logits(seed)
    got = draws(logits, SamplingParams(temperature=5.0, top_k=1), 200, seed=seed)
    assert set(got.tolist()) == {int(np.argmax(logits))}


@pytest.mark.parametrize("seed", range(5))
def test_a_tiny_top_p_equals_greedy(seed):
    logits = random_logits(seed)
    got = draws(logits, SamplingParams(temperature=5.0, top_p=1e-6), 200, seed=seed)
    assert set(got.tolist()) == {int(np.argmax(logits))}


def test_top_k_samples_only_among_the_k_largest_logits():
    logits = random_logits(7)
    top3 = set(np.argsort(-logits)[:3].tolist())
    got = set(draws(logits, SamplingParams(temperature=10.0, top_k=3), 2000).tolist())
    assert got == top3


def test_top_p_keeps_the_smallest_set_whose_mass_reaches_p():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs).astype(np.float32)
    # cumulative mass 0.5, 0.8, 0.95, 1.0: p=0.6 needs the first two tokens, p=0.9 the first three
    assert set(draws(logits, SamplingParams(temperature=1.0, top_p=0.6), 2000).tolist()) == {0, 1}
    assert set(draws(logits, SamplingParams(temperature=1.0, top_p=0.9), 4000).tolist()) == {0, 1, 2}


def test_min_p_drops_tokens_less_likely_than_min_p_times_the_best():
    probs = np.array([0.4, 0.25, 0.19, 0.16])
    logits = np.log(probs).astype(np.float32)
    # min_p=0.5 keeps p >= 0.2: tokens 0 and 1; min_p=0.45 keeps p >= 0.18: tokens 0, 1, 2
    assert set(draws(logits, SamplingParams(temperature=1.0, min_p=0.5), 2000).tolist()) == {0, 1}
    assert set(draws(logits, SamplingParams(temperature=1.0, min_p=0.45), 4000).tolist()) == {0, 1, 2}


def test_min_p_close_to_1_equals_greedy():
    logits = random_logits(3)
    got = draws(logits, SamplingParams(temperature=5.0, min_p=0.999), 200)
    assert set(got.tolist()) == {int(np.argmax(logits))}


def test_repetition_penalty_lowers_the_logits_of_seen_tokens_only():
    logits = np.array([2.0, -1.0, 3.0, 0.5], np.float32)
    out = apply_repetition_penalty(logits, np.array([0, 1]), 2.0)
    assert out[0] == pytest.approx(1.0)  # positive: divided
    assert out[1] == pytest.approx(-2.0)  # negative: multiplied, so also lower
    assert out[2] == logits[2] and out[3] == logits[3]
    assert logits.tolist() == [2.0, -1.0, 3.0, 0.5]  # the caller's row is not modified


def test_repetition_penalty_can_move_greedy_off_a_seen_token():
    logits = np.array([3.0, 2.0, 0.0], np.float32)
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    rng = np.random.default_rng(0)
    assert sample(logits, params, rng, seen=np.array([0])) == 1
    assert sample(logits, params, rng, seen=np.array([2])) == 0


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_sampling_frequencies_follow_softmax_of_logits_over_temperature(temperature):
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0], np.float32)
    n = 20_000
    counts = np.bincount(draws(logits, SamplingParams(temperature=temperature), n, seed=1234), minlength=5)
    expected = softmax(logits.astype(np.float64) / temperature)
    # binomial std of a frequency is <= 0.0036 here; 0.02 is a loose bound (> 5 sigma)
    np.testing.assert_allclose(counts / n, expected, atol=0.02)


def test_the_same_rng_seed_gives_the_same_draws():
    logits = random_logits(11)
    params = SamplingParams(temperature=1.0, top_p=0.95)
    assert draws(logits, params, 100, seed=5).tolist() == draws(logits, params, 100, seed=5).tolist()
    assert draws(logits, params, 100, seed=5).tolist() != draws(logits, params, 100, seed=6).tolist()


@pytest.mark.parametrize("bad", [
    {"temperature": -0.1},
    {"top_p": 0.0},
    {"top_p": 1.5},
    {"min_p": -0.1},
    {"min_p": 1.0},
    {"top_k": -1},
    {"repetition_penalty": 0.0},
    {"repetition_penalty": -1.0},
])
def test_invalid_sampling_parameters_raise_value_error(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
