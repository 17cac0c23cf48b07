"""Stage 3: decoding speed at 0.3B (random weights: only the timing matters here).

Decode-step time comes from the engine's own scheduler (``Engine.submit`` / ``step``):
a batch of rows is admitted, warmed up (on CUDA that captures the step's graph), then
timed over a fixed number of steps while every row stays in the batch. A query of 1
token is a vanilla step; a query of ``n_future`` tokens is a speculative verification
step (pending token + drafts). Eager steps attend over each row's length; CUDA-graph
steps over the whole static cache (masked), since a replayed graph cannot change shape.

Beside it, ``transformers``' Llama with the same head-0 weights (``mtp.bench.peers``),
after a logit check, against our vanilla and speculative generation at equal prompt and
output lengths.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from mtp.bench.gpu_check.report import FAIL, MEASURED, PASS, Budget, Row, error_row, skipped
from mtp.bench.schedules import release
from mtp.config import model_preset
from mtp.decoding import Engine, EngineConfig, Generation, SamplingParams
from mtp.decoding.metrics import acceptance, synchronize, timed
from mtp.model import MTPTransformer
from mtp.tokenizer import ByteTokenizer

STAGE = "3 decoding"
STEP_TARGET_MS = 1.0  # b1 vanilla step at most
VERIFY_OVER_VANILLA_TARGET = 1.2  # b1 verify step at most this times the vanilla step
ANCHOR_STEP_MS = {(1, 1): 1.76, (1, 5): 2.47, (32, 1): 5.56, (32, 5): 7.96}  # reduce-overhead reference, H200; q=5
LOGIT_TOL = 1e-4  # fp32, ours vs Llama: the same function


@dataclass(frozen=True)
class DecodingSizes:
    preset: str
    model: dict  # overrides of the preset
    step_batches: tuple[int, ...]
    prompt_len: int
    warmup_steps: int
    timed_steps: int
    peer_batches: tuple[int, ...]
    new_tokens: int
    estimate_s: dict[str, float]


GPU = DecodingSizes(
    preset="0.3B", model=dict(vocab_size=32000, n_future=4, param_matched=True), step_batches=(1, 32),
    prompt_len=128, warmup_steps=3, timed_steps=30, peer_batches=(1, 8), new_tokens=128,
    estimate_s={"steps": 3, "ours": 5, "peer": 50},  # peer: transformers compiles each batch size
)
TINY = DecodingSizes(
    preset="tiny", model=dict(vocab_size=512, n_future=4, param_matched=True), step_batches=(1, 4),
    prompt_len=16, warmup_steps=1, timed_steps=3, peer_batches=(1, 2), new_tokens=8,
    estimate_s={"steps": 1, "ours": 1, "peer": 10},
)


class NoStopTokenizer(ByteTokenizer):
    """Bytes with no end-of-sequence id: random weights could emit one, and a row that
    left early would shrink the batch being timed."""

    def __init__(self) -> None:
        super().__init__()
        self.eos_id = -1


def random_prompts(batch: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=g).tolist()


def step_seconds(engine: Engine, prompts: list[list[int]], speculative: bool, warmup: int, steps: int) -> float:
    """Seconds per engine step with ``len(prompts)`` rows decoding (after prefill and warm-up)."""
    room = engine.cfg.max_seq_len - max(map(len, prompts))
    params = SamplingParams(max_new_tokens=room, speculative=speculative)
    requests = [engine.submit(p, params) for p in prompts]
    try:
        engine.step()  # prefill: every row is admitted at once
        for _ in range(warmup):
            engine.step()
        synchronize(engine.device)
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        synchronize(engine.device)
        seconds = (time.perf_counter() - start) / steps
        if any(r.done for r in requests):
            raise RuntimeError("a row finished while being timed; the batch was not full throughout")
        return seconds
    finally:
        for r in requests:
            r.cancel()
        engine.step()  # retires the cancelled rows


def tokens_per_s(engine: Engine, prompts: list[list[int]], new_tokens: int, speculative: bool) -> tuple[float, list[Generation]]:
    """Generation throughput, prefill included; the call is made once untimed first (graph capture)."""
    params = SamplingParams(max_new_tokens=new_tokens, speculative=speculative)
    engine.generate_ids(prompts, params)
    gens, seconds = timed(engine, prompts, params)
    return len(prompts) * new_tokens / seconds, gens


def build_model(sizes: DecodingSizes, device: torch.device) -> MTPTransformer:
    torch.manual_seed(0)
    with device:
        model = MTPTransformer(model_preset(sizes.preset, **sizes.model))
    return model.eval()


def step_rows(sizes: DecodingSizes, model: MTPTransformer, engines: dict[str, Engine], budget: Budget) -> list[Row]:
    n = model.cfg.n_future
    rows, measured = [], {}
    for batch in sizes.step_batches:
        prompts = random_prompts(batch, sizes.prompt_len, model.cfg.vocab_size)
        for kind, engine in engines.items():
            for q, speculative in ((1, False), (n, True)):
                name = f"step b{batch} q{q} {kind}"
                if not budget.allows(sizes.estimate_s["steps"]):
                    rows.append(skipped(STAGE, name, "budget"))
                    continue
                try:
                    ms = 1e3 * step_seconds(engine, prompts, speculative, sizes.warmup_steps, sizes.timed_steps)
                except Exception as exc:  # noqa: BLE001
                    rows.append(error_row(STAGE, name, exc))
                    continue
                measured[batch, q, kind] = ms
                anchor = ANCHOR_STEP_MS.get((batch, 5 if q > 1 else 1)) if sizes.preset == "0.3B" else None
                target = f"anchor {anchor} ms (q={5 if q > 1 else 1})" if anchor else ""
                if batch == 1 and kind == "graphs":
                    if q == 1:
                        target = f"<= {STEP_TARGET_MS} ms {'met' if ms <= STEP_TARGET_MS else 'MISSED'}; " + target
                    elif (1, 1, kind) in measured:
                        ratio = ms / measured[1, 1, kind]
                        ok = ratio <= VERIFY_OVER_VANILLA_TARGET
                        target = f"x{ratio:.2f} vanilla <= {VERIFY_OVER_VANILLA_TARGET} {'met' if ok else 'MISSED'}; " + target
                rows.append(Row(STAGE, name, MEASURED, f"{ms:.3f} ms/step", target,
                                {"batch": batch, "query": q, "kind": kind, "ms_per_step": ms}))
    return rows


def llama_check(sizes: DecodingSizes, model: MTPTransformer) -> tuple[Row, object | None]:
    """Our fp32 model's head 0 in ``transformers``' Llama (``mtp.bench.peers``), logits
    compared; the Llama (to be timed) only when they agree."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return skipped(STAGE, "transformers Llama", "transformers is not installed"), None
    from mtp.bench.peers import LOGITS_ATOL, to_llama

    try:
        llama = to_llama(model, check_tokens=sizes.prompt_len)
    except RuntimeError as exc:  # the logits differ: nothing would be comparable
        return Row(STAGE, "Llama logits = ours (fp32)", FAIL, str(exc)), None
    return Row(STAGE, "Llama logits = ours (fp32)", PASS, "logits agree", f"max abs diff <= {LOGITS_ATOL:g}"), llama


