"Tests for ft_course.nf4: bit-exact NF4 / double quantization against bitsandbytes, the 4-bit layer, QLoRA."
import itertools, logging, math

import numpy as np
import pytest
import torch
from torch import nn

bnbF = pytest.importorskip("bitsandbytes.functional")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
import torch._dynamo
torch._dynamo.config.disable = True   # bitsandbytes' CPU fallbacks are torch.compile'd; eager is faster here

from ft_course.nf4 import (NF4_CODE, FP4_CODE, make_nf4_code, make_dynamic_map, quantize_nf4, dequantize_nf4, NF4State,
                           quantize_blockwise_8bit, dequantize_blockwise_8bit, LinearNF4, quantize_model, fake_quantize,
                           pack_4bit, unpack_4bit, model_bytes)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def bnb_formula(bp, bst):
    "bitsandbytes' packed bytes and state dequantized the plain way (independent of ft_course)."
    n = math.prod(bst.shape)
    q = torch.stack([bp.flatten() >> 4, bp.flatten() & 15], -1).flatten()[:n].long()
    am = bst.absmax if bst.state2 is None else bnbF.dequantize_blockwise(bst.absmax, bst.state2) + bst.offset
    v = bst.code.to(bp.device)[q]
    v = torch.nn.functional.pad(v, (0, am.numel() * bst.blocksize - n))
    return (v.view(am.numel(), -1) * am[:, None]).flatten()[:n].to(bst.dtype)


def check_equal(w, blocksize, dq):
    p, s = quantize_nf4(w, blocksize, dq)
    bp, bst = bnbF.quantize_4bit(w, quant_type="nf4", blocksize=blocksize, compress_statistics=dq)
    assert p.dtype == torch.uint8 and p.shape == bp.shape
    assert torch.equal(p.flatten(), bp.flatten()), "packed bytes differ"
    assert torch.equal(s.absmax, bst.absmax), "absmax differs"
    if dq:
        assert torch.equal(s.offset, bst.offset)
        assert torch.equal(s.state2.absmax, bst.state2.absmax)
        assert torch.equal(s.state2.code, bst.state2.code)
    d = dequantize_nf4(p, s)
    assert d.dtype == w.dtype and d.shape == w.shape
    ref = bnb_formula(bp, bst)
    assert torch.equal(d.flatten(), ref)
    bd = bnbF.dequantize_4bit(bp, bst)
    if torch.equal(bd.flatten(), ref):   # bnb 0.50.2's AVX-512 CPU kernel is wrong for some row/block layouts
        assert torch.equal(d.flatten(), bd.flatten())


