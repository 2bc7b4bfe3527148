# ZeRO-2 data-parallel scaling of `ft-course train` on 1 vs 2 GPUs (needs SmolLM2's tokenizer files in .gpu_assets/tok).
# FAST=1: with the fast QLoRA path (fast=True). Results: benchmarks/results/zero2_scaling.json, zero2_scaling_fast.json
import os, sys, json, subprocess, time, torch
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
from ft_course.models import shape_config
OUT = Path(os.environ['OUT']); d = Path('/tmp/internlm2_random')
tok = AutoTokenizer.from_pretrained('.gpu_assets/tok')
cfg = shape_config('internlm2-1.8b'); cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
cfg.vocab_size = max(cfg.vocab_size, len(tok))
with torch.device('cuda'): m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
m.save_pretrained(d); tok.save_pretrained(d); del m; torch.cuda.empty_cache()
res = {}
for n in [int(x) for x in os.environ.get('ORDER', '1,2').split(',')]:
    wd = Path(f'/tmp/zero2_{n}gpu')
    opts = [f'model={str(d)!r}', 'data_generator={"kind": "self_cognition", "name": "Ada", "author": "x", "n": 6000, "lang": "en", "replay": 0, "seed": 0}',
            f"max_steps={os.environ.get('MAX_STEPS', '12')}", 'batch_size=4', 'max_length=1024', 'evaluation_inputs=[]', 'save_steps=1000', 'gradient_checkpointing=True']
    if os.environ.get('FAST'): opts += ['fast=True', 'lora_dropout=0.0']
    t = time.time()
    p = subprocess.run([sys.executable, '-m', 'ft_course', 'train', 'smollm2_135m_qlora_selfcog_e3', '--work-dir', str(wd), '--deepspeed', 'zero2', '--no-progress', '--cfg-options', *opts],
                       env=dict(os.environ, NPROC_PER_NODE=str(n)), capture_output=True, text=True)
    (OUT / f'train_{n}gpu.log').write_text(p.stdout[-20000:] + '\n---\n' + p.stderr[-20000:])
    rows = [json.loads(l) for l in open(wd / 'log.jsonl') if '"train"' in l] if (wd / 'log.jsonl').exists() else []
    steady = [r['tokens_per_s'] for r in rows[3:]]
    res[n] = dict(rc=p.returncode, wall_s=round(time.time() - t, 1), steps=len(rows), tok_s=round(sum(steady) / max(len(steady), 1), 1),
                  peak=[r.get('peak_mem') or r.get('peak_mem_GiB') for r in rows[-1:]], last=rows[-1] if rows else None)
    print(n, res[n], flush=True)
if res[1]['tok_s'] and res[2]['tok_s']: res['scaling'] = round(res[2]['tok_s'] / res[1]['tok_s'], 3)
res['fast'] = bool(os.environ.get('FAST')); res['env'] = dict(gpu=torch.cuda.get_device_name(0), n_gpu=torch.cuda.device_count(), torch=torch.__version__, date=time.strftime('%Y-%m-%d'))
(OUT / 'scaling.json').write_text(json.dumps(res, indent=1, default=str)); print(json.dumps(res, default=str))
