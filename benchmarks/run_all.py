"""Run the references and ft_course's fast QLoRA path side by side on one CUDA GPU; write JSON lines and a chart.

    python benchmarks/run_all.py --out benchmarks/results [--parts tests,dequant,fast,unsloth,agree,hf,ablation] [--budget 560]

Each measurement runs in its own process (a crash or out-of-memory in one leaves the others), in the order of
--parts, and stops starting new ones when --budget seconds are spent. The references are the scripts in
benchmarks/peers/ (copies of the course's shared anchors: transformers + peft + bitsandbytes, and Unsloth).
Lines go to OUT/results.jsonl as they come; the first line describes the machine (date, GPU, library versions).
"""
import argparse, json, os, subprocess, sys, time, datetime
HERE = os.path.dirname(os.path.abspath(__file__)); ROOT = os.path.dirname(HERE)
CONFIGS = [('internlm2-1.8b', 2048, 8), ('internlm2-1.8b', 1024, 1), ('llama2-7b', 2048, 8), ('llama2-7b', 1024, 1)]
PEER_NAME = {'internlm2-1.8b': 'internlm2-1.8b-shape', 'llama2-7b': 'llama2-7b-shape'}

def env_info():
    import torch, platform, importlib.metadata as md
    v = {}
    for p in ('torch', 'transformers', 'peft', 'bitsandbytes', 'triton', 'unsloth', 'accelerate'):
        try: v[p] = md.version(p)
        except Exception: v[p] = None
    return dict(kind='env', date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                cuda=torch.version.cuda, python=platform.python_version(), versions=v)

def run(cmd, timeout, log):
    t = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        out, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = (e.stdout or b'').decode() if isinstance(e.stdout, bytes) else (e.stdout or ''), 'timeout'
    with open(log, 'a') as f: f.write(f'\n$ {" ".join(cmd)}  (rc={rc}, {time.time()-t:.0f}s)\n{out[-6000:]}\n')
    rows = []
    for line in out.splitlines():
        line = line.strip()
        if line.startswith('{') and line.endswith('}'):
            try: rows.append(json.loads(line))
            except Exception: pass
    return rc, rows, time.time() - t

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--out', default=os.path.join(HERE, 'results'))
    ap.add_argument('--parts', default='tests,dequant,fast,unsloth,agree,hf,ablation')
    ap.add_argument('--budget', type=float, default=560)
    ap.add_argument('--configs', default='all', help="'all' or e.g. llama2-7b:1024:1,internlm2-1.8b:2048:8")
    ap.add_argument('--hf-configs', default='all')
    ap.add_argument('--fast-variants', default='prefetch,graph-offload', help='variants of ft_course\'s path (benchmarks/variants.py)')
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    res, log = os.path.join(a.out, 'results.jsonl'), os.path.join(a.out, 'run_log.txt')
    t0 = time.time(); py = sys.executable
    def parse(s): return CONFIGS if s == 'all' else [(x.split(':')[0], int(x.split(':')[1]), int(x.split(':')[2])) for x in s.split(',')]
    cfgs, hf_cfgs = parse(a.configs), parse(a.hf_configs)
    def emit(rows, **extra):
        with open(res, 'a') as f:
            for r in rows:
                r = {**r, **extra}; f.write(json.dumps(r) + '\n'); print(json.dumps(r), flush=True)
    emit([env_info()])
    left = lambda: a.budget - (time.time() - t0)
    for part in a.parts.split(','):
        if part == 'tests':
            rc, _, dt = run([py, '-m', 'pytest', '-q', '-x', 'tests/test_fast.py', '-k', 'cuda'], min(120, left()), log)
            emit([dict(kind='tests', rc=rc, seconds=round(dt))])
            continue
        if part == 'dequant':
            rc, rows, _ = run([py, '-c', 'from ft_course.bench import bench_cli; bench_cli(["--dequant-only"])'], min(120, left()), log)
            emit(rows, kind='dequant'); continue
        if part == 'agree':
            rc, rows, _ = run([py, os.path.join(HERE, 'agree.py')], min(240, left()), log)
            emit(rows, kind='agree'); continue
        todo = cfgs if part in ('fast', 'unsloth', 'fast-lean-off') else hf_cfgs if part == 'hf' else [('internlm2-1.8b', 2048, 8)]
        for shape, seq, bs in todo:
            if left() < 30: emit([dict(kind='skipped', part=part, model=shape, seq=seq, bs=bs, why='time budget')]); continue
            if part == 'fast':   # the eager path (what `ft-course train` runs) and the whole step as one CUDA graph
                cmd = [py, os.path.join(HERE, 'variants.py'), shape, str(seq), str(bs), '--variants', a.fast_variants]
            elif part == 'fast-lean-off':   # small-batch variant: checkpoints kept on the GPU, one AdamW after backward
                cmd = [py, '-c', f'from ft_course.bench import bench_cli; bench_cli(["--shape","{shape}","--seq","{seq}","--bs","{bs}","--no-offload","--no-opt-in-backward","--steps","5","--warmup","2"])']
            elif part == 'ablation':
                cmd = [py, '-c', f'from ft_course.bench import bench_cli; bench_cli(["--shape","{shape}","--seq","{seq}","--bs","{bs}","--ablation","--steps","4","--warmup","1"])']
            elif part == 'unsloth':
                cmd = [py, os.path.join(HERE, 'peers', 'peer_unsloth.py'), PEER_NAME[shape], str(seq), str(bs)]
            elif part == 'hf':
                cmd = [py, os.path.join(HERE, 'peers', 'peer_hf.py'), PEER_NAME[shape], str(seq), str(bs), 'qlora']
            else: raise SystemExit(f'unknown part {part!r}')
            rc, rows, dt = run(cmd, min(300, left()), log)
            if not rows: rows = [dict(impl=part, model=f'{shape}-shape', seq=seq, bs=bs, error=f'rc={rc}', seconds=round(dt))]
            emit(rows, kind='ablation' if part == 'ablation' else 'step', part=part)
    try:
        sys.path.insert(0, HERE); import plot; plot.main([res, os.path.join(a.out, 'chart.png')])
    except Exception as e: print('chart failed:', e)
    print(f'done in {time.time()-t0:.0f}s')

if __name__ == '__main__': main()
