"""Speculative decoding keeps the target's output: greedy tokens identical, sampled distribution kept."""

from __future__ import annotations

import numpy as np
import pytest
from models import write_tiny_llama_gguf

import ondevice
from ondevice.errors import TokenizerMismatchError
from ondevice.sampling import SamplingParams, distribution
from ondevice.speculative import PromptLookup, SpecConfig, Speculator, TokenTree, accept

# Trees grow to these limits whatever the cost model would say, so every path is exercised.
FORCED = SpecConfig(adaptive=False, threshold=0.0, branch_below=0.95, branch_width=3, max_nodes=12, max_depth=6)
REPEATING = [5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 10, 5, 6, 7]


@pytest.fixture(scope="module")
def other_tiny_bundle(tmp_path_factory):
    """A differently seeded tiny model with the same tokenizer: a draft that often disagrees."""
    folder = tmp_path_factory.mktemp("tiny-draft")
    gguf = write_tiny_llama_gguf(folder / "draft.gguf", weight_type="Q4_1", seed=7)
    return ondevice.convert(gguf, folder / "draft.bundle", progress=False)


def forced(model: ondevice.Model) -> ondevice.Model:
    model.speculator.config = FORCED
    model.speculator.threshold = 0.0
    return model


# -- the tree -----------------------------------------------------------------------------------

def test_a_tree_node_attends_to_the_cache_its_ancestors_and_itself():
    tree = TokenTree(1)
    a = tree.add(0, 10)
    b = tree.add(a, 11)
    c = tree.add(0, 12)
    assert tree.add(0, 10) == a  # the same token under the same parent is one node
    bias = tree.attention_bias(past_len=2)
    allowed = bias == 0
    assert allowed[:, :2].all()
    assert allowed[b, 2:].tolist() == [True, True, True, False]
    assert allowed[c, 2:].tolist() == [True, False, False, True]
    assert tree.positions(2).tolist() == [2, 3, 4, 3]


def test_one_pass_over_a_tree_gives_each_node_the_logits_of_its_own_path(tiny_model):
    backend, prompt = tiny_model.backend, [5, 6, 7, 8]
    tree = TokenTree(9)
    a = tree.add(0, 10)
    tree.add(a, 11)
    b = tree.add(0, 12)
    tree.add(b, 13)
    backend.forward(prompt, 0)
    logits = backend.run(np.array(tree.tokens), len(prompt), tree.positions(len(prompt)),
                         tree.attention_bias(len(prompt)))
    for node in range(len(tree)):
        path = [tree.tokens[n] for n in tree.path(node)]
        expected = backend.forward(prompt + path, 0)[-1]
        np.testing.assert_allclose(logits[node], expected, atol=1e-4)


def test_the_accepted_path_moved_down_the_cache_continues_like_plain_decoding(tiny_model):
    backend, prompt = tiny_model.backend, [5, 6, 7, 8]
    tree = TokenTree(9)
    tree.add(0, 20)  # a rejected branch occupies slot 1
    a = tree.add(0, 10)
    b = tree.add(a, 11)
    backend.forward(prompt, 0)
    past = len(prompt)
    backend.run(np.array(tree.tokens), past, tree.positions(past), tree.attention_bias(past))
    path = tree.path(b)
    backend.move_kv([past + n for n in path], list(range(past, past + len(path))))
    after = backend.decode_one(12, past + len(path))[0]
    expected = backend.forward(prompt + [9, 10, 11, 12], 0)[-1]
    np.testing.assert_allclose(after, expected, atol=1e-4)


# -- acceptance ---------------------------------------------------------------------------------

def test_greedy_acceptance_follows_the_targets_choices_and_adds_its_next_token():
    tree = TokenTree(0)
    a = tree.add(0, 1)
    tree.add(a, 2)
    tree.add(a, 3)
    logits = np.zeros((4, 5), np.float32)
    logits[0, 1] = logits[a, 3] = logits[3, 4] = 1.0  # the target wants 1, then 3, then 4
    path, after = accept(tree, logits, SamplingParams(), np.random.default_rng(0))
    assert [tree.tokens[n] for n in path] == [0, 1, 3] and after == 4


