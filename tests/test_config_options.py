"Tests of what `--cfg-options` and config files turn into: mmengine-style values, type checks, did-you-mean, and where generated data goes."
import json
from pathlib import Path
import pytest
from ft_course.config import Config, ConfigError, load_config, validate_config
from ft_course.train import prepare_data, train_cli

SELFCOG, CORPUS = 'smollm2_135m_qlora_selfcog_e3', 'smollm2_135m_full_pretrain_e1'

def _opt(*opts, name=SELFCOG): return load_config(name, list(opts))

def _tiny(tmp_path):
    "A config that trains in a second (tiny-llama, one step) on generated data, for the command-line tests."
    p = tmp_path / 'tiny.py'
    p.write_text("from ft_course.train import Config\nconfig = Config(model='tiny-llama', method='lora', lora_r=2, lora_target_modules=['q_proj'], "
                 "data_generator=dict(kind='fictional_corpus', n=4, seed=0), max_length=32, batch_size=1, accumulative_counts=1, "
                 "max_steps=1, evaluation_inputs=[])\n")
    return str(p)

# --- values are read as mmengine's DictAction reads them ---

@pytest.mark.parametrize('raw,want', [('false', False), ('False', False), ('FALSE', False), ('true', True), ('True', True), ('0', None)])
def test_booleans(raw, want):
    if want is None:   # a number is no boolean
        with pytest.raises(ConfigError, match="pack_to_max_length must be true or false"): _opt(f'pack_to_max_length={raw}')
    else: assert _opt(f'pack_to_max_length={raw}').pack_to_max_length is want

def test_none_any_case():
    assert _opt('model_builder=none').model_builder is None and _opt('max_norm=None').max_norm is None
    assert _opt('max_steps=NONE').max_steps is None

def test_numbers():
    c = _opt('lr=1e-4', 'max_steps=1_000', 'weight_decay=0', 'lora_alpha=32')
    assert (c.lr, c.max_steps, c.weight_decay, c.lora_alpha) == (1e-4, 1000, 0.0, 32.0)
    assert type(c.weight_decay) is float and type(c.max_steps) is int

@pytest.mark.parametrize('raw', ['[q_proj,v_proj]', '[q_proj, v_proj]', 'q_proj,v_proj', "['q_proj', 'v_proj']", '["q_proj","v_proj"]'])
def test_lists(raw):
    assert _opt(f'lora_target_modules={raw}').lora_target_modules == ['q_proj', 'v_proj']

def test_tuples_nested_and_quoted():
    assert _opt('betas=(0.8,0.9)').betas == (0.8, 0.9)
    assert _opt('betas=[0.8, 0.9]').betas == (0.8, 0.9)          # a list given to a tuple field becomes a tuple
    assert _opt('evaluation_inputs=[Who are you?, "Hi, you"]').evaluation_inputs == ['Who are you?', 'Hi, you']
    assert _opt('evaluation_inputs=[]').evaluation_inputs == []
    assert _opt("evaluation_inputs=[What's up?, it's me]").evaluation_inputs == ["What's up?", "it's me"]   # an apostrophe is no quote
    g = _opt('data_generator={"kind": "self_cognition", "n": [[1, 2], [3, true]]}').data_generator
    assert g == {'kind': 'self_cognition', 'n': [[1, 2], [3, True]]}
    assert _opt("data_generator={'kind': 'self_cognition', 'n': (1, [2, 3])}").data_generator['n'] == (1, [2, 3])

def test_text_fields_take_text_as_typed():
    c = _opt('system=You are Ada, a helper.', 'prompt_template=llama3', 'model=HuggingFaceTB/SmolLM2-135M', 'system=none')
    assert (c.prompt_template, c.model, c.system) == ('llama3', 'HuggingFaceTB/SmolLM2-135M', None)
    assert _opt('system=You are Ada, a helper.').system == 'You are Ada, a helper.'
    assert _opt('system="  padded "').system == '  padded '

def test_dotted_key_sets_inside_a_dict():
    c = _opt('data_generator.n=24', 'data_generator.lang=both')
    assert c.data_generator['n'] == 24 and c.data_generator['lang'] == 'both' and c.data_generator['kind'] == 'self_cognition'
    assert load_config(SELFCOG).data_generator['n'] == 240
    with pytest.raises(ConfigError, match='not a dict'): _opt('model_builder.x=1')

def test_unbalanced_is_an_error():
    with pytest.raises(ConfigError, match=r'lora_target_modules=\[q_proj.*unbalanced'): _opt('lora_target_modules=[q_proj')

# --- every field against its annotation ---

