"""kernels/mixture_nll.py against `fastpixel.mixture.nll` and `focal_nll`: losses and
gradients, on small random inputs with the edge cases that matter (Triton's interpreter on
the CPU; the real device where there is one)."""
import pytest
import torch

from fastpixel import mixture
from fastpixel.backend import BackendError, choose_loss
from tests.conftest import DEVICE

mixture_nll = pytest.importorskip("fastpixel.kernels.mixture_nll")

# the interpreter's e^z overflows to inf for large z, as the kernels mean it to
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp")

GAMMAS = [None, 0.0, 0.5, 2.0]  # None: the plain nll


def random_inputs(batch, channels, nr_mix, height, width, dtype, seed=0):
    """params (B, P, H, W) in `dtype` and images x (B, C, H, W) on the grid, with a fifth of
    the sub-pixels at 0 or 255, means well outside [-1, 1], log-scales from far below the
    clamp at -7 to 3, large logits and coupling coefficients."""
    g = torch.Generator().manual_seed(seed)
    k, ck = nr_mix, channels * nr_mix
    params = torch.randn(batch, mixture.num_params(channels, nr_mix), height, width, generator=g, dtype=torch.float64)
    params[:, :k] *= 4
    params[:, k:k + ck] = torch.rand(batch, ck, height, width, generator=g, dtype=torch.float64) * 6 - 3
    params[:, k + ck:k + 2 * ck] = torch.rand(batch, ck, height, width, generator=g, dtype=torch.float64) * 12 - 9
    params[:, k + 2 * ck:] *= 2
    levels = torch.randint(0, 256, (batch, channels, height, width), generator=g)
    edges = torch.rand(levels.shape, generator=g) < 0.2
    levels[edges] = 255 * torch.randint(0, 2, levels.shape, generator=g)[edges]
    x = levels.to(torch.float64) / 127.5 - 1
    return params.to(dtype).to(DEVICE), x.to(dtype).to(DEVICE)


def loss_and_grad(loss_fn, params, x):
    params = params.detach().requires_grad_()
    loss = loss_fn(params, x)
    weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device)  # not all ones
    (grad,) = torch.autograd.grad((loss * weights).sum(), params)
    return loss.detach(), grad


def kernel(gamma):
    return lambda p, x: mixture_nll.nll(p, x) if gamma is None else mixture_nll.focal_nll(p, x, gamma)


def reference(gamma):
    return lambda p, x: mixture_nll.reference(p, x, gamma)


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("channels, nr_mix", [(1, 1), (1, 5), (3, 1), (3, 4)])
def test_loss_and_gradients_match_reference_in_float64(channels, nr_mix, gamma):
    """66 pixels: several programs for K > 1, the last one partly outside the batch."""
    params, x = random_inputs(2, channels, nr_mix, 3, 11, torch.float64, seed=nr_mix)
    loss, grad = loss_and_grad(kernel(gamma), params, x)
    ref_loss, ref_grad = loss_and_grad(reference(gamma), params, x)
    assert loss.dtype == torch.float64 and loss.shape == (2,) and grad.dtype == torch.float64
    # the reference's softplus is z above 20 (off by up to 2e-9 per term); everything else agrees to rounding
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-8 * float(ref_grad.abs().max()))


