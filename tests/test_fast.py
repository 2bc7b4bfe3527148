"""Equality tests of ft_course.fast's pieces against their plain versions (CPU), the Triton kernels through Triton's
CPU interpreter where Triton is installed, and on CUDA against bitsandbytes / eager PyTorch (skipped without CUDA)."""
import os, subprocess, sys, textwrap
import pytest, torch
from types import SimpleNamespace
from ft_course import kernels, fast, bench
# the fast path's three modules (kernels, patched model, benchmark) under one name
F = SimpleNamespace(**{k: v for m in (kernels, fast, bench) for k, v in vars(m).items() if not k.startswith('__')})

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
try:
    import triton  # noqa: F401
    HAS_TRITON = True
except Exception:
    HAS_TRITON = False

def rel(a, b): return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()

def test_nf4_torch_matches_bitsandbytes():
    import bitsandbytes.functional as bnbF
    torch.manual_seed(1)
    for dq in (True, False):
        w = F.NF4Weight.quantize(torch.randn(96, 320) * 0.03, double_quant=dq)
        for dt in (torch.bfloat16, torch.float32):
            ref = bnbF.dequantize_4bit(w.packed.reshape(-1, 1), w.to_bnb_state(dt))
            assert torch.equal(F.dequantize_nf4_torch(w, dt), ref.reshape(w.shape))

def test_nf4_table_is_bitsandbytes():
    import bitsandbytes.functional as bnbF
    assert torch.equal(torch.tensor(F.NF4_CODE), bnbF.get_4bit_type('nf4', device='cpu').float())

def test_qlora_function_matches_plain_autograd():
    torch.manual_seed(0)
    ws = [F.NF4Weight.quantize(torch.randn(o, 64) * 0.05) for o in (48, 32, 32)]
    As = [torch.randn(8, 64, requires_grad=True) for _ in ws]; Bs = [torch.randn(w.shape[0], 8, requires_grad=True) for w in ws]
    x = torch.randn(2, 5, 64, requires_grad=True)
    ts = [x] + As + Bs
    y = F.qlora_linear(x, ws, As, Bs, 0.25, 'torch'); g = torch.randn_like(y)
    got = torch.autograd.grad(y, ts, g)
    y2 = F.qlora_linear_ref(x, ws, As, Bs, 0.25)
    exp = torch.autograd.grad(y2, ts, g)
    assert rel(y, y2) < 1e-6
    for a, b in zip(got, exp): assert rel(a, b) < 1e-5

def test_rmsnorm_swiglu_ce_match_plain():
    torch.manual_seed(0)
    x = torch.randn(3, 7, 96, dtype=torch.float64, requires_grad=True); w = torch.rand(96, dtype=torch.float64) + 0.5
    y = F.rms_norm(x, w, 1e-6); g = torch.randn_like(y)
    assert rel(y, F.rms_norm_ref(x, w, 1e-6)) < 1e-6
    assert rel(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(F.rms_norm_ref(x, w, 1e-6), x, g)[0]) < 1e-6
    gu = torch.randn(3, 5, 160, dtype=torch.float64, requires_grad=True)
    a2 = F.swiglu_ref(gu); g = torch.randn_like(a2); exp = torch.autograd.grad(a2, gu, g)[0]
    a = F.swiglu(gu.clone()); assert rel(a, a2) < 1e-6
    gu.grad = None; F.swiglu(gu * 1).backward(g); assert rel(gu.grad, exp) < 1e-6
    h = torch.randn(2, 9, 32, requires_grad=True); W = torch.randn(100, 32) * 0.3
    lab = torch.randint(0, 100, (2, 9)); lab[0, 3] = -100
    l = F.linear_cross_entropy(h, W, lab, chunk_elems=300); gh = torch.autograd.grad(l, h)[0]
    l2 = F.linear_cross_entropy(h, W, lab, chunked=False); gh2 = torch.autograd.grad(l2, h)[0]
    import torch.nn.functional as tF
    l3 = tF.cross_entropy((h @ W.t())[:, :-1].reshape(-1, 100), lab[:, 1:].reshape(-1), ignore_index=-100)
    assert abs(l.item() - l3.item()) < 1e-5 and abs(l2.item() - l3.item()) < 1e-5 and rel(gh, gh2) < 1e-5

