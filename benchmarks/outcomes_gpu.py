"""Learning outcomes at full size on a GPU: LLaVA on unseen scenes (with no-learning baselines) and the lesson's 1k/10k drift.

    python benchmarks/outcomes_gpu.py OUT_DIR NAME [NAME ...]     # names: keys of LLAVA or DRIFT below (one process each)

LLaVA: each recipe runs stage 1 and stage 2 through `ft_course.llava_data.train_llava` (the trainer and the built-in
configs), then is scored on a dev split (seed DEV_SEED, the one recipes are chosen on) and on a test split drawn with a
fresh seed at run time (recorded), never used to choose anything. Beside each accuracy: n, a 95% Wilson interval and two
baselines a model reaches without looking at the image: the majority answer of each question type (counted on the dev
split's questions) and the same trained model given another image's features (images shuffled).

Drift: the lesson's self-cognition data at its own sizes (1,000 and 10,000 repeated identity samples, and 2,000 identity
samples mixed with 10,000 replay samples of the base model's own answers), QLoRA on SmolLM2 with the built-in config,
every checkpoint scored with `checkpoint_drift` (held-out identity questions, general-probe retention).

Each NAME writes OUT_DIR/NAME.json and OUT_DIR/NAME.log. Getting SmolLM2 onto the GPU machine: see
benchmarks/llava_gpu_assets.sh (two calls), then
    bash benchmarks/llava_gpu_assets.sh --join && export PYTHONPATH=/tmp/site:/tmp/assets:$PWD FT_COURSE_HOME=/tmp/ftc \
        && timeout 560 python3 benchmarks/outcomes_gpu.py $OUT NAME ...
"""
import json, math, os, platform, random, subprocess, sys, time
from collections import Counter
from pathlib import Path

DEV_SEED = 777
XY = 'effnet-lite0-ms-xy'

def _variant(pretrain=None, base='gpu', **finetune):
    from ft_course.llava_data import RECIPES
    g = RECIPES[base]
    return dict(pretrain={**g['pretrain'], **(pretrain or {})}, finetune={**g['finetune'], **finetune})