def relative_error(got, exact):
    """Largest error relative to each value, with a floor of 1e-4 of the largest (gradients
    that underflow to 0 in float32 are not counted as infinitely wrong)."""
    floor = 1e-4 * float(exact.abs().max())
    return float(((got.double() - exact).abs() / (exact.abs() + floor)).max())


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("channels, nr_mix", [(1, 3), (3, 1), (3, 5)])
def test_float32_error_is_at_most_twice_pytorchs(channels, nr_mix, gamma):
    """Flash-attention's rule, pixel by pixel: against the float64 reference, the kernel's
    float32 error in each pixel's loss and each gradient is at most twice plain PyTorch's
    float32 error (plus a few ulps). Each pixel is its own image here, so that the sum over
    an image (the same in both) does not hide the per-pixel error."""
    params, x = random_inputs(3, channels, nr_mix, 4, 7, torch.float64, seed=10 + nr_mix)
    params = params.permute(0, 2, 3, 1).flatten(0, 2)[:, :, None, None]
    x = x.permute(0, 2, 3, 1).flatten(0, 2)[:, :, None, None]
    exact_loss, exact_grad = loss_and_grad(reference(gamma), params, x)
    torch_loss, torch_grad = loss_and_grad(reference(gamma), params.float(), x.float())
    loss, grad = loss_and_grad(kernel(gamma), params.float(), x.float())
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    slack = 8 * torch.finfo(torch.float32).eps
    assert relative_error(loss, exact_loss) <= 2 * relative_error(torch_loss, exact_loss) + slack
    assert relative_error(grad, exact_grad) <= 2 * relative_error(torch_grad, exact_grad) + slack


@pytest.mark.parametrize("channels", [1, 3])
def test_grid_edges_and_extreme_means_and_scales_match_reference(channels):
    """Every sub-pixel at 0 or 255 (the open-ended bins) or next to them, under means far
    outside the grid and log-scales from -30 (clamped to -7) to 10, both losses."""
    nr_mix = 3
    params, _ = random_inputs(4, channels, nr_mix, 2, 3, torch.float64, seed=channels)
    k, ck = nr_mix, channels * nr_mix
    g = torch.Generator().manual_seed(1)
    pick = lambda values, n: torch.tensor(values, dtype=torch.float64)[torch.randint(len(values), n, generator=g)]
    params[:, k:k + ck] = pick([-50.0, -1.0, -0.99, 0.0, 1.0, 50.0], params[:, k:k + ck].shape)
    params[:, k + ck:k + 2 * ck] = pick([-30.0, -7.0, -6.5, 0.0, 10.0], params[:, k + ck:k + 2 * ck].shape)
    levels = torch.tensor([0, 1, 254, 255], dtype=torch.float64)[torch.randint(4, (4, channels, 2, 3), generator=g)]
    x = levels / 127.5 - 1
    for gamma in (None, 2.0):
        loss, grad = loss_and_grad(kernel(gamma), params, x)
        ref_loss, ref_grad = loss_and_grad(reference(gamma), params, x)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-8)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-8 * float(ref_grad.abs().max()))