def test_checkpoint_and_in_backward_adamw():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 16)
    x = torch.randn(4, 16, requires_grad=True)
    run = lambda h: torch.tanh(lin(h)) * 2
    for mode in ('layer', 'offload'):
        y = F.checkpoint(run, x, mode); g = torch.randn_like(y)
        got = torch.autograd.grad(y, [x], g)[0]
        exp = torch.autograd.grad(run(x), [x], g)[0]
        assert torch.allclose(got, exp)
    ps = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]; qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    o1 = torch.optim.AdamW(ps, lr=0.1); o2 = F.InBackwardAdamW(qs, lr=0.1)
    for s in range(3):
        sum((p ** 2 * (i + 1)).sum() for i, p in enumerate(ps)).backward(); o1.step(); o1.zero_grad()
        sum((p ** 2 * (i + 1)).sum() for i, p in enumerate(qs)).backward(); o2.step()
    for p, q in zip(ps, qs): assert torch.allclose(p, q, atol=1e-6) and q.grad is None

def test_patched_tiny_model_matches_peft_bnb():
    from ft_course.models import tiny_model_dir
    ref, fast = F.load_qlora_pair(tiny_model_dir('llama'), r=8, alpha=16, cfg=F.FastConfig(checkpoint='layer'))
    a = F.train_losses(ref, 3, 2, 32, ref.config.vocab_size, lr=3e-3)
    b = F.train_losses(fast, 3, 2, 32, ref.config.vocab_size, lr=3e-3, opt='in_backward')
    for x, y in zip(a, b): assert abs(x - y) / x < 1e-4, (a, b)
    from peft import get_peft_model_state_dict
    sd_ref, sd_fast = get_peft_model_state_dict(ref), F.lora_state_dict(fast)
    assert set(sd_ref) == set(sd_fast)
    for k in sd_ref: assert torch.allclose(sd_ref[k].float(), sd_fast[k].float(), atol=1e-4), k

INTERP = textwrap.dedent('''
    import torch; from ft_course import kernels as F
    torch.manual_seed(0)
    for dq in (True, False):
        w = F.NF4Weight.quantize(torch.randn(64, 320) * 0.03, double_quant=dq)
        # the interpreter truncates fp32 -> bf16 (the GPU rounds), so compare the fp32 output bit for bit
        assert torch.equal(F.dequantize_nf4_triton(w, torch.float32), F.dequantize_nf4_torch(w, torch.float32))
    x = torch.randn(6, 96); w = torch.rand(96) + 0.5
    assert torch.allclose(F.rms_norm(x, w, 1e-6), F.rms_norm_ref(x, w, 1e-6), atol=1e-5)
    xr = x.clone().requires_grad_(); g = torch.randn_like(x)
    a = torch.autograd.grad(F.rms_norm(xr, w, 1e-6), xr, g)[0]; b = torch.autograd.grad(F.rms_norm_ref(xr, w, 1e-6), xr, g)[0]
    assert torch.allclose(a, b, atol=1e-5)
    gu = torch.randn(4, 2 * 80); a = F.swiglu(gu.clone()); assert torch.allclose(a, F.swiglu_ref(gu), atol=1e-6)
    gr = gu.clone().requires_grad_(); d = torch.randn(4, 80)
    e = torch.autograd.grad(F.swiglu_ref(gr), gr, d)[0]; gr2 = gu.clone().requires_grad_(); F.swiglu(gr2 * 1).backward(d)
    assert torch.allclose(gr2.grad, e, atol=1e-5)
    print('ok')
''')

@pytest.mark.skipif(not HAS_TRITON, reason='triton not installed')
def test_triton_kernels_in_interpreter():
    env = {**os.environ, 'TRITON_INTERPRET': '1', 'CUDA_VISIBLE_DEVICES': ''}
    p = subprocess.run([sys.executable, '-c', INTERP], capture_output=True, text=True, env=env)
    assert p.returncode == 0 and 'ok' in p.stdout, p.stderr[-3000:]
    assert F.check_kernels_interpreted() == 'kernels ok'   # RoPE and the cross-entropy kernel too, forward and backward

