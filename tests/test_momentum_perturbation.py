"""Momentum-SAM's perturbation without forming e_S: `Perturbation.apply(S, m, scale=s)` adds e = s m to S (s =
-rho / ||m||, `momentum_scale`), on the CPU one chunk at a time into a kept backup. Checked bit for bit against the
formula `S + (m * s).to(S.dtype)` (the former path, e formed by `momentum_direction`) and against -rho m / ||m|| in
float64; a non-finite m perturbs nothing; an interrupted perturbation and a failing pass leave S as it was; no tensor
of S's size is allocated once the backup is kept; a bf16 model with its own float32 average is perturbed by the
formula inside the trainer."""

from __future__ import annotations

import pytest
import torch

from conftest import shakespeare_lm_dataset, tiny_gpt2
from hf_lwsam import LWSAMTrainer
from hf_lwsam.sam import _ADD_CHUNK, Perturbation, momentum_direction, momentum_scale
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


def _s_and_m(dtype: torch.dtype, m_dtype: torch.dtype, device: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """S: a tensor of several chunks with a partial last one, a small one, and a strided (transposed) one; m: moments
    large enough that w + e rounds away low bits of w."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(300, 500), (70,), (48, 32)]
    assert 300 * 500 > _ADD_CHUNK and 300 * 500 % _ADD_CHUNK
    params = [torch.nn.Parameter(torch.randn(s, generator=generator).to(device, dtype)) for s in shapes]
    params[2] = torch.nn.Parameter(params[2].detach().t())  # not contiguous
    moments = [torch.randn(p.shape, generator=generator).to(device, m_dtype) for p in params]
    return params, moments


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dtype", "m_dtype"), DTYPES)
def test_the_scaled_perturbation_equals_the_formula_bit_for_bit_and_restores_exactly(dtype, m_dtype, device):
    params, moments = _s_and_m(dtype, m_dtype, device)
    start = [p.detach().clone() for p in params]
    rho = 2.0
    scale, norm, usable = momentum_scale(moments, rho)
    assert bool(usable)
    formed, _, _ = momentum_direction(moments, rho)  # e formed, as the ascent did before
    expected = [w + e.to(w.dtype) for w, e in zip(start, formed)]
    exact_norm = torch.sqrt(sum((m.double() ** 2).sum() for m in moments))
    for _ in range(2):  # the second time into the kept backup (CPU)
        perturbation = Perturbation.apply(params, list(moments), scale=scale)
        try:
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


def test_an_interrupted_perturbation_restores_the_chunks_it_changed():
    params, moments = _s_and_m(torch.float32, torch.float32, "cpu")
    start = [p.detach().clone() for p in params]
    scale, _, _ = momentum_scale(moments, 2.0)
    moments[1] = moments[1].to(torch.complex64)  # the second tensor's product cannot be written: it raises there
    with pytest.raises(RuntimeError):
        Perturbation.apply(params, moments, scale=scale)
    assert all(torch.equal(p, w) for p, w in zip(params, start))  # the first tensor, perturbed, is restored


def test_no_tensor_of_s_size_is_allocated_once_the_backup_is_kept():
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(300, 500, generator=generator)) for _ in range(8)]
    moments = [torch.randn(p.shape, generator=generator) for p in params]
    scale, _, _ = momentum_scale(moments, 1.0)
    Perturbation.apply(params, list(moments), scale=scale).restore()  # the backup, kept
    holder = []
    _, allocated = allocations(lambda: holder.append(Perturbation.apply(params, list(moments), scale=scale)))
    holder[0].restore()
    assert allocated <= _ADD_CHUNK * 4 + 4096 < nbytes(params) / 8  # one scratch chunk, no e, no backup
    _, formed = allocations(lambda: momentum_direction(moments, 1.0))
    assert formed >= nbytes(params)  # forming e, as before, allocates S's size


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
