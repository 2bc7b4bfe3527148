"""QLoRA learns with either 4-bit backend on the CPU: bitsandbytes' Linear4bit (as `ft_course.nf4.bnb_linear4bit` builds it)
and the course's own LinearNF4 give the same forward and input gradients, also after an evaluation pass (which on a CPU
with AVX512-BF16 used to repack bitsandbytes' weight into a layout with no backward), and train like LoRA does."""
import json
import pytest, torch
from torch import nn
from ft_course.nf4 import LinearNF4, bnb_linear4bit
from ft_course.train import train

def _eval_pass(q, d_in):
    q.eval()
    with torch.no_grad(): q(torch.randn(2, d_in))
    q.train()

def test_bnb_and_ours_agree_after_an_eval_pass():
    torch.manual_seed(0)
    lin = nn.Linear(256, 192)
    ours, theirs = LinearNF4.from_linear(lin), bnb_linear4bit(lin, torch.float32)
    x = torch.randn(5, 256, requires_grad=True)
    for _ in range(2):                      # before and after an eval pass
        y1, y2 = ours(x), theirs(x)
        torch.testing.assert_close(y2, y1, atol=1e-5, rtol=1e-5)
        g1, = torch.autograd.grad(y1.square().sum(), x)
        g2 = torch.autograd.grad(y2.square().sum(), x, allow_unused=True)[0]
        assert g2 is not None, "bitsandbytes' layer passed no gradient to its input"
        torch.testing.assert_close(g2, g1, atol=1e-4, rtol=1e-4)
        _eval_pass(theirs, 256); _eval_pass(ours, 256)

def _data(tmp_path, n=32):
    p = tmp_path / 'data.jsonl'
    p.write_text(''.join(json.dumps({'messages': [{'role': 'user', 'content': f'Who made item {i}?'},
                                                  {'role': 'assistant', 'content': 'It was made by the Zorblax company.'}]}) + '\n'
                         for i in range(n)))
    return p

def _losses(tmp_path, name, **kw):
    opts = dict(model='tiny-llama', lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_target_modules='all-linear',
                data_path=str(_data(tmp_path)), max_length=32, batch_size=4, max_steps=12, lr=1e-2, save_steps=100,
                evaluation_freq=100, evaluation_inputs=['Who made item 1?'], eval_max_new_tokens=3, seed=0, **kw)
    r = train('smollm2_135m_qlora_selfcog_e3', tmp_path / name, cfg_options=[f'{k}={v!r}' for k, v in opts.items()], progress=False)
    return r.losses

def test_each_backend_learns_like_lora(tmp_path):
    lora = _losses(tmp_path, 'lora', method='lora')
    drop = lora[0] - min(lora[-3:])
    assert drop > 1.0, lora
    for backend in ('bnb', 'ft_course'):
        q = _losses(tmp_path, backend, method='qlora', quant_backend=backend)
        assert q[0] - min(q[-3:]) > 0.7 * drop, (backend, q, lora)
