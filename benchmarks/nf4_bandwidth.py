"""Bandwidth of ft_course's NF4 dequantization kernel (`dequantize_nf4_triton`) over a sweep of its variants,
against bitsandbytes' `dequantize_4bit` on the same weights, and a device copy of the same bytes (a practical ceiling):

    python benchmarks/nf4_bandwidth.py benchmarks/results/nf4_bandwidth.jsonl [--reps 50] [--configs all|default]
    python benchmarks/nf4_bandwidth.py OUT.jsonl --smoke      # tiny shapes, CPU, Triton's interpreter (correctness only:
                                                              # the first config of each kind, in fp32 and fp16)

For each shape (4096x4096, 11008x4096) x double-quant (True, False) x config, the bf16 output is first checked bit for bit
against `dequantize_nf4_torch` and bitsandbytes (when it imports); then timed two ways: 'cold' = median over `--reps`
launches of CUDA-event time with the L2 cache flushed before each (a 256 MiB write), and 'graph' = a CUDA graph of 20
back-to-back launches, total / 20 (no launch overhead, L2 warm). Bytes moved = packed + absmax (+ absmax2, code2) + output.
Prints a table sorted by cold GB/s and the best config per shape; one JSON line per measurement goes to OUT.jsonl."""
import argparse, itertools, json, os, statistics, sys, time, datetime
PEAK_GBS = 4800.0
SHAPES = [(4096, 4096), (11008, 4096)]

def label(kw):
    "The sweep's name of a launch: 'u8-gather-NB128-w4', 's32-w32-select-NB16-w4-t4' (s32: store32, t4: tiles=4)."
    return (f"{'s32-' if kw.get('store32') else ''}{'w32' if kw['words'] else 'u8'}-{kw['lut']}-NB{kw['NB']}-w{kw['num_warps']}"
            + (f"-t{kw['tiles']}" if kw.get('tiles', 1) > 1 else ''))

# (store32, words, lut, tiles): the (NB, num_warps) swept. Of the 2026-12-02 sweep only the words that were not clearly
# slower (NB16) and a few byte variants around the best are kept; store32 and tiles are new.
SWEEP = {(False, False, 'gather', 1): [(16, 4), (32, 4), (64, 4), (64, 8), (128, 4), (128, 8), (256, 8)],
         (False, False, 'select', 1): [(16, 4), (64, 4), (128, 4)],
         (False, True, 'gather', 1): [(16, 2), (16, 4)], (False, True, 'select', 1): [(16, 2)],
         (True, False, 'gather', 1): [(16, 4), (32, 4), (64, 4), (64, 8), (128, 4), (128, 8), (256, 4), (256, 8), (512, 8)],
         (True, False, 'select', 1): [(32, 4), (64, 4), (128, 4), (128, 8), (256, 8)],
         (True, True, 'gather', 1): [(16, 2), (16, 4), (32, 4), (64, 4), (64, 8), (128, 8)],
         (True, True, 'select', 1): [(16, 4), (64, 4)],
         (False, False, 'gather', 4): [(64, 4), (128, 4)],
         (True, False, 'gather', 2): [(64, 4), (128, 4), (128, 8)],
         (True, False, 'gather', 4): [(32, 4), (64, 4), (64, 8)], (True, False, 'gather', 8): [(32, 4)],
         (True, True, 'gather', 4): [(16, 4), (32, 4)]}

def configs(which):
    "The sweep: (label, kwargs of dequantize_nf4_triton); 'smoke': the default and the first of each kind of SWEEP."
    cs = [('default', {})]
    if which == 'default': return cs
    for (s32, words, lut, tiles), nbw in SWEEP.items():
        kws = [dict(words=words, lut=lut, NB=NB, num_warps=nw, store32=s32, tiles=tiles) for NB, nw in nbw]
        cs += [(label(kw), kw) for kw in (kws[:1] if which == 'smoke' else kws)]
    return cs

def time_cold(fn, reps, flush):
    import torch
    st = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]; en = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for _ in range(3): fn()
    for i in range(reps):
        flush.zero_(); st[i].record(); fn(); en[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(st, en)) * 1e-3

def time_graph(fn, k=20, reps=5):
    import torch
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3): fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(k): fn()
    g.replay(); torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b) * 1e-3 / k)
    return statistics.median(ts)

