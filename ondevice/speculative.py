"""Speculative decoding: draft a token tree cheaply, verify it with the target in one pass, keep
exactly what the target alone would have produced (LLMCad, SpecInfer, prompt lookup).

- Draft sources: a small draft bundle (`DraftModel`: a chain while it is confident, top-k siblings
  where it is not) and `PromptLookup` (the continuation of the latest earlier match of the last
  n-gram in the text so far). Both feed one `TokenTree`.
- Verification: the target runs every tree node at once (positions = depths, attention bias = the
  tree's ancestor mask) into the KV slots after the cache; the accepted path is moved down to
  consecutive slots, rejected slots are simply overwritten later.
- Acceptance (`accept`): greedy keeps the longest path the target agrees with; sampling applies the
  speculative-sampling rule at every node, child by child (accept x with min(1, p(x)/q(x)), else
  continue with the residual norm(max(p - q, 0))), so the target's distribution is kept exactly.
- Control (`Speculator`): verification is triggered when the draft's cumulative confidence falls
  below a threshold that adapts to the recent acceptance rate; a cost model (measured draft step,
  verify time per tree size, plain decode step) stops growing the tree when a node costs more than
  it is expected to return, and switches speculation off for a while when it does not pay.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ondevice.sampling import SamplingParams, distribution, sample


# -- the tree ------------------------------------------------------------------------------------

class TokenTree:
    """Node 0 is the root: the last generated token, not yet in the KV cache. Parents precede
    children, so slot order is a topological order and the graph's causal mask stays valid."""

    def __init__(self, root: int):
        self.tokens: list[int] = [root]
        self.parents: list[int] = [-1]
        self.depths: list[int] = [0]
        self.q: list[np.ndarray | None] = [None]  # proposal each node was drawn from; None = deterministic
        self.conf: list[float] = [1.0]  # the draft's probability that the path to this node is accepted
        self.lookup: list[bool] = [False]  # proposed by prompt lookup
        self.children: list[list[int]] = [[]]

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, parent: int, token: int, q: np.ndarray | None = None, conf: float = 0.0,
            lookup: bool = False) -> int:
        """The child of parent holding token (created if new)."""
        for c in self.children[parent]:
            if self.tokens[c] == token:
                self.conf[c] = max(self.conf[c], conf)
                return c
        self.lookup.append(lookup)
        self.tokens.append(int(token))
        self.parents.append(parent)
        self.depths.append(self.depths[parent] + 1)
        self.q.append(q)
        self.conf.append(conf)
        self.children.append([])
        self.children[parent].append(len(self.tokens) - 1)
        return len(self.tokens) - 1

    def path(self, node: int) -> list[int]:
        """Nodes from the root to node."""
        out = []
        while node >= 0:
            out.append(node)
            node = self.parents[node]
        return out[::-1]

    def positions(self, past_len: int) -> np.ndarray:
        return past_len + np.asarray(self.depths, np.int64)

    def attention_bias(self, past_len: int) -> np.ndarray:
        """[T, past_len + T]: 0 where a node may attend (the cache, its ancestors, itself), -inf elsewhere."""
        t = len(self.tokens)
        allowed = np.zeros((t, t), bool)
        for i, parent in enumerate(self.parents):
            if parent >= 0:
                allowed[i] = allowed[parent]
            allowed[i, i] = True
        bias = np.zeros((t, past_len + t), np.float32)
        bias[:, past_len:] = np.where(allowed, 0.0, -np.inf)
        return bias


# -- acceptance ----------------------------------------------------------------------------------

