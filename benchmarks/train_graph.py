"""Tokens per second of `ft-course train` itself on the fast QLoRA path, with and without the CUDA graph of the
micro-step (issue 19, target 3), beside Unsloth at the same shape in the same run:

    python benchmarks/train_graph.py OUT.jsonl [--shapes internlm2-1.8b:1024:1,internlm2-1.8b:2048:8] [--steps 24] [--peer]

For each shape: a random-weight Llama-architecture model at that shape, saved once to /tmp (the peer script's
`/tmp/<name>-shape` folder and tokenizer, so both sides load the very same weights), variable-length chat samples
(prompt and answer lengths drawn log-normally, like real SFT data) packed to max_length, then `python -m ft_course
train CONFIG` once per variant: `fast=True` (the CUDA graph of the micro-step and flash attention within each packed
sample, both on by default), without the graph (`cuda_graph=False`), without varlen attention (`varlen_attn=False`:
SDPA with the block mask), or without both. Read back from each run's log.jsonl: the median tokens/s over the steps after the first three (real tokens
only: the packs' padding is not counted) and the peak memory. `--peer` also runs benchmarks/peers/peer_unsloth.py
(random tokens, every token real, 10 timed steps after 3 warm-up) at the same shape. One JSON line per measurement.
"""
import argparse, json, os, random, statistics, subprocess, sys, time, datetime, math
HERE = os.path.dirname(os.path.abspath(__file__)); ROOT = os.path.dirname(HERE)
PEER_NAME = {'internlm2-1.8b': 'internlm2-1.8b-shape', 'llama2-7b': 'llama2-7b-shape', 'llama3-8b': 'llama3-8b-shape'}

def chat_data(path, n, seed=0, words=('the', 'quick', 'brown', 'fox', 'jumps', 'over', 'lazy', 'dog')):
    "n chat samples of random words, prompt ~ lognormal(median 60 words), answer ~ lognormal(median 180 words), capped at 1500."
    r = random.Random(seed)
    def text(median): return ' '.join(r.choice(words) for _ in range(min(1500, max(3, int(r.lognormvariate(math.log(median), 0.8))))))
    with open(path, 'w') as f:
        for _ in range(n):
            f.write(json.dumps({'messages': [{'role': 'user', 'content': text(60)}, {'role': 'assistant', 'content': text(180)}]}) + '\n')

def config(path, model, data, seq, bs, steps, fast, pack_strategy='greedy'):
    d = dict(name='train_graph', model=model, method='qlora', quant_backend='ft_course', fast=fast, lora_r=64, lora_alpha=16,
             lora_dropout=0.0, lora_target_modules='all-linear', data_path=data, max_length=seq, batch_size=bs,
             accumulative_counts=1, max_steps=steps, pack_to_max_length=True, pack_strategy=pack_strategy, lr=2e-4, save_steps=10**6,
             evaluation_freq=10**6, evaluation_inputs=[], seed=0, max_norm=1.0)
    with open(path, 'w') as f:
        f.write('from ft_course.train import Config\nconfig = Config(' + ', '.join(f'{k}={v!r}' for k, v in d.items()) + ')\n')

def fast_switches(variant):
    """'graph+varlen' | 'graph' | 'eager+varlen' | 'eager', each optionally '+budgetN' (memory_budget_gib=N) -> the config's fast= value
    ('+bestfit' is read by `ours`: pack_strategy='best_fit')."""
    d = {}
    for part in variant.split('+'):
        if part.startswith('budget'): d['memory_budget_gib'] = float(part[6:])
    if 'graph' not in variant: d['cuda_graph'] = False
    if 'varlen' not in variant: d['varlen_attn'] = False
    return d or True