def test_sampling_acceptance_keeps_the_target_distribution_over_a_tree():
    """A root with a sampled child (proposal q), a deterministic sibling and a chain below: the first
    two tokens produced are distributed as the target's p(x1) p(x2 | x1), whatever q proposes."""
    rng = np.random.default_rng(0)
    vocab, params = 4, SamplingParams(temperature=1.0)
    logits_root = np.log(np.array([0.1, 0.2, 0.3, 0.4], np.float32))
    logits_next = {x: np.log(np.roll([0.7, 0.1, 0.1, 0.1], x)).astype(np.float32) for x in range(vocab)}
    q = np.array([0.6, 0.2, 0.1, 0.1])
    counts = np.zeros((vocab, vocab))
    trials = 40000
    for _ in range(trials):
        tree = TokenTree(9)
        x = int(rng.choice(vocab, p=q))
        a = tree.add(0, x, q=q)
        tree.add(a, (x + 1) % vocab)  # a deterministic chain token under the sampled child
        tree.add(0, 2 if x != 2 else 3)  # a deterministic sibling
        logits = np.stack([logits_root] + [logits_next[tree.tokens[n]] for n in range(1, len(tree))])
        path, after = accept(tree, logits, params, rng)
        produced = [tree.tokens[n] for n in path[1:]] + [after]
        if len(produced) < 2:  # nothing accepted: x1 = after; draw x2 from the target directly
            produced.append(int(rng.choice(vocab, p=distribution(logits_next[after], params))))
        counts[produced[0], produced[1]] += 1
    expected = np.array([[np.exp(logits_root[i]) * np.exp(logits_next[i][j]) for j in range(vocab)]
                         for i in range(vocab)])
    observed = counts / trials
    assert np.abs(observed - expected).max() < 0.01


# -- draft sources ------------------------------------------------------------------------------

def test_prompt_lookup_proposes_what_followed_the_latest_match_of_the_last_ngram():
    lookup = PromptLookup(max_ngram=3, min_ngram=2, max_tokens=4)
    assert lookup.propose([1, 2, 3, 4, 5, 9, 2, 3]) == [4, 5, 9, 2]
    assert lookup.propose([1, 2, 3, 4, 5, 9, 2, 3, 4, 7, 2, 3]) == [4, 7, 2, 3]  # the index follows the text
    assert lookup.propose([8, 8, 1]) == []  # a new text starts a new index


def test_a_draft_with_another_tokenizer_is_refused(tiny_bundle, copy_bundle):
    import json

    draft = copy_bundle(tiny_bundle, "draft.bundle")
    manifest = json.loads((draft / "manifest.json").read_text())
    manifest["files"]["tokenizer.json"]["sha256"] = "0" * 64
    (draft / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TokenizerMismatchError, match="different tokenizer"):
        ondevice.load(tiny_bundle, draft=draft, verify=False)


# -- end to end: the output is the target's -----------------------------------------------------

@pytest.mark.parametrize("setting", ["draft", "lookup", "draft+lookup"])
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_speculative_output_is_identical_to_plain_decoding(tiny_bundle, other_tiny_bundle, tiny_model,
                                                                  setting, penalty):
    options = {"draft": other_tiny_bundle} if "draft" in setting else {}
    spec = forced(ondevice.load(tiny_bundle, threads=1, lookup="lookup" in setting, **options))
    for prompt in (REPEATING, list(range(3, 40))):
        tiny_model.reset()
        expected = tiny_model.generate(prompt, max_tokens=40, temperature=0, repetition_penalty=penalty,
                                       ignore_eos=True).token_ids
        got = spec.generate(prompt, max_tokens=40, temperature=0, repetition_penalty=penalty, ignore_eos=True)
        assert got.token_ids == expected
        spec.reset()
    assert spec.speculator.stats.rounds > 0  # trees were verified (a random draft is mostly rejected)


