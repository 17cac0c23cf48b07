"""The decoding engine: exactness of speculative decoding, its sampling distribution, requests and errors."""

from __future__ import annotations

import itertools
import json
import os
import threading
from pathlib import Path

import pytest
import torch
from scipy import stats as scipy_stats

from mtp.config import ModelConfig
from mtp.decoding import DraftTree, Engine, EngineConfig, Generation, RequestError, SamplingParams, reference
from mtp.decoding.packed import PackedModel, StepLayout
from mtp.model import MTPTransformer
from mtp.tokenizer import ByteTokenizer

TOKENIZER = ByteTokenizer()
STORED_HISTOGRAMS = Path(__file__).parent / "data" / "acceptance_histograms.json"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared machine they lose a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(n_future: int, seed: int = 0, vocab: int = 260, **overrides) -> MTPTransformer:
    """A small random fp32 model (its drafts are almost always rejected)."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, n_future=n_future, max_seq_len=96, multiple_of=16)
    return MTPTransformer(ModelConfig(**{**cfg, **overrides})).eval()


def _successor_model(n_future: int, right: float = 0.7, attention: float = 100.0, seed: int = 0) -> MTPTransformer:
    """A model whose heads mostly agree, so drafts are accepted in runs of every length.

    Token ``x`` is embedded one-hot; head 0's feed-forward maps it to ``f(x)`` for a
    random permutation ``f``, head ``i`` to ``f^(i+1)(x)`` on a random ``right``
    fraction of tokens (elsewhere to a random token), so head ``i`` drafts what head
    0 will say ``i`` steps later. Scaled-up random attention makes outputs depend on
    the context (and on a correct cache) too.
    """
    model = _model(n_future, seed=seed, vocab=16)
    V, g = 16, torch.Generator().manual_seed(seed)
    f = torch.randperm(V, generator=g)
    with torch.no_grad():
        for w in (model.tok_embeddings.weight, model.output.weight):
            w.zero_()
            w[:, :V] = torch.eye(V)
        for block in (*model.trunk_layers, *model.heads):
            block.attention.wo.weight.mul_(attention)
            block.feed_forward.w2.weight.zero_()
        image = torch.arange(V)
        for i, block in enumerate(model.heads):
            image = f[image]
            wrong = torch.rand(V, generator=g) > (right if i else 1.0)
            maps_to = torch.where(wrong, torch.randint(0, V, (V,), generator=g), image)
            ff = block.feed_forward
            for w in (ff.w1.weight, ff.w3.weight):
                w.zero_()
                w[:V, :V] = 2 * torch.eye(V)
            # normalised one-hot input 5.66 e_x -> hidden ~ 4 * 5.66^2 e_x -> output 2 e_{maps_to(x)} - e_x
            ff.w2.weight[:V, :V] = (2 * torch.eye(V)[maps_to].T - torch.eye(V)) / (4 * 32)
    return model


def _prompts(n: int, seed: int = 1, max_len: int = 40, vocab: int = 256) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (k,), generator=g).tolist() for k in lengths]


@torch.no_grad()
def _reference_greedy(model: MTPTransformer, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding with full forwards and no cache: the ground truth."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids], device=next(model.parameters()).device))[0, -1].argmax()))
    return ids[len(prompt) :]


# ----------------------------------------------------------------------------- cache


def test_static_cache_steps_equal_full_forward():
    """Prefill + token-by-token steps through the static cache give every head's full-forward logits."""
    model = _model(n_future=3)
    packed = PackedModel(model)
    cache = packed.new_cache(max_batch=3, slots=40)
    tokens = torch.randint(0, 260, (2, 12))
    with torch.no_grad():
        full = model(tokens, all_heads=True)  # [n, B, T, V]
    rows = torch.arange(2)[:, None]
    with torch.inference_mode():
        steps, start = [], 5
        pos = torch.arange(start).expand(2, start)
        mask = (torch.arange(start) <= pos[..., None])[:, None]
        steps.append(packed.logits(packed.forward(tokens[:, :start], StepLayout(pos, pos, mask, rows), cache, slice(1, 3), 3)))
        for t in range(start, 12):
            pos = torch.full((2, 1), t)
            mask = (torch.arange(t + 1) <= pos[..., None])[:, None]
            steps.append(packed.logits(packed.forward(tokens[:, t : t + 1], StepLayout(pos, pos, mask, rows), cache, slice(1, 3), 3)))
    torch.testing.assert_close(torch.cat(steps, 2), full, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------- exactness


@pytest.mark.parametrize(
    "n_future,tree,agreeing",
    [(2, None, False), (2, None, True), (4, None, False), (4, None, True), (4, (3, 2, 1), True), (4, (2, 2), False), (2, (4,), True)],
)
def test_speculative_greedy_equals_vanilla_greedy(n_future, tree, agreeing, device):
    """Token for token, fp32, many prompts of different lengths batched together (rows come and go).

    Random heads exercise rollback at every step; agreeing heads exercise runs of accepted drafts.
    """
    model = (_successor_model(n_future) if agreeing else _model(n_future)).to(device)
    prompts = _prompts(14, vocab=model.cfg.vocab_size)
    params = SamplingParams(max_new_tokens=40)
    spec = Engine(model, TOKENIZER, EngineConfig.matching(model, max_batch_size=4, tree=tree)).generate_ids(prompts, params)
    vanilla = Engine(model, TOKENIZER, EngineConfig.matching(model, max_batch_size=1)).generate_ids(prompts, SamplingParams(max_new_tokens=40, speculative=False))
    for i, (s, v) in enumerate(zip(spec, vanilla)):
        assert s.tokens == v.tokens, f"prompt {i}: speculative output diverged from vanilla greedy"
        assert s.finish_reason == v.finish_reason == "length"
    for i in (0, 5):
        assert vanilla[i].tokens == _reference_greedy(model, prompts[i], 40)
    if agreeing:  # every accepted length occurs, up to all drafts
        assert max(len(s.stats.accepted_histogram) for s in spec) == n_future
        assert sum(s.stats.accepted_histogram[0] for s in spec) > 0


# ------------------------------------------------------------- against the spec


@pytest.mark.parametrize("n_future,tree", [(4, None), (4, (3, 2, 1)), (4, (2, 2)), (2, (4,))])
def test_engine_matches_reference_step_for_step(n_future, tree):
    """The batched engine and ``reference.greedy`` agree on every token and on every step's
    accepted-draft count: an engine that under-accepts drafts keeps the output but not the histogram."""
    model = _successor_model(n_future, right=0.3, seed=1)
    prompts = _prompts(6, seed=11, max_len=20, vocab=16)
    widths = tree or (1,) * (n_future - 1)
    engine = Engine(model, TOKENIZER, EngineConfig(max_batch_size=3, tree=tree)).generate_ids(prompts, SamplingParams(max_new_tokens=40))
    for i, (prompt, g) in enumerate(zip(prompts, engine)):
        spec = reference.greedy(model, prompt, 40, widths, TOKENIZER.eos_id)
        assert g.tokens == spec.tokens, f"prompt {i}: tokens differ from the reference"
        assert g.stats.accepted_histogram == spec.accepted_histogram, f"prompt {i}: steps differ from the reference"
    accepted = [k for g in engine for k, n in enumerate(g.stats.accepted_histogram) if n]
    assert len(set(accepted)) >= 2, "the model must accept drafts of several lengths for this test to see anything"


@pytest.mark.parametrize("speculative", [True, False])
def test_engine_sampling_matches_reference(speculative):
    """Seeded sampling at T=0.8: the engine draws its uniforms in the reference's order, so the
    batched rows reproduce ``reference.sample`` token for token and step for step."""
    model = _model(n_future=3, seed=4, init_std=0.3, vocab=16)
    prompts = _prompts(6, seed=12, max_len=20, vocab=16)
    params = [SamplingParams(max_new_tokens=30, temperature=0.8, seed=100 + i, speculative=speculative) for i in range(6)]
    engine = Engine(model, TOKENIZER, EngineConfig(max_batch_size=3)).generate_ids(prompts, params)
    for i, (prompt, g) in enumerate(zip(prompts, engine)):
        spec = reference.sample(model, prompt, 30, 0.8, 100 + i, speculative, TOKENIZER.eos_id)
        assert (g.tokens, g.stats.accepted_histogram) == (spec.tokens, spec.accepted_histogram), f"prompt {i}"
    if speculative:
        assert sum(sum(g.stats.accepted_histogram[1:]) for g in engine) > 0 and sum(g.stats.accepted_histogram[0] for g in engine) > 0


def test_compiled_engine_matches_eager():
    """``compile=True`` (torch.compile of the step, static shapes, rows padded to a compiled
    batch size as they finish at different steps) changes no token and no step, and after
    ``warm_up`` (what a Serve replica runs at start) no request compiles anything."""
    model = _successor_model(4, right=0.3, seed=1)
    prompts = _prompts(2, seed=11, max_len=20, vocab=16) + _prompts(1, seed=12, max_len=1, vocab=16)
    prompts[2] = prompts[2] * 86  # fills the context and finishes first: later steps pad with its stale row
    lengths = [40, 40, 10]
    engine = Engine(model, TOKENIZER, EngineConfig(max_batch_size=3, compile=True))
    assert engine.warm_up([SamplingParams()]) >= engine.compile_s > 0
    compiled = engine.compile_s
    params = [SamplingParams(max_new_tokens=n) for n in lengths]
    eager = Engine(model, TOKENIZER, EngineConfig(max_batch_size=3)).generate_ids(prompts, params)  # itself held to the reference
    for g, e in zip(engine.generate_ids(prompts, params), eager):
        assert (g.tokens, g.stats.accepted_histogram) == (e.tokens, e.stats.accepted_histogram)
    assert engine.compile_s == compiled, "after warm_up, no request may wait for a compile"
    with pytest.raises(ValueError, match="one of cuda_graphs and compile"):
        Engine(model, TOKENIZER, EngineConfig(compile=True, cuda_graphs=True))


def _stored_histograms() -> dict[str, list[list[int]]]:
    """Per-prompt accepted-draft histograms of a fixed constructed model, by decoding kind."""
    model = _successor_model(4, right=0.3, seed=1)
    prompts = _prompts(4, seed=11, max_len=20, vocab=16)
    kinds = {"chain": (SamplingParams(max_new_tokens=48), None), "tree(3,2,1)": (SamplingParams(max_new_tokens=48), (3, 2, 1)),
             "sampled(T=0.8)": (SamplingParams(max_new_tokens=48, temperature=0.8, seed=7), None)}
    return {name: [g.stats.accepted_histogram for g in Engine(model, TOKENIZER, EngineConfig(max_batch_size=4, tree=tree)).generate_ids(prompts, params)]
            for name, (params, tree) in kinds.items()}


def test_acceptance_histograms_match_the_stored_ones():
    """Pinned like a loss curve. After a deliberate change: ``MTP_UPDATE_STORED=1 pytest tests/test_decoding.py -k stored``."""
    measured = _stored_histograms()
    if os.environ.get("MTP_UPDATE_STORED"):
        STORED_HISTOGRAMS.write_text(json.dumps(measured, indent=1) + "\n")
    assert measured == json.loads(STORED_HISTOGRAMS.read_text())


@pytest.mark.parametrize("tree", [None, (3, 2, 1)])
def test_static_shapes_give_the_same_tokens(tree, device):
    """Attending over the whole masked cache (the CUDA-graph layout) changes nothing; CUDA graphs,
    the same kernels replayed, change nothing either (fp32, vanilla and speculative)."""
    model = _successor_model(4).to(device)
    prompts = _prompts(6, seed=2, vocab=16)
    params = [SamplingParams(max_new_tokens=30, speculative=s) for s in (True, False) for _ in prompts]
    dynamic = Engine(model, TOKENIZER, EngineConfig.matching(model, max_batch_size=3, tree=tree)).generate_ids(prompts * 2, params)
    static = Engine(model, TOKENIZER, EngineConfig.matching(model, max_batch_size=3, tree=tree, static_shapes=True)).generate_ids(prompts * 2, params)
    assert [g.tokens for g in static] == [g.tokens for g in dynamic]
    if device.type == "cuda":
        graphs = Engine(model, TOKENIZER, EngineConfig.matching(model, max_batch_size=3, tree=tree, cuda_graphs=True)).generate_ids(prompts * 2, params)
        assert [g.tokens for g in graphs] == [g.tokens for g in static]
    with pytest.raises(ValueError, match="CUDA"):
        Engine(model, TOKENIZER, EngineConfig(device="cpu", cuda_graphs=True))


def test_tree_accepts_at_least_as_much_as_chain():
    """A tree contains the chain's path, so it never needs more forwards for the same output."""
    model = _successor_model(4, right=0.5)
    prompts = _prompts(6, seed=3, vocab=16)
    params = SamplingParams(max_new_tokens=40)
    chain = Engine(model, TOKENIZER, EngineConfig(max_batch_size=6)).generate_ids(prompts, params)
    tree = Engine(model, TOKENIZER, EngineConfig(max_batch_size=6, tree=(3, 2, 1))).generate_ids(prompts, params)
    assert [g.tokens for g in tree] == [g.tokens for g in chain]
    assert sum(g.stats.forwards for g in tree) < sum(g.stats.forwards for g in chain)
    assert DraftTree((3, 2, 1)).size == 16 and DraftTree.chain(3).is_chain


# ------------------------------------------------------------------------ sampling


def _sequence_probs(model: MTPTransformer, prompt: list[int], length: int, temperature: float) -> dict[tuple, float]:
    """Exact probability of every continuation under head 0 (enumerated: small vocabulary)."""
    V = model.cfg.vocab_size
    out = {}
    with torch.no_grad():
        for seq in itertools.product(range(V), repeat=length):
            ids = torch.tensor([prompt + list(seq)])
            logp = (model(ids)[0, len(prompt) - 1 : -1] / temperature).log_softmax(-1)
            out[seq] = float(logp.gather(1, torch.tensor(seq)[:, None]).sum().exp())
    return out


def _draft_only_probs(model: MTPTransformer, prompt: list[int], length: int, temperature: float) -> dict[tuple, float]:
    """What a broken rule that accepts every draft would sample: head 0, then heads 1.. at the prompt's end."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), all_heads=True)[:length, 0, -1] / temperature
    probs = logits.softmax(-1)
    return {seq: float(torch.prod(probs[torch.arange(length), torch.tensor(seq)])) for seq in itertools.product(range(model.cfg.vocab_size), repeat=length)}


def _chi_square_pvalue(counts: dict[tuple, int], probs: dict[tuple, float], n: int) -> float:
    """Pearson's test over the cells expected >= 5 times, the rest pooled into one cell."""
    observed, expected, rest_o, rest_e = [], [], 0, 0.0
    total = sum(probs.values())  # 1 up to rounding; scipy wants the sums to agree exactly
    for seq, p in probs.items():
        p = p / total
        if p * n >= 5:
            observed.append(counts.get(seq, 0))
            expected.append(p * n)
        else:
            rest_o += counts.get(seq, 0)
            rest_e += p * n
    observed.append(rest_o)
    expected.append(rest_e)
    return float(scipy_stats.chisquare(observed, expected).pvalue)


def test_speculative_sampling_keeps_head0_distribution():
    """Empirical 3-token continuations (vocabulary of 5) against the exact head-0 distribution.

    The heads are random, so their drafts are often wrong: the accept/reject rule has
    to correct them. The same test rejects the distribution a rule that trusted the
    drafts would give, so it has the power to catch a wrong rule.
    """
    model = _model(n_future=3, vocab=5, seed=4, init_std=0.3)
    prompt, length, temperature, n = [1, 3, 2], 3, 0.8, 6000
    torch.manual_seed(0)
    engine = Engine(model, TOKENIZER, EngineConfig(max_batch_size=64))
    results = engine.generate_ids([prompt] * n, SamplingParams(max_new_tokens=length, temperature=temperature))
    counts: dict[tuple, int] = {}
    for g in results:
        counts[tuple(g.tokens)] = counts.get(tuple(g.tokens), 0) + 1
    hist = [sum(g.stats.accepted_histogram[k] if k < len(g.stats.accepted_histogram) else 0 for g in results) for k in range(3)]
    assert hist[0] > 0 and hist[1] + hist[2] > 0, f"both rejections and acceptances must occur: {hist}"
    exact = _sequence_probs(model, prompt, length, temperature)
    assert _chi_square_pvalue(counts, exact, n) > 1e-3
    assert _chi_square_pvalue(counts, _draft_only_probs(model, prompt, length, temperature), n) < 1e-6


def _pit(model: MTPTransformer, prompt: list[int], generations: list[Generation], temperature: float) -> list[float]:
    """Randomised probability integral transform of every generated token under head 0 at
    ``temperature``, teacher-forced: ``F(x - 1) + v p(x)`` is uniform on [0, 1) iff tokens are
    drawn from that distribution given their history."""
    g = torch.Generator().manual_seed(99)
    out: list[float] = []
    with torch.no_grad():
        for gen in generations:
            ids = torch.tensor([prompt + gen.tokens])
            probs = (model(ids)[0, len(prompt) - 1 : -1] / temperature).softmax(-1).double()  # [n, V]
            x = torch.tensor(gen.tokens)[:, None]
            below = probs.cumsum(-1).gather(1, x) - probs.gather(1, x)
            out += (below + torch.rand(len(gen.tokens), 1, generator=g, dtype=torch.float64) * probs.gather(1, x)).flatten().tolist()
    return out


@pytest.mark.parametrize("speculative", [True, False])
def test_sampled_tokens_pass_the_teacher_forced_pit_check(speculative):
    """Sampling exactness over long sequences: the PIT of every sampled token under head 0's
    exact distribution (a full forward of the whole sequence) is uniform (Kolmogorov-Smirnov),
    while the same tokens judged at a wrong temperature are not (the test has power)."""
    model = _model(n_future=4, vocab=24, seed=9, init_std=0.3)
    prompt, temperature = [3, 1, 4, 1, 5], 0.8
    engine = Engine(model, TOKENIZER, EngineConfig(max_batch_size=32))
    params = [SamplingParams(max_new_tokens=24, temperature=temperature, seed=1000 + i, speculative=speculative)
              for i in range(192)]
    generations = engine.generate_ids([prompt] * len(params), params)
    if speculative:
        hist = [sum(g.stats.accepted_histogram[k] if k < len(g.stats.accepted_histogram) else 0 for g in generations) for k in range(4)]
        assert hist[0] > 0 and sum(hist[1:]) > 0, f"both rejections and acceptances must occur: {hist}"
    assert scipy_stats.kstest(_pit(model, prompt, generations, temperature), "uniform").pvalue > 1e-3
    assert scipy_stats.kstest(_pit(model, prompt, generations, 1.0), "uniform").pvalue < 1e-6


def test_sampled_rows_with_static_shapes_match_eager():
    """Seeded sampled rows (speculative and vanilla) give the same tokens attending over the
    whole masked cache (the CUDA-graph layout, which sampled rows now replay too)."""
    model = _model(n_future=3, seed=4, init_std=0.3, vocab=16)
    prompts = _prompts(5, seed=12, max_len=20, vocab=16)
    params = [SamplingParams(max_new_tokens=24, temperature=0.8, seed=50 + i, speculative=i % 2 == 0) for i in range(5)]
    eager = Engine(model, TOKENIZER, EngineConfig(max_batch_size=3)).generate_ids(prompts, params)
    static = Engine(model, TOKENIZER, EngineConfig(max_batch_size=3, static_shapes=True)).generate_ids(prompts, params)
    assert [(g.tokens, g.stats.accepted_histogram) for g in static] == [(g.tokens, g.stats.accepted_histogram) for g in eager]


def test_top_p_of_one_cuts_no_tail_mass():
    """A float32 cumulative sum passes 1 before a long tail ends: ``top_p = 1`` must keep every token."""
    from mtp.decoding.sampling import RowSampling, target_probs

    logits = torch.randn(2, 1, 50_000, generator=torch.Generator().manual_seed(0)) * 3
    rows = RowSampling.build([SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, top_p=0.5)], 50_000, torch.device("cpu"))
    probs = target_probs(logits, rows)
    assert (probs[0] > 0).all()
    assert 0 < (probs[1] > 0).sum() < 50_000


