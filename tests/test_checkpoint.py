"""Tests of ft_course.checkpoint (issue 15): one run per work dir (lock, refusal, --overwrite), resume checks against the
checkpoint's config and base model, a failing save, damaged checkpoints, no pickled code, the base-model fingerprint."""
import json, os, shutil, socket, subprocess, sys, time
from dataclasses import replace
from pathlib import Path
import pytest
from ft_course.config import Config, ConfigError
from ft_course.checkpoint import (CheckpointError, WorkDirLock, base_fingerprint, base_mismatch, checkpoint_problem, load_safe,
                                  resumable_checkpoint, _rng_state, _set_rng_state, latest_checkpoint)
from ft_course import train as train_mod
from ft_course.train import train, train_cli, lr_lambda

ROOT = Path(__file__).resolve().parents[1]

def _data(d, n=16):
    p = Path(d) / 'data.jsonl'
    p.write_text(''.join(json.dumps({'messages': [{'role': 'user', 'content': f'Question {i}?'},
                                                  {'role': 'assistant', 'content': f'Answer number {i}.'}]}) + '\n' for i in range(n)))
    return p

def _cfg(d, name='cfg.py', **kw):
    c = dict(model='tiny-llama', method='lora', lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=['q_proj', 'v_proj'],
             data_path=str(_data(d)), max_length=32, batch_size=2, accumulative_counts=1, max_steps=4, lr=5e-3, save_steps=2,
             save_total_limit=3, evaluation_freq=100, evaluation_inputs=[], seed=3)
    c.update(kw)
    p = Path(d) / name
    p.write_text('from ft_course.train import Config\nconfig = Config(' + ', '.join(f'{k}={v!r}' for k, v in c.items()) + ')\n')
    return p

def _train_rows(wd, kind='train'):
    p = Path(wd) / 'log.jsonl'
    return [r for r in map(json.loads, p.read_text().splitlines()) if r.get('type') == kind] if p.exists() else []

@pytest.fixture(scope='module')
def run(tmp_path_factory, one_torch_thread):
    "One finished 4-step run (checkpoints iter_2, iter_4); tests copy it before changing anything."
    d = tmp_path_factory.mktemp('run')
    cfg = _cfg(d)
    train(cfg, d / 'w', progress=False)
    return d, cfg

def _copy(run, tmp_path):
    shutil.copytree(run[0] / 'w', tmp_path / 'w')
    return tmp_path / 'w'

@pytest.fixture(scope='module')
def other_base(tmp_path_factory):
    "A tiny random Llama of the same shape as tiny-llama but another seed."
    from ft_course.models import tiny_model, load_tokenizer
    d = tmp_path_factory.mktemp('base') / 'tiny-llama-seed1'
    tiny_model('llama', seed=1).save_pretrained(d); load_tokenizer('smollm2').save_pretrained(d)
    return d

