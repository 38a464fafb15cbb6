"""What the perturbation costs in memory: the norm of S reads bf16/fp16 moments without a float32 copy of them, and
the buffer of S's size (w + e swapped in, or a backup of w) is allocated once per selection on the CPU; w is
restored bit-exactly at every micro-batch, and a tensor whose storage something else reads is perturbed in place.

Allocations are read from the profiler's memory records (`torch.profiler.profile(profile_memory=True)`): every CPU
allocation and free, in order, so the bytes held at once are their running sum.
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import TrainerCallback

from conftest import shakespeare_lm_dataset, tiny_gpt2
from hf_lwsam import LWSAMTrainer
from hf_lwsam.sam import Perturbation, global_norm, momentum_scale


def allocations(fn) -> tuple[int, int]:
    """(the most bytes held at once, the bytes allocated in all) by the CPU allocations made while `fn` runs and its
    result is dropped."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    records = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                     key=lambda e: e.start_ns())
    held = peak = total = 0
    for record in records:
        held += record.nbytes()  # an allocation is positive, a free negative
        peak, total = max(peak, held), total + max(record.nbytes(), 0)
    return peak, total


def nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def norm_as_before(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The former global_norm: every tensor cast to float32, the norm of the per-tensor norms."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm([t.float() for t in tensors])))


def exact_norm(tensors: list[torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)))


def test_global_norm_of_float32_tensors_is_bit_identical_to_before():
    torch.manual_seed(0)
    # one tensor past the chunk that bf16 tensors are read in, a transposed (non-contiguous) one, float64 mixed in
    tensors = [torch.randn(1500, 800), torch.randn(7), torch.randn(30, 40).t(), torch.randn(5, dtype=torch.float64)]
    assert torch.equal(global_norm(tensors), norm_as_before(tensors))
    assert torch.equal(global_norm(tensors[:3]), norm_as_before(tensors[:3]))
    assert global_norm(tensors).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_global_norm_of_half_tensors_equals_the_float32_norm_within_rounding(dtype):
    torch.manual_seed(0)
    tensors = [torch.randn(1500, 800, dtype=dtype), torch.randn(7, dtype=dtype),
               torch.randn(30, 40, dtype=dtype).t(), torch.randn(20)]  # chunked, whole, non-contiguous, float32
    got = global_norm(tensors)
    assert got.dtype == torch.float32
    # float32 sums of 1.2M squares: the former expression is itself about 5e-5 from the exact norm on this input
    assert float(got) == pytest.approx(exact_norm(tensors), rel=1e-4)
    assert float(got) == pytest.approx(float(norm_as_before(tensors)), rel=1e-4)
    # fp16 squares past 65504 (|x| > 256) would overflow in the tensor's own dtype: the sum is in float32
    big = [torch.full((1000,), 300.0, dtype=dtype)]
    assert float(global_norm(big)) == pytest.approx(300.0 * 1000**0.5, rel=1e-3)


def test_the_momentum_norm_of_bf16_moments_makes_no_float32_copy():
    torch.manual_seed(0)
    # 24 MiB of bf16 moments; the largest tensor alone is 2/3 of S, so a per-tensor float32 copy would show too
    moments = [torch.randn(8 * 2**20, dtype=torch.bfloat16), torch.randn(1024, 2048, dtype=torch.bfloat16),
               torch.randn(1024, 1024, dtype=torch.bfloat16), torch.randn(64, dtype=torch.bfloat16)]
    size = nbytes(moments)
    before_peak, _ = allocations(lambda: [t.float() for t in moments])
    assert before_peak >= 2 * size  # the measurement sees the float32 copies the former norm made
    peak, _ = allocations(lambda: momentum_scale(moments, 0.3))
    assert peak < size / 4  # one float32 chunk of the norm at a time (4 MiB), nothing of S's size

    scale, norm, usable = momentum_scale(moments, 0.3)
    assert bool(usable) and float(norm) == pytest.approx(exact_norm(moments), rel=1e-4)
    assert float(scale) == pytest.approx(-0.3 / exact_norm(moments), rel=1e-4)