LLAVA = {   # stage settings for train_llava, from ft_course.llava_data.RECIPES as they stand
    'llava-gpu': lambda: _variant(),
    'llava-b128': lambda: _variant(n_images=24000, batch_size=128, max_steps=450),
    # run of 2026-12-01 as 'llava-b128-px128' (best on dev): now RECIPES['gpu128']
    'llava-gpu128': lambda: _variant(base='gpu128'),
    # laptop candidates (a CPU budget: stage 2 sees at most 2,240 samples, twice the 'cpu' recipe's), chosen on dev
    'lap-cpu': lambda: _variant(base='cpu'),
    'lap-b16': lambda: _variant(base='cpu', batch_size=16, lr=2e-3),
    'lap-s280': lambda: _variant(base='cpu', max_steps=280, lr=2e-3),
    'lap-px128': lambda: _variant(dict(image_size=128), base='cpu', image_size=128, batch_size=16, lr=2e-3),
    'lap-pt60': lambda: _variant(dict(max_steps=60), base='cpu', batch_size=16, lr=2e-3),
    'lap-pt120': lambda: _variant(dict(max_steps=120), base='cpu', batch_size=16, lr=2e-3),
    'lap-lr3': lambda: _variant(base='cpu', batch_size=16, lr=3e-3),
    # left/right at the laptop budget (2,240 stage-2 conversations, stage 1 as RECIPES['laptop']): scenes of 2+ objects put a
    # left/right question in most conversations (min_objects); with a higher lr or a larger LoRA
    'lap-min2': lambda: _variant(base='laptop', min_objects=2),
    'lap-min3': lambda: _variant(base='laptop', min_objects=3),
    'lap-min2-lr3': lambda: _variant(base='laptop', min_objects=2, lr=3e-3),
    'lap-min2-r64': lambda: _variant(base='laptop', min_objects=2, lora_r=64, lora_alpha=128),
    'lap-min2-px128': lambda: _variant(dict(image_size=128), base='laptop', image_size=128, min_objects=2),
    # a third sweep (2026-12-03): more left/right questions per conversation at the same 2,240 conversations: the scene's pair
    # asked both ways ('both': the answers flip) or every ordered pair ('all'), with more turns so the other types stay
    'lap-lrboth': lambda: _variant(base='laptop', left_right='both', max_turns=5),
    'lap-lrall': lambda: _variant(base='laptop', left_right='all', max_turns=8),
    'lap-lrboth-min2': lambda: _variant(base='laptop', left_right='both', max_turns=5, min_objects=2),
    'lap-lrall-min2': lambda: _variant(base='laptop', left_right='all', max_turns=8, min_objects=2),
    # ... and a fourth lever: each visual token's column and row appended to its features (tower 'effnet-lite0-ms-xy'):
    # a CNN's features are the same wherever an object sits, so left/right must come from the tokens' order alone
    'lap-xy': lambda: _variant(dict(vision_tower=XY), base='laptop', vision_tower=XY),
    'lap-xy-lrboth': lambda: _variant(dict(vision_tower=XY), base='laptop', vision_tower=XY, left_right='both', max_turns=5),
    'lap-xy-lrall': lambda: _variant(dict(vision_tower=XY), base='laptop', vision_tower=XY, left_right='all', max_turns=8),
    'lap-xy-lr3': lambda: _variant(dict(vision_tower=XY), base='laptop', vision_tower=XY, lr=3e-3),
    'smoke-llava-xy': lambda: _variant(dict(n_images=64, batch_size=16, max_steps=3, vision_tower=XY), n_images=64, batch_size=16, max_steps=3, vision_tower=XY),
    'smoke-llava-lrall': lambda: _variant(dict(n_images=64, batch_size=16, max_steps=3), n_images=64, batch_size=16, max_steps=3, left_right='all', max_turns=8),
    'smoke-llava-min2': lambda: _variant(dict(n_images=64, batch_size=16, max_steps=3), n_images=64, batch_size=16, max_steps=3, min_objects=2),
    'smoke-llava': lambda: _variant(dict(n_images=64, batch_size=16, max_steps=3), n_images=64, batch_size=16, max_steps=3),
}
DRIFT = {   # self-cognition generator settings; save_steps chosen for ~15 checkpoints a run
    'drift-1k': (dict(n=1000, replay=0), 10),
    'drift-10k': (dict(n=10000, replay=0), 60),
    'drift-2k-replay10k': (dict(n=2000, replay=10000), 100),  # the 10,000 replay samples repeat the answers to the 35 REPLAY_PROMPTS
    'drift-1k-replay1k': (dict(n=1000, replay=1000), 20),     # the lesson's 1k identity samples, half the data replay
    'smoke-drift': (dict(n=40, replay=8), 2),
}

QS_SEEDS = (0, 1)
QS = {   # quickstart() settings at laptop size (LoRA, fp32 as on a CPU), chosen on DEV_PROBE (issue 16); fixed before any run.
    # Rule, applied by `choose_qs` to the records: (1) identity 8 of 8 for every seed; (2) the highest dev retention (the base
    # model's correct DEV_PROBE answers kept), summed over the seeds; (3) ties -> fewer optimizer steps; (4) -> earlier in this list
    'qs-lr3e-4': ['lr=3e-4'],                                   # the quickstart's default since 2026-12-02
    'qs-lr2e-4': ['lr=2e-4'],
    'qs-lr1e-4': ['lr=1e-4'],
    'qs-lr3e-4-e2': ['lr=3e-4', 'max_epochs=2'],
    'qs-lr3e-4-rep240': ['lr=3e-4', 'data_generator.replay=240'],
    'qs-lr3e-4-rep480': ['lr=3e-4', 'data_generator.replay=480'],
    'qs-lr2e-4-rep240': ['lr=2e-4', 'data_generator.replay=240'],
    'qs-lr5e-4-rep480': ['lr=5e-4', 'data_generator.replay=480'],
    'smoke-qs': ['lr=3e-4', 'max_steps=2', 'data_generator.n=24', 'data_generator.replay=8'],
}

