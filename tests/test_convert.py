"""ft_course.convert: checkpoint -> peft adapter, merge, refusals, mismatch messages (tiny random Llama: fast, CPU)."""
import json
from pathlib import Path
import pytest
from conftest import tiny_lora_checkpoint

torch = pytest.importorskip('torch')
from safetensors.torch import save_file
from ft_course.models import load_model, tiny_model_dir
from ft_course.convert import pth_to_hf, merge, convert_cli, CheckpointMismatch, fold_lora, read_adapter, template_to_jinja


pytestmark = pytest.mark.usefixtures('one_torch_thread')   # see conftest.py


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    "A peft LoRA model with non-zero B on the tiny Llama, and a checkpoint folder in ft_course.train's format."
    root = tmp_path_factory.mktemp('convert')
    ck = root / 'work' / 'checkpoints' / 'iter_10'
    name, pm, cfg = tiny_lora_checkpoint(ck, 'tiny_test')
    (ck / 'trainer_state.json').write_text(json.dumps(dict(step=10, model=name, method='lora',
        lora=dict(r=4, alpha=8, dropout=0.0, target_modules=['q_proj', 'v_proj']), prompt_template='chatml')))
    x = torch.randint(0, 1000, (2, 16))
    with torch.no_grad(): ref = pm(x).logits
    return dict(root=root, name=name, ck=ck, cfg=cfg, x=x, ref=ref)


@pytest.fixture(scope='module')
def adapter(setup):
    return pth_to_hf(setup['ck'] / 'config.py', setup['ck'], setup['root'] / 'hf_adapter')


def test_peft_loads_converted_adapter(setup, adapter):
    from peft import PeftModel
    for f in ('adapter_config.json', 'adapter_model.safetensors', 'tokenizer_config.json', 'chat_template.jinja', 'ft_course_template.json'):
        assert (adapter / f).exists(), f
    pm = PeftModel.from_pretrained(load_model(setup['name'], device='cpu'), str(adapter)).eval()
    with torch.no_grad(): got = pm(setup['x']).logits
    torch.testing.assert_close(got, setup['ref'], rtol=0, atol=1e-5)
    cfg = json.loads((adapter / 'adapter_config.json').read_text())
    assert cfg['r'] == 4 and cfg['lora_alpha'] == 8 and sorted(cfg['target_modules']) == ['q_proj', 'v_proj']


def test_saved_chat_template_is_the_training_one(adapter):
    from transformers import AutoTokenizer
    from ft_course.data import render_chat
    tok = AutoTokenizer.from_pretrained(str(adapter))
    msgs = [{'role': 'system', 'content': 'be brief'}, {'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'yo'},
            {'role': 'user', 'content': 'again'}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == render_chat(msgs, 'chatml', add_generation_prompt=True)
    assert '<|im_end|>' in json.loads((adapter / 'ft_course_template.json').read_text())['stop_words']


def test_merge_equals_base_plus_adapter_and_loads_plainly(setup, adapter):
    from transformers import AutoModelForCausalLM
    out = merge(setup['name'], adapter, setup['root'] / 'merged', dtype='fp32', max_shard_size='100KB')
    assert len(list(out.glob('model-*.safetensors'))) > 1 and (out / 'model.safetensors.index.json').exists()
    assert (out / 'tokenizer_config.json').exists() and (out / 'chat_template.jinja').exists()
    assert 'quantization_config' not in json.loads((out / 'config.json').read_text())
    m = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad(): got = m(setup['x']).logits
    torch.testing.assert_close(got, setup['ref'], rtol=0, atol=1e-4)
    # and equal to peft's own merge
    from peft import PeftModel
    pm = PeftModel.from_pretrained(load_model(setup['name'], device='cpu'), str(adapter)).merge_and_unload()
    for k, v in pm.state_dict().items(): torch.testing.assert_close(m.state_dict()[k], v, rtol=0, atol=1e-6)


def test_merge_bf16_dtype(setup, adapter):
    from transformers import AutoModelForCausalLM
    out = merge(None, adapter, setup['root'] / 'merged_bf16', dtype='bf16')   # base taken from the adapter's config
    m = AutoModelForCausalLM.from_pretrained(str(out))
    assert next(m.parameters()).dtype == torch.bfloat16


def test_refuses_to_overwrite(setup, adapter, tmp_path):
    out = tmp_path / 'exists'; out.mkdir(); (out / 'keep.txt').write_text('mine')
    with pytest.raises(FileExistsError, match='--force'): merge(setup['name'], adapter, out)
    with pytest.raises(FileExistsError, match='--force'): pth_to_hf(setup['ck'] / 'config.py', setup['ck'], out)
    assert convert_cli(['merge', setup['name'], str(adapter), str(out)]) == 2
    assert (out / 'keep.txt').read_text() == 'mine'
    merge(setup['name'], adapter, out, dtype='fp32', force=True)
    assert not (out / 'keep.txt').exists() and (out / 'config.json').exists()
    assert not any(p.name.startswith('.') for p in out.parent.iterdir()), 'temp folder left behind'


def test_mismatched_checkpoint_message(setup, tmp_path):
    from dataclasses import replace
    bad = replace(setup['cfg'], lora_r=8, lora_target_modules=['q_proj', 'k_proj', 'v_proj'])
    with pytest.raises(CheckpointMismatch) as e: pth_to_hf(bad, setup['ck'], tmp_path / 'a')
    msg = str(e.value)
    assert 'r=8' in msg and 'r=[4]' in msg and "'k_proj'" in msg
    other = replace(setup['cfg'], model=str(tiny_model_dir('qwen2')))
    with pytest.raises(CheckpointMismatch, match='model'): pth_to_hf(other, setup['ck'], tmp_path / 'b')
    # a model of another width: the LoRA shapes do not fit
    wide = tmp_path / 'wide'
    m = load_model(setup['name'], device='cpu')
    from ft_course.models import tiny_model, load_tokenizer
    tiny_model('llama', hidden_size=96, num_attention_heads=4, num_key_value_heads=2).save_pretrained(wide)
    load_tokenizer('smollm2').save_pretrained(wide)
    st = json.loads((setup['ck'] / 'trainer_state.json').read_text()); st['model'] = str(wide)
    ck2 = tmp_path / 'ck2'; ck2.mkdir()
    import shutil; shutil.copy(setup['ck'] / 'trainable.safetensors', ck2); (ck2 / 'trainer_state.json').write_text(json.dumps(st))
    with pytest.raises(CheckpointMismatch, match='shapes do not fit'): pth_to_hf(replace(setup['cfg'], model=str(wide)), ck2, tmp_path / 'c')
    assert not (tmp_path / 'a').exists() and not (tmp_path / 'c').exists()
    assert convert_cli(['pth_to_hf', str(tmp_path / 'nope.py'), str(setup['ck']), str(tmp_path / 'd')]) == 2


def test_never_folds_into_4bit(setup, adapter):
    bnb = pytest.importorskip('bitsandbytes')
    m = load_model(setup['name'], device='cpu')
    lin = m.model.layers[0].self_attn.q_proj
    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, quant_type='nf4')
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type='nf4')
    m.model.layers[0].self_attn.q_proj = q
    cfg, lora = read_adapter(adapter)
    with pytest.raises(TypeError, match='4-bit'): fold_lora(m, cfg, lora)


