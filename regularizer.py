"""Step-wise Variation Regularization (Smooth Diffusion, Guo et al. CVPR 2024, Sec. 3.2-3.3).

The goal (Eq. 8) is that a change of the noise eps moves the model's one-step prediction x0_hat by
a fixed multiple of sqrt(1 - abar_t) * ||d eps||, whatever eps, t and the direction of the change.
Eq. 9 asks for this through the Jacobian J = d x0_hat / d eps: for a random unit direction u,

    L_reg = E_{u, eps} ( sqrt(1 - abar_t) ||J^T u||_2 - a )^2                           # Eq. 9

where a is a running mean of the norm, and the norm is one vector-Jacobian product (Eq. 10):

    sqrt(1 - abar_t) ||J^T u||_2 = || grad_eps( sqrt(1 - abar_t) x0_hat . u ) ||_2      # Eq. 10

It is StyleGAN2's path-length penalty with eps in the role of the latent. Because Eq. 10 is itself
a gradient, training through it needs a double backward: run the UNet forward inside
`ops.double_backward()`.

x0_hat lives in the LATENT space (4 x 64 x 64 for SD-1.5), as in the official code. The paper speaks
of pixel intensities; no VAE decode is involved anywhere here.

A training step reads like Fig. 2(d):

    noise = torch.randn_like(latents).requires_grad_()
    x_t = abar.sqrt().view(-1, 1, 1, 1) * latents + (1 - abar).sqrt().view(-1, 1, 1, 1) * noise  # Eq. 2
    with ops.double_backward():
        eps_pred = unet(x_t, t, text)
    x0_pred = predict_x0(x_t, eps_pred, abar)
    loss = F.mse_loss(eps_pred, noise.detach()) + lam * reg(x0_pred, noise, (1 - abar).sqrt())  # Eq. 14

`fd_variation_norm` is a cheaper finite-difference form of the same quantity (no double backward).

Proven on analytic Jacobians, by finite differences and on the tiny UNet:
`.venv/bin/python -m pytest -q tests/test_regularizer.py` (~10 s on CPU).
"""
import torch
import torch.distributed as dist
from torch import nn


def _per_sample(values, like):
    """Shape a scalar or [B] tensor to broadcast against `like` ([B, C, H, W] -> [B, 1, 1, 1])."""
    values = torch.as_tensor(values, dtype=like.dtype, device=like.device)
    if values.ndim == 0:
        values = values.expand(like.shape[0])
    return values.reshape(-1, *[1] * (like.ndim - 1))


def _norms(x):
    """Per-sample L2 norm: [B, ...] -> [B]."""
    return x.flatten(1).norm(dim=1)


def predict_x0(x_t, eps_pred, alpha_bar):
    """x0_hat = (x_t - sqrt(1 - abar) eps_pred) / sqrt(abar), i.e. Eq. 2 solved for x0.

    alpha_bar: [B] (one timestep per sample) or a scalar. Keep the graph: Eq. 10 differentiates
    this through both x_t(eps) and the UNet.
    """
    abar = _per_sample(alpha_bar, x_t)
    return (x_t - (1 - abar).sqrt() * eps_pred) / abar.sqrt()


def identity_path_scale(alpha_bar):
    """sigma_t^2 / sqrt(abar_t): the part of the Eq. 10 norm that the timestep alone fixes.

    With x_t = sqrt(abar) x0 + sigma eps and D = d eps_theta / d x_t, the Jacobian of Eq. 10 is
    J = d x0_hat / d eps = (sigma / sqrt(abar)) (I - sigma D), so

        sigma ||J^T u|| = (sigma^2 / sqrt(abar)) ||(I - sigma D)^T u||.

    The factor in front grows ~17,000x from t = 0 to t = 999 on SD's schedule, whatever the model.
    Dividing the norm by it (`--reg-normalize analytic`, not in the paper) leaves the part the model
    controls: ||(I - sigma D)^T u||, which is 1 for a model that ignores x_t (D = 0).
    """
    abar = torch.as_tensor(alpha_bar)
    return (1 - abar) / abar.sqrt()


def random_unit_direction(like, generator=None):
    """A Gaussian direction per sample, scaled to unit length per sample (the paper's Delta x0_hat)."""
    d = torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)
    return d / _per_sample(_norms(d), d)