def accept(tree: TokenTree, logits: np.ndarray, params: SamplingParams, rng: np.random.Generator,
           seen: np.ndarray | None = None) -> tuple[list[int], int]:
    """Walk the verified tree: returns (accepted nodes from the root, the token after the last one).

    logits[i] is the target's next-token logits after node i. Greedy: follow the child equal to the
    target's choice. Sampling: at each node try the children in order with the speculative-sampling
    rule against the residual distribution; the token after the path is drawn from what is left."""
    node, accepted = 0, [0]
    while True:
        path_seen = _with_path(seen, tree, node)
        if params.temperature == 0:
            token = sample(logits[node], params, rng, path_seen)
            child = next((c for c in tree.children[node] if tree.tokens[c] == token), None)
            if child is None:
                return accepted, token
        else:
            p = distribution(logits[node], params, path_seen)
            child = None
            for c in tree.children[node]:
                x, q = tree.tokens[c], tree.q[c]
                qx = 1.0 if q is None else q[x]
                if qx > 0 and rng.random() < min(1.0, p[x] / qx):
                    child = c
                    break
                if q is None:
                    p[x] = 0.0
                else:
                    p = np.maximum(p - q, 0.0)
                total = p.sum()
                if total <= 0:  # only reachable through rounding: p was all on rejected tokens
                    p = distribution(logits[node], params, path_seen)
                    break
                p /= total
            if child is None:
                return accepted, int(rng.choice(len(p), p=p))
        node = child
        accepted.append(node)


def _with_path(seen: np.ndarray | None, tree: TokenTree, node: int) -> np.ndarray | None:
    if seen is None:
        return None
    path = [tree.tokens[n] for n in tree.path(node)]
    return np.union1d(seen, path).astype(np.int64)


# -- draft sources -------------------------------------------------------------------------------

class PromptLookup:
    """Drafts from the text itself: the tokens that followed the latest earlier occurrence of the
    last n tokens (n from max_ngram down to min_ngram). An index of n-grams is kept up to date
    incrementally, so a proposal costs a few dictionary lookups."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2, max_tokens: int = 12):
        self.max_ngram, self.min_ngram, self.max_tokens = max_ngram, min_ngram, max_tokens
        self._tokens: list[int] = []
        self._index: dict[tuple, int] = {}  # n-gram -> where its latest continuation starts
        self._indexed = 0  # n-grams ending before this position are in the index

    def propose(self, tokens: list[int], limit: int | None = None) -> list[int]:
        self._sync(tokens)
        limit = self.max_tokens if limit is None else min(limit, self.max_tokens)
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if len(tokens) <= n:
                continue
            start = self._index.get(tuple(tokens[-n:]))
            if start is not None:
                return list(tokens[start:start + limit])
        return []

    def _sync(self, tokens: list[int]) -> None:
        if self._tokens[:self._indexed] != tokens[:self._indexed]:  # a different text: start over
            self._index, self._indexed = {}, 0
        self._tokens = list(tokens)
        # index the n-grams that end at positions with a continuation (all but the last token)
        for end in range(max(self._indexed, 1), len(tokens)):
            for n in range(self.min_ngram, self.max_ngram + 1):
                if end >= n:
                    self._index[tuple(tokens[end - n:end])] = end
        self._indexed = max(self._indexed, len(tokens) - 1) if len(tokens) > 1 else 0


class DraftModel:
    """A small bundle that drafts for a target with the same tokenizer. Keeps its own KV cache in
    step with the text (only the tokens it has not seen are run each round)."""

    def __init__(self, backend, vocab_map: np.ndarray | None):
        self.backend = backend
        self.vocab_map = vocab_map  # draft logits column -> target token id (None: the same ids)
        self.cached: list[int] = []

    def start(self, context: list[int]) -> np.ndarray:
        """Bring the cache to `context` and return the draft's logits after its last token."""
        reuse = min(common_prefix(self.cached, context), len(context) - 1)
        logits = self.backend.forward(context[reuse:], reuse)[-1]
        self.cached = list(context)
        return logits

    def step(self, token: int) -> np.ndarray:
        logits = self.backend.decode_one(token, len(self.cached))[0]
        self.cached.append(token)
        return logits

    def to_target(self, draft_ids: np.ndarray) -> np.ndarray:
        return draft_ids if self.vocab_map is None else self.vocab_map[draft_ids]


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max()
    e = np.exp(z)
    return e / e.sum()


# -- control -------------------------------------------------------------------------------------

PROBE_EVERY = 16  # after this many drafts judged not worth verifying, verify a small one anyway

