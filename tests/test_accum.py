"""Gradient accumulation normalised by the trained tokens of the whole window (ft_course.accum): the accumulated gradient
is the one-big-batch gradient (one process, DeepSpeed, two processes over gloo); the trainer logs that loss, its trained
and real tokens; a dataset truncated to nothing and a NaN loss stop the run with one line."""
import json, math, os, subprocess, sys
from pathlib import Path
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

def _chat(q, a): return {'messages': [{'role': 'user', 'content': q}, {'role': 'assistant', 'content': a}]}

RECS = [_chat('Tell me about rivers.', 'Rivers carry rain from the hills to the sea; they cut valleys, feed lakes and farms, '
              'and most old cities grew up on their banks because water meant trade.'),
        _chat('Is water wet?', 'Yes.'), _chat('Is fire cold?', 'No, it is hot.'),
        _chat('Name a colour.', 'Blue.')]

def _tok():
    from ft_course.models import load_tokenizer
    return load_tokenizer('tiny-llama')

def _micro_and_big(tok):
    "Three micro-batches with very different numbers of trained tokens (1 long sample, 2 short ones, 1 shorter still) and the one batch."
    from ft_course.data import SFTDataset
    ds = SFTDataset(RECS, tok, 'chatml', max_length=128)
    return [ds.collate_fn([ds[0]]), ds.collate_fn([ds[1], ds[2]]), ds.collate_fn([ds[3]])], ds.collate_fn([ds[i] for i in range(4)])

def _tiny_lora(seed=0):
    "The tiny random Llama with LoRA on every linear layer, B random so that every LoRA weight has a gradient."
    from ft_course.models import load_model
    from ft_course.lora import add_lora
    torch.manual_seed(seed)
    m = add_lora(load_model('tiny-llama', dtype='float32', device='cpu'), r=4, alpha=8, target_modules='all-linear')
    for n, p in m.named_parameters():
        if 'lora_B' in n: torch.nn.init.normal_(p, std=0.5)
    return m.train()

def _grads(m): return {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.requires_grad}

def _big_grads(big):
    m = _tiny_lora(); m(**big).loss.backward()
    return _grads(m)

def _rel(g, ref): return math.sqrt(sum(((g[k] - ref[k]) ** 2).sum().item() for k in ref) / sum((v ** 2).sum().item() for v in ref.values()))

def test_accumulated_gradient_is_the_one_batch_gradient(one_torch_thread):
    from ft_course.accum import window_backward, n_trained
    micro, big = _micro_and_big(_tok())
    counts = [n_trained(b['labels']) for b in micro]
    assert max(counts) > 4 * min(counts), counts
    ref = _big_grads(big)
    m = _tiny_lora()
    loss, n_tok, n_real = window_backward(m, micro)
    g = _grads(m)
    assert len(g) == 2 * 7 * 2 and set(g) == set(ref)          # every LoRA weight of both layers' 7 linear layers
    for k in ref: torch.testing.assert_close(g[k], ref[k], rtol=1e-4, atol=1e-6)
    assert n_tok == n_trained(big['labels']) == sum(counts) and n_real == int(big['attention_mask'].sum())
    m.zero_grad(); assert loss == pytest.approx(m(**big).loss.item(), rel=1e-6)
    # the old way, (loss / accum).backward() per micro-batch, is far from it: the test can fail
    m.zero_grad()
    for b in micro: (m(**b).loss / len(micro)).backward()
    assert _rel(_grads(m), ref) > 0.1

def _deepspeed_worker(rank, out):
    "One process under DeepSpeed ZeRO-2 (the trainer's own engine set-up), SGD lr=1, max_norm=None (no clipping): the update of one window is minus its gradient."
    from ft_course.train import Config, init_distributed, _optimizer, _optimizer_step
    from ft_course.accum import window_backward
    torch.set_num_threads(1)
    init_distributed(True)
    micro, _ = _micro_and_big(_tok())
    m = _tiny_lora()
    before = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    cfg = Config(model='tiny-llama', method='lora', optim_type='SGD', lr=1.0, weight_decay=0.0, max_norm=None, warmup_ratio=0.0,
                 batch_size=1, accumulative_counts=len(micro), deepspeed='zero2', dtype='fp32')
    params, opt, sched, engine, zero_stage, fwd = _optimizer(cfg, m, 1, 1, 'cpu')
    assert engine.gradient_accumulation_steps() == 3
    loss, _, _ = window_backward(fwd, micro, 1, engine)
    _optimizer_step(cfg, params, opt, sched, engine, 1)   # the update: the engine's last step of the window
    torch.save({n: before[n] - p.detach() for n, p in engine.module.named_parameters() if p.requires_grad}, out)

