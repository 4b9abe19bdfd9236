"""The CUDA backend's block-scaled FP8 linear as ONE GEMM: the Triton kernel and the blockwise `scaled_mm` path.

The Triton kernel (backends/cuda_fp8_triton.py) runs here on CPU tensors in Triton's interpreter
(`TRITON_INTERPRET=1`, numpy underneath): the same kernel source a GPU compiles, its indexing, masking, scale
handling and activation quantisation checked against the float32 reference (`quant_act_fp8(x) @ W.dequantize().T`).
It says nothing about the compiled kernel's speed or the GPU's FP8 accumulation. The blockwise cuBLAS path
(backends/cuda_fp8_blockwise.py) runs through a TWIN of `torch.nn.functional.scaled_mm`
(tests/twins/torch_cuda_blockwise_twin.py) asserting its documented layouts, since torch's CPU build has no
blockwise scaled GEMM. `CpuHostedCuda` is the CUDA backend with its probe answering "an sm_90 GPU" on the CPU.
"""

import os
import sys

import torch

# Without a GPU the kernel runs in Triton's interpreter, which has to be chosen before triton is imported (its
# standard library is jitted at import). With a GPU the same tests run the compiled kernel on CUDA tensors.
ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    assert "triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1", \
        "triton was imported before TRITON_INTERPRET=1 was set: run this file on its own"
    os.environ["TRITON_INTERPRET"] = "1"
import pytest  # noqa: E402
import triton  # noqa: E402,F401  (in the test extra)

from backends import cuda_fp8_blockwise, cuda_ops, use_backend
from backends.base import DeviceInfo
from backends.cuda import CudaBackend
from backends.cuda_fp8_triton import fp8_block_linear
from runtime.api import Runtime
from runtime.weights.device_storage import Fp8Block
from runtime.ops.numerics import quant_act_fp8
from tests.twins import torch_cuda_blockwise_twin, torch_cuda_twin  # noqa: E402

G = torch.Generator().manual_seed(0)
# fp32 summation order only: measured max |got - ref| / (|q| @ |W|) = 3.5e-8 over the shapes below
SUM_ORDER = 1.2e-7


DEV = "cuda" if ON_GPU else "cpu"


@pytest.fixture(autouse=True)
def twins(monkeypatch):
    monkeypatch.setattr(cuda_fp8_blockwise, "scaled_mm", torch_cuda_blockwise_twin.scaled_mm)
    # always, GPU or not: where the tensors are CPU tensors only the twin checks CUDA's constraints
    for name in ("scaled_mm", "grouped_mm", "sdpa"):
        monkeypatch.setattr(cuda_ops, name, getattr(torch_cuda_twin, name))


def _weight(N: int, K: int) -> Fp8Block:
    mag = torch.logspace(-2, 1, N)[:, None] * torch.logspace(0, 1, K)[None, :]      # scales vary by block
    return Fp8Block.from_float(torch.randn(N, K, generator=G) * mag).to(DEV)


