"""kernels/shifted_conv.py against F.conv2d on the padded input (its `reference`): outputs
and gradients of the fused convolution and gated block, alone and inside the whole model
with the Triton backend forced (Triton's interpreter on the CPU; the device where there is one)."""
import pytest
import torch

from fastpixel import train as train_module
from tests.conftest import DEVICE, tiny_model
from tests.test_train import TINY, train_losses

shifted_conv = pytest.importorskip("fastpixel.kernels.shifted_conv")

# the interpreter evaluates both sides of ELU's where(), and e^x overflows for large x there
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp")

# (input channels C, output channels N, height, width, kernel, padding (left, right, top, bottom), stride)
DOWN = ((2, 3), (1, 1, 1, 0))
DOWN_RIGHT = ((2, 2), (1, 0, 1, 0))
SHAPES = [(3, 5, 6, 7, *DOWN, 1), (3, 5, 6, 7, *DOWN_RIGHT, 1), (4, 17, 7, 9, *DOWN, 2), (5, 6, 8, 5, *DOWN_RIGHT, 2),
          (2, 33, 5, 3, (1, 3), (1, 1, 0, 0), 1), (1, 4, 4, 5, (2, 1), (0, 0, 1, 0), 1)]
NONLINEARITIES = ["concat_elu", "elu", "relu", "identity"]


def make(c, n, height, width, kernel, padding, stride, nonlinearity, *, dtype=torch.float64, gate=False, skip=False,
         class_bias=False, seed=0):
    """Keyword arguments for `reference`, every tensor a leaf that wants its gradient."""
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(DEVICE).requires_grad_()

    factor = 2 if nonlinearity == "concat_elu" else 1
    n_out = 2 * n if gate else n
    out_h, out_w = (height + padding[2] - kernel[0]) // stride + 1, (width + padding[0] + padding[1] - kernel[1]) // stride + 1
    args = dict(x=leaf(2, c, height, width), weight=leaf(n_out, factor * c, *kernel), bias=leaf(n_out),
                padding=padding, stride=stride, nonlinearity=nonlinearity)
    if skip:
        args["skip"] = (leaf(2, 3, out_h, out_w), leaf(n, 6), "concat_elu")
    if class_bias:
        args["class_bias"] = leaf(2, n_out)
    if gate:
        args["residual"] = leaf(2, n, out_h, out_w)
    return args


def fused(args):
    if "residual" in args:
        return shifted_conv.gated_conv(args["x"], args["weight"], args["bias"], args["padding"], args["residual"],
                                       args["nonlinearity"], args.get("class_bias"))
    return shifted_conv.conv(args["x"], args["weight"], args["bias"], args["padding"], args["stride"],
                             args["nonlinearity"], args.get("skip"))


def leaves(args):
    found = [args[k] for k in ("x", "weight", "bias", "class_bias", "residual") if k in args]
    return found + (list(args["skip"][:2]) if "skip" in args else [])


def outputs_and_grads(fn, args):
    out = fn(args)
    g = torch.Generator().manual_seed(9)
    weights = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype).to(out.device)
    return [out.detach()] + list(torch.autograd.grad((out * weights).sum(), leaves(args)))


def assert_matches_reference(args, **tolerance):
    got = outputs_and_grads(fused, args)
    want = outputs_and_grads(lambda a: shifted_conv.reference(**a), args)
    for name, g, w in zip(["output", "x", "weight", "bias", "..."], got, want):
        torch.testing.assert_close(g, w, **tolerance, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
def test_conv_and_its_gradients_match_reference_in_float64(shape, nonlinearity):
    assert_matches_reference(make(*shape, nonlinearity), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1], SHAPES[4]])
def test_gated_block_with_class_bias_matches_reference_in_float64(shape):
    assert_matches_reference(make(*shape[:-1], 1, "concat_elu", gate=True, class_bias=True), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1]])
def test_conv_with_a_skip_input_matches_reference_in_float64(shape):
    assert_matches_reference(make(*shape, "concat_elu", skip=True), rtol=1e-12, atol=1e-12)


def test_float32_matches_reference():
    args = make(*SHAPES[0], "concat_elu", dtype=torch.float32, skip=True, seed=3)
    assert_matches_reference(args, rtol=1e-4, atol=1e-4)
    assert_matches_reference(make(*SHAPES[1], "concat_elu", dtype=torch.float32, gate=True, seed=4), rtol=1e-4, atol=1e-4)


def test_bfloat16_products_accumulate_in_float32():
    args = make(*SHAPES[2], "concat_elu", dtype=torch.bfloat16, seed=5)
    want = shifted_conv.reference(**{k: v.double() if isinstance(v, torch.Tensor) else v for k, v in args.items()}).detach()
    got = fused(args).detach()
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))


