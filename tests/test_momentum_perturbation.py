"""Momentum-SAM's perturbation without forming e_S: `Perturbation.apply(S, m, scale=s)` perturbs S by e = s m (s =
-rho / ||m||, `momentum_scale`), swapping w + e in as the storage of parameters that own theirs, in place with a backup
for views. Checked bit for bit against the formula `S + (m * s).to(S.dtype)` computed here, and against -rho m / ||m||
in float64; a non-finite m perturbs nothing; a failing perturbation and a failing pass leave S as it was; no tensor of
S's size is allocated once the buffer is kept; a bf16 model with its own float32 average is perturbed by the formula
inside the trainer."""

from __future__ import annotations

import pytest
import torch

from conftest import shakespeare_lm_dataset, tiny_gpt2
from hf_lwsam import LWSAMTrainer
from hf_lwsam.sam import Perturbation, momentum_scale
from test_momentum import watch_passes
from test_sam_memory import allocations, nbytes

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
# (S's dtype, m's dtype): the optimizer's moment has S's dtype, the own average is float32
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
          (torch.float16, torch.float32)]


@pytest.fixture(autouse=True)
def no_kept_backup():
    Perturbation._spare.clear()
    yield
    Perturbation._spare.clear()


def _s_and_m(dtype: torch.dtype, m_dtype: torch.dtype, device: str, views: bool = False
             ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """S: a large tensor, a small one and a strided (transposed) one, parameters of their own or (`views`) views of
    them; m: moments large enough that w + e rounds away low bits of w."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(300, 500), (70,), (48, 32)]
    params = [torch.nn.Parameter(torch.randn(s, generator=generator).to(device, dtype)) for s in shapes]
    params[2] = torch.nn.Parameter(params[2].detach().t())  # not contiguous
    if views:  # as FSDP2's local shards: views of a storage that something else reads
        params = [p.detach()[:] for p in params]
    moments = [torch.randn(p.shape, generator=generator).to(device, m_dtype) for p in params]
    return params, moments


def _swapped(params: list[torch.Tensor], perturbation: Perturbation) -> bool:
    return bool(perturbation.swapped) and all(p.data_ptr() == b.data_ptr() for p, b in zip(params,
                                                                                           perturbation.swapped))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dtype", "m_dtype"), DTYPES)
@pytest.mark.parametrize("views", [False, True], ids=["swapped", "in place"])
def test_the_scaled_perturbation_equals_the_formula_bit_for_bit_and_restores_exactly(dtype, m_dtype, device, views):
    params, moments = _s_and_m(dtype, m_dtype, device, views)
    start = [p.detach().clone() for p in params]
    rho = 2.0
    scale, norm, usable = momentum_scale(moments, rho)
    assert bool(usable)
    exact_norm = torch.sqrt(sum((m.double() ** 2).sum() for m in moments))
    assert float(scale) == pytest.approx(-rho / float(exact_norm), rel=1e-5)
    expected = [w + (m * scale).to(w.dtype) for w, m in zip(start, moments)]  # the formula, e formed here
    for _ in range(2):  # the second time into the kept buffer (CPU)
        perturbation = Perturbation.apply(params, list(moments), scale=scale)
        try:
            assert _swapped(params, perturbation) is not views
            assert all(torch.equal(p, x) for p, x in zip(params, expected))
            for p, w, m in zip(params, start, moments):  # -rho m / ||m|| in float64, within S's rounding
                e = -rho * m.double() / exact_norm
                # rounding of e and of w + e in S's dtype, and of ||m|| summed in float32
                tol = torch.finfo(dtype).eps * (e.abs() + (w.double() + e).abs()) + 1e-5 * e.abs()
                assert bool(((p.double() - (w.double() + e)).abs() <= tol).all())
        finally:
            perturbation.restore()
        assert all(torch.equal(p, w) for p, w in zip(params, start))
    assert all(m.dtype == m_dtype for m in moments) and float(norm) == pytest.approx(float(exact_norm), rel=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 0.0])
def test_an_unusable_moment_perturbs_nothing(bad, device):
    params, moments = _s_and_m(torch.float32, torch.float32, device)
    start = [p.detach().clone() for p in params]
    if bad == 0.0:
        moments = [torch.zeros_like(m) for m in moments]
    else:
        moments[1][3] = bad
    scale, _, usable = momentum_scale(moments, 0.5)
    assert not bool(usable) and float(scale) == 0.0
    perturbation = Perturbation.apply(params, list(moments), scale=scale)
    try:
        assert all(torch.equal(p, w) for p, w in zip(params, start))  # e = 0: no NaN from m * 0
    finally:
        perturbation.restore()
    assert all(torch.equal(p, w) for p, w in zip(params, start))


def test_a_perturbation_that_fails_midway_leaves_s_as_it_was():
    params, moments = _s_and_m(torch.float32, torch.float32, "cpu")
    start = [p.detach().clone() for p in params]
    scale, _, _ = momentum_scale(moments, 2.0)
    moments[1] = moments[1].to(torch.complex64)  # the second tensor's product cannot be written: it raises there
    with pytest.raises(RuntimeError):
        Perturbation.apply(params, moments, scale=scale)
    assert all(torch.equal(p, w) for p, w in zip(params, start))  # w + e is written apart: w never changed
    assert all(p.data_ptr() == w.data_ptr() for p, w in zip(params, [p.data for p in params]))


def test_no_tensor_of_s_size_is_allocated_once_the_buffer_is_kept():
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(300, 500, generator=generator)) for _ in range(8)]
    moments = [torch.randn(p.shape, generator=generator) for p in params]
    scale, _, _ = momentum_scale(moments, 1.0)
    first = Perturbation.apply(params, list(moments), scale=scale)  # the buffer for w + e, kept after restore
    first.restore()
    holder = []
    _, allocated = allocations(lambda: holder.append(Perturbation.apply(params, list(moments), scale=scale)))
    assert _swapped(params, holder[0])
    holder[0].restore()
    assert allocated <= 4096 < nbytes(params) / 8  # no e, no backup, no new buffer


def test_a_bf16_model_with_its_own_float32_average_is_perturbed_by_the_formula(sgd_args):
    """Inside the trainer: at every perturbed pass S = w + (s m).to(bf16) with m the own float32 average, within bf16
    rounding of -rho m / ||m|| in float64, and w restored bit-exactly after the pass (`watch_passes`)."""
    rho = 0.3
    model = tiny_gpt2().to(torch.bfloat16)
    trainer = LWSAMTrainer(model=model, args=sgd_args(sam_preset="free", sam_momentum="own", sam_rho=rho,
                                                      max_steps=3, learning_rate=1e-2),
                           train_dataset=shakespeare_lm_dataset(12))
    checked = []  # the number of tensors of S at each pass

    def at_forward(tensors, before):
        if not tensors:  # a plain pass (no m before the first optimizer step)
            checked.append(0)
            return
        m = trainer.schedule.direction(trainer.perturbed_parameter_names())
        assert all(t.dtype == torch.bfloat16 for t in tensors) and all(x.dtype == torch.float32 for x in m)
        norm = torch.sqrt(sum((x.double() ** 2).sum() for x in m))
        for t, w, x in zip(tensors, before, m):
            e = -rho * x.double() / norm
            tol = 2**-7 * (e.abs() + (w.double() + e).abs()) + 1e-5 * e.abs()  # bf16's eps, as above
            assert bool(((t.detach().double() - (w.double() + e)).abs() <= tol).all())
        checked.append(len(tensors))

    watch_passes(trainer, model, at_forward)
    trainer.train()
    assert checked[:2] == [0, 0] and len(checked) == 6 and all(n == len(list(model.parameters())) for n in checked[2:])
