"""DeepSpeed ZeRO-2/3 on CPU (gloo, 2 processes): LoRA, QLoRA and full fine-tuning equal to the single-process run with
the same global batch; kill and resume under ZeRO-3; sharded checkpoints converted (also without trainable.safetensors,
by gathering the shards); two "nodes" of one process each on this machine (--nnodes 2 --node-rank 0/1)."""
import json, os, re, shutil, subprocess, sys, zipfile, pickletools
from pathlib import Path
import pytest

torch = pytest.importorskip('torch')
pytest.importorskip('deepspeed')
from safetensors.torch import load_file
from ft_course.checkpoint import (latest_checkpoint, checkpoint_problem, gather_zero_checkpoint, read_checkpoint, CheckpointError,
                                  DS_SAFE_GLOBALS)
from ft_course.convert import convert_cli
from ft_course.train import _free_port

ROOT = Path(__file__).resolve().parents[1]
ENV = {'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT)}
CODE = 'import sys\nfrom ft_course.train import train_cli\nsys.exit(train_cli(sys.argv[1:]))'
STEPS = 4

@pytest.fixture(scope='module')
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp('zero')
    (root / 'data.jsonl').write_text(''.join(json.dumps({'messages': [{'role': 'user', 'content': f'Question {i}?'},
        {'role': 'assistant', 'content': f'Answer number {i}.'}]}) + '\n' for i in range(24)))
    return root

def _cfg(root, name, **kw):
    "batch_size=1: a micro-batch is one sample, so 2 processes x 2 micro-batches = 1 process x 4 micro-batches exactly."
    d = dict(model='tiny-llama', method='lora', lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=['q_proj', 'v_proj'],
             data_path=str(root / 'data.jsonl'), max_length=32, batch_size=1, accumulative_counts=4, max_steps=STEPS, lr=5e-3,
             save_steps=2, save_total_limit=3, evaluation_freq=100, evaluation_inputs=[], seed=3)
    d.update(kw)
    p = root / f'{name}.py'
    p.write_text('from ft_course.train import Config\nconfig = Config(' + ', '.join(f'{k}={v!r}' for k, v in d.items()) + ')\n')
    return p

def _run(args, env=None, check=True):
    p = subprocess.run([sys.executable, '-c', CODE, *map(str, args), '--no-progress'], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, **ENV, **(env or {})}, timeout=600)
    if check: assert p.returncode == 0, p.stderr[-3000:]
    return p

def _log(wd): return [json.loads(l) for l in (Path(wd) / 'log.jsonl').read_text().splitlines() if l.strip()]
def _losses(wd): return [r['loss'] for r in _log(wd) if r['type'] == 'train']
def _trainable(wd):
    "(trainable, all) parameter counts from the run's start line."
    m = [re.search(r'trainable ([\d,]+) / ([\d,]+) params', r.get('msg', '')) for r in _log(wd)]
    return next(tuple(int(g.replace(',', '')) for g in x.groups()) for x in m if x)

_runs = {}
def run_once(root, key, cfg_kw, args=(), env=None):
    "Each configuration trains once per test module (the CPU is shared): its work dir."
    if key not in _runs:
        wd = root / key
        _run([_cfg(root, key, **cfg_kw), '--work-dir', wd, *args], env=env)
        _runs[key] = wd
    return _runs[key]

def plain(root, **kw): return run_once(root, 'plain_' + '_'.join(f'{k}{v}' for k, v in kw.items()), kw)
def zero(root, stage, **kw):   # 2 processes x accumulative_counts 2 = the plain run's global batch of 4
    return run_once(root, f'zero{stage}_' + '_'.join(f'{k}{v}' for k, v in kw.items()), dict(kw, accumulative_counts=2),
                    ['--deepspeed', f'zero{stage}'], env={'NPROC_PER_NODE': '2'})

def _close(a, b, tol=2e-4):
    assert len(a) == len(b) == STEPS, (a, b)
    assert a == pytest.approx(b, abs=tol, rel=tol), (a, b)


# 1. ZeRO-3: LoRA, full fine-tuning, QLoRA (both 4-bit backends) equal to the plain single-process run
@pytest.mark.parametrize('kw', [dict(method='lora'), dict(method='full'), dict(method='qlora', quant_backend='ft_course'),
                                dict(method='qlora', quant_backend='bnb'),
                                dict(method='qlora', quant_backend='ft_course', fast=True, lora_target_modules='all-linear')],
                         ids=['lora', 'full', 'qlora_ft_course', 'qlora_bnb', 'qlora_fast'])