def choose_qs(records):
    "The candidate `QS`'s rule picks from `records` ({name: record}): dev figures only."
    ok = {n: r for n, r in records.items() if all(s['dev']['identity'] == 1 for s in r['seeds'])}
    key = lambda n: (-sum(s['dev']['kept'] for s in ok[n]['seeds']), ok[n]['seeds'][0]['steps'], list(QS).index(n))
    return min(ok, key=key) if ok else None

def run_qs(name, work):
    from ft_course.selfcog import probe_prompts, score_answers, eval_questions
    from ft_course.selfcog_run import quickstart
    dev, test = probe_prompts(split='dev'), probe_prompts(split='test')
    prompts = dev + test[len(eval_questions()):]          # one run answers both; only dev chooses
    seeds = []
    for seed in (QS_SEEDS if not name.startswith('smoke') else (0,)):
        opts = QS[name] + ['dtype="fp32"', f'seed={seed}', f'data_generator.seed={seed}']
        r = quickstart(work / f'seed{seed}', method='lora', cfg_options=opts, prompts=prompts, progress=False)
        row = dict(seed=seed, steps=r['steps'], seconds=round(r['seconds']))
        for split, ps in (('dev', dev), ('test', test)):
            idx = [prompts.index(p) for p in ps]
            before, after = [r['before'][i] for i in idx], [r['after'][i] for i in idx]
            sb = score_answers(ps, before, 'Ada', 'the ft_course team')
            sa = score_answers(ps, after, 'Ada', 'the ft_course team', base_correct=sb['general_correct'])
            base = [q for q, ok in sb['general_correct'].items() if ok]
            row[split] = dict(identity=sa['identity'], n_identity=sa['n_identity'], general_before=sb['general'],
                              general_after=sa['general'], n_general=len(sa['general_correct']), base_correct=len(base),
                              kept=sum(sa['general_correct'][q] for q in base), retention=sa['retention'],
                              lost=[q for q in base if not sa['general_correct'][q]],
                              answers=[dict(q=p, before=b, after=a) for p, b, a in zip(ps, before, after)])
        seeds.append(row)
    return dict(cfg_options=QS[name], method='lora', dtype='fp32', seeds=seeds)

def wilson(k, n, z=1.96):
    "95% Wilson interval of k successes in n trials."
    if n == 0: return (0.0, 1.0)
    p = k / n; d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d; h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (round(max(0, c - h), 4), round(min(1, c + h), 4))

def _score(rows, answers):
    from ft_course.llava_data import is_correct, QUESTION_TYPES
    out = {}
    for t in QUESTION_TYPES:
        idx = [i for i, r in enumerate(rows) if r[1] == t]
        k = sum(is_correct(t, answers[i], rows[i][3]) for i in idx)
        if idx: out[t] = dict(acc=round(k / len(idx), 4), n=len(idx), ci=wilson(k, len(idx)))
    return out

def evaluate(model, tok, samples, feats, majority):
    "Accuracy by type with the trained model, with images shuffled, and of the majority answer."
    import torch
    from ft_course.llava_data import answer_questions
    rows = [(i, t, q, a) for i, s in enumerate(samples) for (t, q, a) in s['qa']]
    img = torch.tensor([r[0] for r in rows])
    qs = [r[2] for r in rows]
    real = answer_questions(model, tok, feats[img], qs, progress=False)
    shuf = answer_questions(model, tok, feats[(img + 1) % len(samples)], qs, progress=False)   # another scene's image
    return dict(model=_score(rows, real), shuffled=_score(rows, shuf), majority=_score(rows, [majority[r[1]] for r in rows]),
                examples=[dict(q=r[2], truth=r[3], answer=a) for r, a in zip(rows[:12], real)])