def test_vanilla_sampling_respects_top_k_and_seed():
    model = _model(n_future=2, seed=5, init_std=0.5)
    with torch.no_grad():
        allowed = set(model(torch.tensor([[7, 8, 9]]))[0, -1].topk(3).indices.tolist())
    for speculative in (False, True):
        params = SamplingParams(max_new_tokens=1, temperature=1.5, top_k=3, speculative=speculative)
        engine = Engine(model, TOKENIZER, EngineConfig(max_batch_size=8))
        firsts = {g.tokens[0] for g in engine.generate_ids([[7, 8, 9]] * 200, params)}
        assert firsts <= allowed and len(firsts) > 1
    seeded = SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.9, seed=123)
    engine = Engine(model, TOKENIZER, EngineConfig(max_batch_size=4))
    alone = engine.generate_ids([[5, 6]], seeded)[0].tokens
    other = SamplingParams(max_new_tokens=20, temperature=1.0)
    batched = engine.generate_ids([[1], [5, 6], [2, 3, 4]], [other, seeded, other])
    assert batched[1].tokens == alone, "a seeded request must not depend on its batch"


# ------------------------------------------------------------------------ requests


def test_stop_sequences_max_tokens_and_stream():
    model = _model(4)
    engine = Engine(model, TOKENIZER, EngineConfig(max_batch_size=2))
    prompt = "def f(x):"
    full = engine.generate([prompt], SamplingParams(max_new_tokens=40, speculative=False))[0]
    assert full.finish_reason == "length" and len(full.tokens) == 40
    stop = full.text[17:20]
    cut = full.text.index(stop)
    for speculative in (False, True):
        params = SamplingParams(max_new_tokens=40, stop=["\x00never", stop], speculative=speculative)
        g = engine.generate([prompt], params)[0]
        assert (g.text, g.finish_reason) == (full.text[:cut], "stop")
        assert g.tokens == full.tokens[: len(g.tokens)] and TOKENIZER.decode(g.tokens) == g.text
        items = list(engine.stream(prompt, params))
        assert isinstance(items[-1], Generation) and items[-1].text == g.text
        assert "".join(items[:-1]) == g.text and all(isinstance(d, str) and d for d in items[:-1])
    one = engine.generate([prompt, "x"], SamplingParams(max_new_tokens=1))
    assert [len(g.tokens) for g in one] == [1, 1] and all(g.finish_reason == "length" for g in one)


