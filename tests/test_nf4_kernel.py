"""The NF4 dequantization kernel's variants (`dequantize_nf4_triton`: int32 words or bytes, table gather or select tree,
blocks per program, int64 offsets, int32 stores of two 16-bit values, several tiles per program) against `dequantize_nf4_torch`, bit for bit: in Triton's CPU interpreter (a fresh
process, TRITON_INTERPRET=1 set before Triton is imported; skipped without Triton) and on CUDA where there is one.
The argument checks and the launch decisions (words fallback, int64 threshold) need no Triton."""
import importlib.util, itertools, math, os, subprocess, sys
from types import SimpleNamespace
import pytest, torch
from ft_course import kernels
from ft_course.kernels import NF4Weight, dequantize_nf4_torch, dequantize_nf4_triton, NF4_TRITON_DEFAULTS

HAS_TRITON = importlib.util.find_spec('triton') is not None
triton_only = pytest.mark.skipif(not HAS_TRITON, reason='triton not installed')
cuda = pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason='needs CUDA and triton')

# (shape, why): numels that are and are not multiples of 64 * NB, of 64 (partial last block), of 8 (whole int32 words)
SHAPES = [((64, 320), '320 blocks: two absmax2 groups of 256'), ((3, 1000), 'partial last block, 375 words'),
          ((9, 70), '315 bytes: words fall back'), ((5, 192), '15 whole blocks'), ((2, 33), '2 blocks, 33 bytes')]
S32_SHAPES = [SHAPES[0], SHAPES[1], SHAPES[2], SHAPES[4], ((3, 333), '999 values: odd, store32 falls back')]
LUTS = ('gather', 'select')

def weights():
    "The weights of the interpreter cases, nested and plain, one per (shape, nested)."
    torch.manual_seed(0)
    return {(s, dq): NF4Weight.quantize(torch.randn(s) * 0.03, double_quant=dq)
            for (s, _), dq in itertools.product(SHAPES + S32_SHAPES[-1:], (True, False))}

def cases():
    "(id, (shape, nested), dtype name, kwargs of dequantize_nf4_triton, extra) for the interpreter."
    cs = []
    for (s, _), dq, words, lut in itertools.product(SHAPES, (True, False), (True, False), LUTS):
        for NB in ((8, 128) if math.prod(s) > 5000 else (1, 8, 128)):         # NB=1: one program per block (slow there)
            cs.append((f"{s[0]}x{s[1]}-{'dq' if dq else 'plain'}-{'w32' if words else 'u8'}-{lut}-NB{NB}-fp32",
                       (s, dq), 'float32', dict(words=words, lut=lut, NB=NB), {}))
    for s, dq, words, lut in itertools.product([(3, 1000), (9, 70)], (True, False), (True, False), LUTS):
        cs.append((f"{s[0]}x{s[1]}-{'dq' if dq else 'plain'}-{'w32' if words else 'u8'}-{lut}-NB8-bf16",
                   (s, dq), 'bfloat16', dict(words=words, lut=lut, NB=8), {}))
    for s, words, lut in itertools.product([(3, 1000), (64, 320)], (True, False), LUTS):   # the int64-offset path, forced
        cs.append((f"{s[0]}x{s[1]}-dq-{'w32' if words else 'u8'}-{lut}-NB32-i64", (s, True), 'float32',
                   dict(words=words, lut=lut, NB=32), dict(i64=True)))
    # store32 (2-byte outputs only) and tiles: bf16 and fp16 into NaN-filled outputs (an element not written stays NaN);
    # 3x333 (999 values: odd) and an output 2 bytes off a 4-byte boundary fall back to 2-byte stores
    for (s, _), dq, dt in itertools.product(S32_SHAPES, (True, False), ('bfloat16', 'float16')):
        small = math.prod(s) < 5000
        for words, lut, NB, tiles in [(False, 'gather', 8, 1), (False, 'select', 1 if small else 128, 1), (True, 'gather', 8, 1),
                                      (True, 'select', 128, 1), (False, 'gather', 4, 4), (True, 'select', 2, 2)]:
            cs.append((f"{s[0]}x{s[1]}-{'dq' if dq else 'plain'}-s32-{'w32' if words else 'u8'}-{lut}-NB{NB}-t{tiles}-{dt}", (s, dq), dt,
                       dict(words=words, lut=lut, NB=NB, store32=True, tiles=tiles), dict(nan_out=True)))
    for dt, tiles in itertools.product(('bfloat16', 'float16', 'float32'), (1, 2)):
        cs.append((f'3x1000-dq-s32-t{tiles}-{dt}-unaligned-out', ((3, 1000), True), dt, dict(NB=4, store32=True, tiles=tiles), dict(unaligned=True)))
    cs.append(('64x320-plain-u8-NB32-t4-bf16', ((64, 320), False), 'bfloat16', dict(NB=32, tiles=4), dict(nan_out=True)))
    cs.append(('3x1000-dq-defaults-nan-out', ((3, 1000), True), 'float32', {}, dict(nan_out=True)))
    cs.append(('3x1000-plain-warps8-stages2', ((3, 1000), False), 'float32', dict(num_warps=8, num_stages=2), {}))
    return cs

