"""Step-wise Variation Regularization proven on maps whose Jacobian is known (x0 = A eps), by finite
differences on a nonlinear map, across two processes, and on the real (tiny) UNet with LoRA."""
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lora import lora_layers
from regularizer import (StepwiseVariationRegularizer, fd_variation_norm, identity_path_scale, predict_x0,
                         random_unit_direction, trajectory_direction, variation_norm)

DT = torch.float64


def linear_x0(A, noise):
    """x0_b = A_b @ eps_b for a batch of maps A [B, n, n] and noises [B, n]."""
    return torch.einsum("bij,bj->bi", A, noise)


def random_orthogonal(n, generator):
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=DT))
    return q * torch.sign(torch.diagonal(r))


def test_trajectory_direction_is_the_ddim_step_through_x0_and_eps():
    g = torch.Generator().manual_seed(3)
    abar = torch.linspace(0.999, 0.01, 1000, dtype=DT)
    x0, eps = torch.randn(3, 4, 5, 5, generator=g, dtype=DT), torch.randn(3, 4, 5, 5, generator=g, dtype=DT)
    t = torch.tensor([500, 7, 999])

    def x_at(s):  # Eq. 2 at timesteps s
        a = abar[s].view(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps

    d = trajectory_direction(x0, eps, t, abar, stride=20)
    expected = x_at(torch.tensor([500, 20, 999])) - x_at(torch.tensor([480, 0, 979]))  # below t; from 0 near 0
    expected = expected / expected.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(d, expected)
    assert torch.allclose(d.flatten(1).norm(dim=1), torch.ones(3, dtype=DT))


def test_predict_x0_inverts_the_forward_process_per_sample():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 2, 4, 4, 4, generator=g, dtype=DT)  # two [B=2, C, H, W] tensors
    abar = torch.tensor([0.9, 0.05], dtype=DT)
    x_t = abar.sqrt().view(-1, 1, 1, 1) * x0 + (1 - abar).sqrt().view(-1, 1, 1, 1) * eps  # Eq. 2
    torch.testing.assert_close(predict_x0(x_t, eps, abar), x0, rtol=1e-12, atol=1e-12)


def test_variation_norm_is_sigma_times_norm_of_A_transpose_u():
    g = torch.Generator().manual_seed(1)
    B, n = 3, 7
    A = torch.randn(B, n, n, generator=g, dtype=DT)
    noise = torch.randn(B, n, generator=g, dtype=DT, requires_grad=True)
    u = torch.randn(B, n, generator=g, dtype=DT)  # deliberately not unit: the function normalises
    sigma = torch.tensor([0.3, 0.7, 1.0], dtype=DT)
    got = variation_norm(linear_x0(A, noise), noise, sigma, direction=u)
    u_unit = u / u.norm(dim=1, keepdim=True)
    want = sigma * torch.einsum("bji,bj->bi", A, u_unit).norm(dim=1)  # sigma ||A^T u||
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_variation_norm_gradient_wrt_the_map_matches_the_closed_form():
    g = torch.Generator().manual_seed(2)
    B, n = 2, 5
    A = torch.randn(B, n, n, generator=g, dtype=DT, requires_grad=True)
    noise = torch.randn(B, n, generator=g, dtype=DT, requires_grad=True)
    u = random_unit_direction(torch.empty(B, n, dtype=DT), generator=g)
    sigma = torch.tensor([0.4, 0.9], dtype=DT)
    weights = torch.tensor([1.5, -0.5], dtype=DT)

    (grad_ours,) = torch.autograd.grad((weights * variation_norm(linear_x0(A, noise), noise, sigma, u)).sum(), A)
    closed = sigma * torch.einsum("bji,bj->bi", A, u).norm(dim=1)
    (grad_closed,) = torch.autograd.grad((weights * closed).sum(), A)
    torch.testing.assert_close(grad_ours, grad_closed, rtol=1e-12, atol=1e-14)