def test_per_request_stats():
    model = _successor_model(4)
    engine = Engine(model, TOKENIZER, EngineConfig(max_batch_size=3))
    gens = engine.generate_ids(_prompts(5, seed=7, vocab=16), SamplingParams(max_new_tokens=30))
    for g in gens:
        s = g.stats
        assert s.generated_tokens == len(g.tokens) == 30
        assert sum(s.accepted_histogram) == s.forwards >= 30 / 4 - 1
        steps_tokens = sum((k + 1) * c for k, c in enumerate(s.accepted_histogram))
        assert steps_tokens + 1 >= 30  # the prefill gives the first token
        assert s.tokens_per_forward == pytest.approx(steps_tokens / s.forwards)
        assert s.elapsed_s > 0 and s.tokens_per_s > 0
    vanilla = engine.generate_ids([[1, 2]], SamplingParams(max_new_tokens=10, speculative=False))[0].stats
    assert vanilla.forwards == 9 and vanilla.accepted_histogram == [9] and vanilla.tokens_per_forward == 1.0


def test_bad_requests_raise_clear_errors():
    model = _model(2)
    engine = Engine(model, TOKENIZER, EngineConfig(max_batch_size=2))
    with pytest.raises(RequestError, match=r"90 prompt tokens \+ max_new_tokens=10 = 100 exceeds the model's max_seq_len=96") as exc:
        engine.generate_ids([[1] * 90], SamplingParams(max_new_tokens=10))
    assert (exc.value.field, exc.value.code) == ("max_new_tokens", "context_length_exceeded")
    with pytest.raises(RequestError, match="96 tokens; the model's context is 96") as exc:
        engine.generate_ids([[1] * 96], SamplingParams(max_new_tokens=1))
    assert exc.value.field == "prompt"
    with pytest.raises(ValueError, match="empty"):
        engine.generate([""], SamplingParams())
    with pytest.raises(ValueError, match="outside"):
        engine.generate_ids([[1, 999]], SamplingParams())
    with pytest.raises(ValueError, match="temperature"):
        engine.generate(["a"], SamplingParams(temperature=-1))
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        engine.generate(["a"], [SamplingParams(), SamplingParams()])
    with pytest.raises(ValueError, match="n_future - 1 = 1"):
        Engine(model, TOKENIZER, EngineConfig(tree=(2, 2)))
    with pytest.raises(ValueError, match="max_batch_size"):
        Engine(model, TOKENIZER, EngineConfig(max_batch_size=0))
    assert engine.generate(["ok"], SamplingParams(max_new_tokens=3))[0].finish_reason == "length"  # still usable