CASES = cases()

RUN = r'''
import sys, torch; from ft_course import kernels as F
ws, cases = torch.load(sys.argv[1])
K = F._kernels(); kern = K.nf4_dequant_kernel
class ForceI64:
    "The kernel launched with int64 offsets whatever the size."
    def __getitem__(self, grid): return lambda *a, **kw: kern[grid](*a, **{**kw, 'I64': True})
outs = []
for i, dt, kw, extra in cases:
    w, dtype = F.NF4Weight(**ws[i]), getattr(torch, dt)
    K.nf4_dequant_kernel = ForceI64() if extra.get('i64') else kern
    if extra.get('nan_out'):
        o = torch.full(w.shape, float('nan'), dtype=dtype)
        r = F.dequantize_nf4_triton(w, dtype, out=o, **kw); assert r is o
    elif extra.get('unaligned'):   # 2 bytes past a 16-byte boundary
        o = torch.full((w.numel + 8,), float('nan'), dtype=dtype)[1:1 + w.numel].view(w.shape)
        r = F.dequantize_nf4_triton(w, dtype, out=o, **kw); assert r is o and o.data_ptr() % 4 == 2 or dtype == torch.float32
    else: r = F.dequantize_nf4_triton(w, dtype, **kw)
    outs.append(r)
torch.save(outs, sys.argv[2])
'''

def fields(w):
    return dict(packed=w.packed, shape=w.shape, blocksize=w.blocksize, absmax=w.absmax, absmax_q=w.absmax_q,
                code2=w.code2, absmax2=w.absmax2, offset=w.offset)

