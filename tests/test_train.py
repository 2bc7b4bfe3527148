"Tests of ft_course.train: config validation, checkpoints, kill-and-resume equality, DeepSpeed ZeRO-2 on CPU with two processes."
import json, os, subprocess, sys
from pathlib import Path
import pytest
from ft_course.train import (Config, ConfigError, load_config, latest_checkpoint, read_checkpoint, lr_lambda, train_cli, config_source)
from ft_course.config import validate_config, list_configs, copy_config, copy_cfg_cli, list_cfg_cli

ROOT = Path(__file__).resolve().parents[1]

def _data(tmp_path, n=24):
    p = tmp_path / 'data.jsonl'
    p.write_text(''.join(json.dumps({'messages': [{'role': 'user', 'content': f'Question {i}?'},
                                                  {'role': 'assistant', 'content': f'Answer number {i}.'}]}) + '\n' for i in range(n)))
    return p

def _cfg(tmp_path, **kw):
    d = dict(model='tiny-llama', method='lora', lora_r=4, lora_alpha=8, lora_dropout=0.1, lora_target_modules=['q_proj', 'v_proj'],
             data_path=str(_data(tmp_path)), max_length=32, batch_size=2, accumulative_counts=2, max_steps=6, lr=5e-3,
             save_steps=2, save_total_limit=2, evaluation_freq=100, evaluation_inputs=['Question 1?'], eval_max_new_tokens=4, seed=3)
    d.update(kw)
    p = tmp_path / 'cfg.py'
    p.write_text('from ft_course.train import Config\nconfig = Config(' + ', '.join(f'{k}={v!r}' for k, v in d.items()) + ')\n')
    return p

def _losses(wd): return [json.loads(l)['loss'] for l in (Path(wd) / 'log.jsonl').read_text().splitlines() if '"train"' in l]

def _run(args, env=None, check=True):
    code = 'import sys\nfrom ft_course.train import train_cli\nsys.exit(train_cli(sys.argv[1:]))'
    p = subprocess.run([sys.executable, '-c', code, *args, '--no-progress'], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, **(env or {})})
    if check: assert p.returncode == 0, p.stderr[-3000:]
    return p

def test_builtin_configs_validate():
    names = list_configs()
    for n in ('smollm2_135m_qlora_selfcog_e3', 'smollm2_135m_full_pretrain_e1', 'internlm2_chat_1_8b_qlora_selfcog_e3'):
        assert n in names
        validate_config(load_config(n))
    assert list_configs('full') == ['smollm2_135m_full_pretrain_e1']

@pytest.mark.parametrize('opt,key', [('lr=-1', 'lr'), ('lora_r=0', 'lora_r'), ('prompt_template="nope"', 'prompt_template'),
                                     ('data_path="/no/such/file.jsonl"', 'data_path'), ('method="dora"', 'method'),
                                     ('deepspeed="zero4"', 'deepspeed')])
def test_validation_names_the_key(tmp_path, opt, key):
    cfg = load_config(_cfg(tmp_path), [opt])
    with pytest.raises(ConfigError, match=f"'{key}'"): validate_config(cfg)

def test_cli_errors_before_loading(tmp_path, capsys):
    assert train_cli([str(_cfg(tmp_path)), '--work-dir', str(tmp_path / 'w'), '--cfg-options', 'lr=-0.1']) == 2
    assert "'lr'" in capsys.readouterr().err
    assert train_cli([str(_cfg(tmp_path)), '--work-dir', str(tmp_path / 'w'), '--cfg-options', 'nosuchkey=1']) == 2
    assert not (tmp_path / 'w' / 'checkpoints').exists()

def test_config_file_errors(tmp_path):
    bad = tmp_path / 'bad.py'; bad.write_text('from ft_course.train import Config\n\nconfig = Config(lr=)\n')
    with pytest.raises(ConfigError, match='bad.py'): load_config(bad)
    none = tmp_path / 'none.py'; none.write_text('x = 1\n')
    with pytest.raises(ConfigError, match='config = Config'): load_config(none)
    with pytest.raises(ConfigError, match='built-ins'): load_config('no_such_config_e3')

def test_options_and_roundtrip(tmp_path):
    cfg = load_config(_cfg(tmp_path), ['lr=0.5', 'betas=[0.8, 0.9]', 'system="hi"'])
    assert cfg.lr == 0.5 and cfg.betas == (0.8, 0.9) and cfg.system == 'hi'
    p = tmp_path / 'again.py'; p.write_text(config_source(cfg))
    again = load_config(p)
    assert all(getattr(again, f) == getattr(cfg, f) for f in ('lr', 'betas', 'system', 'model', 'lora_target_modules', 'data_path'))

def test_copy_and_list_cli(tmp_path, capsys):
    assert copy_cfg_cli(['smollm2_135m_qlora_selfcog_e3', str(tmp_path)]) == 0
    out = tmp_path / 'smollm2_135m_qlora_selfcog_e3_copy.py'
    assert out.is_file() and load_config(out).model == 'smollm2'
    assert copy_cfg_cli(['smollm2_135m_qlora_selfcog_e3', str(tmp_path)]) == 2     # refuses to overwrite
    assert list_cfg_cli(['-p', 'qlora']) == 0 and 'internlm2_chat_1_8b_qlora_selfcog_e3' in capsys.readouterr().out