def test_merge_auto_uses_the_nf4_base_for_qlora(setup, tmp_path):
    "A QLoRA adapter is merged into dequant(NF4(W0)), the weights it was trained against (checked against bitsandbytes)."
    import shutil
    from dataclasses import replace
    from transformers import AutoModelForCausalLM
    from ft_course.train import config_source
    bnbF = pytest.importorskip('bitsandbytes.functional')
    ck = tmp_path / 'iter_1'; shutil.copytree(setup['ck'], ck)
    (ck / 'config.py').write_text(config_source(replace(setup['cfg'], method='qlora')))
    st = json.loads((ck / 'trainer_state.json').read_text()); st['method'] = 'qlora'; (ck / 'trainer_state.json').write_text(json.dumps(st))
    ad = pth_to_hf(ck / 'config.py', ck, tmp_path / 'ad')
    sd = lambda p: AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32).state_dict()
    auto = sd(merge(setup['name'], ad, tmp_path / 'auto', dtype='fp32'))
    orig = sd(merge(setup['name'], ad, tmp_path / 'orig', dtype='fp32', base_weights='original'))
    k = 'model.layers.0.mlp.up_proj.weight'                # not adapted: just the base, rounded through NF4 or not
    w0 = load_model(setup['name'], device='cpu').state_dict()[k]
    torch.testing.assert_close(orig[k], w0, rtol=0, atol=0)
    ref = bnbF.dequantize_4bit(*bnbF.quantize_4bit(w0.clone(), quant_type='nf4', blocksize=64, compress_statistics=True))
    torch.testing.assert_close(auto[k], ref.reshape(w0.shape), rtol=0, atol=0)
    assert not torch.equal(auto[k], orig[k])


def test_given_config_is_the_only_one_run(setup, tmp_path):
    "pth_to_hf CFG CKPT must not execute CKPT/config.py (it is Python) when CFG is given."
    import shutil
    ck = tmp_path / 'iter_10'; shutil.copytree(setup['ck'], ck)
    flag = tmp_path / 'ran'
    (ck / 'config.py').write_text(f"open({str(flag)!r}, 'w').write('x')\n" + (setup['ck'] / 'config.py').read_text())
    pth_to_hf(setup['ck'] / 'config.py', ck, tmp_path / 'ad')
    assert not flag.exists()


def test_corrupt_checkpoint_and_out_inside_input_are_one_line(setup, adapter, tmp_path):
    import shutil, contextlib, io
    ck = tmp_path / 'iter_10'; shutil.copytree(setup['ck'], ck)
    (ck / 'trainable.safetensors').write_bytes(b'\x00' * 64)
    cases = [['pth_to_hf', str(setup['ck'] / 'config.py'), str(ck), str(tmp_path / 'ad')],
             ['pth_to_hf', str(setup['ck'] / 'config.py'), str(setup['ck']), str(setup['ck'] / 'out'), '--force'],
             ['merge', setup['name'], str(adapter), str(adapter), '--force'],
             ['merge', setup['name'], str(adapter), str(adapter / 'sub'), '--force']]
    for argv in cases:
        err = io.StringIO()
        with contextlib.redirect_stderr(err): rc = convert_cli(argv)
        assert rc == 2 and len(err.getvalue().strip().splitlines()) == 1, (argv, err.getvalue())
    assert (adapter / 'adapter_model.safetensors').exists() and not (adapter / 'sub').exists()


def test_merge_force_replaces_atomically_and_cleans_stale_temp(setup, adapter, tmp_path):
    "A killed merge's .OUT.tmp-PID is removed by the next run; --force renames the old aside, the new in, then deletes the old."
    import subprocess
    dead = subprocess.Popen(['true']); dead.wait()
    out = tmp_path / 'merged'
    merge(setup['name'], adapter, out, dtype='fp32')
    stale = tmp_path / f'.merged.tmp-{dead.pid}'; stale.mkdir(); (stale / 'model.safetensors').write_bytes(b'half')
    merge(setup['name'], adapter, out, dtype='fp32', force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['merged']
    assert (out / 'config.json').exists()