@pytest.fixture(scope='module')
def interpreted(tmp_path_factory):
    "Every case run once in Triton's interpreter (one process); {case id: (weight, dtype, output)}."
    ws = weights(); keys = list(ws)
    d = tmp_path_factory.mktemp('nf4')
    torch.save(([fields(ws[k]) for k in keys], [(keys.index(k), dt, kw, ex) for _, k, dt, kw, ex in CASES]), d / 'in.pt')
    env = {**os.environ, 'TRITON_INTERPRET': '1', 'CUDA_VISIBLE_DEVICES': ''}
    p = subprocess.run([sys.executable, '-c', RUN, str(d / 'in.pt'), str(d / 'out.pt')], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    outs = torch.load(d / 'out.pt')
    assert len(outs) == len(CASES)
    return {cid: (ws[k], dt, o) for (cid, k, dt, _, _), o in zip(CASES, outs)}

def trunc_bf16(x):
    "fp32 -> bf16 by dropping the low 16 bits: the interpreter's conversion (the GPU rounds to nearest)."
    return (x.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)

@triton_only
@pytest.mark.parametrize('cid', [c[0] for c in CASES])
def test_variant_matches_torch_in_interpreter(interpreted, cid):
    w, dt, got = interpreted[cid]
    ref = dequantize_nf4_torch(w, torch.float32)
    if dt == 'bfloat16': ref = trunc_bf16(ref)
    if dt == 'float16': ref = dequantize_nf4_torch(w, torch.float16)       # the interpreter rounds fp32 -> fp16 to nearest, as torch
    assert got.dtype == ref.dtype and got.shape == ref.shape
    bits = torch.int32 if dt == 'float32' else torch.int16
    assert torch.equal(got.contiguous().view(bits), ref.view(bits)), \
        f'{cid}: {(got.float() != ref.float()).sum().item()} of {ref.numel()} values differ'

def test_cases_cover_the_edges():
    "The shapes above do reach what they are there for (a typo in SHAPES would silently weaken the interpreter tests)."
    ws = weights()
    assert ws[((9, 70), True)].packed.numel() % 4 != 0                          # words must fall back
    assert ws[((3, 1000), True)].packed.numel() % 4 == 0 and 3000 % 64 != 0      # words used, partial last block
    assert ws[((64, 320), True)].absmax2.numel() == 2                            # two groups of 256 blocks
    assert any(math.prod(s) % (64 * 128) for s, _ in SHAPES) and any(math.prod(s) % 64 == 0 for s, _ in SHAPES)
    assert [math.prod(s) % 2 for s, _ in S32_SHAPES] == [0, 0, 0, 0, 1]               # store32 used, except on the last
    assert {c[3].get('tiles', 1) for c in CASES} >= {1, 2, 4} and {c[2] for c in CASES if c[3].get('store32')} == {'bfloat16', 'float16', 'float32'}

class Launch:
    "Stands in for the compiled kernel: records the grid and the launch arguments, runs nothing."
    def __init__(self): self.calls = []
    def __getitem__(self, grid): return lambda *a, **kw: self.calls.append((grid, a, kw))

@pytest.fixture
def launches(monkeypatch):
    k = Launch(); monkeypatch.setattr(kernels, '_KERNELS', SimpleNamespace(nf4_dequant_kernel=k)); return k.calls

def fake(numel, nested=False):
    "An NF4Weight of `numel` values whose tensors are tiny (only the launch decisions are looked at)."
    z = torch.zeros(8, dtype=torch.uint8)
    if nested: return NF4Weight(z, (1, numel), absmax_q=z, code2=torch.zeros(256), absmax2=torch.zeros(1))
    return NF4Weight(z, (1, numel), absmax=torch.zeros(1))

def test_int64_offsets_only_past_2_31(launches):
    out = torch.empty(1)
    for NB in (1, 64, 128):
        for n, i64 in [(2**31 - 64 * NB - 1, False), (2**31 - 64 * NB, True), (4096, False), (2**33, True)]:
            launches.clear(); dequantize_nf4_triton(fake(n), torch.float32, out=out, NB=NB)
            (grid, _, kw), = launches
            assert kw['I64'] is i64, (n, NB)
            assert grid == (-(-n // (64 * NB)),)

def test_defaults_and_words_fallback(launches):
    out = torch.empty(1)
    dequantize_nf4_triton(fake(4096), torch.float32, out=out)
    kw = launches[-1][2]
    assert (kw['NB'], kw['num_warps'], kw['WORDS'], kw['LUT']) == (128, 4, False, 0) == (
        NF4_TRITON_DEFAULTS['NB'], NF4_TRITON_DEFAULTS['num_warps'], NF4_TRITON_DEFAULTS['words'], 0)
    w = fake(4096); dequantize_nf4_triton(w, torch.float32, out=out, words=True, lut='select')
    a, kw = launches[-1][1:]
    assert kw['WORDS'] and kw['LUT'] == 1 and a[0].dtype == torch.int32 and a[9] == 2   # 8 bytes = 2 words
    w.packed = torch.zeros(7, dtype=torch.uint8); dequantize_nf4_triton(w, torch.float32, out=out, words=True)
    assert launches[-1][2]['WORDS'] is False and launches[-1][1][0].dtype == torch.uint8
    w.packed = torch.zeros(9, dtype=torch.uint8)[1:]                                # 8 bytes, but not 4-aligned
    dequantize_nf4_triton(w, torch.float32, out=out, words=True)
    assert launches[-1][2]['WORDS'] is False

def test_store32_and_tiles_launch(launches):
    "store32 only for a 2-byte output of an even numel at a 4-byte aligned address; tiles shrink the grid and count for int64."
    for dt, n, off, s32 in [(torch.bfloat16, 4096, 0, True), (torch.float16, 4096, 0, True), (torch.float32, 4096, 0, False),
                            (torch.bfloat16, 4095, 0, False), (torch.bfloat16, 4096, 1, False), (torch.float16, 4096, 2, True)]:
        out = torch.empty(n + 2, dtype=dt)[off:off + n]
        dequantize_nf4_triton(fake(n), dt, out=out, store32=True)
        assert launches[-1][2]['STORE32'] is s32 and launches[-1][2]['TILES'] == 1, (dt, n, off)
    dequantize_nf4_triton(fake(4096), torch.bfloat16, out=torch.empty(4096, dtype=torch.bfloat16))
    assert launches[-1][2]['STORE32'] is NF4_TRITON_DEFAULTS['store32'] is False
    for NB, T, n, i64 in [(64, 4, 10**6, False), (128, 2, 2**31 - 64 * 256, True), (128, 2, 2**31 - 64 * 256 - 1, False)]:
        dequantize_nf4_triton(fake(n), torch.float32, out=torch.empty(1), NB=NB, tiles=T)
        grid, _, kw = launches[-1]
        assert grid == (-(-n // (64 * NB * T)),) and kw['TILES'] == T and kw['I64'] is i64, (NB, T, n)

@pytest.mark.parametrize('bad, msg', [(dict(NB=3), 'power of two'), (dict(NB=96), 'power of two'), (dict(NB=0), 'power of two'),
                                      (dict(NB=-4), 'power of two'), (dict(lut='foo'), "lut must be 'gather' or 'select'"),
                                      (dict(tiles=3), 'tiles must be a power of two'), (dict(tiles=0), 'tiles must be a power of two')])
def test_bad_arguments_raise(launches, bad, msg):
    with pytest.raises(ValueError, match=msg): dequantize_nf4_triton(fake(4096), torch.float32, out=torch.empty(1), **bad)
    assert launches == []

def test_blocksize_other_than_64_raises(launches):
    w = NF4Weight.quantize(torch.randn(4, 256) * 0.1, blocksize=128)
    with pytest.raises(ValueError, match='blocksize 64'): dequantize_nf4_triton(w, torch.float32)
    assert launches == []

@cuda
def test_cuda_variants_bit_exact():
    "On the GPU bf16 rounds to nearest as torch does: every variant equals dequantize_nf4_torch in bf16 and fp32."
    torch.manual_seed(0)
    for shp, dq in itertools.product([(1000, 333), (64, 320), (9, 70), (4096, 4096)], (True, False)):
        w = NF4Weight.quantize((torch.randn(shp, device='cuda') * 0.02).to(torch.bfloat16), double_quant=dq)
        for dt in (torch.bfloat16, torch.float32):
            ref = dequantize_nf4_torch(w, dt)
            for words, lut, (NB, nw) in itertools.product((True, False), LUTS, [(1, 1), (16, 2), (64, 4), (128, 4), (256, 8)]):
                o = torch.full(shp, float('nan'), dtype=dt, device='cuda')
                got = dequantize_nf4_triton(w, dt, out=o, NB=NB, num_warps=nw, words=words, lut=lut)
                assert torch.equal(got, ref), (shp, dq, dt, words, lut, NB, nw)

@cuda
def test_cuda_store32_and_tiles_bit_exact():
    "store32 and tiles on the GPU, bf16 and fp16 (fp32 and the odd 3x333 fall back), against dequantize_nf4_torch."
    torch.manual_seed(0)
    for shp, dq in itertools.product([(1000, 333), (64, 320), (9, 70), (3, 333), (4096, 4096)], (True, False)):
        w = NF4Weight.quantize((torch.randn(shp, device='cuda') * 0.02).to(torch.bfloat16), double_quant=dq)
        for dt in (torch.bfloat16, torch.float16, torch.float32):
            ref = dequantize_nf4_torch(w, dt)
            for s32, words, lut, (NB, nw, T) in itertools.product((True, False), (True, False), LUTS,
                                                                   [(1, 1, 1), (16, 2, 4), (64, 4, 1), (128, 4, 2), (512, 8, 1)]):
                o = torch.full(shp, float('nan'), dtype=dt, device='cuda')
                got = dequantize_nf4_triton(w, dt, out=o, NB=NB, num_warps=nw, words=words, lut=lut, store32=s32, tiles=T)
                assert torch.equal(got, ref), (shp, dq, dt, s32, words, lut, NB, nw, T)