def test_deepspeed_one_process_takes_the_one_batch_step(tmp_path, one_torch_thread):
    pytest.importorskip('deepspeed')
    import torch.multiprocessing as mp
    _, big = _micro_and_big(_tok())
    ref = _big_grads(big)
    out = tmp_path / 'update.pt'
    mp.spawn(_deepspeed_worker, args=(str(out),), nprocs=1, join=True)
    upd = torch.load(out)
    assert set(upd) == set(ref)
    for k in ref: torch.testing.assert_close(upd[k], ref[k], rtol=1e-3, atol=1e-6)

def test_two_processes_take_the_one_batch_step(tmp_path, one_torch_thread):
    "World 2 over gloo: each process one micro-batch (3 against 43 trained tokens); the gradients after DDP are the one batch's."
    import torch.multiprocessing as mp
    from ft_course.train import _free_port
    from ft_course.data import SFTDataset
    tok = _tok()
    ds = SFTDataset(RECS[:2], tok, 'chatml', max_length=128)
    big = ds.collate_fn([ds[0], ds[1]])
    ref = _big_grads(big)
    out = tmp_path / 'rank0.pt'
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    r = torch.load(out)
    for k in ref: torch.testing.assert_close(r['grads'][k], ref[k], rtol=1e-4, atol=1e-6)
    assert r['n_tok'] == int((big['labels'][:, 1:] != -100).sum()) and r['n_real'] == int(big['attention_mask'].sum())
    assert r['loss'] == pytest.approx(_tiny_lora()(**big).loss.item(), rel=1e-6)

def _ddp_worker(rank, world, port, out):
    "Rank r holds sample r of RECS: one micro-batch each, DDP averaging the gradients."
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from ft_course.accum import window_backward
    from ft_course.data import SFTDataset
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world)
    ds = SFTDataset(RECS[:2], _tok(), 'chatml', max_length=128)
    m = _tiny_lora()
    loss, n_tok, n_real = window_backward(DDP(m), [ds.collate_fn([ds[rank]])], world)
    if rank == 0: torch.save(dict(grads=_grads(m), loss=loss, n_tok=n_tok, n_real=n_real), out)
    dist.destroy_process_group()