@pytest.mark.parametrize("M,N,K", [(1, 33, 300), (4, 384, 320), (7, 129, 128), (4096, 33, 100)])
def test_triton_fp8_linear_matches_the_reference(M, N, K):
    """K not a multiple of 128, N odd or spanning a partial scale block, decode (M = 1) and prefill (M = 4096)."""
    w = _weight(N, K)
    x = (torch.randn(M, K, generator=G) * 4).to(DEV)
    got = fp8_block_linear(x, w)
    ref = quant_act_fp8(x) @ w.dequantize().T
    partial = quant_act_fp8(x).abs() @ w.dequantize().abs().T
    assert got.shape == (M, N) and got.dtype == torch.float32
    assert torch.all((got - ref).abs() <= SUM_ORDER * partial + 1e-30)
    # the scale of the last (partial) N x K block is the one applied there: scaled 4x, its outputs move
    s = w.scale.clone()
    s[-1, -1] *= 4
    cols = slice((N - 1) // 128 * 128, N)
    moved = (fp8_block_linear(x, Fp8Block(w.codes, s)) - ref)[:, cols].abs().amax()
    assert moved > 0.1 * ref[:, cols].abs().amax()


def test_triton_kernel_quantises_activations_exactly_like_act_quant():
    """Through an identity weight each output is one product, so the kernel's e4m3 codes and power-of-two scales
    show bit for bit: ties to even, a rounding that carries into the exponent (31.6 -> 32, where Triton's
    interpreter cast gives 16), e4m3 subnormals next to a large block maximum, zeros, a trailing partial block."""
    K = 300
    eye = Fp8Block.from_float(torch.eye(K)).to(DEV)
    x = torch.randn(5, K, generator=G) * torch.logspace(-3, 3, K)
    x[0, :8] = torch.tensor([448.0, 17.0, 19.0, 31.6, -126.3, 1.5 * 2 ** -9, 2 ** -11, -0.0])
    x[1, :128] = 0.0                                  # an all-zero block: amax floored at 1e-4, codes 0
    x[2, :3] = torch.tensor([1.75, 0.5, -1.0])        # amax = 448 * 2^-8 exactly: scale 2^-8, no clamp
    x[3] *= 1e-6
    got = fp8_block_linear(x.to(DEV), eye).cpu()
    assert torch.equal(got, quant_act_fp8(x))
    assert got[0, 1] == 16.0 and got[0, 2] == 20.0 and got[0, 3] == 32.0 and got[0, 5] == 2 ** -8


def test_triton_linear_takes_leading_dims_and_strided_rows():
    w = _weight(64, 256)
    x = torch.randn(3, 5, 512, generator=G).to(DEV)[..., ::2]               # non-contiguous last dim
    got = fp8_block_linear(x, w)
    ref = quant_act_fp8(x) @ w.dequantize().T
    assert got.shape == (3, 5, 64)
    assert torch.all((got - ref).abs() <= SUM_ORDER * (quant_act_fp8(x).abs() @ w.dequantize().abs().T))


@pytest.mark.parametrize("M,N,K", [(1, 48, 320), (5, 384, 256), (130, 16, 1024)])
def test_blockwise_scaled_mm_path_matches_the_reference(M, N, K):
    w = _weight(N, K).to("cpu")
    x = torch.randn(M, K, generator=G) * 4
    got = cuda_fp8_blockwise.blockwise_linear(x, w)
    ref = quant_act_fp8(x) @ w.dequantize().T
    partial = quant_act_fp8(x).abs() @ w.dequantize().abs().T
    # one bf16 rounding of the result (the GEMM's output dtype): <= 2^-9 of it
    assert torch.all((got - ref).abs() <= ref.abs() * 2 ** -8 + SUM_ORDER * partial)


def test_blockwise_twin_rejects_what_cuda_rejects():
    w = _weight(48, 320).to("cpu")
    q, s = cuda_fp8_blockwise.quant_act_blocks(torch.randn(4, 320, generator=G))
    sb = cuda_fp8_blockwise.weight_scale_operand(w.scale)
    assert sb.shape == (4, 1) and sb.stride() == (1, 4)                # 3 K blocks padded to 4
    bw = torch.nn.functional.ScalingType
    ok = torch_cuda_blockwise_twin.scaled_mm(q, w.codes.t(), s.t().contiguous().t(), bw.BlockWise1x128, sb,
                                             bw.BlockWise128x128)
    assert ok.shape == (4, 48)
    with pytest.raises(AssertionError, match="scale_a strides"):
        torch_cuda_blockwise_twin.scaled_mm(q, w.codes.t(), s, bw.BlockWise1x128, sb, bw.BlockWise128x128)
    with pytest.raises(AssertionError, match="scale_b must be"):
        torch_cuda_blockwise_twin.scaled_mm(q, w.codes.t(), s.t().contiguous().t(), bw.BlockWise1x128,
                                            w.scale.t(), bw.BlockWise128x128)
    with pytest.raises(AssertionError, match="column-major"):
        torch_cuda_blockwise_twin.scaled_mm(q, w.codes.t().contiguous(), s.t().contiguous().t(),
                                            bw.BlockWise1x128, sb, bw.BlockWise128x128)


class CpuHostedCuda(CudaBackend):
    """TWIN of a CUDA device: CudaBackend whose probe reports an sm_90 GPU while computing on the CPU."""

    has_triton, blockwise = True, False

    def probe(self) -> DeviceInfo:
        return DeviceInfo("cuda", "cpu", "CPU-hosted twin of an sm_90 GPU", {"sm": 90})

    def capabilities(self, info):
        """A GPU's capabilities; `triton` runs here because the interpreter takes the CPU tensors."""
        caps = set(super().capabilities(info))
        caps |= {"triton"} if self.has_triton else set()
        caps |= {"scaled_mm_blockwise"} if self.blockwise else set()
        return frozenset(caps)


@pytest.mark.parametrize("blockwise,impl", [(False, "cuda.triton_fp8_block+bf16_gemm"),
                                            (True, "cuda.scaled_mm_blockwise_fp8+bf16_gemm")])
@pytest.mark.skipif(ON_GPU, reason="the hosted twin computes on CPU tensors")
def test_the_dispatch_row_names_the_fp8_linear_that_runs(blockwise, impl, tiny_ckpt, monkeypatch):
    backend = type("Hosted", (CpuHostedCuda,), {"blockwise": blockwise})()
    with use_backend("cuda", lambda: backend):             # the twin, through the registration hook
        rt = Runtime.load("nvidia-h100", checkpoint=tiny_ckpt, progress=False)
        assert {r.op: r.impl for r in rt.dispatch.rows}["linear"] == impl
        emu = Runtime.load("nvidia-h100", checkpoint=tiny_ckpt, emulate=True, progress=False)
        ids = torch.randint(2, 258, (1, 48), generator=torch.Generator().manual_seed(0))
        got, ref = rt.forward(ids), emu.forward(ids)
        # The emulation's numerics through the device path: what differs is summation order and the device ops' bf16
        # roundings. Measured mean KL 0.018 over 48 tokens for the Triton linear and the per-K-block loop alike; one
        # token's routing flips in layer 3 (bf16 noise on a random model), so a max-|diff| bound would test that flip.
        p, q = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
        assert (p.exp() * (p - q)).sum(-1).mean() < 0.054
        # without triton and blockwise scaling the per-K-block loop remains, and the row says so
        backend.has_triton = backend.blockwise = False
        rt = Runtime.load("nvidia-h100", checkpoint=tiny_ckpt, progress=False)
        assert {r.op: r.impl for r in rt.dispatch.rows}["linear"] == "cuda.scaled_mm_fp8+bf16_gemm"


@pytest.mark.cuda
@pytest.mark.skipif(not ON_GPU or torch.cuda.get_device_capability(0) != (9, 0) if ON_GPU else True,
                    reason="blockwise scaled_mm needs an sm_90 GPU")
def test_on_gpu_blockwise_scaled_mm_matches_the_reference(monkeypatch):
    monkeypatch.setattr(cuda_fp8_blockwise, "scaled_mm", torch.nn.functional.scaled_mm)
    w = _weight(384, 1024)
    x = (torch.randn(64, 1024, generator=G) * 4).to(DEV)
    ref = quant_act_fp8(x) @ w.dequantize().T
    partial = quant_act_fp8(x).abs() @ w.dequantize().abs().T
    got = cuda_fp8_blockwise.blockwise_linear(x, w)
    assert torch.all((got - ref).abs() <= ref.abs() * 2 ** -8 + 1e-5 * partial)