# ---- 2. one work dir, one run ------------------------------------------------------------------------------------------
def test_lock_two_processes_and_stale(tmp_path):
    "A second `ft-course train` into a work dir in use stops at once naming the holder; the killed holder's lock is taken over."
    cfg = _cfg(tmp_path, max_steps=100000, save_steps=100000)
    code = 'import sys\nfrom ft_course.train import train_cli\nsys.exit(train_cli(sys.argv[1:]))'
    env = {**os.environ, 'PYTHONPATH': str(ROOT), 'OMP_NUM_THREADS': '1'}
    args = [sys.executable, '-c', code, str(cfg), '--work-dir', str(tmp_path / 'w'), '--no-progress']
    a = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while not (tmp_path / 'w' / '.lock').exists():
            assert a.poll() is None, a.stderr.read()[-2000:]
            assert time.time() - t0 < 300; time.sleep(0.2)
        holder = json.loads((tmp_path / 'w' / '.lock').read_text())
        assert holder['pid'] == a.pid and holder['host'] == socket.gethostname() and holder['since'] and str(cfg) in holder['command']
        b = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert a.poll() is None                                     # b stopped while a still trains
        assert b.returncode == 2
        err = b.stderr.strip().splitlines()
        assert len(err) == 1 and 'in use by another run' in err[0] and f'pid {a.pid}' in err[0] and holder['since'] in err[0], b.stderr
    finally:
        a.kill(); a.wait()
    assert json.loads((tmp_path / 'w' / '.lock').read_text())['pid'] == a.pid   # SIGKILL: the lock stays behind, stale
    c = subprocess.run([*args[:-1], '--overwrite', '--no-progress', '--cfg-options', 'max_steps=1', 'save_steps=1'],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert c.returncode == 0, c.stderr[-2000:]
    assert f'stale lock of pid {a.pid}' in c.stderr
    assert not (tmp_path / 'w' / '.lock').exists()                 # released at the end
    assert len(_train_rows(tmp_path / 'w')) == 1

def test_lock_in_process(tmp_path):
    "Held: a second taker fails naming pid, host and time; a dead pid's lock is taken over; an exception releases it."
    wd = tmp_path / 'w'; wd.mkdir()
    with WorkDirLock(wd):
        with pytest.raises(ConfigError, match=f"pid {os.getpid()} on {socket.gethostname()} since"): WorkDirLock(wd).__enter__()
    assert not (wd / '.lock').exists()
    dead = subprocess.Popen(['true']); dead.wait()
    (wd / '.lock').write_text(json.dumps(dict(pid=dead.pid, host=socket.gethostname(), since='x', command='old')))
    with pytest.raises(RuntimeError):
        with WorkDirLock(wd) as lock:
            assert lock.taken_over['pid'] == dead.pid and json.loads((wd / '.lock').read_text())['pid'] == os.getpid()
            raise RuntimeError('boom')
    assert not (wd / '.lock').exists()
    live = subprocess.Popen(['sleep', '30'])
    try:
        (wd / '.lock').write_text(json.dumps(dict(pid=live.pid, host=socket.gethostname(), since='then', command='other')))
        with pytest.raises(ConfigError, match=f'pid {live.pid}'): WorkDirLock(wd).__enter__()
        assert json.loads((wd / '.lock').read_text())['pid'] == live.pid        # a live holder's lock is left alone
    finally: live.kill(); live.wait()

def test_used_work_dir_refused_then_overwrite(run, tmp_path, capsys):
    wd = _copy(run, tmp_path)
    log_before = (wd / 'log.jsonl').read_text()
    assert train_cli([str(run[1]), '--work-dir', str(wd), '--no-progress']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'already holds a run' in err[0] and '--resume auto' in err[0] and '--overwrite' in err[0]
    assert (wd / 'log.jsonl').read_text() == log_before and {p.name for p in (wd / 'checkpoints').iterdir()} == {'iter_2', 'iter_4'}
    r = train(run[1], wd, cfg_options=['max_steps=2'], overwrite=True, progress=False)
    assert r.steps == 2 and [x['step'] for x in _train_rows(wd)] == [1, 2]
    assert sorted(p.name for p in (wd / 'checkpoints').iterdir()) == ['iter_2']   # the old iter_4 is gone
    assert json.loads((wd / 'checkpoints' / 'iter_2' / 'trainer_state.json').read_text())['run']['lora_r'] == 4

# ---- 2/3. resume must be the same run ---------------------------------------------------------------------------------
def _no_build(monkeypatch):
    def boom(cfg): raise AssertionError('the model was built before the config was checked')
    monkeypatch.setattr(train_mod, 'build_model', boom)

@pytest.mark.parametrize('opts,want', [
    (['lora_r=8'], ['lora_r: checkpoint 4 vs now 8']),
    (['optim_type="SGD"'], ["optim_type: checkpoint 'AdamW' vs now 'SGD'"]),
    (['lora_alpha=16', 'batch_size=4'], ['lora_alpha: checkpoint 8 vs now 16', 'batch_size: checkpoint 2 vs now 4'])])
def test_resume_mismatch_listed_before_building(run, monkeypatch, opts, want):
    _no_build(monkeypatch)
    wd = run[0] / 'w'
    with pytest.raises(CheckpointError) as e: train(run[1], wd, resume='auto', cfg_options=opts, progress=False)
    msg = str(e.value)
    assert 'iter_4' in msg and all(w in msg for w in want), msg
    assert msg.count(' vs now ') == len(want)

def test_resume_with_another_base(run, other_base, monkeypatch, tmp_path):
    _no_build(monkeypatch)
    with pytest.raises(CheckpointError, match='tiny-llama-seed1') as e:
        train(run[1], run[0] / 'w', resume='auto', cfg_options=[f'model={str(other_base)!r}'], progress=False)
    assert "'tiny-llama'" in str(e.value) and 'fingerprint' in str(e.value)
    monkeypatch.undo()
    wd = _copy(run, tmp_path)   # deliberately: force_base=True, and a longer run
    r = train(run[1], wd, resume='auto', cfg_options=[f'model={str(other_base)!r}', 'max_steps=5'], force_base=True, progress=False)
    assert r.steps == 5

def test_lr_change_allowed_and_used(run, tmp_path):
    "lr and max_steps may change on resume; the resumed steps use the new lr on the new schedule."
    wd = _copy(run, tmp_path)
    r = train(run[1], wd, resume='auto', cfg_options=['lr=1e-3', 'max_steps=6'], progress=False)
    rows = _train_rows(wd)
    assert r.steps == 6 and [x['step'] for x in rows] == [1, 2, 3, 4, 5, 6]
    f = lr_lambda(6, Config().warmup_ratio)
    assert rows[4]['lr'] == pytest.approx(1e-3 * f(4), rel=1e-9) and rows[5]['lr'] == pytest.approx(1e-3 * f(5), rel=1e-9)

# ---- 4. saving fails cleanly; damaged checkpoints ----------------------------------------------------------------------
def test_disk_full_while_saving(tmp_path, capsys, monkeypatch, one_torch_thread):
    monkeypatch.setenv('FT_COURSE_DEBUG_ENOSPC', 'in_save:4')
    cfg = _cfg(tmp_path)
    assert train_cli([str(cfg), '--work-dir', str(tmp_path / 'w'), '--no-progress']) == 2
    err = [l for l in capsys.readouterr().err.strip().splitlines() if l.startswith('ft-course')]
    assert len(err) == 1 and 'iter_4' in err[0] and 'No space left on device' in err[0] and 'iter_2 is intact' in err[0], err
    assert sorted(p.name for p in (tmp_path / 'w' / 'checkpoints').iterdir()) == ['iter_2']   # no .tmp_iter_4, no iter_4
    assert checkpoint_problem(tmp_path / 'w' / 'checkpoints' / 'iter_2') is None
    assert not (tmp_path / 'w' / '.lock').exists()

@pytest.mark.parametrize('damage', ['truncate_weights', 'garble_optimizer', 'drop_optimizer'])
def test_damaged_newest_falls_back(run, tmp_path, damage):
    wd = _copy(run, tmp_path)
    ck = wd / 'checkpoints' / 'iter_4'
    if damage == 'truncate_weights':
        f = ck / 'trainable.safetensors'; f.write_bytes(f.read_bytes()[:-100]); name = 'trainable.safetensors'
    elif damage == 'garble_optimizer': (ck / 'optimizer.pt').write_bytes(b'\x00garbage' * 10); name = 'optimizer.pt'
    else: (ck / 'optimizer.pt').unlink(); name = 'optimizer.pt'
    said = []
    assert resumable_checkpoint(wd, lambda kind, msg, **kw: said.append(msg)).name == 'iter_2'
    assert len(said) == 1 and 'iter_4' in said[0] and name in said[0] and 'falling back' in said[0]
    with pytest.raises(CheckpointError, match=name): train(run[1], wd, resume=str(ck), progress=False)   # given explicitly: an error
    if damage == 'truncate_weights':   # and the real thing: resumes from iter_2, says so, ends at step 4
        r = train(run[1], wd, resume='auto', progress=False)
        infos = [x['msg'] for x in _train_rows(wd, 'info')]
        assert r.steps == 4 and any('iter_4 is damaged' in m for m in infos) and any('resumed from' in m and 'iter_2' in m for m in infos)

# ---- 5. no code runs when a checkpoint is loaded -----------------------------------------------------------------------
class _Evil:
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (os.system, (f'touch {self.marker}',))

def test_crafted_optimizer_is_refused(run, tmp_path):
    import torch
    wd = _copy(run, tmp_path)
    ck = wd / 'checkpoints' / 'iter_4'
    marker = tmp_path / 'pwned'
    sd = torch.load(ck / 'optimizer.pt', weights_only=True); sd['evil'] = _Evil(marker)
    torch.save(sd, ck / 'optimizer.pt')
    with pytest.raises(CheckpointError, match='optimizer.pt.*refused'): load_safe(ck / 'optimizer.pt')
    with pytest.raises(CheckpointError, match='optimizer.pt'): train(run[1], wd, resume=str(ck), progress=False)
    assert not marker.exists()
    # the file really is dangerous: a plain unpickling runs its code (in a child process)
    subprocess.run([sys.executable, '-c', f'import torch; torch.load({str(ck / "optimizer.pt")!r}, weights_only=False)'], check=False)
    assert marker.exists()

def test_every_torch_load_in_the_package_is_weights_only():
    import ast
    calls = []
    for p in (ROOT / 'ft_course').glob('*.py'):
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == 'load' and getattr(n.func.value, 'id', '') == 'torch':
                kw = {k.arg: k.value for k in n.keywords}
                calls.append((p.name, n.lineno, isinstance(kw.get('weights_only'), ast.Constant) and kw['weights_only'].value is True))
    assert len(calls) >= 4 and all(ok for *_, ok in calls), [c for c in calls if not c[2]]

def test_rng_state_round_trips_through_weights_only(tmp_path):
    import random, numpy as np, torch
    torch.save(_rng_state(), tmp_path / 'rng.pt')
    a = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(), torch.rand(4).tolist())
    _set_rng_state(torch.load(tmp_path / 'rng.pt', weights_only=True))
    b = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(), torch.rand(4).tolist())
    assert a == b