@pytest.fixture(autouse=True)
def no_kept_backup():
    """Every test starts without a backup kept by an earlier one (the tensors here share their shapes)."""
    Perturbation._spare.clear()
    yield
    Perturbation._spare.clear()


def _params(views: bool = False) -> list[torch.Tensor]:
    """Parameters of their own (swapped), or (`views`) views of them (perturbed in place)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(300, 200)), torch.nn.Parameter(torch.randn(50)),
              torch.nn.Parameter(torch.randn(40, 30, dtype=torch.bfloat16))]
    return [p.detach()[:] for p in params] if views else params


def _steps(params: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    # steps as large as the weights: w + e rounds away low bits of w, so w + e - e != w and only the saved values
    # restore it
    return [3 * torch.randn(p.shape, generator=generator).to(p.dtype) for p in params]


def _buffer(perturbation: Perturbation) -> list[torch.Tensor]:
    """The tensors of S's size a perturbation holds: w + e swapped in, or the backup of w."""
    return perturbation.swapped or perturbation.backup


WAYS = pytest.mark.parametrize("views", [False, True], ids=["swapped", "in place"])


@WAYS
def test_restore_is_bit_exact_at_every_step_and_the_buffer_is_allocated_once(views):
    params = _params(views)
    start = [p.detach().clone() for p in params]
    storage = [p.data_ptr() for p in params]
    assert all(not torch.equal(w + e - e, w) for w, e in zip(start, _steps(params, 0)))  # not arithmetic
    for step in range(4):
        steps = _steps(params, step)
        expected = [w + e for w, e in zip(start, steps)]
        holder = []
        _, allocated = allocations(lambda h=holder, e=steps: h.append(Perturbation.apply(params, e)))
        perturbation = holder[0]
        assert bool(perturbation.swapped) is not views
        if step == 0:
            assert allocated >= nbytes(params)  # the first micro-batch allocates the buffer
        else:
            assert allocated < nbytes(params) / 10  # later ones write into the one kept (it was S's size each time)
        assert all(torch.equal(p, x) for p, x in zip(params, expected))
        perturbation.restore()
        perturbation.restore()  # idempotent
        assert all(torch.equal(p, w) for p, w in zip(params, start))
        assert [p.data_ptr() for p in params] == storage  # w is back in its own storage


@WAYS
def test_restore_after_a_failing_pass_is_exact_and_the_next_step_reuses_the_buffer(views):
    params = _params(views)
    start = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="failing pass"):
        perturbation = Perturbation.apply(params, _steps(params, 1))
        kept = [b.data_ptr() for b in _buffer(perturbation)]
        try:
            raise RuntimeError("failing pass")
        finally:
            perturbation.restore()
    assert all(torch.equal(p, w) for p, w in zip(params, start))
    again = Perturbation.apply(params, _steps(params, 2))
    assert [b.data_ptr() for b in _buffer(again)] == kept
    again.restore()
    assert all(torch.equal(p, w) for p, w in zip(params, start))


def test_a_parameter_whose_storage_is_read_elsewhere_is_perturbed_in_place_and_its_aliases_see_it():
    """A view of a weight kept by another module, or a second parameter on the same storage (weights tied by storage,
    not by object): swapping the parameter's storage would leave them at w, so the perturbation goes in place."""
    tied, alone = torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(4))
    alias = torch.nn.Parameter(tied.data)  # another parameter on tied's storage
    view = alone.detach()[1:]  # a view kept elsewhere
    for param, reader in ((tied, alias), (alone, view)):
        start, e = param.detach().clone(), torch.ones_like(param)
        perturbation = Perturbation.apply([param], [e])
        assert not perturbation.swapped
        assert torch.equal(reader, (start + e)[1:] if reader is view else start + e)  # the alias sees w + e
        perturbation.restore()
        assert torch.equal(param, start) and torch.equal(reader, start[1:] if reader is view else start)