def ours(shape, seq, bs, steps, variant, tmp, model=None):
    model = model or f'/tmp/{PEER_NAME[shape]}'
    data = os.path.join(tmp, f'data_{seq}_{bs}.jsonl')
    if not os.path.exists(data): chat_data(data, n=max(400, 6 * steps * bs * seq // 600))
    cfg = os.path.join(tmp, f'cfg_{shape}_{seq}_{bs}_{variant}.py'); wd = os.path.join(tmp, f'wd_{shape}_{seq}_{bs}_{variant}')
    config(cfg, model, data, seq, bs, steps, fast_switches(variant), 'best_fit' if 'bestfit' in variant.split('+') else 'greedy')
    t = time.time()
    p = subprocess.run([sys.executable, '-m', 'ft_course', 'train', cfg, '--work-dir', wd, '--overwrite'], capture_output=True, text=True, cwd=ROOT)
    out = p.stdout + p.stderr
    if p.returncode: return dict(impl='ft_course train', shape=shape, seq=seq, bs=bs, variant=variant, error=out[-1500:])
    log = [json.loads(l) for l in open(os.path.join(wd, 'log.jsonl'))]
    tr = [r for r in log if r.get('type') == 'train']
    info = [r.get('msg', '') for r in log if r.get('type') == 'info' and 'CUDA graph' in str(r.get('msg', ''))]
    plan = [r.get('msg', '') for r in log if r.get('type') == 'info' and str(r.get('msg', '')).startswith('memory plan')]
    tps = [r['tokens_per_s'] for r in tr[3:]]
    return dict(impl='ft_course train', shape=shape, seq=seq, bs=bs, variant=variant, steps=len(tr), tok_s=round(statistics.median(tps)),
                tok_s_all=[round(x) for x in tps], real_tokens_per_step=round(statistics.mean(r['real_tokens'] for r in tr)),
                fill=round(statistics.mean(r['real_tokens'] for r in tr) / (seq * bs), 4),
                peak_GiB=round(max(r.get('peak_mem') or 0 for r in tr) / 2**30, 2), loss_first=tr[0]['loss'], loss_last=tr[-1]['loss'],
                graph_line=info[0] if info else None, **({'memory_plan': plan[0]} if plan else {}), wall_s=round(time.time() - t, 1))

def peer(shape, seq, bs):
    p = subprocess.run([sys.executable, os.path.join(HERE, 'peers', 'peer_unsloth.py'), PEER_NAME[shape], str(seq), str(bs)],
                       capture_output=True, text=True, cwd=ROOT)
    rows = [json.loads(l) for l in p.stdout.splitlines() if l.startswith('{')]
    return rows[-1] if rows else dict(impl='unsloth', shape=shape, seq=seq, bs=bs, error=(p.stdout + p.stderr)[-1500:])

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('out'); ap.add_argument('--shapes', default='internlm2-1.8b:1024:1,internlm2-1.8b:2048:8')
    ap.add_argument('--steps', type=int, default=24); ap.add_argument('--peer', action='store_true')
    ap.add_argument('--model', help='a model folder instead of the peer\'s random-weight one (a CPU smoke test: tiny-llama)')
    ap.add_argument('--tmp', default='/tmp/train_graph')
    ap.add_argument('--variants', default='graph+varlen,eager,graph,eager+varlen', help='of the fast path: CUDA graph and/or flash varlen attention')
    a = ap.parse_args(argv)
    import torch, importlib.metadata as md
    tmp = a.tmp; os.makedirs(tmp, exist_ok=True)
    def emit(r):
        with open(a.out, 'a') as f: f.write(json.dumps(r) + '\n')
        print(json.dumps(r), flush=True)
    vers = {}
    for k in ('torch', 'transformers', 'triton', 'unsloth', 'bitsandbytes'):
        try: vers[k] = md.version(k)
        except Exception: vers[k] = None
    emit(dict(kind='env', date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
              gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, versions=vers))
    for s in a.shapes.split(','):
        shape, seq, bs = s.split(':'); seq, bs = int(seq), int(bs)
        steps = a.steps if bs == 1 else max(8, a.steps // 2)
        if not a.model and (a.peer or not os.path.exists(f'/tmp/{PEER_NAME[shape]}')): emit(peer(shape, seq, bs))   # also saves the model
        for v in a.variants.split(','): emit(ours(shape, seq, bs, steps, v, tmp, a.model))

if __name__ == '__main__': main()