def test_scaled_orthogonal_jacobian_gives_sigma_k_for_every_direction():
    """The Eq. 11-13 optimum: J = k Q (J J^T = k^2 I) makes the norm sigma*k whatever the direction."""
    g = torch.Generator().manual_seed(3)
    B, n = 2, 16
    k = torch.tensor([0.5, 3.0], dtype=DT)
    A = torch.stack([random_orthogonal(n, g) for _ in range(B)]) * k.view(-1, 1, 1)
    sigma = torch.tensor([0.2, 0.8], dtype=DT)
    for _ in range(5):  # fresh random directions each time (the default)
        noise = torch.randn(B, n, generator=g, dtype=DT, requires_grad=True)
        got = variation_norm(linear_x0(A, noise), noise, sigma)
        torch.testing.assert_close(got, sigma * k, rtol=1e-12, atol=0)
    # ... and a non-orthogonal map does not (the test can fail).
    noise = torch.randn(B, n, generator=g, dtype=DT, requires_grad=True)
    A2 = torch.randn(B, n, n, generator=g, dtype=DT)
    spread = torch.stack([variation_norm(linear_x0(A2, noise), noise, 1.0) for _ in range(5)]).std(0)
    assert (spread > 1e-3).all()


def small_nonlinear_x0(W, noise):
    """A per-sample nonlinear map of the noise; W: [n, n]."""
    h = torch.tanh(noise @ W.T + 0.3)
    return h * noise.flip(-1) + 0.5 * noise  # [B, n]


def test_variation_norm_is_per_sample_although_autograd_sums_the_batch():
    g = torch.Generator().manual_seed(4)
    W = torch.randn(6, 6, generator=g, dtype=DT)
    noise = torch.randn(3, 6, generator=g, dtype=DT, requires_grad=True)
    u = torch.randn(3, 6, generator=g, dtype=DT)
    sigma = torch.tensor([0.1, 0.5, 0.9], dtype=DT)
    batched = variation_norm(small_nonlinear_x0(W, noise), noise, sigma, u)
    for b in range(3):
        nb = noise[b:b + 1].detach().requires_grad_()
        alone = variation_norm(small_nonlinear_x0(W, nb), nb, sigma[b:b + 1], u[b:b + 1])
        torch.testing.assert_close(batched[b:b + 1], alone, rtol=1e-12, atol=0)