@pytest.mark.parametrize("channels", [1, 3])
def test_focal_at_gamma_zero_equals_nll(channels):
    params, x = random_inputs(2, channels, 3, 3, 4, torch.float64, seed=5)
    loss, grad = loss_and_grad(kernel(None), params, x)
    focal_loss, focal_grad = loss_and_grad(kernel(0.0), params, x)
    torch.testing.assert_close(focal_loss, loss, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(focal_grad, grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("gamma", [None, 0.5, 2.0])
@pytest.mark.parametrize("channels", [1, 3])
def test_gradcheck_in_float64(channels, gamma):
    """Analytic gradients against finite differences of the kernel's own loss (log-scales kept
    off the clamp's kink, where the derivative jumps)."""
    params, x = random_inputs(1, channels, 2, 1, 2, torch.float64, seed=7)
    log_scales = slice(2 + 2 * channels, 2 + 4 * channels)
    params[:, log_scales] = params[:, log_scales].clamp(-6.5, 2.0)
    assert torch.autograd.gradcheck(lambda p: mixture_nll.nll_per_pixel(p, x, gamma),
                                    (params.requires_grad_(),), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_bfloat16_params_get_bfloat16_gradients_close_to_the_reference():
    params, x = random_inputs(2, 3, 2, 2, 3, torch.bfloat16, seed=3)
    loss, grad = loss_and_grad(kernel(None), params, x)
    ref_loss, ref_grad = loss_and_grad(reference(None), params, x)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=2e-2, atol=1e-2 * float(ref_grad.abs().max()))


def test_non_contiguous_params_give_the_same_loss():
    params, x = random_inputs(2, 3, 2, 3, 4, torch.float64, seed=4)
    strided = params.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels last
    assert not strided.is_contiguous()
    torch.testing.assert_close(mixture_nll.nll(strided, x), mixture_nll.nll(params, x), rtol=0, atol=0)


def test_fake_implementation_gives_shapes_without_running_the_kernel():
    params, x = random_inputs(2, 3, 2, 3, 4, torch.float32, seed=2)
    loss = mixture_nll.nll_per_pixel(params.to("meta"), x.to("meta"), 2.0)
    assert loss.device.type == "meta" and loss.shape == (2, 3, 4) and loss.dtype == torch.float32
    grad = torch.ops.fastpixel.mixture_nll_backward(loss, params.to("meta"), x.to("meta"), 2.0, True)
    assert grad.device.type == "meta" and grad.shape == params.shape


def test_opcheck_passes():
    params, x = random_inputs(1, 3, 2, 1, 2, torch.float64, seed=1)
    for gamma, focal in ((0.0, False), (2.0, True)):
        torch.library.opcheck(torch.ops.fastpixel.mixture_nll.default, (params.requires_grad_(), x, gamma, focal),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_torch_compile_traces_mixture_focal_nll_through_the_op_in_one_graph():
    """fullgraph=True fails on any graph break (the dispatch included); aot_eager runs the
    traced forward and backward graphs, which must hold the custom op."""
    from torch._dynamo.testing import CompileCounterWithBackend

    params, x = random_inputs(2, 3, 2, 2, 3, torch.float64, seed=6)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda p, x: mixture.focal_nll(p, x, 2.0, backend="triton"), backend=counter,
                             fullgraph=True)
    loss, grad = loss_and_grad(compiled, params, x)
    eager_loss, eager_grad = loss_and_grad(kernel(2.0), params, x)
    torch.testing.assert_close(loss, eager_loss, rtol=0, atol=0)
    torch.testing.assert_close(grad, eager_grad, rtol=0, atol=0)
    targets = [str(node.target) for graph in counter.graphs for node in graph.graph.nodes]
    assert "fastpixel.mixture_nll.default" in targets


def test_mixture_nll_takes_the_kernel_only_where_chosen(monkeypatch):
    """One dispatch point: on the CPU the loss stays PyTorch's unless Triton is forced."""
    monkeypatch.delenv("FASTPIXEL_BACKEND", raising=False)
    assert choose_loss("cpu") == "torch"
    assert choose_loss("cpu", "triton") == "triton"  # TRITON_INTERPRET=1 (tests/conftest.py)
    monkeypatch.setenv("FASTPIXEL_BACKEND", "cext")  # the sampler's engine: the loss stays PyTorch's
    assert choose_loss("cpu") == "torch"
    with pytest.raises(BackendError, match="no mixture loss"):
        choose_loss("cpu", "cext")
    monkeypatch.setenv("FASTPIXEL_BACKEND", "triton")
    assert choose_loss("cpu") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendError, match="FASTPIXEL_BACKEND=triton cannot run here"):
        choose_loss("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("FASTPIXEL_BACKEND")
    assert choose_loss("cpu") == "torch"

    calls = []
    monkeypatch.setattr(mixture_nll, "_nll_per_pixel", lambda *args: calls.append(args) or args[1].sum(1) * 0)
    params, x = random_inputs(1, 1, 2, 1, 2, torch.float64)
    mixture.nll(params, x)
    mixture.focal_nll(params, x)
    assert not calls
    mixture.nll(params, x, backend="triton")
    mixture.focal_nll(params, x, 0.5, backend="triton")
    assert [(gamma, focal) for _, _, gamma, focal in calls] == [(0.0, False), (0.5, True)]
