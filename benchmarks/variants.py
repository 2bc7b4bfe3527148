"""ft_course's fast path in several variants at one shape, in one process (the model is rebuilt for each):

    python benchmarks/variants.py internlm2-1.8b 2048 8 [--variants prefetch,graph-layer,graph-offload] [--steps 10]

Prints one JSON line per variant (a variant that fails prints its error instead of stopping the others)."""
import argparse, json, sys, traceback
from ft_course.kernels import FastConfig
from ft_course.bench import bench_fast

VARIANTS = {
    'no-prefetch': FastConfig(prefetch=False),                       # run 1's configuration
    'prefetch': FastConfig(),                                         # offloaded checkpoints prefetched in the backward
    'layer': FastConfig(checkpoint='layer'),                          # checkpoints kept on the GPU
    'graph-offload': FastConfig(cuda_graph=True),                     # the whole step as one CUDA graph
    'graph-layer': FastConfig(checkpoint='layer', cuda_graph=True),
    'keep-all': FastConfig(checkpoint='none'),                        # no layer recomputed: the ceiling of the memory-budget lever
    'budget24': FastConfig(memory_budget_gib=24),                     # plan_memory: as many layers kept as fit in 24 GiB (a consumer card)
    'graph-budget24': FastConfig(memory_budget_gib=24, cuda_graph=True),
    'budget80': FastConfig(memory_budget_gib=80),
}

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('shape'); ap.add_argument('seq', type=int); ap.add_argument('bs', type=int)
    ap.add_argument('--variants', default='prefetch,graph-offload,graph-layer')
    ap.add_argument('--steps', type=int, default=10); ap.add_argument('--warmup', type=int, default=3)
    a = ap.parse_args(argv)
    for v in a.variants.split(','):
        try: r = bench_fast(a.shape, a.seq, a.bs, VARIANTS[v], a.steps, a.warmup, label=f'ft_course {v}')
        except Exception as e:
            r = dict(impl=f'ft_course {v}', model=f'{a.shape}-shape', seq=a.seq, bs=a.bs, error=f'{type(e).__name__}: {e}'[:500])
            traceback.print_exc()
            import torch; torch.cuda.empty_cache()
        print(json.dumps(r), flush=True)

if __name__ == '__main__': sys.exit(main())