@pytest.mark.parametrize('opt,expected', [('seed=abc', 'an integer'), ('seed=1.5', 'an integer'), ('lr=fast', 'a number'),
                                          ('lora_target_modules=5', 'a string or a list'), ('max_steps=2.5', 'an integer or None'),
                                          ('pack_to_max_length=maybe', 'true or false'), ('data_generator=5', 'a dict or None'),
                                          ('eval_max_new_tokens=abc', 'an integer'), ('betas=0.9', 'a list or tuple')])
def test_wrong_type_names_key_value_type(opt, expected):
    k, v = opt.split('=')
    with pytest.raises(ConfigError) as e: _opt(opt)
    msg = str(e.value)
    assert '\n' not in msg and f'{k} must be {expected}' in msg and v in msg, msg

def test_wrong_type_in_a_config_file(tmp_path):
    p = tmp_path / 'cfg.py'; p.write_text("from ft_course.train import Config\nconfig = Config(seed='abc', data_path=None)\n")
    with pytest.raises(ConfigError, match=r"cfg.py: key 'seed' = 'abc': expected an integer, got str"): load_config(p)
    with pytest.raises(ConfigError, match=r"key 'max_length' = '64': expected an integer"): validate_config(Config(max_length='64'))
    assert load_config(Config(lr=1, data_path=None)).lr == 1          # an int fits a float field

def test_cli_wrong_type_one_line(tmp_path, capsys):
    assert train_cli([_tiny(tmp_path), '--work-dir', str(tmp_path / 'w'), '--cfg-options', 'seed=abc', '--no-progress']) == 2
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0 and 'seed' in err and 'abc' in err and 'an integer' in err, err
    assert not (tmp_path / 'w' / 'data').exists()

# --- unknown keys: did you mean ---

@pytest.mark.parametrize('key,meant', [('lora_rank', 'lora_r'), ('learning_rate', 'lr'), ('epochs', 'max_epochs'), ('bs', 'batch_size'),
                                       ('batch', 'batch_size'), ('grad_accum', 'accumulative_counts'),
                                       ('gradient_accumulation_steps', 'accumulative_counts'), ('max_seq_len', 'max_length'),
                                       ('max_seq_length', 'max_length'), ('template', 'prompt_template'), ('lora_alhpa', 'lora_alpha'),
                                       ('warmup_ration', 'warmup_ratio')])
def test_did_you_mean_in_options(key, meant):
    with pytest.raises(ConfigError, match=f"unknown key '{key}' \\(did you mean '{meant}'"): _opt(f'{key}=1')

def test_did_you_mean_in_a_config_file(tmp_path):
    p = tmp_path / 'cfg.py'
    p.write_text("from ft_course.train import Config\n\nconfig = Config(model='tiny-llama',\n                learning_rate=1e-4)\n")
    with pytest.raises(ConfigError) as e: load_config(p)
    msg = str(e.value)
    assert 'cfg.py, line 4' in msg and "unknown key 'learning_rate'" in msg and "did you mean 'lr'" in msg and 'TypeError' not in msg, msg

# --- data_path and the data generator ---

def test_data_path_typo_with_a_generator_is_an_error(tmp_path):
    typo = tmp_path / 'some' / 'typo.jsonl'
    for name in (SELFCOG, CORPUS):
        with pytest.raises(ConfigError, match=f"'data_path' = '{typo}'.*no such file"): validate_config(_opt(f'data_path={typo}', name=name))
    with pytest.raises(ConfigError, match='no such file'):   # prepare_data itself never writes to a user's path
        prepare_data(_opt(f'data_path={typo}', name=CORPUS), tmp_path / 'w', None, None)
    assert not typo.exists() and not typo.parent.exists()

def test_cli_data_path_typo(tmp_path, capsys):
    typo = tmp_path / 'typo.jsonl'
    assert train_cli([_tiny(tmp_path), '--work-dir', str(tmp_path / 'w'), '--cfg-options', f'data_path={typo}', '--no-progress']) == 2
    assert str(typo) in capsys.readouterr().err and not typo.exists()

def test_given_data_path_is_used_as_is(tmp_path):
    f = tmp_path / 'mine.jsonl'; f.write_text('{"text": "my own document"}\n')
    c = prepare_data(_opt(f'data_path={f}', name=CORPUS), tmp_path / 'w', None, None)
    assert c.data_path == str(f) and f.read_text() == '{"text": "my own document"}\n' and not (tmp_path / 'w' / 'data').exists()

def _corpus(wd, n, seed=0):
    c = prepare_data(_opt(f"data_generator={{'kind': 'fictional_corpus', 'n': {n}, 'seed': {seed}}}", name=CORPUS), wd, None, None)
    p = Path(c.data_path)
    return p, p.read_text().splitlines()