# ---- 3. the base model: fingerprints in checkpoints and adapters; merge and chat refuse another base ---------------------
def test_fingerprints(run, other_base):
    from ft_course.models import tiny_model_dir
    fp = base_fingerprint('tiny-llama')
    assert fp and fp == base_fingerprint(tiny_model_dir('llama')) and fp != base_fingerprint(other_base)
    st = json.loads((run[0] / 'w' / 'checkpoints' / 'iter_4' / 'trainer_state.json').read_text())
    assert st['base_model'] == {'name': 'tiny-llama', 'fingerprint': fp}
    assert base_mismatch(st['base_model'], tiny_model_dir('llama')) is None and 'tiny-llama-seed1' in base_mismatch(st['base_model'], other_base)

def test_adapter_records_base_and_merge_chat_refuse_another(run, other_base, tmp_path, capsys):
    from ft_course.convert import pth_to_hf, merge, convert_cli
    from ft_course.chat import load_chat_model, chat_cli
    ck = run[0] / 'w' / 'checkpoints' / 'iter_4'
    ad = pth_to_hf(ck / 'config.py', ck, tmp_path / 'ad')
    prov = json.loads((ad / 'ft_course_checkpoint.json').read_text())
    assert prov['base_model_fingerprint'] == base_fingerprint('tiny-llama')
    with pytest.raises(ValueError, match='tiny-llama-seed1'): merge(str(other_base), ad, tmp_path / 'm', dtype='fp32')
    assert not (tmp_path / 'm').exists()
    assert convert_cli(['merge', str(other_base), str(ad), str(tmp_path / 'm')]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'tiny-llama-seed1' in err[0] and "'tiny-llama'" in err[0]
    assert merge(str(other_base), ad, tmp_path / 'm', dtype='fp32', force_base=True).is_dir()          # forced
    assert merge('tiny-llama', ad, tmp_path / 'm2', dtype='fp32').is_dir()                             # its own base
    with pytest.raises(ValueError, match='tiny-llama-seed1'): load_chat_model(str(other_base), ad, device='cpu')
    assert chat_cli([str(other_base), '--adapter', str(ad), '--device', 'cpu']) == 2
    assert 'tiny-llama-seed1' in capsys.readouterr().err
    m, tok, info = load_chat_model(str(other_base), ad, device='cpu', force_base=True)
    assert type(m).__name__ == 'PeftModelForCausalLM'

def test_deepspeed_files_checked_before_deepspeed_unpickles_them(tmp_path, one_torch_thread):
    "DeepSpeed loads its ZeRO files with weights_only=False: they are checked with weights_only=True (its few data classes allowed) first."
    import torch
    pytest.importorskip('deepspeed')
    r = train(_cfg(tmp_path, max_steps=2), tmp_path / 'w', deepspeed='zero2', progress=False)
    ck = latest_checkpoint(tmp_path / 'w')
    assert checkpoint_problem(ck) is None                        # a real ZeRO-2 checkpoint passes
    f = next((ck / 'deepspeed').rglob('*optim_states.pt'))
    marker = tmp_path / 'pwned'
    sd = torch.load(f, weights_only=False); sd['evil'] = _Evil(marker); torch.save(sd, f)
    assert 'refused' in checkpoint_problem(ck) and f.name in checkpoint_problem(ck)
    with pytest.raises(CheckpointError, match=f.name): train(_cfg(tmp_path, max_steps=2), tmp_path / 'w', deepspeed='zero2', resume=str(ck), progress=False)
    assert not marker.exists()