def trajectory_direction(latents, noise, timesteps, alphas_cumprod, stride=20):
    """The direction x_t moves along the deterministic (DDIM) path through (x0, eps) near t, per sample:
    x_hi - x_lo with x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps (Eq. 2), lo = max(t - stride, 0),
    hi = lo + stride (stride 20: a 50-step DDIM grid on T = 1000). Not in the paper (issue 21): one DDIM
    inversion step errs by how much eps changes along this direction, where Eq. 10 probes a random one.
    Unit length per sample."""
    lo = (timesteps - stride).clamp(min=0)
    hi = (lo + stride).clamp(max=len(alphas_cumprod) - 1)
    abar_lo, abar_hi = (_per_sample(alphas_cumprod[s], latents) for s in (lo, hi))
    d = (abar_hi.sqrt() - abar_lo.sqrt()) * latents + ((1 - abar_hi).sqrt() - (1 - abar_lo).sqrt()) * noise
    return d / _per_sample(_norms(d), d)


def variation_norm(x0_pred, noise, sigma, direction=None):
    """Eq. 10 per sample: || grad_noise( sigma * x0_pred . u ) ||_2 = sigma ||J^T u||_2  -> [B].

    x0_pred: [B, C, H, W] latent prediction, computed (with graph) from `noise`, which must require
             grad and be the eps that built x_t = sqrt(abar) x0 + sqrt(1 - abar) eps. The gradient
             therefore includes the identity path through x_t as well as the UNet (as in the
             official code).
    sigma:   sqrt(1 - abar_t), [B] or scalar.
    direction: u, [B, C, H, W]; default a fresh Gaussian direction per sample. It is scaled to unit
             length per sample, as the paper says ("normalized to unit length"), so that the Eq. 11-13
             optimum gives the same norm for every direction. The official code divides by
             sqrt(C*H*W) instead, which is unit length only in expectation (same mean).

    autograd.grad returns the gradient of the batch SUM; it is still per sample because sample b's
    x0_pred depends on sample b's noise only: the UNet treats samples independently (GroupNorm and
    attention are per sample; there is no BatchNorm). create_graph=True keeps the result
    differentiable, so Eq. 9 can be trained through it.
    """
    if not noise.requires_grad:
        raise ValueError("variation_norm: `noise` must require grad and be the eps that built x_t "
                         "(noise = torch.randn_like(latents).requires_grad_()).")
    if direction is None:
        u = random_unit_direction(x0_pred)
    else:
        u = direction.detach()
        u = u / _per_sample(_norms(u), u)
    inner = (_per_sample(sigma, x0_pred) * x0_pred * u).sum()  # sum_b sigma_b <x0_b, u_b>
    (grad,) = torch.autograd.grad(inner, noise, create_graph=True)  # Eq. 10: rows are sigma_b J_b^T u_b
    return _norms(grad)


def fd_variation_norm(x0_pred, x0_pred_shifted, h, sigma):
    """Finite-difference form of the variation: sigma * ||x0(eps + h v) - x0(eps)||_2 / h  -> [B].

    x0_pred_shifted is the prediction for the same x0, t and text with the noise moved to eps + h v,
    v a unit vector per sample (`random_unit_direction`). Both predictions keep their graphs, so the
    penalty trains through two ordinary forward passes and a first-order backward (fused attention
    works, no `double_backward()`).

    Why it targets the same optimum as Eq. 9. The difference quotient is J v + O(h), a Jacobian-
    VECTOR product, where Eq. 10 takes the vector-Jacobian product J^T u. With v, u uniform on the
    unit sphere of R^n (x0 and eps have the same shape here, so J is square):
        E_v ||J v||^2 = tr(J^T J) / n = ||J||_F^2 / n = tr(J J^T) / n = E_u ||J^T u||^2.
    More than the means agree: with J = U S V^T, ||J v|| = ||S V^T v|| and ||J^T u|| = ||S U^T u||,
    and V^T v, U^T u are both uniform on the sphere, so the two norms have the same distribution.
    Pulling either to a shared running mean a (Eq. 9) is minimised when the norm is the same for
    every direction, i.e. all singular values are equal: J = k Q with Q orthogonal (the paper's
    J J^T = K I with K = k^2, Eq. 11). There ||J v|| = ||J^T u|| = k for every unit v, u, and
    ||Delta x0|| = k sqrt(1 - abar) ||Delta eps|| (Eq. 12-13, i.e. Eq. 8). What differs is only the
    O(h) truncation error of the forward difference, and the noise of each estimator.
    """
    return _per_sample(sigma, x0_pred).flatten() * _norms(x0_pred_shifted - x0_pred) / h


