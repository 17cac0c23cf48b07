"""The sequential (and chunked) backward and the batched-heads fused loss must equal the naive
summed-loss backward."""

import pytest
import torch

from mtp.config import ModelConfig
from mtp.loss import (
    IGNORE_INDEX,
    batched_loss,
    evaluate_head_losses,
    linear_cross_entropy,
    mtp_targets,
    naive_loss,
    sequential_backward,
    step_backward,
)
from mtp.model import MTPTransformer
from mtp.bench.profiling import LiveTensorBytes


TOLERANCE = {torch.float32: dict(rtol=2e-5, atol=1e-6), torch.float64: dict(rtol=1e-9, atol=1e-12)}
BF16_NAIVE = 5e-2  # bf16 autocast moves any schedule's gradients by 1e-3..1e-2 (max relative error over params)
BF16_EXCESS = 2.0  # the sequential schedule's bf16 error: at most this times the naive one's, plus 1e-3


def _model(n_future: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> MTPTransformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=97, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, n_future=n_future, max_seq_len=64, multiple_of=16)
    return MTPTransformer(cfg).to(dtype)


def _batch(seed: int = 1, B: int = 3, T: int = 24, vocab: int = 97) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T + 1), generator=g)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_targets_shift_per_head():
    tokens = torch.arange(10).view(1, 10)
    inputs, targets = mtp_targets(tokens, n_future=3)
    assert inputs.tolist() == [list(range(9))]
    assert targets[0, 0].tolist() == list(range(1, 10))
    assert targets[2, 0].tolist() == list(range(3, 10)) + [IGNORE_INDEX] * 2