@dataclass
class SpecConfig:
    max_nodes: int = 24  # tree nodes besides the root
    max_depth: int = 12
    branch_below: float = 0.6  # the draft adds siblings where its top-1 probability is below this
    branch_width: int = 2  # tokens tried at such a node (the top-1 and its siblings)
    threshold: float = 0.25  # start value of the adaptive cumulative-confidence threshold
    lookup_tokens: int = 12
    adaptive: bool = True  # off: a fixed threshold, no cost model, speculation never pauses (tests)
    pipeline: bool = True  # greedy: the draft drafts on while the target verifies (load() decides)


@dataclass
class SpecStats:
    rounds: int = 0  # verifications
    plain_steps: int = 0  # single-token decode steps (speculation off or nothing drafted)
    drafted: int = 0  # tree nodes sent to verification
    accepted: int = 0  # draft tokens the target kept
    ahead_rounds: int = 0  # rounds whose draft chain was drafted while the previous round verified
    draft_s: float = 0.0
    verify_s: float = 0.0
    plain_s: float = 0.0

    def to_dict(self) -> dict:
        total = self.draft_s + self.verify_s + self.plain_s
        return {"rounds": self.rounds, "plain_steps": self.plain_steps, "drafted": self.drafted,
                "accepted": self.accepted, "ahead_rounds": self.ahead_rounds,
                "acceptance_rate": self.accepted / self.drafted if self.drafted else 0.0,
                "accepted_per_verify": self.accepted / self.rounds if self.rounds else 0.0,
                "draft_share": self.draft_s / total if total else 0.0,
                "verify_share": self.verify_s / total if total else 0.0}


@dataclass
class _Ema:
    value: float | None = None
    alpha: float = 0.2

    def add(self, x: float) -> None:
        self.value = x if self.value is None else (1 - self.alpha) * self.value + self.alpha * x