def test_zero3_equals_plain_run(root, kw):
    if kw.get('quant_backend') == 'bnb': pytest.importorskip('bitsandbytes')
    ref, z = plain(root, **kw), zero(root, 3, **kw)
    _close(_losses(z), _losses(ref))
    assert _losses(z)[-1] < _losses(z)[0]
    assert _trainable(z) == _trainable(ref) and _trainable(z)[0] > 0     # ZeRO-3's empty partitions counted at full size
    ck = latest_checkpoint(z)
    assert ck.name == f'iter_{STEPS}' and json.loads((ck / 'trainer_state.json').read_text())['world_size'] == 2
    assert checkpoint_problem(ck) is None
    a, b = load_file(str(ck / 'trainable.safetensors')), load_file(str(latest_checkpoint(ref) / 'trainable.safetensors'))
    assert set(a) == set(b) and all(v.shape == b[k].shape and v.numel() > 0 for k, v in a.items())   # gathered, not partitions
    err = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert err < 1e-3, err


@pytest.mark.parametrize('kw', [dict(method='lora'), dict(method='qlora', quant_backend='ft_course', fast=True, lora_target_modules='all-linear')],
                         ids=['lora', 'qlora_fast'])
def test_zero2_equals_plain_run(root, kw):
    "ZeRO-2 (the standard and the fast QLoRA path) on 2 processes: the plain run's losses."
    _close(_losses(zero(root, 2, **kw)), _losses(plain(root, **kw)))


def _globals(f):
    "The 'module name' globals a torch.save pickle names."
    with zipfile.ZipFile(f) as z: data = z.read(next(n for n in z.namelist() if n.endswith('data.pkl')))
    out, strs = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ('SHORT_BINUNICODE', 'BINUNICODE', 'UNICODE'): strs.append(arg)
        elif op.name == 'STACK_GLOBAL': out.add(f'{strs[-2]}:{strs[-1]}')
        elif op.name == 'GLOBAL': out.add(arg.replace(' ', ':'))
    return out

def test_zero3_checkpoint_holds_only_safe_globals(root):
    "Every class a ZeRO-3 checkpoint's shards name is torch's own tensor machinery or in DS_SAFE_GLOBALS; load_safe reads them all."
    from ft_course.checkpoint import load_safe
    torch_plain = {'collections:OrderedDict', 'torch:Size', 'torch:Tensor', 'torch._utils:_rebuild_tensor_v2', 'torch._tensor:_rebuild_from_type_v2'}
    for kw in (dict(method='lora'), dict(method='full'), dict(method='qlora', quant_backend='ft_course')):
        shards = sorted((latest_checkpoint(zero(root, 3, **kw)) / 'deepspeed').glob('*.pt'))
        assert len(shards) == 4   # model and optimizer states of two ranks
        seen = set().union(*map(_globals, shards))
        other = {g for g in seen if g not in torch_plain and not re.fullmatch(r'torch:\w+Storage', g)}
        assert other <= set(DS_SAFE_GLOBALS), other - set(DS_SAFE_GLOBALS)
        assert 'deepspeed.runtime.zero.config:ZeroStageEnum' in other
        for f in shards: load_safe(f, DS_SAFE_GLOBALS)


# 2. kill and resume under ZeRO-3
def test_zero3_kill_and_resume_same_curve(root):
    ref = zero(root, 3, method='lora')
    wd = root / 'zero3_killed'
    cfg = _cfg(root, 'zero3_killed', accumulative_counts=2)
    args = [cfg, '--work-dir', wd, '--deepspeed', 'zero3']
    p = _run(args, env={'NPROC_PER_NODE': '2', 'FT_COURSE_DEBUG_KILL': 'after_step:3'}, check=False)
    assert p.returncode != 0
    assert latest_checkpoint(wd).name == 'iter_2' and len(_losses(wd)) == 3
    _run([*args, '--resume', 'auto'], env={'NPROC_PER_NODE': '2'})
    assert any('resumed from' in r.get('msg', '') for r in _log(wd))
    assert _losses(wd) == pytest.approx(_losses(ref), abs=1e-6)
    a, b = (load_file(str(latest_checkpoint(w) / 'trainable.safetensors')) for w in (wd, ref))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


# 3. ft-course convert pth_to_hf of ZeRO-2/3 checkpoints, also with trainable.safetensors missing
def _convert(ck, out):
    assert convert_cli(['pth_to_hf', str(ck / 'config.py'), str(ck), str(out)]) == 0
    return load_file(str(out / 'adapter_model.safetensors'))

@pytest.mark.parametrize('stage', [2, 3])
def test_convert_sharded_checkpoint(root, stage):
    ref_ck = latest_checkpoint(plain(root, method='lora'))
    ck = latest_checkpoint(zero(root, stage, method='lora'))
    want = _convert(ref_ck, root / f'hf_plain_{stage}')
    got = _convert(ck, root / f'hf_zero{stage}')
    assert set(got) == set(want) and len(got) == 8    # 2 layers x (q, v) x (A, B)
    assert max((got[k] - want[k]).abs().max().item() for k in got) < 1e-3
    # the same checkpoint without trainable.safetensors: the ZeRO shards are gathered instead
    bare = root / f'bare{stage}' / 'checkpoints' / ck.name
    shutil.copytree(ck, bare); (bare / 'trainable.safetensors').unlink()
    sd = gather_zero_checkpoint(bare)
    full = load_file(str(ck / 'trainable.safetensors'))
    assert set(sd) == set(full)                              # only the trainable (LoRA) tensors
    assert all(torch.equal(sd[k], full[k].float()) for k in sd)
    assert set(read_checkpoint(bare)[0]) == set(full)
    again = _convert(bare, root / f'hf_bare{stage}')
    assert all(torch.equal(again[k], got[k]) for k in got)