class StepwiseVariationRegularizer(nn.Module):
    """Eq. 9: mean over the batch of (norm - a)^2, with a the running mean of the norms.

    `a` is a buffer, so it is saved in state_dict and a resumed run keeps it (the official script
    restarts it at 0). It starts at 0 like the official code and StyleGAN2's pl_mean; with decay 0.01
    it reaches the norms' scale within a few hundred updates.

    timestep_buckets > 1 (not in the paper) keeps one running mean per range of timesteps: the norm's
    mean grows by orders of magnitude from t = 0 to t = 999 while it varies by ~20% at one t, so a
    single `a` mostly penalises that profile instead of the spread across directions and noises that
    Eq. 8 is about. Each bucket starts from the first mean it sees (not 0: a bucket is updated in only
    some steps, and a slow climb from 0 would dominate a short fine-tune).

    relative=True (not in the paper) penalises (norm / a - 1)^2 instead of (norm - a)^2: the spread
    in units of the running mean, so that every range of t weighs the same. With (norm - a)^2 the
    buckets of large t, whose norms are hundreds of times larger, make up nearly all of the loss.
    """

    def __init__(self, decay=0.01, timestep_buckets=1, num_train_timesteps=1000, relative=False):
        super().__init__()
        self.decay, self.num_train_timesteps, self.relative = decay, num_train_timesteps, relative
        self.register_buffer("a", torch.zeros((timestep_buckets,) if timestep_buckets > 1 else (),
                                              dtype=torch.float32))

    def buckets(self, norms, timesteps):
        """Each sample's index into a.view(-1): its range of timesteps, or 0 for the single a."""
        if self.a.ndim == 0:
            return torch.zeros_like(norms, dtype=torch.long)
        if timesteps is None:
            raise ValueError("a per-timestep running mean needs the samples' timesteps: penalty(norms, t)")
        return (timesteps.long() * self.a.numel() // self.num_train_timesteps).clamp(0, self.a.numel() - 1)

    def _update(self, norms, bucket):
        """a <- a + decay (mean(norms) - a), per bucket; one a for the whole run across ranks."""
        sums = torch.zeros(self.a.numel(), device=norms.device).index_add_(0, bucket, norms.detach().float())
        counts = torch.zeros_like(sums).index_add_(0, bucket, torch.ones_like(sums[bucket]))
        means, ranks = sums / counts.clamp(min=1), (counts > 0).float()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(means)  # every rank moves a by the mean of the ranks' batch means
            dist.all_reduce(ranks)
        a, seen = self.a.view(-1), ranks > 0
        rate = torch.full_like(a, self.decay)
        if self.a.ndim or self.relative:
            rate[a == 0] = 1.0  # a bucket's first mean starts it (the norms are > 0)
        a[seen] += rate[seen] * (means[seen] / ranks[seen] - a[seen])

    def penalty(self, norms, timesteps=None):
        """norms: [B] (variation_norm or fd_variation_norm), timesteps: [B] (needed with buckets)
        -> scalar loss. Updates `a` in training mode."""
        bucket = self.buckets(norms, timesteps)
        if self.training:
            with torch.no_grad():
                self._update(norms, bucket)
        # The official code (like rosinality's StyleGAN2) uses the updated a without detaching it
        # within the step, which sends a gradient of relative size `decay` through the mean; we
        # detach it (a is a buffer), a negligible difference at decay 0.01.
        a = self.a.view(-1)[bucket]
        if self.relative:  # Eq. 9 on the norm measured in units of its running mean
            return ((norms / a - 1) ** 2).mean()
        return ((norms - a) ** 2).mean()  # Eq. 9

    def forward(self, x0_pred, noise, sigma, direction=None, timesteps=None):
        """Eq. 9 with the Eq. 10 norm; arguments as in `variation_norm`."""
        return self.penalty(variation_norm(x0_pred, noise, sigma, direction), timesteps)

    def extra_repr(self):
        return f"decay={self.decay}, timestep_buckets={self.a.numel()}, relative={self.relative}"