def test_generated_data_goes_to_work_dir_and_regenerates_on_change(tmp_path):
    wd = tmp_path / 'w'
    p, lines = _corpus(wd, 8)
    assert p == wd / 'data' / 'train.jsonl' and len(lines) == 8
    meta = json.loads((wd / 'data' / 'train.jsonl.meta.json').read_text())
    assert meta['settings']['data_generator'] == {'kind': 'fictional_corpus', 'n': 8, 'seed': 0} and len(meta['hash']) == 64
    t0 = p.stat().st_mtime_ns
    assert _corpus(wd, 8)[1] == lines and p.stat().st_mtime_ns == t0              # same settings: reused
    assert len(_corpus(wd, 12)[1]) == 12                                          # changed n: regenerated
    assert _corpus(wd, 12, seed=1)[1] != _corpus(tmp_path / 'other', 12, seed=0)[1]   # changed seed: regenerated
    msgs = [json.loads(l).get('msg', '') for l in (wd / 'log.jsonl').read_text().splitlines()]
    assert any('regenerating' in m and "data_generator['n'] 8 -> 12" in m for m in msgs), msgs

def test_edited_or_unrecorded_data_is_regenerated(tmp_path):
    wd = tmp_path / 'w'
    p, lines = _corpus(wd, 8)
    p.write_text(lines[0] + '\n')                                                 # edited by hand
    assert _corpus(wd, 8)[1] == lines
    (wd / 'data' / 'train.jsonl.meta.json').unlink()                              # data from before the record existed
    p.write_text(lines[0] + '\n')
    assert _corpus(wd, 8)[1] == lines

def test_replay_settings_include_the_model():
    from ft_course.config import generator_settings
    a, b = generator_settings(_opt()), generator_settings(_opt('model=tiny-llama'))
    assert a != b and a['data_generator'] == b['data_generator']                   # replayed answers come from the model
    assert generator_settings(_opt(name=CORPUS)) == generator_settings(_opt('model=tiny-llama', name=CORPUS))

@pytest.mark.parametrize('opt, bad, meant', [('data_generator.nn=3', 'nn', 'n'), ('data_generator.autor=X', 'autor', 'author')])
def test_unknown_generator_key_names_it_before_any_work(opt, bad, meant):
    "A misspelled key inside data_generator is refused by validate_config (it used to reach the generator as a TypeError)."
    cfg = load_config('smollm2_135m_qlora_selfcog_e3', [opt])
    with pytest.raises(ConfigError, match=f"no key '{bad}' for kind 'self_cognition' \\(did you mean '{meant}'\\?\\)"): validate_config(cfg)
    validate_config(load_config('smollm2_135m_qlora_selfcog_e3', [opt.replace(bad, meant)]))   # the right key passes

def test_cli_unknown_generator_key_one_line(tmp_path, capsys):
    assert train_cli(['smollm2_135m_qlora_selfcog_e3', '--work-dir', str(tmp_path / 'w'), '--cfg-options', 'data_generator.nn=3', '--no-progress']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no key 'nn'" in err[0] and 'Traceback' not in err[0]
    assert not (tmp_path / 'w').exists()

def test_python_m_cli_runs_the_command():
    "`python -m ft_course.cli list-cfg` runs the command (it used to exit 0 having done nothing)."
    import subprocess, sys
    out = subprocess.run([sys.executable, '-m', 'ft_course.cli', 'list-cfg'], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and 'smollm2_135m_qlora_selfcog_e3' in out.stdout, out

def test_generator_key_table_matches_the_generators():
    "DATA_GENERATOR_KEYS (config, below the trainer) lists exactly what each data generator accepts."
    import inspect
    from ft_course.config import DATA_GENERATOR_KEYS
    from ft_course.train import DATA_GENERATORS, gen_self_cognition
    from ft_course.selfcog import make_fictional_corpus
    params = lambda f, drop: {p for p in inspect.signature(f).parameters if p not in drop}
    assert set(DATA_GENERATOR_KEYS) == set(DATA_GENERATORS)
    assert set(DATA_GENERATOR_KEYS['self_cognition']) == params(gen_self_cognition, {'cfg', 'out', 'model', 'tokenizer', 'kw'}) | {'kind', 'replay_tokens'}
    assert set(DATA_GENERATOR_KEYS['fictional_corpus']) == params(make_fictional_corpus, {'out'}) | {'kind'}


def test_pack_strategy_checked_before_any_work(tmp_path, capsys):
    assert _opt('pack_strategy=best_fit').pack_strategy == 'best_fit'
    with pytest.raises(ConfigError, match="pack_strategy.*'greedy' or 'best_fit'"): validate_config(_opt('pack_strategy=first_fit'))
    assert train_cli([_tiny(tmp_path), '--work-dir', str(tmp_path / 'w'), '--cfg-options', 'pack_strategy=tight', '--no-progress']) == 2
    assert not (tmp_path / 'w').exists()