def test_finite_differences_confirm_the_double_backward_gradient():
    g = torch.Generator().manual_seed(5)
    W = torch.randn(5, 5, generator=g, dtype=DT, requires_grad=True)
    noise0 = torch.randn(2, 5, generator=g, dtype=DT)
    u = torch.randn(2, 5, generator=g, dtype=DT)
    sigma = torch.tensor([0.3, 0.6], dtype=DT)

    def norms_of(W):
        noise = noise0.clone().requires_grad_()
        return variation_norm(small_nonlinear_x0(W, noise), noise, sigma, u)

    assert torch.autograd.gradcheck(norms_of, (W,), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_variation_norm_asks_for_a_noise_that_requires_grad():
    noise = torch.randn(2, 3)
    with pytest.raises(ValueError, match="requires_grad_"):
        variation_norm(noise * 2, noise, 1.0)


def test_running_mean_update_and_loss_follow_eq9():
    reg = StepwiseVariationRegularizer(decay=0.1)
    assert "a" in reg.state_dict() and reg.a.item() == 0.0
    norms1 = torch.tensor([1.0, 2.0, 6.0], requires_grad=True)
    loss1 = reg.penalty(norms1)
    a1 = 0.0 + 0.1 * (3.0 - 0.0)
    assert reg.a.item() == pytest.approx(a1)
    assert loss1.item() == pytest.approx(((torch.tensor([1.0, 2.0, 6.0]) - a1) ** 2).mean().item())
    # The updated a is used as a constant: d loss / d norm_i = 2 (norm_i - a) / B.
    (g,) = torch.autograd.grad(loss1, norms1)
    torch.testing.assert_close(g, 2 * (norms1.detach() - a1) / 3)

    loss2 = reg.penalty(torch.tensor([4.0, 4.0]))
    a2 = a1 + 0.1 * (4.0 - a1)
    assert reg.a.item() == pytest.approx(a2)
    assert loss2.item() == pytest.approx((4.0 - a2) ** 2)

    reg.eval()  # no update in eval mode
    loss3 = reg.penalty(torch.tensor([10.0]))
    assert reg.a.item() == pytest.approx(a2)
    assert loss3.item() == pytest.approx((10.0 - a2) ** 2)

    resumed = StepwiseVariationRegularizer(decay=0.1)
    resumed.load_state_dict(reg.state_dict())
    assert resumed.a.item() == pytest.approx(a2)


def test_per_timestep_running_means_start_at_their_first_mean_and_follow_eq9_per_bucket():
    reg = StepwiseVariationRegularizer(decay=0.1, timestep_buckets=4)  # buckets of 250 timesteps
    norms = torch.tensor([1.0, 3.0, 10.0, 50.0])
    t = torch.tensor([0, 249, 600, 999])  # buckets 0, 0, 2, 3; bucket 1 unseen
    loss = reg.penalty(norms, t)
    torch.testing.assert_close(reg.a, torch.tensor([2.0, 0.0, 10.0, 50.0]))  # first means, not 0.1 * mean
    assert loss.item() == pytest.approx(((1 - 2.0) ** 2 + (3 - 2.0) ** 2) / 4)
    loss = reg.penalty(torch.tensor([4.0, 20.0, 7.0]), torch.tensor([100, 700, 300]))
    want = torch.tensor([2.0 + 0.1 * (4.0 - 2.0), 7.0, 10.0 + 0.1 * (20.0 - 10.0), 50.0])
    torch.testing.assert_close(reg.a, want)
    assert loss.item() == pytest.approx(((4 - want[0]) ** 2 + (20 - want[2]) ** 2 + 0.0) / 3)
    with pytest.raises(ValueError, match="timesteps"):
        reg.penalty(norms)
    resumed = StepwiseVariationRegularizer(decay=0.1, timestep_buckets=4)
    resumed.load_state_dict(reg.state_dict())
    torch.testing.assert_close(resumed.a, want)


def test_identity_path_scale_leaves_the_norm_of_i_minus_sigma_d_at_every_t():
    """A linear 'UNet' eps_theta(x_t) = M_b x_t (D = M_b) through the real x_t(eps) and x0_hat: the Eq. 10
    norm is sigma^2 / sqrt(abar) ||(I - sigma M)^T u||, with a different abar (t) per sample."""
    g = torch.Generator().manual_seed(11)
    B, n = 3, 6
    M = 0.3 * torch.randn(B, n, n, generator=g, dtype=DT)
    abar = torch.tensor([0.999, 0.5, 0.005], dtype=DT)  # t near 0, mid, near T
    sigma = (1 - abar).sqrt()
    x0 = torch.randn(B, n, generator=g, dtype=DT)
    noise = torch.randn(B, n, generator=g, dtype=DT, requires_grad=True)
    u = random_unit_direction(torch.empty(B, n, dtype=DT), generator=g)
    x_t = abar.sqrt()[:, None] * x0 + sigma[:, None] * noise  # Eq. 2
    eps_pred = torch.einsum("bij,bj->bi", M, x_t)
    x0_pred = (x_t - sigma[:, None] * eps_pred) / abar.sqrt()[:, None]
    norms = variation_norm(x0_pred, noise, sigma, u)
    scale = identity_path_scale(abar)
    torch.testing.assert_close(scale, sigma ** 2 / abar.sqrt(), rtol=1e-14, atol=0)
    i_minus_sigma_d = torch.eye(n, dtype=DT) - sigma[:, None, None] * M
    want = torch.einsum("bji,bj->bi", i_minus_sigma_d, u).norm(dim=1)  # ||(I - sigma D)^T u||
    torch.testing.assert_close(norms / scale, want, rtol=1e-10, atol=0)
    # The factor alone spans four orders of magnitude over SD's schedule; a model ignoring x_t (D = 0) gives 1.
    assert identity_path_scale(torch.tensor(0.0047)) / identity_path_scale(torch.tensor(0.99915)) > 1e4
    ones = variation_norm(x_t / abar.sqrt()[:, None], noise, sigma, u) / scale
    torch.testing.assert_close(ones, torch.ones(B, dtype=DT), rtol=1e-12, atol=0)


def test_relative_penalty_is_eq9_in_units_of_each_buckets_running_mean():
    reg = StepwiseVariationRegularizer(decay=0.1, timestep_buckets=2, relative=True)
    loss = reg.penalty(torch.tensor([1.0, 3.0, 100.0]), torch.tensor([10, 20, 900]))
    torch.testing.assert_close(reg.a, torch.tensor([2.0, 100.0]))  # first means
    assert loss.item() == pytest.approx(((1 / 2 - 1) ** 2 + (3 / 2 - 1) ** 2 + 0.0) / 3)
    norms = torch.tensor([4.0, 80.0], requires_grad=True)
    loss = reg.penalty(norms, torch.tensor([0, 999]))
    a = torch.tensor([2.0 + 0.1 * (4.0 - 2.0), 100.0 + 0.1 * (80.0 - 100.0)])
    torch.testing.assert_close(reg.a, a)
    assert loss.item() == pytest.approx(((4 / a[0] - 1) ** 2 + (80 / a[1] - 1) ** 2).item() / 2)
    # A large-t deviation weighs no more than the same relative deviation at small t.
    (grad,) = torch.autograd.grad(loss, norms)
    torch.testing.assert_close(grad, 2 * (norms.detach() / a - 1) / a / 2)
    single = StepwiseVariationRegularizer(decay=0.1, relative=True)  # a single a starts at its first mean too
    single.penalty(torch.tensor([3.0, 5.0]))
    assert single.a.item() == pytest.approx(4.0)


def test_forward_is_the_penalty_of_the_eq10_norm():
    g = torch.Generator().manual_seed(6)
    A = torch.randn(2, 4, 4, generator=g, dtype=DT)
    noise = torch.randn(2, 4, generator=g, dtype=DT, requires_grad=True)
    u = torch.randn(2, 4, generator=g, dtype=DT)
    norms = variation_norm(linear_x0(A, noise), noise, 0.5, u).detach()
    reg = StepwiseVariationRegularizer(decay=0.5)
    loss = reg(linear_x0(A, noise), noise, 0.5, direction=u)
    a = 0.5 * norms.mean()
    torch.testing.assert_close(reg.a, a.float())
    torch.testing.assert_close(loss, ((norms - a) ** 2).mean(), rtol=1e-6, atol=0)


def test_fd_norm_is_exact_on_linear_maps():
    g = torch.Generator().manual_seed(7)
    B, n = 3, 6
    A = torch.randn(B, n, n, generator=g, dtype=DT)
    noise = torch.randn(B, n, generator=g, dtype=DT)
    v = random_unit_direction(noise, generator=g)
    sigma = torch.tensor([0.2, 0.5, 1.0], dtype=DT)
    for h in (1e-3, 1.0):  # a linear map has no truncation error
        got = fd_variation_norm(linear_x0(A, noise), linear_x0(A, noise + h * v), h, sigma)
        want = sigma * torch.einsum("bij,bj->bi", A, v).norm(dim=1)  # sigma ||A v||
        torch.testing.assert_close(got, want, rtol=1e-9, atol=0)


def test_fd_and_vjp_norms_share_their_distribution_on_linear_maps():
    """E_v ||A v||^2 = ||A||_F^2 / n = E_u ||A^T u||^2, and pairing v = V U^T u makes them equal."""
    g = torch.Generator().manual_seed(8)
    n, N = 8, 4000
    A = torch.randn(n, n, generator=g, dtype=DT) @ torch.diag(torch.linspace(0.2, 3, n, dtype=DT))
    As = A.expand(N, n, n)
    noise = torch.randn(N, n, generator=g, dtype=DT)
    v = random_unit_direction(noise, generator=g)
    fd = fd_variation_norm(linear_x0(As, noise), linear_x0(As, noise + 0.1 * v), 0.1, 1.0)
    noise.requires_grad_()
    u = random_unit_direction(noise, generator=g)
    vjp = variation_norm(linear_x0(As, noise), noise, 1.0, u)
    expected = (A ** 2).sum() / n
    for sq in (fd ** 2, vjp ** 2):  # Monte Carlo: 5 standard errors
        assert abs(sq.mean() - expected) < 5 * sq.std() / math.sqrt(N)
    # Same distribution, exactly: ||A (V U^T u)|| = ||S U^T u|| = ||A^T u||.
    U, S, Vh = torch.linalg.svd(A)
    paired_v = u.detach() @ U @ Vh  # rows: V U^T u_b
    fd_paired = fd_variation_norm(linear_x0(As, noise.detach()),
                                  linear_x0(As, noise.detach() + 0.1 * paired_v), 0.1, 1.0)
    torch.testing.assert_close(fd_paired, vjp.detach(), rtol=1e-9, atol=0)
    # A scaled orthogonal map gives k for every direction in both forms (Eq. 11-13).
    Q = 2.5 * random_orthogonal(n, g).expand(N, n, n)
    fd_q = fd_variation_norm(linear_x0(Q, noise.detach()), linear_x0(Q, noise.detach() + 0.1 * v), 0.1, 1.0)
    torch.testing.assert_close(fd_q, torch.full_like(fd_q, 2.5), rtol=1e-9, atol=0)


def _distributed_worker(rank, world_size, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    reg = StepwiseVariationRegularizer(decay=0.25)
    norms = torch.tensor([1.0, 3.0]) if rank == 0 else torch.tensor([10.0, 20.0, 30.0])
    loss = reg.penalty(norms)
    torch.save({"a": reg.a.clone(), "loss": loss.detach()}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_running_mean_is_averaged_across_ranks(tmp_path):
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    want_a = 0.25 * ((2.0 + 20.0) / 2)  # mean of the per-rank batch means
    assert r0["a"].item() == pytest.approx(want_a) and r1["a"].item() == pytest.approx(want_a)
    assert r0["loss"].item() == pytest.approx(((torch.tensor([1.0, 3.0]) - want_a) ** 2).mean().item())
    assert r1["loss"].item() == pytest.approx(((torch.tensor([10.0, 20.0, 30.0]) - want_a) ** 2).mean().item())


def test_regularizer_on_a_tiny_unet_trains_only_the_lora_and_its_gradient_is_right():
    """One Eq. 9 backward through the real UNet (double backward, math attention): finite, non-zero
    gradients on the LoRA weights only, equal to a float64 finite difference along a random direction."""
    import ops
    from checkpoint import unet_from_config
    from conftest import TINY_UNET, perturb_
    from lora import freeze_all_but_lora, inject_lora

    torch.manual_seed(0)
    unet = perturb_(unet_from_config(TINY_UNET))
    inject_lora(unet, rank=2)
    params = freeze_all_but_lora(unet.double())  # float64 (LoRA included) for the finite difference
    perturb_(nn.ModuleList(layer.lora_up for layer in lora_layers(unet).values()), seed=1, scale=0.05)
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(2, 4, 8, 8, generator=g, dtype=DT)
    noise0 = torch.randn(2, 4, 8, 8, generator=g, dtype=DT)
    direction = torch.randn(2, 4, 8, 8, generator=g, dtype=DT)
    cond = torch.randn(2, 3, TINY_UNET["cross_attention_dim"], generator=g, dtype=DT)
    t = torch.tensor([50, 800])
    abar = torch.tensor([0.95, 0.15], dtype=DT)  # stand-ins for the schedule's alpha_bar at t
    reg = StepwiseVariationRegularizer().double().eval()  # eval: a stays fixed between evaluations
    reg.a.fill_(0.3)

    def loss_fn():
        noise = noise0.clone().requires_grad_()
        x_t = abar.sqrt().view(-1, 1, 1, 1) * latents + (1 - abar).sqrt().view(-1, 1, 1, 1) * noise  # Eq. 2
        with ops.double_backward():
            x0_pred = predict_x0(x_t, unet(x_t, t, cond), abar)
            return reg(x0_pred, noise, (1 - abar).sqrt(), direction=direction)

    loss_fn().backward()
    grads = [p.grad for p in params]
    assert all(gr is not None and torch.isfinite(gr).all() and gr.abs().max() > 0 for gr in grads)
    assert all(p.grad is None for n, p in unet.named_parameters() if "lora" not in n)

    step = [torch.randn(p.shape, generator=g, dtype=DT) for p in params]

    def loss_at(h):  # the loss with every LoRA weight moved by h * step
        with torch.no_grad():
            for p, s in zip(params, step):
                p.add_(h * s)
        value = loss_fn().item()  # needs autograd on: Eq. 10 is itself a gradient
        with torch.no_grad():
            for p, s in zip(params, step):
                p.sub_(h * s)
        return value

    h = 1e-5
    directional = sum((gr * s).sum() for gr, s in zip(grads, step)).item()
    assert (loss_at(h) - loss_at(-h)) / (2 * h) == pytest.approx(directional, rel=1e-6)