@cuda
def test_cuda_dequant_bit_exact_with_bitsandbytes():
    import bitsandbytes.functional as bnbF
    torch.manual_seed(0)
    for shp in ((4096, 4096), (11008, 4096), (1000, 333)):
        for dq in (True, False):
            w = F.NF4Weight.quantize((torch.randn(shp, device='cuda') * 0.02).to(torch.bfloat16), double_quant=dq)
            ref = bnbF.dequantize_4bit(w.packed.reshape(-1, 1), w.to_bnb_state(torch.bfloat16)).reshape(shp)
            out = torch.full(shp, float('nan'), dtype=torch.bfloat16, device='cuda')
            assert torch.equal(F.dequantize_nf4_triton(w, torch.bfloat16, out=out).view(torch.int16), ref.view(torch.int16))

@cuda
def test_cuda_fused_pieces_match_plain():
    torch.manual_seed(0)
    x = torch.randn(4, 512, 2048, device='cuda', dtype=torch.bfloat16) * 3; w = (torch.rand(2048, device='cuda') + 0.5).to(torch.bfloat16)
    assert rel(F.rms_norm(x, w, 1e-6), F.rms_norm_ref(x, w, 1e-6)) < 1e-2
    xr = x.clone().requires_grad_(); g = torch.randn_like(x)
    a = torch.autograd.grad(F.rms_norm(xr, w, 1e-6), xr, g)[0]
    b = torch.autograd.grad(F.rms_norm_ref(xr.double(), w.double(), 1e-6), xr, g.double())[0]
    assert rel(a, b) < 1e-2
    gu = torch.randn(4, 512, 2 * 5504, device='cuda', dtype=torch.bfloat16)
    assert rel(F.swiglu(gu.clone()), F.swiglu_ref(gu)) < 1e-2
    gr = gu.clone().requires_grad_(); d = torch.randn(4, 512, 5504, device='cuda', dtype=torch.bfloat16)
    e = torch.autograd.grad(F.swiglu_ref(gr.double()), gr, d.double())[0]; gr2 = gu.clone().requires_grad_(); F.swiglu(gr2 * 1).backward(d)
    assert rel(gr2.grad, e) < 1e-2
    ws = [F.NF4Weight.quantize(torch.randn(o, 1024, device='cuda', dtype=torch.bfloat16) * 0.02) for o in (1024, 256, 256)]
    As = [torch.randn(64, 1024, device='cuda', requires_grad=True) * 0.01 for _ in ws]; Bs = [torch.randn(w.shape[0], 64, device='cuda', requires_grad=True) * 0.01 for w in ws]
    As = [a.detach().requires_grad_() for a in As]; Bs = [b.detach().requires_grad_() for b in Bs]
    xx = torch.randn(2, 300, 1024, device='cuda', dtype=torch.bfloat16, requires_grad=True)
    y = F.qlora_linear(xx, ws, As, Bs, 0.25, 'triton'); gy = torch.randn_like(y)
    got = torch.autograd.grad(y, [xx] + As + Bs, gy)
    exp = torch.autograd.grad(F.qlora_linear_ref(xx.double(), ws, [a.double() for a in As], [b.double() for b in Bs], 0.25), [xx] + As + Bs, gy.double())
    assert rel(y, F.qlora_linear_ref(xx.double(), ws, [a.double() for a in As], [b.double() for b in Bs], 0.25)) < 1e-2
    for p, q in zip(got, exp): assert rel(p, q) < 2e-2