@pytest.mark.parametrize("gate", [False, True])
def test_gradcheck_in_float64(gate):
    args = make(2, 2, 3, 4, *DOWN, 1, "concat_elu", gate=gate, skip=not gate, class_bias=gate, seed=6)
    inputs = leaves(args)

    def fn(*tensors):
        rebuilt = dict(args)
        for key, t in zip([k for k in ("x", "weight", "bias", "class_bias", "residual") if k in args], tensors):
            rebuilt[key] = t
        if "skip" in args:
            rebuilt["skip"] = (tensors[-2], tensors[-1], "concat_elu")
        return fused(rebuilt)

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def test_fake_implementation_and_opcheck():
    args = make(*SHAPES[1], "concat_elu", gate=True, class_bias=True, seed=7)
    op_args = (args["x"], args["weight"], args["bias"], None, None, args["class_bias"], args["residual"],
               list(args["padding"]), 1, "concat_elu", "identity")
    out, pre = torch.ops.fastpixel.shifted_conv(*[a.to("meta") if isinstance(a, torch.Tensor) else a for a in op_args])
    assert out.device.type == "meta" and out.shape == args["residual"].shape and pre.shape == (2, 10, 6, 7)
    torch.library.opcheck(torch.ops.fastpixel.shifted_conv.default, op_args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_torch_compile_traces_a_gated_block_in_one_graph():
    from torch._dynamo.testing import CompileCounterWithBackend

    args = make(*SHAPES[1][:-1], 1, "concat_elu", gate=True, seed=8)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fused, backend=counter, fullgraph=True)
    for g, w in zip(outputs_and_grads(compiled, args), outputs_and_grads(fused, args)):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    assert counter.frame_count == 1


def test_bad_arguments_are_refused_with_a_reason():
    args = make(*SHAPES[0], "concat_elu")
    with pytest.raises(ValueError, match="weight must be"):
        shifted_conv.conv(args["x"], args["weight"][:, :3], args["bias"], args["padding"], 1, "concat_elu")
    with pytest.raises(ValueError, match="padding must be"):
        shifted_conv.conv(args["x"], args["weight"], args["bias"], (1, 1, 0, 1), 1, "concat_elu")


# --------------------------------------------------------------------------- in the model
def forced(backend, monkeypatch) -> list:
    """Force a backend; the list returned grows by one per fused-kernel launch."""
    monkeypatch.setenv("FASTPIXEL_BACKEND", backend)
    launches, run = [], shifted_conv._run
    monkeypatch.setattr(shifted_conv, "_run", lambda op, device: (launches.append(op.kind), run(op, device)))
    return launches


def forward_and_grads(model, x, labels):
    params = model(x, labels)
    weights = torch.linspace(-1, 1, params.numel(), dtype=params.dtype).view(params.shape)
    grads = torch.autograd.grad((params * weights).sum(), [x, *model.parameters()])
    return [params.detach(), *grads]


def test_whole_model_forward_and_backward_match_pytorch_layers_in_float64(monkeypatch):
    model = tiny_model(channels=3, coordconv=True, nonlocal_block=True, num_classes=3).train()
    x = (torch.rand(2, 3, *model.config.shape, dtype=torch.float64) * 2 - 1).requires_grad_()
    labels = torch.tensor([0, 2])
    assert not forced("torch", monkeypatch)
    want = forward_and_grads(model, x, labels)
    launches = forced("triton", monkeypatch)
    got = forward_and_grads(model, x, labels)
    assert {"forward", "gate_backward", "input_grad", "weight_grad"} <= set(launches)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_causal_invariant_holds_with_the_triton_backend_forced(monkeypatch):
    from tests.test_model import assert_causal

    launches = forced("triton", monkeypatch)
    assert_causal(tiny_model(channels=3, num_classes=3, image_size=(8, 4)).requires_grad_(False))
    assert "input_grad" in launches


def test_training_steps_with_triton_forced_give_pytorchs_losses(mnist_dir, tmp_path, monkeypatch):  # noqa: F811
    """Two steps at batch 4 (the interpreter takes about a second per launch on 28x28 images)."""
    common = ["--data_set", "mnist", "--data_dir", str(mnist_dir), *TINY, "--batch_size", "4", "--num_samples", "0",
              "--max_steps", "2", "--log_every", "1", "--max_test_images", "4"]
    losses = {}
    for backend in ("torch", "triton"):
        launches = forced(backend, monkeypatch)
        assert train_module.main(common + ["--save_dir", str(tmp_path / backend)]) == 0
        assert bool(launches) == (backend == "triton")
        losses[backend] = train_losses(tmp_path / backend)
    assert sorted(losses["torch"]) == sorted(losses["triton"]) == [1, 2]
    for step, bits in losses["torch"].items():
        assert losses["triton"][step] == pytest.approx(bits, rel=1e-4), step


def test_conv_backend_is_pytorch_unless_triton_is_forced(monkeypatch):
    from fastpixel.backend import BackendError, choose_conv

    monkeypatch.delenv("FASTPIXEL_BACKEND", raising=False)
    assert choose_conv("cpu") == "torch" and choose_conv("cuda") == "torch"
    monkeypatch.setenv("FASTPIXEL_BACKEND", "cext")
    assert choose_conv("cpu") == "torch"
    with pytest.raises(BackendError, match="no training convolutions"):
        choose_conv("cpu", "cext")
    assert choose_conv(DEVICE, "triton") == "triton"