def test_codes():
    assert torch.allclose(make_nf4_code(), bnbF.get_4bit_type("nf4", device="cpu"), atol=1e-6, rtol=0)
    assert torch.equal(NF4_CODE, bnbF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(FP4_CODE, bnbF.get_4bit_type("fp4", device="cpu").sort().values)
    assert torch.equal(make_dynamic_map(), bnbF.create_dynamic_map(signed=True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("blocksize", [64, 128, 256, 512, 1024, 2048, 4096])
def test_bit_exact(device, dtype, blocksize):
    torch.manual_seed(blocksize)
    for shape, dq in itertools.product([(1,), (7,), (100, 70), (333,), (3, 5, 129), (256, 512), (4097, 3), (8, 256)], (False, True)):
        check_equal((torch.randn(shape, device=device) * 0.05).to(dtype), blocksize, dq)


@pytest.mark.parametrize("device", DEVICES)
def test_edges(device):
    mid = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
    e = torch.cat([torch.ones(1), mid, torch.from_numpy(np.nextafter(mid.numpy(), 2)),
                   torch.from_numpy(np.nextafter(mid.numpy(), -2)), NF4_CODE])
    e = torch.cat([e, torch.zeros(128 - e.numel()), torch.zeros(64), torch.full((64,), .3), -torch.rand(64) * 3, torch.tensor([.5, -.25, .1])])
    for dt, dq in itertools.product([torch.float32, torch.float16, torch.bfloat16], (False, True)):
        check_equal(e.to(device, dt), 64, dq)
    check_equal(torch.full((64 * 300,), 0.02, device=device), 64, True)   # all absmax equal: absmax - mean = 0


def test_blockwise_8bit():
    torch.manual_seed(0)
    a = torch.rand(10000) * 0.1
    q, st = quantize_blockwise_8bit(a - a.mean())
    bq, bst = bnbF.quantize_blockwise(a - a.mean(), blocksize=256)
    assert torch.equal(q, bq) and torch.equal(st.absmax, bst.absmax)
    assert torch.equal(dequantize_blockwise_8bit(q, st), bnbF.dequantize_blockwise(bq, bst))


def test_packing_and_bits():
    q = torch.tensor([1, 15, 0, 7, 9], dtype=torch.uint8)
    assert pack_4bit(q).tolist() == [0x1F, 0x07, 0x97] and torch.equal(unpack_4bit(pack_4bit(q), 5), q)
    _, s = quantize_nf4(torch.randn(4096, 4096), 64, True)
    assert abs(s.bits_per_param(False) - (8 / 64 + 32 / (64 * 256))) < 1e-5
    _, s = quantize_nf4(torch.randn(4096, 4096), 64, False)
    assert abs(s.bits_per_param() - 4.5) < 1e-9


def test_errors_anchor():
    torch.manual_seed(42)
    A = torch.randn(1024, 1024)
    p, s = quantize_nf4(A, 64, False)
    err = (A - dequantize_nf4(p, s)).abs()
    assert abs(err.mean().item() - 0.0728) < 2e-3 and abs((err / (A.abs() + 1e-8)).mean().item() - 0.203) < 5e-3
    err = (A - fake_quantize(A, FP4_CODE, 64)).abs()
    assert abs(err.mean().item() - 0.0965) < 2e-3
    bd = bnbF.dequantize_4bit(*bnbF.quantize_4bit(A, quant_type="fp4", blocksize=64)).reshape(A.shape)
    assert torch.equal(fake_quantize(A, FP4_CODE, 64), bd)


def test_bad_input():
    with pytest.raises(ValueError, match="power of two"): quantize_nf4(torch.randn(10), blocksize=100)
    with pytest.raises(ValueError, match="power of two"): quantize_nf4(torch.randn(10), blocksize=16)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"): quantize_nf4(torch.arange(10))
    with pytest.raises(ValueError, match="empty"): quantize_nf4(torch.randn(0))
    with pytest.raises(ValueError, match="no nn.Linear"): quantize_model(nn.Sequential(nn.ReLU()))


def test_linear_nf4_and_grads():
    torch.manual_seed(0)
    lin = nn.Linear(300, 130)
    q = LinearNF4.from_linear(lin)
    x = torch.randn(4, 300, requires_grad=True)
    bp, bst = bnbF.quantize_4bit(lin.weight.data, quant_type="nf4", blocksize=64, compress_statistics=True)
    Wq = bnb_formula(bp, bst).view(130, 300)
    y = q(x)
    assert torch.allclose(y, x @ Wq.T + lin.bias, atol=1e-5)
    y.pow(2).sum().backward()
    assert torch.allclose(x.grad, (2 * (x @ Wq.T + lin.bias)) @ Wq, atol=1e-4)
    assert not any(p.requires_grad for p in q.parameters()) and q.weight.dtype == torch.uint8
    q2 = LinearNF4(300, 130); q2.load_state_dict(q.state_dict())
    assert torch.equal(q2(x), q(x))
    assert q(x.bfloat16()).dtype == torch.bfloat16


def test_qlora_step_only_lora_changes():
    from ft_course.models import tiny_model
    from ft_course.lora import add_lora
    torch.manual_seed(0)
    model = tiny_model("llama")
    fp32 = model_bytes(model)
    quantize_model(model)
    assert model_bytes(model) < fp32
    assert not any(type(m) is nn.Linear for n, m in model.named_modules() if not n.endswith("lm_head"))
    add_lora(model, r=4, alpha=8, target_modules="all-linear")
    before = {n: t.detach().clone() for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    model.train()
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward(); opt.step(); opt.zero_grad()
    changed = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if not torch.equal(t, before[n])]
    assert changed and all(".lora_" in n for n in changed)