def test_patch_takes_over_linear_nf4_and_right_padding_matches_peft():
    import copy
    from ft_course.models import tiny_model, tiny_model_dir
    from ft_course.nf4 import quantize_model
    m = tiny_model('llama'); m2 = quantize_model(copy.deepcopy(m))
    a = F.patch_model(m, F.FastConfig(checkpoint='none'), r=8, alpha=16, device='cpu', dtype=torch.float32)
    b = F.patch_model(m2, F.FastConfig(checkpoint='none'), r=8, alpha=16, device='cpu', dtype=torch.float32)
    with torch.no_grad():
        for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
            if 'lora_' in n: p.normal_(0, 0.1); q.copy_(p)
    x = F.pattern_batch(2, 16, 49152, 0)
    with torch.no_grad(): assert a(input_ids=x, labels=x).loss.item() == b(input_ids=x, labels=x).loss.item()
    ref, fast = F.load_qlora_pair(tiny_model_dir('llama'), r=8, alpha=16, cfg=F.FastConfig(checkpoint='layer'))
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if 'lora_B' in n: p.normal_(0, 0.1)
        src = {n.replace('base_model.model.', '').replace('.default', ''): p for n, p in ref.named_parameters() if 'lora_' in n}
        for n, p in fast.named_parameters():
            if 'lora_' in n: p.copy_(src[n])
        mask = torch.ones_like(x); mask[1, 10:] = 0; lab = x.masked_fill(mask == 0, -100)
        la = ref(input_ids=x, attention_mask=mask, labels=lab).loss.item(); lb = fast(input_ids=x, attention_mask=mask, labels=lab).loss.item()
    assert abs(la - lb) / la < 1e-5, (la, lb)

def _patched_tiny(cfg=None, seed=0):
    from ft_course.models import tiny_model
    torch.manual_seed(seed)
    m = F.patch_model(tiny_model('llama'), cfg or F.FastConfig(checkpoint='layer'), r=8, alpha=16, device='cpu', dtype=torch.float32)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if 'lora_B' in n: p.normal_(0, 0.05)
    return m

def _hf_loss(m, **batch):
    "The same patched model through its own Hugging Face forward (what generation uses), loss from full logits."
    import torch.nn.functional as tF
    lab = batch.pop('labels')
    logits = m(**batch).logits
    return tF.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), lab[:, 1:].reshape(-1), ignore_index=-100)

def test_fast_path_on_packed_batches_matches_the_hf_forward():
    "Packed samples (block-diagonal 4D mask, positions restarting at 0) and padded ones: fast loss and gradients = HF's."
    from ft_course.data import collate
    m = _patched_tiny()
    g = torch.Generator().manual_seed(3)
    packs = []
    for lens in ([5, 9, 4], [11, 6]):
        ids = torch.randint(0, 49152, (sum(lens),), generator=g).tolist()
        lab = [t if i % 3 else -100 for i, t in enumerate(ids)]
        packs.append(dict(input_ids=ids, labels=lab, position_ids=[p for n in lens for p in range(n)], seq_lens=lens))
    for packed in ('mask', 'padding'):
        batch = collate(packs, 0) if packed == 'mask' else collate([{k: v for k, v in p.items() if k not in ('seq_lens', 'position_ids')} for p in packs], 0)
        if packed == 'mask': assert batch['attention_mask'].dim() == 4
        fast = m(**{k: v.clone() for k, v in batch.items()}).loss
        lab = batch['labels'].clone()
        if batch['attention_mask'].dim() == 2: lab = lab.masked_fill(batch['attention_mask'] == 0, -100)
        ref = _hf_loss(m, **{**batch, 'labels': lab})
        assert abs(fast.item() - ref.item()) < 1e-5 * ref.item(), (packed, fast.item(), ref.item())
        ps = F.lora_parameters(m)
        fast.backward(); ga = [p.grad.clone() for p in ps]; m.zero_grad(set_to_none=True)   # re-entrant checkpoint: .grad
        ref.backward(); gb = [p.grad.clone() for p in ps]; m.zero_grad(set_to_none=True)
        for a, b in zip(ga, gb): assert rel(a, b) < 1e-4
    # naive packing (no block mask, positions not restarted) is a different computation: the test can fail
    b2 = collate(packs, 0)
    wrong = m(input_ids=b2['input_ids'], labels=b2['labels']).loss
    right = m(**b2).loss
    assert abs(wrong.item() - right.item()) > 1e-3

