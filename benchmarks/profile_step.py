"""Where the GPU time of one fast-path training step goes: torch.profiler over two steps, kernels grouped by name.

    python benchmarks/profile_step.py internlm2-1.8b 2048 8 [--out DIR]"""
import argparse, json, sys
import torch
from ft_course.kernels import FastConfig
from ft_course.fast import build_fast_model, lora_groups, InBackwardAdamW

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__); ap.add_argument('shape'); ap.add_argument('seq', type=int); ap.add_argument('bs', type=int)
    ap.add_argument('--out', default='.'); a = ap.parse_args(argv)
    m = build_fast_model(a.shape, FastConfig())
    opt = InBackwardAdamW(lora_groups(m), lr=2e-4)
    x = torch.randint(0, m.config.vocab_size, (a.bs, a.seq), device='cuda')
    def step(): m(input_ids=x, labels=x).loss.backward()
    for _ in range(2): step()
    torch.cuda.synchronize()
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(2): step()
        torch.cuda.synchronize()
    tot = {}
    for e in p.key_averages():
        t = getattr(e, 'device_time_total', None) or getattr(e, 'cuda_time_total', 0)
        if t: tot[e.key] = (t / 2e3, e.count // 2)
    total = sum(v[0] for v in tot.values())
    rows = sorted(tot.items(), key=lambda kv: -kv[1][0])
    print(f'GPU kernel time per step: {total:.1f} ms (sum over kernels; {a.shape} {a.seq}x{a.bs})')
    for k, (ms, n) in rows[:40]: print(f'{ms:8.2f} ms {100 * ms / total:5.1f}%  x{n:<5d} {k[:110]}')
    with open(f'{a.out}/profile_{a.shape}_{a.seq}x{a.bs}.json', 'w') as f:
        json.dump(dict(shape=a.shape, seq=a.seq, bs=a.bs, total_ms=total, kernels=[dict(name=k, ms=v[0], calls=v[1]) for k, v in rows]), f)

if __name__ == '__main__': sys.exit(main())
