"""Chart of benchmarks/results/results.jsonl: tokens/s and peak GiB per shape x (seq x batch), one bar per implementation.

    python benchmarks/plot.py [results.jsonl] [chart.png]
"""
import json, os, sys
HERE = os.path.dirname(os.path.abspath(__file__))

def load(path):
    return [json.loads(l) for l in open(path) if l.strip()]

def impl_name(r):
    part = r.get('part') or ''
    i = r.get('impl') or ''
    if part == 'hf' or i.startswith('transformers'): return 'transformers+peft+bnb'
    if part == 'unsloth' or i.startswith('unsloth'): return 'Unsloth'
    if 'graph' in i: return 'ft_course, CUDA graph'
    return 'ft_course, eager'

def main(argv=None):
    argv = argv or sys.argv[1:]
    src = argv[0] if argv else os.path.join(HERE, 'results', 'results.jsonl')
    dst = argv[1] if len(argv) > 1 else os.path.join(os.path.dirname(src), 'chart.png')
    import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt
    rows = [r for r in load(src) if r.get('kind') == 'step' and 'tok_s' in r and r.get('part') in ('fast', 'hf', 'unsloth')]
    env = next((r for r in load(src) if r.get('kind') == 'env'), {})
    keys = []
    for r in rows:
        k = (r['model'].replace('-shape', ''), r['seq'], r['bs'])
        if k not in keys: keys.append(k)
    impls = ['transformers+peft+bnb', 'Unsloth', 'ft_course, eager', 'ft_course, CUDA graph']
    colors = {'transformers+peft+bnb': '#999999', 'Unsloth': '#4c72b0', 'ft_course, eager': '#f0b27a', 'ft_course, CUDA graph': '#dd8452'}
    fig, axs = plt.subplots(1, 2, figsize=(12, 4.2))
    w = 0.2
    for j, (metric, title) in enumerate([('tok_s', 'tokens / s (higher is better)'), ('peak_GiB', 'peak GPU memory, GiB (lower is better)')]):
        ax = axs[j]
        for i, im in enumerate(impls):
            vals = []
            for k in keys:
                m = [r[metric] for r in rows if impl_name(r) == im and (r['model'].replace('-shape', ''), r['seq'], r['bs']) == k]
                vals.append(m[-1] if m else 0)
            xs = [x + (i - 1.5) * w for x in range(len(keys))]
            b = ax.bar(xs, vals, w, label=im, color=colors[im])
            for x, v in zip(xs, vals):
                if v: ax.text(x, v, f'{v:.0f}' if metric == 'tok_s' else f'{v:.1f}', ha='center', va='bottom', fontsize=7)
        ax.set_xticks(range(len(keys))); ax.set_xticklabels([f'{m}\n{s}x{b}' for m, s, b in keys], fontsize=8)
        ax.set_title(title, fontsize=10)
    axs[0].legend(fontsize=8)
    v = env.get('versions', {})
    fig.suptitle(f"QLoRA r=64 all linear, grad. checkpointing, AdamW - {env.get('gpu', '?')}, {env.get('date', '?')[:10]}, "
                 f"torch {v.get('torch')}, transformers {v.get('transformers')}, bnb {v.get('bitsandbytes')}, unsloth {v.get('unsloth')}", fontsize=8)
    notes = sorted({f"{r['model'].replace('-shape', '')} {r['seq']}x{r['bs']}" for r in rows if r.get('source')})
    if notes:
        fig.text(0.01, 0.005, 'standard stack at ' + ', '.join(notes) + ': ' + next(r['source'] for r in rows if r.get('source')), fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1)); fig.savefig(dst, dpi=110)
    print('wrote', dst)
    ab = [r for r in load(src) if r.get('kind') == 'ablation' and 'tok_s' in r]
    last = max((r.get('run', 0) for r in ab), default=0)
    ab = [r for r in ab if r.get('run', 0) == last]          # the newest ablation only
    if ab:
        uns = [r for r in rows if impl_name(r) == 'Unsloth' and r['model'] == ab[0]['model'] and r['seq'] == ab[0]['seq'] and r['bs'] == ab[0]['bs']]
        fig, axs = plt.subplots(1, 2, figsize=(12, 3.6))
        names = [r['impl'] for r in ab]
        axs[0].barh(names, [r['tok_s'] for r in ab], color='#dd8452'); axs[0].invert_yaxis(); axs[0].set_title('tokens / s', fontsize=10)
        axs[1].barh(names, [r['peak_GiB'] or 0 for r in ab], color='#dd8452'); axs[1].invert_yaxis(); axs[1].set_yticks([])
        axs[1].set_title('peak GiB (0 = not measured)', fontsize=10)
        if uns:
            axs[0].axvline(uns[-1]['tok_s'], color='#4c72b0', ls='--', label='Unsloth'); axs[1].axvline(uns[-1]['peak_GiB'], color='#4c72b0', ls='--')
            axs[0].legend(fontsize=8, loc='upper right')
        axs[0].set_xlim(0, 1.18 * max([r['tok_s'] for r in ab] + [u['tok_s'] for u in uns]))
        for ax in axs: ax.tick_params(axis='x', labelsize=7)
        for ax, key in ((axs[0], 'tok_s'), (axs[1], 'peak_GiB')):
            for i, r in enumerate(ab):
                if r[key]: ax.text(r[key], i, f" {r[key]:.0f}" if key == 'tok_s' else f" {r[key]:.2f}", va='center', fontsize=7)
        fig.suptitle(f"ablation, {ab[0]['model']} {ab[0]['seq']}x{ab[0]['bs']}: each row adds one mean to the row above", fontsize=9)
        fig.tight_layout(); p = os.path.join(os.path.dirname(dst), 'ablation.png'); fig.savefig(p, dpi=110); print('wrote', p)

if __name__ == '__main__': main()