@pytest.mark.parametrize("n_future", [1, 2, 4])
@pytest.mark.parametrize("chunk_size", [None, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sequential_backward_matches_naive(n_future, chunk_size, dtype, device):
    tokens = _batch().to(device)
    inputs, targets = mtp_targets(tokens, n_future, pad_id=5)  # token 5 acts as padding: ignored targets
    assert (targets == IGNORE_INDEX).any()
    weights = [1.0, 0.3, 0.3, 0.3][:n_future]

    tol = TOLERANCE[dtype]

    naive = _model(n_future, dtype=dtype).to(device)
    loss, ref = naive_loss(naive, inputs, targets, weights)
    loss.backward()

    seq = _model(n_future, dtype=dtype).to(device)
    got = sequential_backward(seq, inputs, targets, weights, chunk_size=chunk_size)

    torch.testing.assert_close(got.head_losses, ref.head_losses, **tol)
    torch.testing.assert_close(got.loss, ref.loss, **tol)
    ref_grads, got_grads = _grads(naive), _grads(seq)
    assert ref_grads.keys() == got_grads.keys()
    for name in ref_grads:
        assert ref_grads[name].abs().max() > 0, f"{name} got no gradient"
        torch.testing.assert_close(got_grads[name], ref_grads[name], **tol, msg=name)


@pytest.mark.parametrize("n_future", [1, 2, 4])
@pytest.mark.parametrize("chunk_size", [None, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_heads_fused_loss_matches_naive(n_future, chunk_size, dtype, device):
    inputs, targets = mtp_targets(_batch().to(device), n_future, pad_id=5)
    weights = [1.0, 0.3, 0.3, 0.3][:n_future]
    tol = TOLERANCE[dtype]

    naive = _model(n_future, dtype=dtype).to(device)
    with torch.no_grad():  # every head its own weights: a mix-up of stacked heads cannot pass
        for i, head in enumerate(naive.heads):
            head.attention.wq.weight.mul_(1 + i)
            head.feed_forward.w2.weight.mul_(1 - 0.2 * i)
    batched = _model(n_future, dtype=dtype).to(device)
    batched.load_state_dict(naive.state_dict())
    loss, ref = naive_loss(naive, inputs, targets, weights)
    loss.backward()
    got_loss, got = batched_loss(batched, inputs, targets, weights, chunk_size=chunk_size)
    got_loss.backward()

    torch.testing.assert_close(got.head_losses, ref.head_losses, **tol)
    torch.testing.assert_close(got.loss, ref.loss, **tol)
    torch.testing.assert_close(got_loss.detach(), loss.detach(), **tol)
    for (name, a), b in zip(naive.named_parameters(), batched.parameters()):
        assert a.grad.abs().max() > 0, f"{name} got no gradient"
        torch.testing.assert_close(b.grad, a.grad, **tol, msg=name)


def test_heads_batched_is_every_head_on_the_trunk_output():
    model = _model(3)
    h = model.trunk(_batch()[:, :-1])
    expected = torch.stack([model.head(i, h).flatten(0, 1) for i in range(3)])
    torch.testing.assert_close(model.heads_batched(h), expected, rtol=0, atol=1e-13)


def test_fused_linear_cross_entropy_never_holds_the_whole_logits():
    torch.manual_seed(0)
    rows, dim, vocab, chunk = 512, 16, 2048, 16
    x = torch.randn(rows, dim, requires_grad=True)
    weight = torch.randn(vocab, dim, requires_grad=True)
    targets = torch.randint(0, vocab, (rows,))
    scale = torch.full((rows,), 1.0 / rows, dtype=torch.float64)
    with LiveTensorBytes() as live:
        loss, _ = linear_cross_entropy(x, weight, targets, scale, chunk_size=chunk)
        loss.backward()
    logits_bytes = rows * vocab * 4
    assert live.peak_bytes < logits_bytes / 4, (live.peak_bytes, logits_bytes)  # chunks of 1/32
    ref = torch.nn.functional.cross_entropy(x.detach().requires_grad_() @ weight.t(), targets)
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [None, 7])
def test_sequential_backward_under_bf16_autocast_adds_no_error(chunk_size, device):
    """Against the fp32 naive gradients, the sequential (and chunked) backward and the batched
    fused loss under bf16 autocast err no more than the naive backward under bf16 does: the
    schedule adds nothing."""
    inputs, targets = mtp_targets(_batch().to(device), 4)

    def error(schedule: str) -> float:
        model = _model(4, dtype=torch.float32).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            step_backward(schedule, model, inputs, targets, chunk_size=chunk_size)
        return max(float((p.grad - ref[n]).norm() / ref[n].norm()) for n, p in model.named_parameters())

    reference = _model(4, dtype=torch.float32).to(device)
    naive_loss(reference, inputs, targets)[0].backward()
    ref = _grads(reference)
    naive = error("naive")
    assert 0 < naive <= BF16_NAIVE
    assert error("sequential") <= BF16_EXCESS * naive + 1e-3
    assert error("batched") <= BF16_EXCESS * naive + 1e-3


def test_loss_scale_accumulates_like_grad_accumulation():
    tokens = _batch(B=4)
    inputs, targets = mtp_targets(tokens, 2)
    whole = _model(2)
    sequential_backward(whole, inputs, targets)
    halves = _model(2)
    for part in (slice(0, 2), slice(2, 4)):
        sequential_backward(halves, inputs[part], targets[:, part], loss_scale=0.5)
    for (name, a), b in zip(whole.named_parameters(), halves.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_evaluate_head_losses_matches_training_losses():
    tokens = _batch()
    inputs, targets = mtp_targets(tokens, 4)
    model = _model(4)
    _, ref = naive_loss(model, inputs, targets)
    sums = evaluate_head_losses(model, inputs, targets, chunk_size=5)
    torch.testing.assert_close(sums[:, 0] / sums[:, 1], ref.head_losses, rtol=1e-10, atol=1e-12)


def test_param_matched_removes_trunk_layers():
    base = ModelConfig(n_layers=8, n_future=4)
    matched = ModelConfig(n_layers=8, n_future=4, param_matched=True)
    assert base.n_trunk_layers == 7 and matched.n_trunk_layers == 4
    assert len(MTPTransformer(ModelConfig(dim=32, n_heads=4, n_layers=8, n_future=4, param_matched=True)).trunk_layers) == 4