# ----------------------------------------------------------------- shared batch


def test_concurrent_streams_and_generate_share_the_batch_exactly():
    """Streams (stepped round-robin here) and a generate call on another thread, speculative
    and vanilla rows mixed, give token for token what separate calls give, and each stream's
    deltas add up to its final text. A stream closed early leaves the others untouched."""
    model = _successor_model(4)
    engine = Engine(model, TOKENIZER, EngineConfig(max_batch_size=3, tree=(3, 2, 1)))
    prompts = [TOKENIZER.decode(p) for p in _prompts(7, seed=8, max_len=12, vocab=16)]
    kinds = [SamplingParams(max_new_tokens=30, speculative=s) for s in (True, True, False, True, False, True, True)]
    alone = [engine.generate([p], k)[0].tokens for p, k in zip(prompts, kinds)]

    streams = [engine.stream(p, k) for p, k in zip(prompts[:3], kinds[:3])]
    abandoned = engine.stream(prompts[0], kinds[0])
    next(abandoned)
    batch: list[Generation] = []
    worker = threading.Thread(target=lambda: batch.extend(engine.generate(prompts[3:], kinds[3:])))
    worker.start()
    abandoned.close()
    items: list[list] = [[] for _ in streams]
    while any(not out or not isinstance(out[-1], Generation) for out in items):
        for it, out in zip(streams, items):
            if not out or not isinstance(out[-1], Generation):
                out.append(next(it))
    worker.join(timeout=60)
    for out, expected in zip(items, alone[:3]):
        final = out[-1]
        assert final.tokens == expected and "".join(out[:-1]) == final.text
    assert [g.tokens for g in batch] == alone[3:]
    assert not engine.has_work()