def _cfg(tmp_path, recs, **kw):
    (tmp_path / 'data.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in recs))
    d = dict(model='tiny-llama', method='lora', lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=['q_proj', 'v_proj'],
             data_path=str(tmp_path / 'data.jsonl'), max_length=48, batch_size=1, accumulative_counts=2, max_steps=2, lr=1e-3,
             save_steps=100, evaluation_freq=100, evaluation_inputs=[], seed=1)
    d.update(kw)
    p = tmp_path / 'cfg.py'
    p.write_text('from ft_course.train import Config\nconfig = Config(' + ', '.join(f'{k}={v!r}' for k, v in d.items()) + ')\n')
    return p

def _rows(wd, kind='train'):
    return [json.loads(l) for l in (Path(wd) / 'log.jsonl').read_text().splitlines() if l.strip() and json.loads(l)['type'] == kind]

def test_trainer_logs_the_window_loss_and_its_tokens(tmp_path, one_torch_thread):
    "Step 1's logged loss is the token-weighted mean of its window (LoRA's B is 0: the base model's loss), with its trained and real tokens."
    from ft_course.train import train, load_config, _micro_batches, _step_counts, build_dataset
    from ft_course.models import load_model
    from ft_course.accum import n_trained, n_real
    recs = RECS * 3 + [_chat('Say a long thing, please, at length.', 'word ' * 200)]      # the last one is cut by max_length
    cfg_path = _cfg(tmp_path, recs, max_length=128, batch_size=2)
    train(cfg_path, tmp_path / 'w', progress=False)
    rows = _rows(tmp_path / 'w')
    cfg = load_config(cfg_path)
    ds, collate_fn = build_dataset(cfg, _tok())
    mpe, _, _ = _step_counts(cfg, len(ds), 1)
    window = [b for _, _, b in _micro_batches(ds, collate_fn, cfg, 0, 1, 0, 2, mpe)]
    base = load_model('tiny-llama', dtype='float32', device='cpu').train()
    with torch.no_grad(): means = [base(**b).loss.item() for b in window]
    N = [n_trained(b['labels']) for b in window]
    weighted = sum(l * n for l, n in zip(means, N)) / sum(N)
    assert N[0] != N[1] and abs(weighted - sum(means) / 2) > 1e-4           # the mean of means is another number
    r = rows[0]
    assert r['loss'] == pytest.approx(weighted, abs=2e-6)
    assert r['trained_tokens'] == sum(N) and r['real_tokens'] == sum(n_real(b) for b in window)
    assert r['real_tokens'] < sum(b['input_ids'].numel() for b in window)     # the padding is not counted
    assert r['tokens_per_s'] == pytest.approx(r['real_tokens'] / r['step_s'], rel=0.02)
    warn = [x['msg'] for x in _rows(tmp_path / 'w', 'info') if x.get('msg', '').startswith('warning:')]
    assert len(warn) == 1 and '1 of 13 samples (8%) lose trained tokens at max_length=128' in warn[0], warn

def test_every_answer_cut_off_fails_before_training(tmp_path):
    from ft_course.train import train, ConfigError
    long_q = 'Please read the whole of this question carefully before you answer it: ' * 2
    recs = [_chat(f'{long_q}what is {i} + 1?', f'It is {i + 1}.') for i in range(40)]
    for pack in (False, True):
        wd = tmp_path / f'w{pack}'
        with pytest.raises(ConfigError, match=r"all 40 samples lose all their trained tokens at max_length=16"):
            train(_cfg(tmp_path, recs, max_length=16, pack_to_max_length=pack), wd, progress=False)
        assert not (wd / 'checkpoints').exists() and not (wd / 'eval').exists()   # stopped before the step-0 evaluation
        assert not (wd / 'log.jsonl').exists() or not _rows(wd)

def test_nan_loss_stops_the_run_naming_the_step(tmp_path):
    "SGD at lr=1e30 unclipped: step 1 is fine, its update blows the LoRA weights up, step 2's loss is NaN: one line, exit 2, no NaN logged."
    cfg = _cfg(tmp_path, RECS * 4, lr=1e30, optim_type='SGD', max_norm=None, lora_target_modules='all-linear', max_steps=4, save_steps=1)
    code = 'import sys\nfrom ft_course.train import train_cli\nsys.exit(train_cli(sys.argv[1:]))'
    p = subprocess.run([sys.executable, '-c', code, str(cfg), '--work-dir', str(tmp_path / 'w'), '--no-progress'],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert p.returncode == 2, p.stderr[-2000:]
    assert 'Traceback' not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith('ft-course: error: step 2: the training loss is nan; the run stopped before'), last
    rows = _rows(tmp_path / 'w')
    assert [r['step'] for r in rows] == [1] and all(math.isfinite(r[k]) for r in rows for k in ('loss', 'grad_norm'))
    assert sorted(p.name for p in (tmp_path / 'w' / 'checkpoints').iterdir()) == ['iter_1']

def _cli(args, env=None):
    code = 'import sys\nfrom ft_course.train import train_cli\nsys.exit(train_cli(sys.argv[1:]))'
    p = subprocess.run([sys.executable, '-c', code, *args, '--no-progress'], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, 'OMP_NUM_THREADS': '1', **(env or {})})
    assert p.returncode == 0, p.stderr[-3000:]

def test_one_process_ddp_and_zero2_train_alike(tmp_path):
    """One process with micro-batches of 4, and two (DDP, then DeepSpeed ZeRO-2) with micro-batches of 2: each step's window
    holds the same 8 samples (rank r takes every other one), so with the one-big-batch gradient the runs log the same losses."""
    recs = RECS * 6
    (tmp_path / 'a').mkdir(); (tmp_path / 'b').mkdir()
    one, two = _cfg(tmp_path / 'a', recs, batch_size=4, max_steps=3), _cfg(tmp_path / 'b', recs, batch_size=2, max_steps=3)
    _cli([str(one), '--work-dir', str(tmp_path / 'one')])
    _cli([str(two), '--work-dir', str(tmp_path / 'ddp')], env={'NPROC_PER_NODE': '2'})
    _cli([str(two), '--work-dir', str(tmp_path / 'zero2'), '--deepspeed', 'zero2'], env={'NPROC_PER_NODE': '2'})
    a, b, c = (_rows(tmp_path / w) for w in ('one', 'ddp', 'zero2'))
    assert len(a) == len(b) == len(c) == 3 and a[-1]['loss'] != a[0]['loss']
    for x, y, z in zip(a, b, c):
        assert x['loss'] == pytest.approx(y['loss'], abs=1e-5) and x['loss'] == pytest.approx(z['loss'], abs=1e-5), (a, b, c)
    assert [r['trained_tokens'] for r in a] == [r['trained_tokens'] for r in b] == [r['trained_tokens'] for r in c]