def test_schedule():
    f = lr_lambda(100, 0.1)
    assert f(0) == pytest.approx(1 / 11) and f(9) == pytest.approx(10 / 11) and f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5) and f(99) < 0.001

def test_kill_and_resume_same_curve(tmp_path):
    "A run killed (SIGKILL) after step 5 and resumed from iter_4 logs the same losses as an uninterrupted run."
    cfg = _cfg(tmp_path)
    _run([str(cfg), '--work-dir', str(tmp_path / 'a')])
    p = _run([str(cfg), '--work-dir', str(tmp_path / 'b')], env={'FT_COURSE_DEBUG_KILL': 'after_step:5'}, check=False)
    assert p.returncode != 0
    assert latest_checkpoint(tmp_path / 'b').name == 'iter_4'
    _run([str(cfg), '--work-dir', str(tmp_path / 'b'), '--resume', 'auto'])
    a, b = _losses(tmp_path / 'a'), _losses(tmp_path / 'b')
    assert len(a) == len(b) == 6
    assert a == pytest.approx(b, abs=1e-6)
    assert a[-1] < a[0]
    # the checkpoints: layout, limit, content
    ck = sorted(p.name for p in (tmp_path / 'a' / 'checkpoints').iterdir())
    assert ck == ['iter_4', 'iter_6']
    sd, state, c = read_checkpoint(tmp_path / 'a' / 'checkpoints' / 'iter_6')
    assert state['step'] == 6 and state['micro_step'] == 12 and state['lora']['r'] == 4 and c.lr == 5e-3
    assert sorted({k.split('.')[-2] for k in sd}) == ['lora_A', 'lora_B'] and 'model.layers.0.self_attn.q_proj.lora_A.weight' in sd
    for f in ('optimizer.pt', 'scheduler.pt', 'rng.pt', 'config.py'): assert (tmp_path / 'a' / 'checkpoints' / 'iter_6' / f).is_file()
    assert (tmp_path / 'a' / 'loss_curve.png').is_file() and (tmp_path / 'a' / 'eval' / 'step_6.json').is_file()

def test_kill_during_save_keeps_previous(tmp_path):
    cfg = _cfg(tmp_path)
    p = _run([str(cfg), '--work-dir', str(tmp_path / 'k')], env={'FT_COURSE_DEBUG_KILL': 'in_save:4'}, check=False)
    assert p.returncode != 0
    assert latest_checkpoint(tmp_path / 'k').name == 'iter_2'          # the half-written iter_4 is not picked
    read_checkpoint(latest_checkpoint(tmp_path / 'k'))
    _run([str(cfg), '--work-dir', str(tmp_path / 'k'), '--resume', 'auto'])
    assert len(_losses(tmp_path / 'k')) == 6

def test_deepspeed_zero2_two_processes(tmp_path):
    "ZeRO-2 on CPU, two processes through torchrun (gloo), resumable; the loss falls like the plain run's."
    cfg = _cfg(tmp_path, max_steps=4)
    _run([str(cfg), '--work-dir', str(tmp_path / 'z'), '--deepspeed', 'zero2'], env={'NPROC_PER_NODE': '2'})
    ck = latest_checkpoint(tmp_path / 'z')
    assert ck.name == 'iter_4'
    files = {p.name for p in ck.rglob('*')}
    assert {'zero_pp_rank_0_mp_rank_00_optim_states.pt', 'zero_pp_rank_1_mp_rank_00_optim_states.pt', 'trainable.safetensors'} <= files
    st = json.loads((ck / 'trainer_state.json').read_text())
    assert st['world_size'] == 2
    l = _losses(tmp_path / 'z')
    assert len(l) == 4 and l[-1] < l[0]


def test_plot_log_keeps_the_callers_backend(tmp_path):
    "Saving loss_curve.png must not switch matplotlib's backend (that would silence a notebook's inline plots)."
    import matplotlib
    from PIL import Image
    from ft_course.train import plot_log
    rows = [dict(type='train', step=i, loss=3.0 / i, lr=1e-3) for i in range(1, 6)]
    (tmp_path / 'log.jsonl').write_text('\n'.join(json.dumps(r) for r in rows) + '\n')
    before = matplotlib.get_backend()
    try:
        matplotlib.use('svg')
        out = plot_log(tmp_path)
        assert matplotlib.get_backend() == 'svg'
    finally: matplotlib.use(before)
    assert Image.open(out).format == 'PNG' and Image.open(out).size[0] > 300

def test_moved_hooks_keep_their_old_names():
    "Configs (and checkpoints' config.py) written before a hook moved still name its old place."
    from ft_course.train import _import_obj, MOVED_HOOKS
    from ft_course import llava_data
    assert _import_obj('ft_course.llava:build_dataset') is llava_data.build_dataset
    for old, new in MOVED_HOOKS.items(): assert _import_obj(old) is _import_obj(new)
    with pytest.raises(ConfigError, match='no_such_hook'): _import_obj('ft_course.llava:no_such_hook')