def peer_rows(sizes: DecodingSizes, engine: Engine, llama, budget: Budget) -> list[Row]:
    """Ours (vanilla, speculative) vs the Llama's ``generate`` at equal lengths, in the engine's dtype.

    ``generate`` runs greedy with a static cache, which ``transformers`` compiles on CUDA
    by itself; its first call per batch size (the compile) is untimed.
    """
    from mtp.bench.peers import hf_generate

    llama = llama.to(engine.packed.dtype)
    rows = []
    for batch in sizes.peer_batches:
        name = f"tok/s b{batch}: ours vs Llama"
        if not budget.allows(sizes.estimate_s["ours"] + sizes.estimate_s["peer"]):
            rows.append(skipped(STAGE, name, "budget"))
            continue
        try:
            prompts = random_prompts(batch, sizes.prompt_len, engine.vocab_size, seed=2)
            vanilla, _ = tokens_per_s(engine, prompts, sizes.new_tokens, speculative=False)
            speculative, gens = tokens_per_s(engine, prompts, sizes.new_tokens, speculative=True)
            generate = dict(max_new_tokens=sizes.new_tokens, eos_id=None, do_sample=False, cache_implementation="static")
            hf_generate(llama, prompts, **generate)
            tokens, seconds = hf_generate(llama, prompts, **generate)
            peer = sum(map(len, tokens)) / seconds
        except Exception as exc:  # noqa: BLE001
            rows.append(error_row(STAGE, name, exc))
            continue
        tpf, _ = acceptance(gens)
        rows.append(Row(
            STAGE, name, MEASURED,
            f"vanilla {vanilla:,.0f}, speculative {speculative:,.0f} ({tpf:.2f} tok/fwd, random weights), "
            f"Llama generate {peer:,.0f}; ours/Llama x{vanilla / peer:.2f} vanilla, x{speculative / peer:.2f} spec",
            f"{sizes.prompt_len}-token prompts, {sizes.new_tokens} new tokens",
            {"batch": batch, "vanilla": vanilla, "speculative": speculative, "llama": peer, "tokens_per_forward": tpf},
        ))
    return rows


def run(sizes: DecodingSizes, device: torch.device, budget: Budget) -> list[Row]:
    model = build_model(sizes, device)
    llama_row, llama = llama_check(sizes, model)
    model.to(torch.bfloat16 if device.type == "cuda" else torch.float32)
    tok = NoStopTokenizer()
    batch = max(*sizes.step_batches, *sizes.peer_batches)
    engines = {"eager": Engine(model, tok, EngineConfig.matching(model, max_batch_size=batch))}
    if device.type == "cuda":
        engines["graphs"] = Engine(model, tok, EngineConfig.matching(model, max_batch_size=batch, cuda_graphs=True))
    rows = step_rows(sizes, model, engines, budget)
    if "graphs" not in engines:
        rows.append(skipped(STAGE, "steps with CUDA graphs", "needs CUDA"))
    rows.append(llama_row)
    if llama is not None:
        rows += peer_rows(sizes, engines.get("graphs", engines["eager"]), llama, budget)
    del engines, model, llama
    release(device)
    return rows
