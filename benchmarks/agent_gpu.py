"""The agent lesson's recipe trained to the end of its schedule on a GPU, checkpoints chosen on the dev split, scored on test.

    python benchmarks/agent_gpu.py OUT_DIR [RECIPE ...]      # recipes: keys of RECIPES below (default: all)

The CPU record (benchmarks/results/agent_laptop.json, made when the config had no_tool=0.25) stopped at checkpoint
iter_25 of 132 because a shared 2-core machine ran out of time. Here every recipe is the built-in config `smollm2_135m_qlora_agent_e3` (QLoRA, the course's
NF4, LoRA r=32 on every linear layer), with only the settings each recipe names changed; every saved checkpoint is
scored on the dev questions (`ft_course.agent.eval_set('dev')`: other numbers, entities and phrasings than the test
split), the best one by end-to-end accuracy on dev (ties: fewer spurious calls) is then scored once on the test split,
and so is the base model. Nothing is chosen on test. Writes OUT_DIR/agent_gpu.json (copied to
benchmarks/results/agent_gpu.json, read by nbs/12_agent.ipynb). Getting SmolLM2 onto the GPU machine: see
benchmarks/llava_gpu_assets.sh.
"""
import json, os, platform, sys, time
from pathlib import Path

RECIPES = {   # --cfg-options over the built-in config
    'e2-n400': ["data_generator={'kind': 'agent', 'fmt': 'json', 'n': 400, 'no_tool': 0.25, 'seed': 0}"],  # the config before 2026-12-02
    'e2-n400-nt40': [],   # the config as shipped: 40% of the samples need no tool (chosen on dev over e2-n400)
    'e3-n800': ["data_generator={'kind': 'agent', 'fmt': 'json', 'n': 800, 'no_tool': 0.25, 'seed': 0}", 'max_epochs=3'],
}
N_TOOL = 100
SMOKE = os.environ.get('AGENT_SMOKE') == '1'   # a 2-step check of the script itself (CPU is fine)
if SMOKE: N_TOOL = 3

def main(out, names):
    import torch, transformers
    from safetensors.torch import load_file
    from ft_course.train import train, load_config, build_model
    from ft_course.agent import evaluate_agent
    sys.path.insert(0, str(Path(__file__).parent))
    from agent_common import dequantize_bases
    out = Path(out); out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get('OUTCOMES_WORK', '/tmp/agent_gpu'))
    dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    cfg0 = load_config('smollm2_135m_qlora_agent_e3')
    model, tok = build_model(cfg0); model.to(dev).eval(); dequantize_bases(model)
    params = dict(model.named_parameters())
    init = {k: v.detach().clone() for k, v in params.items() if 'lora' in k}
    res = dict(config=cfg0.name, n_tool=N_TOOL, recipes={}, date=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
               machine=dict(gpu=torch.cuda.get_device_name() if dev == 'cuda' else 'cpu', torch=torch.__version__, transformers=transformers.__version__,
                            platform=platform.platform()))
    def save():
        (out / 'agent_gpu.json').write_text(json.dumps(res, indent=1))
    def score(split, sd=None, **kw):
        with torch.no_grad():
            for k, v in (sd or init).items(): params[k].copy_(v.to(params[k].device))
        t0 = time.time()
        r = evaluate_agent(model, tok, split, N_TOOL, 'json', 'chatml', max_new_tokens=64, limit=2 if SMOKE else None, **kw)
        ex = [dict(question=x.question, answer=x.answer, steps=[dict(reply=s['reply'], observation=s['observation']) for s in x.steps])
              for x in r['runs'][:4] + r['runs'][N_TOOL:N_TOOL + 2]]
        return dict(scores=r['scores'], seconds=round(time.time() - t0, 1), examples=ex)
    rate = lambda s, k: s[k][0] / max(1, s[k][1])
    dev_key = lambda c, s: (rate(s, 'end_to_end'), -rate(s, 'spurious_calls'), -int(c[5:]))   # the choice rule on dev
    prev = os.environ.get('AGENT_PREV')   # an earlier call's JSON: keep its base and dev scores, retrain, score what it chose
    if prev:
        res = dict(json.loads(Path(prev).read_text()), date=res['date'], machine=res['machine'], continued_from=res['date'])
    else:
        res['base'] = {'dev': score('dev'), 'test': score('test'), 'test_plain': score('test', tools=False)}
        print('base', {k: v['scores']['end_to_end'] for k, v in res['base'].items()}, flush=True); save()
    for name in names:
        if prev and name in res['recipes']:   # retrain (same seed) for the checkpoint files; its dev scores are recorded
            r = train('smollm2_135m_qlora_agent_e3', work / name, progress=False,
                      cfg_options=RECIPES[name] + ['save_steps=20', 'save_total_limit=100', 'evaluation_inputs=[]'])
            res['recipes'][name]['retrained_losses'] = [round(x, 4) for x in r.losses]
            continue
        t0 = time.time()
        r = train('smollm2_135m_qlora_agent_e3', work / name, progress=False,
                  cfg_options=RECIPES[name] + ['save_steps=20', 'save_total_limit=100', 'evaluation_inputs=[]'] + (['max_steps=2', 'save_steps=1'] if SMOKE else []))
        rec = dict(options=RECIPES[name], steps=r.steps, train_seconds=round(time.time() - t0, 1),
                   losses=[round(x, 4) for x in r.losses], dev={})
        for ck in r.checkpoints:
            sd = load_file(str(Path(ck) / 'trainable.safetensors'))
            rec['dev'][Path(ck).name] = score('dev', sd)
            print(name, Path(ck).name, rec['dev'][Path(ck).name]['scores'], flush=True)
        best = max(rec['dev'], key=lambda c: dev_key(c, rec['dev'][c]['scores']))
        rec['test_of_dev_best'] = dict(checkpoint=best, note='reported, not used to choose',
                                       **score('test', load_file(str(work / name / 'checkpoints' / best / 'trainable.safetensors'))))
        res['recipes'][name] = rec; save()
    # choose on dev: end-to-end first, then fewer spurious calls, then the earlier checkpoint
    cands = [(n, c, v['scores']) for n, rec in res['recipes'].items() for c, v in rec['dev'].items()]
    n, c, _ = max(cands, key=lambda t: dev_key(t[1], t[2]))
    old = res.get('chosen') or {}
    if prev and (old.get('recipe'), old.get('checkpoint')) == (n, c):
        print('chosen on dev as before:', n, c, '- its test score is kept', flush=True)
    else:
        sd = load_file(str(work / n / 'checkpoints' / c / 'trainable.safetensors'))
        res['chosen'] = dict(recipe=n, checkpoint=c, rule='highest dev end-to-end; ties: fewer spurious calls, earlier step',
                             test=score('test', sd))
        if prev: res['chosen']['dev_rescored'] = score('dev', sd)   # the retrained checkpoint on dev again: is it the same model?
    save()
    print('chosen', n, c, res['chosen']['test']['scores'], flush=True)

if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2:] or list(RECIPES))