def test_submitted_rows_interleave_and_join_as_rows_free():
    """With listeners (how a server drives the engine): a request submitted while others run
    starts before they finish, a third waits for a free row, and events arrive per step."""
    model = _successor_model(4)
    engine = Engine(model, TOKENIZER, EngineConfig(max_batch_size=2))
    log: list[tuple[str, str]] = []

    def listen(name: str):
        return lambda event: log.append((name, type(event).__name__))

    params = SamplingParams(max_new_tokens=40)
    engine.submit([1, 2, 3], params, listen("long"), stream=True)
    for _ in range(3):
        engine.step()
    engine.submit([4, 5], SamplingParams(max_new_tokens=4), listen("short"))
    engine.submit([6], params, listen("queued"), stream=True)
    while engine.step():
        pass
    order = [name for name, kind in log if kind == "Generation"]
    assert order == ["short", "long", "queued"]
    first_queued = log.index(("queued", "str"))
    assert log.index(("short", "Generation")) < first_queued < log.index(("long", "Generation"))
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.submit([1], SamplingParams(max_new_tokens=0))
    assert not engine.has_work()


# ------------------------------------------------------------------------- peers


def test_llama_port_has_equal_logits_and_greedy_tokens(monkeypatch):
    """The bench's Hugging Face peer runs head 0's weights: equal logits (checked inside
    ``to_llama``), the engine's greedy tokens, and a wrong rotary layout is refused."""
    pytest.importorskip("transformers")
    from mtp.bench import peers

    model = _model(n_future=3, seed=6, init_std=0.1)
    hf = peers.to_llama(model)
    prompts = _prompts(3, seed=13, max_len=12, vocab=256)
    tokens, _ = peers.hf_generate(hf, prompts, 12, TOKENIZER.eos_id, do_sample=False)
    engine = Engine(model, TOKENIZER, EngineConfig(max_batch_size=3)).generate_ids(prompts, SamplingParams(max_new_tokens=12, speculative=False))
    assert tokens == [g.tokens for g in engine]
    monkeypatch.setattr(peers, "to_halves", lambda w, heads: w)
    with pytest.raises(RuntimeError, match="logits differ"):
        peers.to_llama(model)
