"""The agent lesson's laptop run, measured: base vs fine-tuned SmolLM2-135M (QLoRA, ft_course NF4) on held-out tool questions.

    OMP_NUM_THREADS=2 ft-course train smollm2_135m_qlora_agent_e3 --work-dir work_dirs/agent_laptop
    OMP_NUM_THREADS=2 python benchmarks/agent_laptop.py work_dirs/agent_laptop [--split dev|test|both]

Loads the run's newest checkpoint into the model the trainer builds (the NF4 base + LoRA it was trained as; the NF4
weights are dequantized once into plain Linear layers, the same weights, so that generation does not dequantize them
again for every token), scores
the base model (the same model with the LoRA update at its initial zero) and the trained one on the dev and/or test
questions of `ft_course.agent.eval_set`, and writes benchmarks/results/agent_laptop.json (read by nbs/12_agent.ipynb).
The committed record was made when the config's generator had no_tool=0.25 (now 0.4); to train that run again add
    --cfg-options "data_generator={'kind': 'agent', 'fmt': 'json', 'n': 400, 'no_tool': 0.25, 'seed': 0}"
"""
import argparse, json, sys, time
from pathlib import Path
import torch
from safetensors.torch import load_file
from ft_course.core import atomic_write
from ft_course.train import load_config, latest_checkpoint, build_model
from ft_course.agent import evaluate_agent, score_runs, results_table

p = argparse.ArgumentParser()
p.add_argument('work_dir'); p.add_argument('--split', default='both', choices=['dev', 'test', 'both'])
p.add_argument('--n-tool', type=int, default=100); p.add_argument('--out', default='benchmarks/results/agent_laptop.json')
p.add_argument('--only', choices=['base', 'trained'], help='score only the base model (needs no checkpoint) or only the trained one')
a = p.parse_args()
ck = latest_checkpoint(a.work_dir)
if ck is None and a.only != 'base': sys.exit(f"{a.work_dir}: no checkpoint")
cfg = load_config(ck / 'config.py' if ck else 'smollm2_135m_qlora_agent_e3')
fmt = (cfg.data_generator or {}).get('fmt', 'json')
model, tok = build_model(cfg); model.eval()

sys.path.insert(0, str(Path(__file__).parent))
from agent_common import dequantize_bases
dequantize_bases(model, torch.float32)   # fp32 on the CPU, as measured
splits = ['dev', 'test'] if a.split == 'both' else [a.split]
out = json.loads(Path(a.out).read_text()) if Path(a.out).exists() else {}
out.update(config=cfg.name, fmt=fmt, template=cfg.prompt_template, n_tool=a.n_tool, threads=torch.get_num_threads())
if ck: out['checkpoint'] = str(ck)
def run(label, split, tools=True):
    t0 = time.time()
    r = evaluate_agent(model, tok, split, a.n_tool, fmt, cfg.prompt_template, tools=tools, max_new_tokens=64)
    ex = [dict(question=x.question, answer=x.answer, steps=[dict(reply=s['reply'], observation=s['observation']) for s in x.steps])
          for x in r['runs'][:6] + r['runs'][a.n_tool:a.n_tool + 3]]
    out.setdefault('results', {})[f"{label}/{split}"] = dict(scores=r['scores'], seconds=round(time.time() - t0, 1), examples=ex)
    print(f"{label}/{split}: {r['scores']} ({time.time() - t0:.0f} s)", flush=True)
    with atomic_write(a.out) as f: json.dump(out, f, indent=1)
if a.only != 'trained':
    for s in splits: run('base', s)
    run('base_plain', 'test', tools=False)
if a.only == 'base': sys.exit(0)
sd = load_file(str(ck / 'trainable.safetensors'))
params = dict(model.named_parameters())
with torch.no_grad():
    for k, v in sd.items(): params[k].copy_(v)
for s in splits: run('trained', s)
print(results_table({k: v['scores'] for k, v in out['results'].items()}))
