"""`ft-course train` with `fast=True` (lesson 12's fast QLoRA path): same losses as the standard QLoRA path on the same
NF4 base, packed data, and a checkpoint that converts to a peft adapter giving the trained model's outputs."""
import json
from pathlib import Path
import pytest, torch
from ft_course.train import train, load_config, validate_config, ConfigError

def _cfg(tmp_path, **kw):
    data = tmp_path / 'data.jsonl'
    data.write_text(''.join(json.dumps({'messages': [{'role': 'user', 'content': f'Question {i}?'},
                                                     {'role': 'assistant', 'content': f'Answer number {i}, twice {2 * i}.'}]}) + '\n' for i in range(24)))
    d = dict(model='tiny-llama', method='qlora', quant_backend='ft_course', lora_r=4, lora_alpha=8, lora_dropout=0.0,
             lora_target_modules='all-linear', data_path=str(data), max_length=48, batch_size=4, accumulative_counts=2, max_steps=4,
             lr=5e-3, save_steps=4, evaluation_freq=100, evaluation_inputs=['Question 1?'], eval_max_new_tokens=4, seed=3, max_norm=1.0)
    d.update(kw)
    p = tmp_path / f"cfg_{abs(hash(str(sorted(d.items())))) % 10**8}.py"
    p.write_text('from ft_course.train import Config\nconfig = Config(' + ', '.join(f'{k}={v!r}' for k, v in d.items()) + ')\n')
    return p

@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread): yield

@pytest.mark.parametrize('pack', [False, True])
def test_fast_switch_trains_like_the_standard_qlora_path(tmp_path, pack):
    std = train(_cfg(tmp_path, pack_to_max_length=pack), tmp_path / 'std', progress=False)
    fast = train(_cfg(tmp_path, pack_to_max_length=pack, fast=dict(checkpoint='layer')), tmp_path / 'fast', progress=False)
    assert type(fast.model.model.layers[0].self_attn.q_proj).__name__ == 'FastLoRALinear'
    assert abs(fast.losses[0] - std.losses[0]) < 1e-4 * std.losses[0]   # step 1: B = 0, so only the NF4 base counts
    assert fast.losses[-1] < fast.losses[0]
    for a, b in zip(fast.losses, std.losses): assert abs(a - b) < 1e-4 * b, (fast.losses, std.losses)   # same LoRA init, same maths
    st = json.loads((fast.last_checkpoint / 'trainer_state.json').read_text())
    assert st['fast'] == {'checkpoint': 'layer'}

def test_fast_checkpoint_converts_to_a_peft_adapter(tmp_path):
    from peft import PeftModel
    from ft_course.convert import pth_to_hf, nf4_roundtrip_
    from ft_course.models import load_model
    cfg = _cfg(tmp_path, fast=True)
    res = train(cfg, tmp_path / 'w', progress=False)
    out = pth_to_hf(cfg, res.last_checkpoint, tmp_path / 'adapter')
    base = load_model('tiny-llama', dtype=torch.float32, device='cpu'); nf4_roundtrip_(base)
    peft_m = PeftModel.from_pretrained(base, str(out)).eval()
    x = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = res.model.eval()(input_ids=x).logits; b = peft_m(input_ids=x).logits
    assert (a - b).abs().max().item() < 1e-4 * b.abs().max().item() + 1e-5
    ans = json.loads(sorted((tmp_path / 'w' / 'eval').glob('step_*.json'))[-1].read_text())
    assert ans[0]['prompt'] == 'Question 1?' and isinstance(ans[0]['answer'], str)   # evaluation generated through the patched model

@pytest.mark.parametrize('opt,key', [('fast=dict(checkpoint="disk")', 'fast'), ('fast=dict(nosuch=1)', 'fast'),
                                     ('fast=dict(cuda_graph=True)', 'fast'), ('method="lora"', 'method'),
                                     ('lora_dropout=0.1', 'lora_dropout'), ('lora_target_modules=["q_proj"]', 'lora_target_modules')])
def test_fast_switch_validation_names_the_key(tmp_path, opt, key):
    cfg = load_config(_cfg(tmp_path, fast=True), [opt])
    with pytest.raises(ConfigError, match=f"'{key}'"): validate_config(cfg)