def test_gather_refuses_bad_shards(root, tmp_path):
    "A shard that would run code when unpickled, or a missing rank, is refused in one line; nothing runs."
    ck = latest_checkpoint(zero(root, 3, method='lora'))
    bare = tmp_path / 'iter_4'; shutil.copytree(ck, bare); (bare / 'trainable.safetensors').unlink()
    class Evil:
        def __reduce__(self): return (os.system, (f"touch {tmp_path / 'pwned'}",))
    victim = bare / 'deepspeed' / 'zero_pp_rank_1_mp_rank_00_optim_states.pt'
    torch.save({'x': Evil()}, victim)
    with pytest.raises(CheckpointError, match='refused'): gather_zero_checkpoint(bare)
    assert convert_cli(['pth_to_hf', str(bare / 'config.py'), str(bare), str(tmp_path / 'out')]) == 2
    assert not (tmp_path / 'pwned').exists() and not (tmp_path / 'out').exists()
    victim.unlink()
    with pytest.raises(CheckpointError, match='do not gather'): gather_zero_checkpoint(bare)
    shutil.rmtree(bare / 'deepspeed')
    with pytest.raises(CheckpointError, match='no DeepSpeed shards'): gather_zero_checkpoint(bare)


# 4. two "nodes" of one process each on this machine
@pytest.mark.parametrize('stage', [2, 3])
def test_two_nodes(root, stage):
    ref = plain(root, method='lora')
    wd, port = root / f'nodes_zero{stage}', _free_port()
    cfg = _cfg(root, f'nodes{stage}', accumulative_counts=2)
    env = {**os.environ, **ENV}
    for k in ('NPROC_PER_NODE', 'NNODES', 'NODE_RANK', 'MASTER_ADDR', 'MASTER_PORT'): env.pop(k, None)
    procs = [subprocess.Popen([sys.executable, '-c', CODE, str(cfg), '--work-dir', str(wd), '--deepspeed', f'zero{stage}', '--no-progress',
                               '--nnodes', '2', '--node-rank', str(r), '--master-addr', '127.0.0.1', '--master-port', str(port),
                               '--nproc-per-node', '1'], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert '--nnodes 2 --node_rank 1' in outs[1][1]                       # node 1 went through torchrun's rendezvous
    _close(_losses(wd), _losses(ref))
    assert [r['world_size'] for r in _log(wd) if 'world_size' in r] == [2]
    st = json.loads((latest_checkpoint(wd) / 'trainer_state.json').read_text())
    assert st['world_size'] == 2 and {f'zero_pp_rank_{r}_mp_rank_00_optim_states.pt' for r in (0, 1)} <= {p.name for p in latest_checkpoint(wd).rglob('*.pt')}

def test_node_options_refused_in_one_line(root, capsys):
    from ft_course.train import train_cli
    cfg = _cfg(root, 'refuse')
    for extra, want in [(['--nnodes', '2', '--node-rank', '0'], '--master-addr'), (['--nnodes', '2', '--node-rank', '2', '--master-addr', 'h',
                         '--master-port', '1'], '--node-rank'), (['--nnodes', 'two'], '--nnodes'), (['--nproc-per-node', '0'], '--nproc-per-node')]:
        assert train_cli([str(cfg), '--work-dir', str(root / 'refused'), *extra]) == 2
        err = capsys.readouterr().err
        assert want in err and 'Traceback' not in err and len(err.strip().splitlines()) == 1, err
    assert not (root / 'refused').exists()

def test_torchrun_env_vars_honoured(root, monkeypatch):
    "NNODES / NODE_RANK / MASTER_ADDR / MASTER_PORT as torchrun's own variables make the same launch as the options."
    import ft_course.train as T
    seen = {}
    monkeypatch.setattr(T, '_launch_torchrun', lambda plan, argv: seen.update(plan) or 0)
    for k, v in dict(NNODES='3', NODE_RANK='2', MASTER_ADDR='10.1.2.3', MASTER_PORT='29555', NPROC_PER_NODE='4').items(): monkeypatch.setenv(k, v)
    monkeypatch.delenv('TORCHELASTIC_RUN_ID', raising=False)
    assert T.train_cli([str(_cfg(root, 'envs')), '--work-dir', str(root / 'envs')]) == 0
    assert seen == dict(nproc=4, nnodes=3, node_rank=2, addr='10.1.2.3', port=29555)
    seen.clear()
    assert T.train_cli([str(_cfg(root, 'envs')), '--work-dir', str(root / 'envs'), '--node-rank', '1', '--master-port', '29600']) == 0
    assert seen == dict(nproc=4, nnodes=3, node_rank=1, addr='10.1.2.3', port=29600)   # an option beats its variable