def test_a_kept_buffer_that_something_still_holds_is_never_written_over():
    params = _params()
    first = Perturbation.apply(params, _steps(params, 1))
    held = first.swapped[0][:]  # e.g. a graph kept with retain_graph saved w + e
    snapshot = held.clone()
    first.restore()
    again = Perturbation.apply(params, _steps(params, 2))
    assert again.swapped[0].data_ptr() != held.data_ptr() and torch.equal(held, snapshot)
    again.restore()


def test_another_selection_allocates_its_own_buffer_and_an_active_one_is_never_shared():
    params, other = _params(), [torch.nn.Parameter(torch.randn(64, 64)), torch.nn.Parameter(torch.randn(64))]
    start, other_start = [p.detach().clone() for p in params], [p.detach().clone() for p in other]
    Perturbation.apply(params, _steps(params, 0)).restore()
    first = Perturbation.apply(params, _steps(params, 1))
    mine = {b.data_ptr() for b in _buffer(first)}
    first.restore()
    # different shapes: a buffer of their own, and the kept one of the first selection is freed, not kept beside it
    holder = []
    _, allocated = allocations(lambda: holder.append(Perturbation.apply(other, _steps(other, 2))))
    assert allocated >= nbytes(other) and not mine & {b.data_ptr() for b in _buffer(holder[0])}
    holder[0].restore()
    assert all(torch.equal(p, w) for p, w in zip(other, other_start))
    assert len(Perturbation._spare) == 1
    # two perturbations of the same tensors active at once (nested): the second gets its own buffer
    # (it perturbs the outer w + e in place: that storage is held by the outer perturbation)
    outer = Perturbation.apply(other, _steps(other, 3))
    inner = Perturbation.apply(other, _steps(other, 4))
    assert outer.swapped and not inner.swapped
    assert not {b.data_ptr() for b in _buffer(outer)} & {b.data_ptr() for b in _buffer(inner)}
    assert all(torch.equal(p, w + e3 + e4) for p, w, e3, e4 in zip(other, other_start, _steps(other, 3),
                                                                   _steps(other, 4)))
    inner.restore()
    outer.restore()
    assert all(torch.equal(p, w) for p, w in zip(other, other_start))
    assert all(torch.equal(p, w) for p, w in zip(params, start))


class _Weights(TrainerCallback):
    """The weights at the start of every optimizer step."""

    def __init__(self, model):
        self.model, self.at_step_begin = model, []

    def on_step_begin(self, args, state, control, **kwargs):
        self.at_step_begin.append({n: p.detach().clone() for n, p in self.model.named_parameters()})


class _FailingPerturbedPass(LWSAMTrainer):
    """Raises inside the perturbed pass of the second step (the first is plain: no moment yet)."""

    def compute_loss(self, model, inputs, **kwargs):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 2:
            raise RuntimeError("boom in the perturbed pass")
        return super().compute_loss(model, inputs, **kwargs)


def test_free_preset_step_that_raises_leaves_the_weights_of_the_step_before(sgd_args):
    model = tiny_gpt2()
    weights = _Weights(model)
    trainer = _FailingPerturbedPass(model=model, train_dataset=shakespeare_lm_dataset(8), callbacks=[weights],
                                    args=sgd_args(sam_preset="free", gradient_accumulation_steps=1, max_steps=3,
                                                  optim="adamw_torch", learning_rate=1e-2))
    with pytest.raises(RuntimeError, match="boom in the perturbed pass"):
        trainer.train()
    assert len(weights.at_step_begin) == 2  # raised in step 2, after step 1 moved the weights
    assert all(torch.equal(weights.at_step_begin[1][n], p) for n, p in model.named_parameters())
    assert not all(torch.equal(weights.at_step_begin[0][n], p) for n, p in model.named_parameters())
