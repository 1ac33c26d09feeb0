"""The GPU path on a GPU: `pytest -m cuda` (every test here is marked `cuda` and skipped without one).

With `python -m bench --device cuda --gpu-check` (SD-1.5 parity, the 512 px step at batch 1 and 3,
20-step toy runs) this is the check to run the first time a GPU is available (README, Speed). Each
test runs a piece that the CPU suite also runs on the CPU, here with CUDA's kernels.
"""
import pytest
import torch
from conftest import TINY_VAE, perturb_

from bench import speed as bench
import ops
from checkpoint import vae_from_config
from test_devices import check_mixed_precision_step
from test_ops import BF16_U, attention_derivatives, math_attention, relative_error

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
diffusers = pytest.importorskip("diffusers")


def test_sd15_unet_forward_matches_diffusers_on_cuda_in_fp32_fp16_bf16():
    rows = bench.unet_parity("cuda")  # SD-1.5 config, 64x64 latents, batch 2, the same GPU
    assert [r["dtype"] for r in rows] == ["float32", "float16", "bfloat16"]
    assert all(r["ok"] for r in rows), rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tiny_vae_decode_matches_diffusers_on_cuda(dtype):
    torch.manual_seed(0)
    ref = perturb_(diffusers.AutoencoderKL(**TINY_VAE), scale=0.02).cuda().eval()
    ours = vae_from_config(TINY_VAE).cuda().eval()
    ours.load_state_dict(ref.state_dict())
    z = torch.randn(2, 4, 8, 8, device="cuda")
    with torch.no_grad():
        exact = ref.decode(z).sample
        got = ours.to(dtype).decode(z.to(dtype))
    assert relative_error(got, exact) < (1e-3 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("length", [160, 300])  # > ops.MATH_MAX_KEYS: the fused path
def test_double_backward_attention_matches_the_math_path_on_cuda(length):
    """fp32 (the CUDA branch: SDPA forward, recomputed fused backward) and bf16 autocast, against
    float64 math on the GPU, with the CPU test's tolerances."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, length, 40, generator=g, dtype=torch.float64).cuda() for _ in range(3))
    exact = attention_derivatives(math_attention, *(x.clone().requires_grad_() for x in (q, k, v)), False)
    fp32 = attention_derivatives(ops.attention, *(x.float().requires_grad_() for x in (q, k, v)), False)
    bf16 = attention_derivatives(ops.attention, *(x.float().requires_grad_() for x in (q, k, v)), True)
    for a, b, e in zip(fp32, bf16, exact):
        assert relative_error(a, e) < 1e-3  # TF32 is off for matmuls by default; 1e-3 allows it on
        assert relative_error(b, e) < 4 * BF16_U


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_regularized_step_under_cuda_autocast_matches_fp32(autocast_dtype):
    check_mixed_precision_step("cuda", autocast_dtype, autocast_dtype)