def test_the_same_model_as_its_own_draft_has_every_token_accepted(tiny_bundle, tiny_model):
    spec = forced(ondevice.load(tiny_bundle, threads=1, draft=tiny_bundle))
    spec.speculator.config = SpecConfig(adaptive=False, threshold=0.0, branch_below=0.0, max_depth=6)
    got = spec.generate(REPEATING, max_tokens=30, temperature=0, ignore_eos=True)
    assert got.token_ids == tiny_model.generate(REPEATING, max_tokens=30, temperature=0, ignore_eos=True).token_ids
    stats = spec.speculator.stats
    assert stats.accepted == stats.drafted
    assert stats.to_dict()["accepted_per_verify"] > 4


@pytest.mark.parametrize("pipeline", [True, False])
def test_the_draft_drafts_the_next_chain_while_the_target_verifies(tiny_bundle, tiny_model, pipeline):
    spec = forced(ondevice.load(tiny_bundle, threads=1, draft=tiny_bundle))
    spec.speculator.config = SpecConfig(adaptive=False, threshold=0.0, branch_below=0.0, max_depth=6,
                                        pipeline=pipeline)
    got = spec.generate(REPEATING, max_tokens=40, temperature=0, ignore_eos=True)
    assert got.token_ids == tiny_model.generate(REPEATING, max_tokens=40, temperature=0, ignore_eos=True).token_ids
    stats = spec.speculator.stats
    # every chain is accepted, so each round after the first verifies the chain drafted during the last
    assert stats.ahead_rounds == (stats.rounds - 1 if pipeline else 0)
    assert stats.accepted == stats.drafted


def test_speculation_stops_at_max_tokens_and_at_the_end_of_the_context(tiny_bundle_ctx64):
    spec = forced(ondevice.load(tiny_bundle_ctx64, threads=1, draft=tiny_bundle_ctx64, lookup=True))
    plain = ondevice.load(tiny_bundle_ctx64, threads=1)
    prompt = REPEATING * 3  # 45 tokens of a 64-token context
    for n in (1, 2, 7, 64 - len(prompt)):
        got = spec.generate(prompt, max_tokens=n, temperature=0, ignore_eos=True).token_ids
        assert got == plain.generate(prompt, max_tokens=n, temperature=0, ignore_eos=True).token_ids
        assert len(got) == n
        spec.reset()
        plain.reset()


def test_sampling_with_a_draft_keeps_the_targets_distribution(tiny_bundle, other_tiny_bundle, tiny_model):
    """The joint distribution of the first two sampled tokens (top-k 3: 9 outcomes) matches the one
    computed from the target's own logits; the second token is the one speculation decides."""
    params = dict(temperature=1.5, top_k=3)
    spec = forced(ondevice.load(tiny_bundle, threads=1, draft=other_tiny_bundle, lookup=True))
    prompt = REPEATING
    first = tiny_model.backend.forward(prompt, 0)[-1]
    sp = tiny_model.sampling_params(**params)
    p1 = distribution(first, sp)
    expected = {}
    for x1 in np.flatnonzero(p1):
        p2 = distribution(tiny_model.backend.forward(prompt + [int(x1)], 0)[-1], sp)
        for x2 in np.flatnonzero(p2):
            expected[(int(x1), int(x2))] = p1[x1] * p2[x2]
    counts: dict[tuple, int] = {}
    trials = 1500
    for seed in range(trials):
        spec.reset()
        ids = spec.generate(prompt, max_tokens=3, seed=seed, ignore_eos=True, **params).token_ids
        counts[tuple(ids[:2])] = counts.get(tuple(ids[:2]), 0) + 1
    assert set(counts) <= set(expected)
    assert spec.speculator.stats.rounds > 0
    # chi-square over the 9 outcomes; 8 degrees of freedom: 26.1 is the 0.1% tail
    chi2 = sum((counts.get(k, 0) - trials * p) ** 2 / (trials * p) for k, p in expected.items())
    assert chi2 < 26.1
