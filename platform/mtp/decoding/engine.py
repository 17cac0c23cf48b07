"""The decoding engine: continuous batching over a static KV cache, plain or self-speculative.

It computes what ``mtp.decoding.reference`` specifies (the tests hold it to that
token for token and step for step) and adds what makes it fast and servable:

* packed weights (``mtp.decoding.packed``): fused projections, all heads as one
  batched layer, so a step costs few kernel calls;
* a preallocated static cache, written at explicit slots: rolling back is
  resetting a length, not cutting tensors;
* one forward verifies a whole draft tree (tree attention mask), where the
  reference runs one chain per path;
* many requests in one batch, each row at its own position, joining and leaving
  between steps (continuous batching), with per-row sampling settings and seeds;
* fixed step buffers, so a step can be compiled (``torch.compile``, any device; the
  attended cache length a dynamic size) or replayed as a CUDA graph (static shapes).

Requests run in rows of a fixed-size batch. A row is admitted with a prefill
(which also yields its first token and the heads' first drafts), then advances one
verification forward per step with its own position and its own number of
accepted tokens, and leaves when it stops; a waiting request takes its row.

Three step kinds, chosen per request:

* ``vanilla`` (``speculative=False``): head 0 only, one token per forward;
* speculative greedy: feed ``[pending, drafts...]`` (a chain, or a ``DraftTree``
  of the heads' top-k), take head 0's argmax at every fed token, accept the longest
  path that agrees plus head 0's next token, and draft again from the heads at the
  accepted position, all from the same forward (Stern et al. 2018). The output is
  token for token what greedy decoding gives;
* speculative sampling (temperature > 0): the chain, with speculative sampling's
  accept/reject rule, so outputs are distributed exactly as head 0's.

Both acceptance rules live in ``mtp.decoding.acceptance``.

Rolling back rejected drafts is resetting a row's length: their cache slots are
overwritten by the next step and masked out until then.

All requests, from any caller, go through one scheduler: ``submit`` queues a
request (optionally with a listener that receives its text deltas and result),
and every ``step`` admits waiting requests into free rows or advances the running
ones. ``generate`` and ``stream`` are thin drivers over it, so concurrent callers
(a server's streams and plain requests) share the same running batch. One static
cache serves one step kind at a time: while another kind waits at the head of the
queue, the running kind admits no more rows and drains, then the next kind starts.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence, Union

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from mtp.decoding import acceptance
from mtp.decoding.api import Generation, GenerationStats, RequestError, SamplingParams
from mtp.decoding.config import EngineConfig
from mtp.decoding.graphs import CompiledSteps, CudaGraphs
from mtp.decoding.packed import PackedModel, StepLayout
from mtp.decoding.sampling import RowSampling, sample, target_probs
from mtp.decoding.text import TextState
from mtp.decoding.tree import DraftTree, TreeTensors
from mtp.model import MTPTransformer
from mtp.tokenizer import Tokenizer

CHANGING_SHAPE_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


# One of each step kind: greedy or sampled, speculative or head 0 alone.
STEP_KINDS = tuple(SamplingParams(temperature=t, speculative=s) for t in (0.0, 1.0) for s in (True, False))
Event = Union[str, Generation, BaseException]
Listener = Callable[[Event], None]


@dataclass(frozen=True)
class _Mode:
    """How a group of requests steps: which tree (None = vanilla) and whether rows sample."""

    tree: TreeTensors | None
    sampled: bool

    @property
    def width(self) -> int:
        return self.tree.size if self.tree is not None else 1

    @property
    def drafts(self) -> int:
        return len(self.tree.tree.widths) if self.tree is not None else 0

    @property
    def uniforms(self) -> int:
        """Random numbers a sampled row draws per step: accept tests, the next token, the next drafts."""
        return 2 * self.drafts + 1 if self.sampled else 0


@dataclass(eq=False)
class Request:
    """One queued or running request, as ``Engine.submit`` returns it.

    ``listener`` (called on the thread that runs ``Engine.step``; it must be quick
    and must not call the engine) gets, with ``stream=True``, each text delta that
    can no longer change, then the final ``Generation``, or the exception that
    failed the request. A listener that raises cancels its request: nobody listens.
    """

    index: int
    prompt: list[int]
    params: SamplingParams
    mode: _Mode
    text: TextState
    generator: torch.Generator | None
    listener: Listener | None = None
    stream: bool = False
    stats: GenerationStats = field(default_factory=GenerationStats)
    started: float = 0.0
    cancelled: bool = False  # set from any thread; the scheduler drops the request at its next step
    done: bool = False  # the result (or error) has been published
    error: BaseException | None = None

    def cancel(self) -> None:
        """Stop working on this request (its row is freed at the next step); no result follows."""
        self.cancelled = True

    @property
    def finished(self) -> bool:
        return self.cancelled or self.text.finish_reason is not None

    def accept(self, tokens: list[int], drafts_accepted: int | None) -> bool:
        """Record one step's tokens; returns True when finished."""
        if drafts_accepted is not None:
            self.stats.forwards += 1
            hist = self.stats.accepted_histogram
            hist.extend([0] * (drafts_accepted + 1 - len(hist)))
            hist[drafts_accepted] += 1
        done = self.text.extend(tokens)
        self.stats.generated_tokens = len(self.text.tokens)
        self.stats.elapsed_s = time.perf_counter() - self.started
        return done

    def result(self) -> Generation:
        return Generation(self.prompt, list(self.text.tokens), self.text.text, self.text.finish_reason, self.stats)

    def publish(self) -> None:
        """After a step: hand the listener the new text, and the result once finished."""
        if self.cancelled or self.done:
            return
        if self.text.finish_reason is not None:
            self.done = True
        if self.listener is None:
            return
        if self.stream and (delta := self.text.delta()):
            self._tell(delta)
        if self.done:
            self._tell(self.result())

    def fail(self, exc: BaseException) -> None:
        self.error, self.done = exc, True
        if self.listener is not None:
            self._tell(exc)

    def _tell(self, event: Event) -> None:
        if self.cancelled:
            return
        try:
            self.listener(event)
        except Exception:  # noqa: BLE001 - a broken listener must not fail the other rows
            self.cancelled = True