def run_llava(name, work):
    import torch
    from ft_course.llava_data import make_shapes_dataset, image_features, train_llava, VISION_TOWER
    rec = LLAVA[name](); s1, s2 = rec['pretrain'], rec['finetune']
    size, tower = s1['image_size'], s1.get('vision_tower', VISION_TOWER)
    test_seed = int.from_bytes(os.urandom(4), 'little') % 10**6 + 10**6      # fresh each run, never below 1e6 (training seeds are 0/1)
    n = 40 if name.startswith('smoke') else 200
    dev, test = make_shapes_dataset(n, seed=DEV_SEED, size=size), make_shapes_dataset(n, seed=test_seed, size=size)
    fd = image_features([d['image'] for d in dev], vision_tower=tower, progress=False)
    ft = image_features([d['image'] for d in test], vision_tower=tower, progress=False)
    majority = {}
    for t in {t for s in dev for (t, _, _) in s['qa']}:
        majority[t] = Counter(a for s in dev for (tt, _, a) in s['qa'] if tt == t).most_common(1)[0][0]
    t0 = time.time()
    r1 = train_llava('pretrain', work / 'pretrain', progress=False, **s1)
    t1 = time.time() - t0; ck1 = r1.last_checkpoint
    after1 = evaluate(r1.model, r1.tokenizer, dev, fd, majority)['model']; del r1
    t0 = time.time()
    r2 = train_llava('finetune', work / 'finetune', pretrained_pth=ck1, progress=False, **s2)
    t2 = time.time() - t0
    return dict(recipe=rec, dev_seed=DEV_SEED, test_seed=test_seed, majority_answer=majority,
                seconds=dict(pretrain=round(t1), finetune=round(t2)), steps=dict(finetune=r2.steps),
                loss=dict(first=r2.losses[0], last=sum(r2.losses[-5:]) / 5),
                dev_after_stage1=after1, dev=evaluate(r2.model, r2.tokenizer, dev, fd, majority),
                test=evaluate(r2.model, r2.tokenizer, test, ft, majority))

def run_drift(name, work):
    from ft_course.train import train
    from ft_course.selfcog_run import checkpoint_drift
    gen, save = DRIFT[name]
    spec = dict(kind='self_cognition', name='Ada', author='the ft_course team', lang='en', seed=0, **gen)
    opts = [f'data_generator={spec!r}', f'save_steps={save}', 'save_total_limit=1000', 'evaluation_inputs=[]']
    if name.startswith('smoke'): opts.append('max_steps=4')
    t0 = time.time()
    r = train('smollm2_135m_qlora_selfcog_e3', work, progress=False, cfg_options=opts, resume='auto')   # a second call continues a cut-off run
    secs = time.time() - t0
    return dict(generator=spec, method='qlora', steps=r.steps, seconds=round(secs), losses=r.losses[::max(1, len(r.losses) // 200)],
                checkpoints=checkpoint_drift(work, 'Ada', author='the ft_course team', progress=False))

def one(name, out):
    import torch, transformers
    work = Path(os.environ.get('OUTCOMES_WORK', '/tmp/outcomes')) / name
    res = run_llava(name, work) if name in LLAVA else run_qs(name, work) if name in QS else run_drift(name, work)
    res.update(name=name, date=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
               machine=dict(gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu', torch=torch.__version__,
                            transformers=transformers.__version__, platform=platform.platform()))
    (Path(out) / f'{name}.json').write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k in ('test', 'checkpoints', 'seconds')}, indent=1)[:3000])
    for s in res.get('seeds', []): print({k: (v if not isinstance(v, dict) else {a: b for a, b in v.items() if a != 'answers'}) for k, v in s.items()})

def main(out, names):
    bad = [n for n in names if n not in LLAVA and n not in DRIFT and n not in QS]
    if bad: sys.exit(f"unknown names {bad}: expected some of {', '.join([*LLAVA, *DRIFT, *QS])}")
    sys.path.insert(0, str(Path(__file__).parent))
    from llava_gpu import side_by_side
    side_by_side(__file__, out, names)

if __name__ == '__main__':
    if sys.argv[1] == '--one': one(sys.argv[2], sys.argv[3])
    else: main(sys.argv[1], sys.argv[2:])