def timed(fn, reps, flush, nbytes):
    "Cold and graph time of `fn` and the GB/s they give (graph None where capture fails)."
    tc = time_cold(fn, reps, flush)
    try: tg = time_graph(fn)
    except Exception as e: print(f'graph capture failed: {type(e).__name__}: {e}'[:200]); tg = None
    return dict(cold_s=tc, graph_s=tg, cold_GBs=nbytes / tc / 1e9, graph_GBs=nbytes / tg / 1e9 if tg else None)

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('out'); ap.add_argument('--reps', type=int, default=50); ap.add_argument('--smoke', action='store_true')
    ap.add_argument('--configs', default='all', choices=['all', 'default'])
    a = ap.parse_args(argv)
    if a.reps < 1: raise ValueError(f'--reps must be >= 1, got {a.reps}')
    if a.smoke: os.environ['TRITON_INTERPRET'] = '1'; os.environ['CUDA_VISIBLE_DEVICES'] = ''
    import torch
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from ft_course.kernels import NF4Weight, dequantize_nf4_torch, dequantize_nf4_triton, NF4_TRITON_DEFAULTS
    try: import bitsandbytes.functional as bnbF
    except Exception: bnbF = None
    import triton
    dev = 'cpu' if a.smoke else 'cuda'
    if not a.smoke and not torch.cuda.is_available(): raise SystemExit('no CUDA device: use --smoke for the CPU check')
    shapes = [(9, 72), (16, 256)] if a.smoke else SHAPES
    cfgs = configs('smoke' if a.smoke else a.configs)
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                gpu=torch.cuda.get_device_name() if dev == 'cuda' else 'cpu (interpreter)', torch=torch.__version__,
                triton=triton.__version__, bitsandbytes=getattr(sys.modules.get('bitsandbytes'), '__version__', None),
                defaults=NF4_TRITON_DEFAULTS, smoke=a.smoke)
    try: import transformers; meta['transformers'] = transformers.__version__
    except Exception: meta['transformers'] = None
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=dev) if dev == 'cuda' else None
    rows, t0 = [], time.time()
    f = open(a.out, 'w')
    def emit(r):
        r = {**meta, **r}; rows.append(r); f.write(json.dumps(r) + '\n'); f.flush()
    torch.manual_seed(0)
    for shp, dq in itertools.product(shapes, (True, False)):
        w = NF4Weight.quantize((torch.randn(shp, device=dev) * 0.02).to(torch.bfloat16), double_quant=dq)
        out = torch.full(shp, float('nan'), dtype=torch.bfloat16, device=dev)
        nbytes = w.nbytes() + out.numel() * out.element_size()
        base = dict(shape=list(shp), nested=dq, bytes=nbytes)
        if dev == 'cuda':
            src = torch.empty(nbytes // 4, dtype=torch.bfloat16, device=dev); dst = torch.empty_like(src)   # 2x bytes/2 = nbytes moved
            emit({**base, 'impl': 'copy (same bytes)', 'config': '-', 'equal': True, **timed(lambda: dst.copy_(src), a.reps, flush, nbytes)})
        # the interpreter truncates fp32 -> bf16 (the GPU rounds): compare fp32 and fp16 there (fp16 runs the store32 path)
        for odt in ((torch.float32, torch.float16) if a.smoke else (torch.bfloat16,)):
            ref = dequantize_nf4_torch(w, odt)
            base['dtype'] = str(odt).split('.')[-1]
            if bnbF is not None:
                st, p2 = w.to_bnb_state(odt), w.packed.reshape(-1, 1)     # built once: its offset tensor is a host->device copy
                bnb = lambda: bnbF.dequantize_4bit(p2, st).reshape(shp)
                if not torch.equal(bnb(), ref): raise SystemExit(f'bitsandbytes differs from dequantize_nf4_torch at {shp} nested={dq} {odt}')
                if dev == 'cuda': emit({**base, 'impl': 'bitsandbytes', 'config': '-', 'equal': True, **timed(bnb, a.reps, flush, nbytes)})
            for name, kw in cfgs:
                o = torch.full(shp, float('nan'), dtype=odt, device=dev)
                fn = lambda: dequantize_nf4_triton(w, odt, out=o, **kw)
                r = {**base, 'impl': 'ft_course triton', 'config': name, 'kwargs': kw}
                try: r['equal'] = torch.equal(fn(), ref)
                except Exception as e: r.update(equal=False, error=f'{type(e).__name__}: {e}'[:300])
                if not r['equal']: print(f"NOT EQUAL: {shp} nested={dq} {odt} {name} {r.get('error', '')}", flush=True)
                elif dev == 'cuda': r.update(timed(fn, a.reps, flush, nbytes))
                emit(r)
    f.close()
    bad = [r for r in rows if not r['equal']]
    print(f"{meta['gpu']}  torch {meta['torch']}  triton {meta['triton']}  bitsandbytes {meta['bitsandbytes']}  ({time.time() - t0:.0f} s)")
    if a.smoke:
        print(f'smoke: {len(rows)} checks, {len(bad)} not equal'); return 1 if bad else 0
    for shp, dq in itertools.product(shapes, (True, False)):
        rs = sorted([r for r in rows if r['shape'] == list(shp) and r['nested'] == dq and 'cold_GBs' in r], key=lambda r: -r['cold_GBs'])
        if not rs: continue
        print(f"\n{shp[0]}x{shp[1]} nested={dq}  ({rs[0]['bytes'] / 1e6:.1f} MB moved)")
        print(f"{'impl':18s} {'config':24s} {'cold us':>8s} {'GB/s':>7s} {'% 4.8T':>7s} {'graph us':>9s} {'GB/s':>7s}")
        for r in rs:
            print(f"{r['impl'][:18]:18s} {r['config']:24s} {r['cold_s'] * 1e6:8.2f} {r['cold_GBs']:7.0f} {100 * r['cold_GBs'] / PEAK_GBS:6.1f}% "
                  + (f"{r['graph_s'] * 1e6:9.2f} {r['graph_GBs']:7.0f}" if r['graph_s'] else f"{'-':>9s} {'-':>7s}"))
    print('\nbest config per shape (cold GB/s; summed over nested True/False):')
    for shp in shapes:
        tot = {}
        for r in rows:
            if r['shape'] == list(shp) and r['impl'] == 'ft_course triton' and 'cold_GBs' in r: tot.setdefault(r['config'], []).append(r['cold_GBs'])
        if not tot: continue
        best = max(tot, key=lambda c: sum(tot[c]))
        bnb = [r['cold_GBs'] for r in rows if r['shape'] == list(shp) and r['impl'] == 'bitsandbytes']
        print(f"  {shp[0]}x{shp[1]}: {best}  {' / '.join(f'{g:.0f}' for g in tot[best])} GB/s (nested / plain)"
              + (f";  bitsandbytes {' / '.join(f'{g:.0f}' for g in bnb)} GB/s" if bnb else ''))
    if bad: print(f'{len(bad)} configs NOT bit-exact'); return 1
    return 0

if __name__ == '__main__': sys.exit(main())