class _Rows:
    """Device state of the active rows (``[max_batch, ...]`` buffers) and their requests."""

    def __init__(self, engine: "Engine", mode: _Mode):
        B, dev = engine.max_batch_size, engine.device
        self.mode = mode
        self.requests: list[Request] = []
        self.lengths = torch.zeros(B, dtype=torch.long, device=dev)
        self.host_lengths: list[int] = []
        self.fed = torch.zeros(B, mode.width, dtype=torch.long, device=dev)
        self.draft_probs = torch.zeros(B, mode.drafts, engine.vocab_size, device=dev) if mode.sampled else None
        self.uniforms = torch.zeros(B, mode.uniforms, device=dev)  # this step's, drawn on the host per request
        self.sampling = RowSampling.build([SamplingParams()] * B, engine.vocab_size, dev)

    def buffers(self) -> list[torch.Tensor]:
        s = self.sampling
        return [t for t in (self.lengths, self.fed, self.draft_probs, self.uniforms, s.temperature, s.top_k, s.top_p)
                if t is not None]

    def move(self, src: int, dst: int) -> None:
        for t in self.buffers():
            t[dst] = t[src]
        self.requests[dst] = self.requests[src]
        self.host_lengths[dst] = self.host_lengths[src]


class Engine:
    """Generate from an ``MTPTransformer`` with self-speculative decoding, as ``config`` says.

    ``config.tree`` (widths per draft depth, e.g. ``(3, 2, 1)``) makes greedy requests
    verify a Medusa-style candidate tree instead of a single chain.
    ``static_shapes`` gives every step fixed shapes for its batch size (attention over
    the whole cache, masked); ``cuda_graphs`` (implies it) captures each step kind and
    batch size once and replays it, which removes the per-kernel launch cost that
    dominates small-batch decoding on GPUs. ``compile`` (not with ``cuda_graphs``) runs
    each step through ``torch.compile``, on any device, attending over the filled part
    of the cache only (its length a dynamic size): a step kind is compiled once for one
    row and once for ``max_batch_size`` rows (a step of 2.. rows pads up to it), on
    first use or in ``warm_up`` (which a server calls before taking requests).
    The model is moved to the config's device and dtype and its weights are repacked
    once here: build a new Engine after changing them. Any number of threads may
    submit, generate and stream at once: their requests share one continuous batch
    (one static cache per engine).
    """

    def __init__(self, model: MTPTransformer, tokenizer: Tokenizer, config: EngineConfig | None = None):
        self.config = config = (config or EngineConfig()).validate()
        self.device = config.torch_device()
        if config.cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a CUDA device, not {self.device}")
        self.model = model.to(device=self.device, dtype=config.torch_dtype(self.device)).eval()
        self.tokenizer = tokenizer
        self.cfg = model.cfg
        self.max_batch_size = max_batch_size = config.max_batch_size
        self.vocab_size = self.cfg.vocab_size
        self.packed = PackedModel(self.model)
        drafts, tree = self.cfg.n_future - 1, config.tree
        if tree is not None and not 1 <= len(tree) <= drafts:
            raise ValueError(f"tree={tuple(tree)} needs between 1 and n_future - 1 = {drafts} levels")
        with torch.inference_mode():
            self.chain = TreeTensors(DraftTree.chain(drafts), self.device) if drafts else None
            self.tree = TreeTensors(DraftTree(tuple(tree)), self.device) if tree is not None else self.chain
            width = max(self.tree.size if self.tree is not None else 1, drafts + 1)
            self.cache = self.packed.new_cache(max_batch_size, self.cfg.max_seq_len + width)
            self._arange = torch.arange(self.cache.slots, device=self.device)
            self._slot_ids = self._arange.clone()  # sliced to the filled part: a compiled step's dynamic input
            for tree in (self.chain, self.tree):  # the heads' fused projections, built outside any capture
                self.packed.heads.qkv(1 + (len(tree.tree.widths) if tree is not None else 0))
        self._rows: dict[_Mode, _Rows] = {}  # device state per step kind, allocated once
        self.static_shapes = config.static_shapes or config.cuda_graphs
        self._graphs = CudaGraphs() if config.cuda_graphs else None
        self._compiled = CompiledSteps(self._device_step, self.cache.slots - 1) if config.compile else None
        self._lock = threading.Lock()  # one step at a time
        self._waiting: deque[Request] = deque()
        self._waiting_lock = threading.Lock()  # submit() may run while a step does
        self._active: _Rows | None = None  # the rows of the step kind now running

    @classmethod
    def from_checkpoint(cls, directory: str, config: EngineConfig | None = None) -> "Engine":
        """An engine over a local checkpoint directory (an MLflow URI is resolved first, by
        ``mtp.tracking.registry.resolve_checkpoint``), loaded straight onto the config's device and dtype."""
        from mtp.checkpoint import load_model

        config = (config or EngineConfig()).validate()
        device = config.torch_device()
        model, tokenizer, _ = load_model(directory, device=device, dtype=config.torch_dtype(device))
        return cls(model, tokenizer, config)

    # ------------------------------------------------------------------ public API

    def generate(self, prompts: list[str], params: SamplingParams | list[SamplingParams]) -> list[Generation]:
        return self.generate_ids([self.tokenizer.encode(p) for p in prompts], params)

    def generate_ids(self, prompt_ids: list[list[int]], params: SamplingParams | list[SamplingParams],
                     progress: Callable[[int, int], None] | None = None) -> list[Generation]:
        """Any number of prompts, batched ``max_batch_size`` rows at a time; results in prompt order.

        Requests are queued grouped by step kind (so a mixed list does not switch
        kinds at every row) and decoded together with whatever else is running.
        ``progress(done, total)`` is called whenever more of them have finished.
        """
        requests = self._requests(prompt_ids, params)
        groups: dict[_Mode, list[Request]] = {}
        for r in requests:
            groups.setdefault(r.mode, []).append(r)
        self._enqueue([r for group in groups.values() for r in group])
        pending = list(reversed(requests))  # oldest last: the first to finish, popped cheaply
        reported = 0
        while pending:
            while pending and pending[-1].done:
                pending.pop()
            if progress is not None and len(requests) - len(pending) > reported:
                reported = len(requests) - len(pending)
                progress(reported, len(requests))
            if pending and not self.step() and not pending[-1].done:
                raise RuntimeError("the engine went idle with unfinished requests")
        failed = next((r.error for r in requests if r.error is not None), None)
        if failed is not None:
            raise failed
        return [r.result() for r in requests]

    def stream(self, prompt: str, params: SamplingParams) -> Iterator[str | Generation]:
        """Text deltas as tokens are accepted, then the final ``Generation``.

        Every ``next`` runs one step of the shared batch, so streams and other
        callers' requests advance together; closing the iterator early cancels
        the request.
        """
        events: deque[Event] = deque()
        request = self.submit(self.tokenizer.encode(prompt), params, events.append, stream=True)
        try:
            while True:
                while events:
                    event = events.popleft()
                    if isinstance(event, BaseException):
                        raise event
                    yield event
                    if isinstance(event, Generation):
                        return
                if not self.step() and not events:
                    raise RuntimeError("the engine went idle with an unfinished stream")
        finally:
            request.cancel()

    def submit(
        self, prompt_ids: list[int], params: SamplingParams, listener: Listener | None = None, stream: bool = False
    ) -> Request:
        """Validate and queue one request (thread-safe); whoever calls ``step`` decodes it.

        Raises ``RequestError`` (a ``ValueError`` naming the field) for an impossible
        request before anything is queued: the one place requests are checked.
        """
        (request,) = self._requests([prompt_ids], params, listener, stream)
        self._enqueue([request])
        return request

    def step(self) -> bool:
        """One scheduling step: admit waiting requests into free rows (a prefill) or
        advance every running row by one forward; then publish and retire.

        Thread-safe (steps are serialised); returns False when there was nothing to do.
        If the model raises, every request in the step fails with the exception (their
        listeners are told), the rows are cleared, the engine stays usable, and the
        exception propagates to the caller.
        """
        with self._lock:
            admitted: list[Request] = []
            try:
                rows = self._select_rows()
                if rows is None:
                    return False
                admitted = self._admit(rows)
                if admitted:
                    self._prefill(rows, admitted)
                elif rows.requests:  # (empty only if the waiting head was cancelled meanwhile)
                    self._step(rows)
                for request in rows.requests:
                    request.publish()
                self._retire(rows)
            except BaseException as exc:
                self._fail(admitted, exc)
                raise
            return True

    def warm_up(self, kinds: Sequence[SamplingParams] = STEP_KINDS) -> float:
        """Compile (or capture) the steps of these request kinds (default: all) at every batch
        bucket now, so that no request pays for it later; returns the seconds it took.

        It decodes a few throwaway tokens per kind and bucket, so call it before serving.
        """
        start = time.perf_counter()
        for params in kinds:
            params = SamplingParams(**{**params.__dict__, "max_new_tokens": 2, "stop": [], "seed": 0})
            for bucket in self._buckets():
                self.generate_ids([[0]] * bucket, params)
        return time.perf_counter() - start

    @property
    def cuda_graphs(self) -> bool:
        return self._graphs is not None

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    @property
    def compile_s(self) -> float:
        """Seconds spent compiling steps so far (0 unless ``compile``)."""
        return self._compiled.compile_s if self._compiled is not None else 0.0

    def _buckets(self) -> list[int]:
        """Batch sizes a step is compiled or captured for."""
        if self._compiled is None:
            return list(range(1, self.max_batch_size + 1)) if self._graphs is not None else [1]
        return sorted({1, self.max_batch_size})  # compiling is slow on a CPU: one alone, or all rows

    def has_work(self) -> bool:
        """Whether requests are waiting or running (a cancelled one counts until the next step)."""
        return bool(self._waiting) or (self._active is not None and bool(self._active.requests))

    # ------------------------------------------------------------------ requests

    def _requests(
        self,
        prompt_ids: list[list[int]],
        params: SamplingParams | list[SamplingParams],
        listener: Listener | None = None,
        stream: bool = False,
    ) -> list[Request]:
        """Validate everything before any work, so a bad request fails alone and early."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompt_ids)
        if len(params) != len(prompt_ids):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompt_ids)} prompts")
        limit = self.cfg.max_seq_len
        requests = []
        for i, (ids, p) in enumerate(zip(prompt_ids, params)):
            p.validate()
            if not ids:
                raise RequestError(f"prompt {i} is empty: at least one token is needed", "prompt")
            if min(ids) < 0 or max(ids) >= self.vocab_size:
                raise RequestError(f"prompt {i} has token ids outside [0, {self.vocab_size})", "prompt")
            if len(ids) >= limit:
                raise RequestError(f"prompt {i} has {len(ids)} tokens; the model's context is {limit}", "prompt",
                                   "context_length_exceeded")
            if len(ids) + p.max_new_tokens > limit:
                raise RequestError(
                    f"prompt {i}: {len(ids)} prompt tokens + max_new_tokens={p.max_new_tokens} "
                    f"= {len(ids) + p.max_new_tokens} exceeds the model's max_seq_len={limit}",
                    "max_new_tokens", "context_length_exceeded",
                )
            generator = None
            if p.temperature > 0:
                seed = p.seed if p.seed is not None else int(torch.randint(2**62, ()).item())
                generator = torch.Generator().manual_seed(seed)
            text = TextState(self.tokenizer, list(p.stop), p.max_new_tokens)
            requests.append(Request(i, list(ids), p, self._mode(p), text, generator, listener, stream))
        return requests

    def _mode(self, params: SamplingParams) -> _Mode:
        sampled = params.temperature > 0
        if not params.speculative or self.chain is None:
            return _Mode(None, sampled)
        return _Mode(self.chain if sampled else self.tree, sampled)

    # ------------------------------------------------------------------ scheduling

    def _enqueue(self, requests: list[Request]) -> None:
        with self._waiting_lock:
            self._waiting.extend(requests)

    def _select_rows(self) -> _Rows | None:
        """The running step kind's rows, or the next kind's once the running one has drained."""
        rows = self._active
        if rows is not None:
            self._retire(rows)  # cancelled rows leave before they cost a forward
            if rows.requests:
                return rows
        with self._waiting_lock:
            while self._waiting and self._waiting[0].cancelled:
                self._waiting.popleft()
            head = self._waiting[0] if self._waiting else None
        if head is None:
            self._active = None
            return None
        self._active = self._rows.get(head.mode) or self._rows.setdefault(head.mode, _Rows(self, head.mode))
        return self._active

    def _admit(self, rows: _Rows) -> list[Request]:
        """Waiting requests of the running kind for the free rows, in arrival order; stops at
        the first of another kind, so the running kind drains and that one gets its turn."""
        admitted: list[Request] = []
        free = self.max_batch_size - len(rows.requests)
        with self._waiting_lock:
            while self._waiting and len(admitted) < free:
                head = self._waiting[0]
                if head.cancelled:
                    self._waiting.popleft()
                elif head.mode == rows.mode:
                    admitted.append(self._waiting.popleft())
                else:
                    break
        return admitted

    def _fail(self, admitted: list[Request], exc: BaseException) -> None:
        """Fail the running rows and those being admitted, and clear the rows for what waits."""
        rows = self._active
        running = rows.requests if rows is not None else []
        ids = set(map(id, running))
        for request in running + [r for r in admitted if id(r) not in ids]:
            request.fail(exc)
        if rows is not None:
            rows.requests.clear()
            rows.host_lengths.clear()

    def _retire(self, rows: _Rows) -> None:
        """Drop finished rows, moving the last row into each hole (keeps rows contiguous)."""
        for i in reversed(range(len(rows.requests))):
            if not rows.requests[i].finished:
                continue
            last = len(rows.requests) - 1
            if i != last:
                with torch.inference_mode():
                    self.cache.move_row(last, i, rows.host_lengths[last])
                    rows.move(last, i)
            rows.requests.pop()
            rows.host_lengths.pop()

    def _uniforms(self, requests: list[Request], k: int) -> torch.Tensor:
        return torch.stack([torch.rand(k, generator=r.generator) for r in requests]).to(self.device)

    def _layout(self, lengths: torch.Tensor, kv_slots: torch.Tensor, width: int, tree: TreeTensors | None,
                from_start: bool = False) -> StepLayout:
        """Slots, rotary positions and an attention mask over the cache slots ``kv_slots``
        (``0..S-1``) for ``width`` tokens after each row's ``lengths``."""
        offsets = self._arange[:width]
        slots = lengths[:, None] + offsets
        depth = tree.depth if tree is not None else offsets
        rope = (lengths[:, None] + depth).clamp_(max=self.cfg.max_seq_len - 1)
        rel = kv_slots - lengths[:, None, None]  # [B, 1, S]: slot - length
        if tree is None or tree.tree.is_chain:
            mask = rel <= offsets[:, None]
        else:
            mask = (rel < 0) | ((rel < width) & tree.ancestors[offsets[:, None], rel.clamp(0, width - 1)])
        return StepLayout(rope, slots, mask[:, None], self._arange[: lengths.shape[0], None], from_start)

    # ------------------------------------------------------------------ model steps

    @torch.inference_mode()
    def _prefill(self, rows: _Rows, new: list[Request]) -> None:
        """Run new requests' prompts into free rows: first token and first drafts."""
        mode, start = rows.mode, len(rows.requests)
        now = time.perf_counter()
        for r in new:
            r.started = now
        lengths = [len(r.prompt) for r in new]
        T = max(lengths)
        tokens = torch.tensor([r.prompt + [0] * (T - len(r.prompt)) for r in new], device=self.device)
        zero = torch.zeros(len(new), dtype=torch.long, device=self.device)
        heads = 1 + mode.drafts
        last = torch.tensor(lengths, device=self.device) - 1
        layout = self._layout(zero, self._arange[:T], T, None, from_start=True)
        with self._changing_shapes():
            hidden = self.packed.forward(tokens, layout, self.cache, slice(start, start + len(new)), heads, last[:, None])
        logits = self.packed.logits(hidden[:, :, 0].transpose(0, 1))  # [k, heads, V] at each prompt's end
        sampling = RowSampling.build([r.params for r in new], self.vocab_size, self.device)
        end = start + len(new)
        for buf, value in zip(
            (rows.sampling.temperature, rows.sampling.top_k, rows.sampling.top_p),
            (sampling.temperature, sampling.top_k, sampling.top_p),
        ):
            buf[start:end] = value
        rows.lengths[start:end] = last + 1
        if mode.sampled:
            probs = target_probs(logits, sampling)
            first = sample(probs, self._uniforms(new, heads))  # [k, heads]
            rows.fed[start:end] = first
            if mode.drafts:
                rows.draft_probs[start:end] = probs[:, 1:]
        else:
            first = logits[:, :1].argmax(-1)
            rows.fed[start:end] = first if mode.tree is None else mode.tree.tokens(first[:, 0], logits[:, 1:])
        rows.requests.extend(new)
        rows.host_lengths.extend(lengths)
        for r, token in zip(new, first[:, 0].tolist()):
            r.accept([token], None)
            r.stats.prefill_s = r.stats.elapsed_s

    @torch.inference_mode()
    def _step(self, rows: _Rows) -> None:
        """One forward for every active row: verify drafts (or take one token), draft again."""
        mode, B = rows.mode, len(rows.requests)
        if mode.sampled:
            rows.uniforms[:B] = self._uniforms(rows.requests, mode.uniforms)
        filled = self._slot_ids[: max(rows.host_lengths) + mode.width]  # the slots any row attends to this step
        if self._graphs is not None:
            emitted, accepted = self._graphs.run((mode, B), lambda: self._device_step(rows, B, self._arange), rows.buffers())
        elif self._compiled is not None:
            padded = next(b for b in self._buckets() if b >= B)
            rows.lengths[B:padded] = 0  # padding rows (free, stale) write their keys/values in range
            emitted, accepted = self._compiled(rows, padded, filled)
            emitted, accepted = emitted[:B], accepted[:B] if accepted is not None else None
        elif self.static_shapes:
            emitted, accepted = self._device_step(rows, B, self._arange)
        else:
            with self._changing_shapes():
                emitted, accepted = self._device_step(rows, B, filled)
        steps = emitted.tolist() if accepted is None else torch.cat([accepted[:, None], emitted], 1).tolist()
        for i, (request, out) in enumerate(zip(rows.requests, steps)):
            n_accepted = 0 if accepted is None else out.pop(0)
            request.accept(out[: n_accepted + 1], n_accepted)
            rows.host_lengths[i] += n_accepted + 1

    def _changing_shapes(self) -> AbstractContextManager:
        """Attention kernels for a forward whose shapes are new (every prefill; every
        eager step, whose key length grows): on CUDA, not cuDNN's, which builds an
        execution plan per shape. Measured on an H200 (torch 2.11, 0.3B, batch 1):
        3.9 ms of CPU per attention call, an eager step of 61 ms with it and 14 ms
        without; static-shape steps keep it (a graph-replayed step 1.3 ms with it,
        3.7 ms without)."""
        return sdpa_kernel(CHANGING_SHAPE_ATTENTION) if self.device.type == "cuda" else nullcontext()

    def _device_step(self, rows: _Rows, B: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The first ``B`` rows' step on the device, attending over cache ``slots`` (``0..S-1``:
        the filled part, or the whole cache for a CUDA graph): no host synchronisation and no
        host-side values, so it can be compiled (``S`` a dynamic size) or captured."""
        mode = rows.mode
        layout = self._layout(rows.lengths[:B], slots, mode.width, mode.tree)
        hidden = self.packed.forward(rows.fed[:B], layout, self.cache, slice(0, B), 1 + mode.drafts)
        if mode.tree is None:
            return self._vanilla(rows, hidden, B), None
        if mode.sampled:
            return self._speculative_sampling(rows, hidden, B)
        return self._speculative_greedy(rows, hidden, B)

    def _vanilla(self, rows: _Rows, hidden: torch.Tensor, B: int) -> torch.Tensor:
        logits = self.packed.logits(hidden[0])  # [B, 1, V]
        if rows.mode.sampled:
            token = sample(target_probs(logits, rows.sampling.rows(slice(0, B))), rows.uniforms[:B])
        else:
            token = logits.argmax(-1)
        rows.fed[:B] = token
        rows.lengths[:B] += 1
        return token

    def _speculative_greedy(self, rows: _Rows, hidden: torch.Tensor, B: int) -> tuple[torch.Tensor, torch.Tensor]:
        tree = rows.mode.tree
        fed, lengths = rows.fed[:B], rows.lengths[:B]
        logits = self.packed.logits(hidden)  # [heads, B, W, V]: one call, cheaper here than two exact ones
        target = logits[0].argmax(-1)  # [B, W]
        best, accepted, emitted = acceptance.greedy(tree, fed, target)
        if not tree.tree.is_chain:  # the accepted path's keys/values -> contiguous slots
            path = tree.path[best, 1:]
            self.cache.move_slots(self._arange[:B], lengths[:, None] + path, lengths[:, None] + 1 + self._arange[: path.shape[1]])
        drafts = logits[1:, self._arange[:B], best]  # [D, B, V]: the heads at the accepted node
        rows.fed[:B] = tree.tokens(emitted.gather(1, accepted[:, None])[:, 0], drafts.transpose(0, 1))
        rows.lengths[:B] += accepted + 1
        return emitted, accepted

    def _speculative_sampling(self, rows: _Rows, hidden: torch.Tensor, B: int) -> tuple[torch.Tensor, torch.Tensor]:
        D = rows.mode.drafts
        fed, sampling = rows.fed[:B], rows.sampling.rows(slice(0, B))
        target = target_probs(self.packed.logits(hidden[0]), sampling)  # [B, D + 1, V]
        u = rows.uniforms[:B]
        accepted, emitted = acceptance.sampled(fed[:, 1:], target, rows.draft_probs[:B], u[:, : D + 1])
        bonus = emitted.gather(1, accepted[:, None])
        head_logits = self.packed.logits(hidden[1:, self._arange[:B], accepted].transpose(0, 1))
        draft_probs = target_probs(head_logits, sampling)
        rows.fed[:B] = torch.cat([bonus, sample(draft_probs, u[:, D + 1 :])], 1)
        rows.draft_probs[:B] = draft_probs
        rows.lengths[:B] += accepted + 1
        return emitted, accepted