@dataclass
class Speculator:
    """Drafts trees and decides, from measured costs, how big they should be and whether to draft."""

    vocab_size: int  # the target's
    draft: DraftModel | None = None
    lookup: PromptLookup | None = None
    config: SpecConfig = field(default_factory=SpecConfig)
    stats: SpecStats = field(default_factory=SpecStats)

    def __post_init__(self):
        self.threshold = self.config.threshold
        self.t_plain = _Ema()  # seconds per plain decode step
        self.t_draft = _Ema()  # seconds per draft step
        self.t_verify: dict[int, _Ema] = {}  # tree size -> seconds per verification
        self.lookup_accept = _Ema(0.6)  # chance that a lookup token is kept, given its parent was
        self.rate_spec = _Ema()  # tokens per second while speculating
        self.cooldown = 0  # rounds left before the draft model runs again (lookup costs nothing to ask)
        self.backoff = 4
        self.attempts = 0  # rounds judged since the last pause
        self._line: tuple | None = None  # verify-time fit, refreshed when a measurement comes in
        self._probe = self.draft is not None  # the next draft round is a short one that measures the draft
        self._unverified = 0  # drafts in a row the cost model did not find worth verifying
        self._draft_s = 0.0  # draft time of the tree being verified
        self._overlapped = False  # the tree's draft chain was drafted while the last one was verified
        self._worker: ThreadPoolExecutor | None = None
        self._ahead: Future | None = None  # the draft drafting on while the target verifies
        self._ahead_from: tuple[list[int], int] = ([], 0)  # (context + the chain it assumes, its last node)
        self._ahead_chain: tuple[list[int], list[int], list[float]] | None = None  # (context, tokens, probs)

    def reset_stats(self) -> None:
        self.stats = SpecStats()

    # -- cost model ------------------------------------------------------------------------------
    def verify_time(self, t: int) -> float:
        """Verification time for t nodes: measured, or a line fitted through the sizes measured so far
        (a plain step counts as t = 1)."""
        if t in self.t_verify:
            return self.t_verify[t].value
        if self._line is None:
            self._line = self._fit_line()
        slope, intercept, floor = self._line
        return max(intercept + slope * t, floor)

    def _fit_line(self) -> tuple[float, float, float]:
        points = [(k, e.value) for k, e in self.t_verify.items()]
        if self.t_plain.value is not None:
            points.append((1, self.t_plain.value))
        if not points:
            return 0.0015, 0.0085, 0.0
        if len({k for k, _ in points}) < 2:
            k, v = points[0]
            return 0.15 * v, v * (1 - 0.15 * k), v
        slope, intercept = np.polyfit([k for k, _ in points], [v for _, v in points], 1)
        return float(slope), float(intercept), min(v for _, v in points)

    def _draft_can_pay(self, depth_cap: int) -> bool:
        """Whether a draft chain, even if every token were accepted, beats plain decoding."""
        if not self.config.adaptive or self.t_draft.value is None or self.t_plain.value is None:
            return True
        best = max(self.worth(1 + k, k, k + 1) for k in range(1, depth_cap + 1))
        return best * self.t_plain.value > 1.0

    def worth(self, expected_tokens: float, draft_steps: int, nodes: int) -> float:
        """Expected tokens per second of a round (1 token is always produced)."""
        cost = draft_steps * (self.t_draft.value or 0.0) + self.verify_time(nodes)
        return expected_tokens / cost

    # -- drafting --------------------------------------------------------------------------------
    def propose(self, context: list[int], params: SamplingParams, rng: np.random.Generator,
                budget: int, room: int) -> TokenTree | None:
        """A tree rooted at context[-1] (the pending token), or None to decode one plain step.
        budget: tokens that may still be produced (the tree's depth stays below it); room: KV slots
        free after the root (the tree's size stays within it)."""
        if self.t_plain.value is None and self.config.adaptive:
            return None  # a plain step first: it measures what speculation has to beat
        use_draft = self.draft is not None and self.cooldown == 0
        self.cooldown = max(0, self.cooldown - 1)
        depth_cap = min(self.config.max_depth, budget - 1, room)
        self.max_nodes = min(self.config.max_nodes, room)
        if depth_cap < 1:
            return None
        # a draft with a shorter context than the target's drafts only while the text fits in it
        draft_cap = min(depth_cap, self.draft.backend.max_context - len(context) + 1) if self.draft else 0
        use_draft = use_draft and draft_cap >= 1
        tree = TokenTree(context[-1])
        self._draft_s = 0.0
        chain = self.lookup.propose(context, min(depth_cap, self.config.lookup_tokens)) if self.lookup else []
        a = min(max(self.lookup_accept.value or 0.6, 0.05), 0.95)
        if chain and use_draft and self.rate_spec.value is not None:
            # the text repeats itself here: skip the draft if the free chain alone promises more
            # tokens per second than the draft's rounds have been delivering
            expected = 1 + sum(a ** (k + 1) for k in range(len(chain)))
            use_draft = self.worth(expected, 0, len(chain) + 1) < self.rate_spec.value
        probe, self._probe = self._probe, False
        self.finish_ahead([], -1)  # only left running when the last verification failed
        ahead, self._ahead_chain = self._ahead_chain, None
        self._overlapped = use_draft and ahead is not None and ahead[0] == context and len(ahead[1]) > 0
        if self._overlapped:
            self._add_chain(tree, ahead[1][:depth_cap], ahead[2])  # drafted during the last verification
            self.stats.ahead_rounds += 1
        elif use_draft and not probe and not self._draft_can_pay(depth_cap):
            self._pause()  # measured too slow to pay: try again after a while (it is re-measured then)
        elif use_draft:
            t0 = time.perf_counter()
            self._grow_draft(tree, context, params, rng, min(draft_cap, 2) if probe else draft_cap)
            self._draft_s = time.perf_counter() - t0
            self.stats.draft_s += self._draft_s
        self._add_chain(tree, chain, [a] * len(chain), lookup=True)
        tree = self._prune(tree) if self.config.adaptive and len(tree) > 1 else tree
        if tree is None or len(tree) == 1:
            if self._draft_s and self.config.adaptive:  # drafted for nothing: one plain token for both
                self._judge(1, self._draft_s + (self.t_plain.value or 0.0))
            return None
        return tree

    def _grow_draft(self, tree: TokenTree, context: list[int], params: SamplingParams, rng: np.random.Generator,
                    depth_cap: int) -> None:
        cfg, draft = self.config, self.draft
        logits = draft.start(context)
        node, conf, steps, expected = 0, 1.0, 1, 1.0
        best_rate = 0.0
        while tree.depths[node] < depth_cap and len(tree) - 1 < self.max_nodes:
            probs = _softmax(logits)
            if params.temperature == 0:
                width = min(cfg.branch_width, len(probs) - 1)
                order = np.argpartition(-probs, width)[:width] if width > 0 else np.array([0])
                order = order[np.argsort(-probs[order])]
                top = int(order[0])
                q_vec = None
            else:  # sampled chain: keep its proposal distribution for the acceptance rule
                q_vec = np.zeros(self.vocab_size, np.float64)
                q_draft = distribution(logits, params)
                q_vec[draft.to_target(np.arange(len(q_draft)))] = q_draft
                top = int(rng.choice(len(q_draft), p=q_draft))
                order = np.array([top])
            p_top = float(probs[top])
            child = tree.add(node, int(draft.to_target(np.array([top]))[0]), q_vec, conf * p_top)
            if params.temperature == 0 and p_top < cfg.branch_below:
                for sib in order[1:]:
                    if len(tree) - 1 < self.max_nodes:
                        tree.add(node, int(draft.to_target(np.array([sib]))[0]), None, conf * float(probs[sib]))
            conf *= p_top
            expected += conf
            node = child
            rate = self.worth(expected, steps, len(tree))
            if conf < self.threshold or (cfg.adaptive and rate < best_rate):
                break
            best_rate = max(best_rate, rate)
            if tree.depths[node] >= depth_cap:
                break
            t0 = time.perf_counter()
            logits = draft.step(tree.tokens[node])
            self.t_draft.add(time.perf_counter() - t0)
            steps += 1

    def _add_chain(self, tree: TokenTree, tokens: list[int], probs: list[float], lookup: bool = False) -> None:
        """A chain from the root, each token kept with probability probs[k] given its parent was."""
        node, conf = 0, 1.0
        for token, p in zip(tokens, probs):
            if len(tree) - 1 >= self.max_nodes:
                break
            conf *= p
            node = tree.add(node, token, None, conf, lookup=lookup)

    # -- pipeline: the draft works while the target verifies -----------------------------------------
    def start_ahead(self, tree: TokenTree, context: list[int], params: SamplingParams) -> None:
        """Let the draft run on past the end of the tree's most confident chain, as if the target
        accepted all of it, while the target verifies (ORT releases the GIL). Greedy only: a sampled
        chain's proposals would need the target's random draws, which come after verification."""
        drafting = self._draft_s > 0 or self._overlapped  # the draft model is in use this round
        if not self.config.pipeline or not drafting or params.temperature != 0 or len(tree) == 1:
            return
        node = 0
        while tree.children[node]:
            node = max(tree.children[node], key=lambda c: tree.conf[c])
        chain = context + [tree.tokens[n] for n in tree.path(node)[1:]]
        steps = min(self.config.max_depth, self.draft.backend.max_context - len(chain))
        if steps < 1:
            return
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ondevice-draft")
        self._ahead_from = (chain, node)
        self._ahead = self._worker.submit(self._draft_on, chain, steps, self.threshold)

    def _draft_on(self, chain: list[int], steps: int, threshold: float) -> tuple[list[int], list[float]]:
        """Greedy draft tokens after chain (with their draft probabilities), while confident."""
        draft, tokens, probs, conf = self.draft, [], [], 1.0
        logits = draft.start(chain)
        while True:
            p = _softmax(logits)
            top = int(np.argmax(p))
            tokens.append(int(draft.to_target(np.array([top]))[0]))
            probs.append(float(p[top]))
            conf *= float(p[top])
            if conf < threshold or len(tokens) > steps:
                return tokens, probs
            logits = draft.step(tokens[-1])

    def finish_ahead(self, accepted: list[int], after: int) -> None:
        """Keep what the draft drafted ahead if the target accepted the whole chain it assumed and
        then chose the draft's next token; otherwise the work is dropped (the draft's cache re-syncs
        by common prefix next time)."""
        if self._ahead is None:
            return
        future, self._ahead = self._ahead, None
        chain, node = self._ahead_from
        tokens, probs = future.result()
        if accepted and accepted[-1] == node and tokens[0] == after:
            self._ahead_chain = (chain + [after], tokens[1:], probs[1:])

    def _prune(self, tree: TokenTree) -> TokenTree:
        """Keep the nodes whose confidence pays for their verification (the cost model), best first."""
        order = sorted(range(1, len(tree)), key=lambda i: -tree.conf[i])
        keep, expected, best, best_n = {0}, 1.0, self.worth(1.0, 0, 1), 0
        for n, i in enumerate(order, 1):
            expected += tree.conf[i]
            rate = self.worth(expected, 0, n + 1)
            if rate > best:
                best, best_n = rate, n
        if best_n == 0 and self._unverified >= PROBE_EVERY:  # estimates may be stale: measure again
            best_n = min(3, len(order))
        self._unverified = 0 if best_n else self._unverified + 1
        keep.update(order[:best_n])
        # a kept node's ancestors are kept too (their confidence is never lower)
        for i in list(keep):
            keep.update(tree.path(i))
        if len(keep) == 1:
            return None
        if len(keep) == len(tree):
            return tree
        pruned, new_id = TokenTree(tree.tokens[0]), {0: 0}
        for i in range(1, len(tree)):
            if i in keep:
                new_id[i] = pruned.add(new_id[tree.parents[i]], tree.tokens[i], tree.q[i], tree.conf[i],
                                       tree.lookup[i])
        return pruned

    # -- feedback --------------------------------------------------------------------------------
    def record_plain(self, seconds: float) -> None:
        self.t_plain.add(seconds)
        self._line = None
        self.stats.plain_steps += 1
        self.stats.plain_s += seconds

    def record_round(self, tree: TokenTree, accepted: list[int], verify_s: float, round_s: float) -> None:
        t = len(tree)
        self.t_verify.setdefault(t, _Ema()).add(verify_s)
        self._line = None
        kept = len(accepted) - 1
        st = self.stats
        st.rounds += 1
        st.drafted += t - 1
        st.accepted += kept
        st.verify_s += verify_s
        kept_set = set(accepted)
        tried = [n for n in range(1, t) if tree.lookup[n] and tree.parents[n] in kept_set]
        if tried:  # lookup's chance of a token being kept, given its parent was
            self.lookup_accept.add(sum(n in kept_set for n in tried) / len(tried))
        if not self.config.adaptive:
            return
        # LLMCad: draft further when the verifier keeps accepting, stop earlier when it does not
        depth = max(tree.depths)
        ratio = kept / depth if depth else 0.0
        if ratio > 0.8:
            self.threshold = max(0.02, self.threshold * 0.7)
        elif ratio < 0.4:
            self.threshold = min(0.8, self.threshold * 1.4)
        if self._draft_s or self._overlapped:
            self._judge(kept + 1, self._draft_s + round_s)

    def _judge(self, tokens: int, seconds: float) -> None:
        """Pause the draft model (for a doubling number of rounds) while its rounds yield fewer tokens
        per second than plain decoding; drafts that were not worth verifying count as one token."""
        self.rate_spec.add(tokens / seconds)
        self.attempts += 1
        plain = self.t_plain.value
        if plain is None or self.attempts < 3:
            return
        if self.rate_spec.value < 0.9 / plain:
            self._pause()
        elif self.rate_spec.value >= 1.0 / plain:
            self.backoff = 4

    def _pause(self) -> None:
        self.cooldown, self.backoff = self.backoff, min(self.backoff * 2, 256)
        self.rate_spec, self.attempts = _Ema(), 0
        self._probe = True


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens a and b share (what a KV cache holding a can reuse for b)."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