def test_patched_model_generates_with_its_kv_cache():
    "Without labels the patched model is the HF model with NF4+LoRA layers: greedy generation with the cache = without."
    m = _patched_tiny().eval()
    x = torch.randint(0, 49152, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = m.generate(x, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        b = m.generate(x, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
        lf = m(input_ids=a, labels=a).loss; lh = _hf_loss(m, input_ids=a, labels=a)
    assert torch.equal(a, b) and a.shape[1] == 13
    assert abs(lf.item() - lh.item()) < 1e-5 * lh.item()

@cuda
def test_cuda_offload_prefetch_and_graph_match_eager():
    "Offloaded checkpoints (with and without prefetch) and a CUDA-graphed step give the eager step's losses."
    losses = {}
    for name, cfg in [('layer', F.FastConfig(checkpoint='layer')), ('offload', F.FastConfig(checkpoint='offload', prefetch=False)),
                      ('prefetch', F.FastConfig(checkpoint='offload')), ('graph', F.FastConfig(checkpoint='layer', cuda_graph=True)),
                      ('graph+offload', F.FastConfig(checkpoint='offload', cuda_graph=True))]:
        m = F.build_fast_model('smollm2-135m', cfg, r=8, alpha=16, seed=0, num_hidden_layers=4)
        opt = F.InBackwardAdamW(F.lora_parameters(m), lr=1e-3, capturable=cfg.cuda_graph)
        xs = [F.pattern_batch(2, 256, 49152, s).cuda() for s in range(6)]
        if cfg.cuda_graph:
            step = F.GraphedStep(m, opt, xs[0], warmup=1)   # the warm-up is step 1 (eager); capturing runs nothing
            out = [float('nan')] + [step(x).item() for x in xs[1:]]
        else:
            out = []
            for x in xs:
                loss = m(input_ids=x, labels=x).loss; loss.backward(); out.append(loss.item())
        losses[name] = out
        del m, opt; F._POOL.reset(); torch.cuda.empty_cache()
    for k, v in losses.items():
        for a, b in zip(v[1:], losses['layer'][1:]): assert abs(a - b) < 2e-2 * b, (k, v, losses['layer'])
    assert losses['layer'][-1] < losses['layer'][0]

@cuda
def test_cuda_rope_matches_hf_formula():
    "The RoPE kernel on a strided q view, shared and per-sample (packed) positions, forward and backward."
    torch.manual_seed(0)
    qkv = torch.randn(2, 300, (32 + 8 + 8) * 128, device='cuda', dtype=torch.bfloat16)
    q = qkv[..., :32 * 128].view(2, 300, 32, 128).detach().requires_grad_()
    cos, sin = torch.randn(300, 128, device='cuda', dtype=torch.bfloat16), torch.randn(300, 128, device='cuda', dtype=torch.bfloat16)
    pos = torch.randint(0, 300, (2, 300), device='cuda')
    for c, s in ((cos, sin), (cos[pos][:, None], sin[pos][:, None])):
        a = F.rope(q, c, s); b = F.rope_ref(q.double(), c.double(), s.double())
        assert a.shape == (2, 32, 300, 128) and rel(a, b) < 1e-2
        g = torch.randn_like(a)
        assert rel(torch.autograd.grad(a, q, g)[0], torch.autograd.grad(b, q, g.double())[0]) < 1e-2

@cuda
def test_cuda_fused_cross_entropy_matches_torch_chunks():
    torch.manual_seed(0)
    h = (torch.randn(2, 700, 1024, device='cuda') ).to(torch.bfloat16).requires_grad_()
    W = (torch.randn(32000, 1024, device='cuda') * 0.05).to(torch.bfloat16)
    lab = torch.randint(0, 32000, (2, 700), device='cuda'); lab[0, :50] = -100
    a = F.linear_cross_entropy(h, W, lab, chunk_elems=2**24, fused=True); ga = torch.autograd.grad(a, h)[0]
    b = F.linear_cross_entropy(h, W, lab, chunk_elems=2**24, fused=False); gb = torch.autograd.grad(b, h)[0]
    assert abs(a.item() - b.item()) < 1e-4 * b.item() and rel(ga, gb) < 1e-2
