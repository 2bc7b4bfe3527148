"Tests for ft_course.lora: round trips with peft (both directions) and merge equality, on tiny random models and SmolLM2."
import copy, json, math
import pytest
import torch
from torch import nn

peft = pytest.importorskip('peft')
from ft_course.lora import (LoRALinear, add_lora, lora_layers, merge_lora, lora_state_dict, save_adapter, load_adapter,
                            read_adapter_config, find_targets, lora_budget, meta_model)
from ft_course.models import tiny_model, load_model, shape_config


def _randomize(model, seed=0):
    "Give every adapter a non-zero B so it changes the output (B=0 would make every comparison trivial)."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, l in lora_layers(model): l.lora_B.weight.copy_(torch.randn(l.lora_B.weight.shape, generator=g) * 0.05)
    return model


def _logits(model, x):
    with torch.no_grad(): return model(input_ids=x).logits


@pytest.fixture(scope='module')
def ids():
    return torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- tiny random models
@pytest.mark.parametrize('arch', ['llama', 'qwen2'])
@pytest.mark.parametrize('targets', [('q_proj', 'v_proj'), 'all-linear'])
def test_tiny_ours_to_peft(tmp_path, ids, arch, targets):
    base = tiny_model(arch)
    ref = _logits(base, ids)
    ours = add_lora(copy.deepcopy(base), r=4, alpha=8, dropout=0.1, target_modules=targets).eval()
    torch.testing.assert_close(_logits(ours, ids), ref, rtol=0, atol=0)   # exact no-op at start
    _randomize(ours)
    out = _logits(ours, ids)
    assert (out - ref).abs().max() > 1e-3
    save_adapter(ours, tmp_path / 'a', base_model_name_or_path='tiny')
    cfg = json.loads((tmp_path / 'a' / 'adapter_config.json').read_text())
    for k, v in dict(peft_type='LORA', r=4, lora_alpha=8, lora_dropout=0.1, task_type='CAUSAL_LM', bias='none',
                     base_model_name_or_path='tiny').items():
        assert cfg[k] == v, k
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / 'a').eval()
    assert sorted(pm.peft_config['default'].target_modules) == sorted(cfg['target_modules'])
    torch.testing.assert_close(_logits(pm, ids), out, rtol=1e-5, atol=1e-5)
    assert sorted(peft.get_peft_model_state_dict(pm)) == sorted(lora_state_dict(ours))
    # and peft's merge gives the same weights as ours
    ours_merged = merge_lora(copy.deepcopy(ours)).state_dict()
    peft_merged = pm.merge_and_unload().state_dict()
    assert sorted(ours_merged) == sorted(peft_merged)
    for k in ours_merged: torch.testing.assert_close(ours_merged[k], peft_merged[k], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('arch', ['llama', 'qwen2'])
@pytest.mark.parametrize('rslora', [False, True])
def test_tiny_peft_to_ours(tmp_path, ids, arch, rslora):
    base = tiny_model(arch)
    torch.manual_seed(1)
    pcfg = peft.LoraConfig(r=3, lora_alpha=7, target_modules=['k_proj', 'o_proj', 'down_proj'], use_rslora=rslora,
                           init_lora_weights=False, task_type='CAUSAL_LM')
    pm = peft.get_peft_model(copy.deepcopy(base), pcfg).eval()
    ref = _logits(pm, ids)
    pm.save_pretrained(tmp_path / 'p')
    ours = load_adapter(copy.deepcopy(base), tmp_path / 'p').eval()
    names = [n for n, _ in lora_layers(ours)]
    assert len(names) == 3 * 2 and all(n.split('.')[-1] in ('k_proj', 'o_proj', 'down_proj') for n in names)
    l = dict(lora_layers(ours))[names[0]]
    assert l.scaling == pytest.approx(7 / math.sqrt(3) if rslora else 7 / 3)
    torch.testing.assert_close(_logits(ours, ids), ref, rtol=1e-5, atol=1e-5)
    # only the adapters train
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
           {f'{n}.lora_{ab}.weight' for n in names for ab in 'AB'}
    # loading into a model that already has (matching) adapters replaces their weights
    again = add_lora(copy.deepcopy(base), r=3, alpha=7, use_rslora=rslora, target_modules=['k_proj', 'o_proj', 'down_proj'])
    torch.testing.assert_close(_logits(load_adapter(again, tmp_path / 'p').eval(), ids), ref, rtol=1e-5, atol=1e-5)
    # read back the config
    rc = read_adapter_config(tmp_path / 'p')
    assert (rc.r, rc.lora_alpha, rc.use_rslora, rc.target_modules) == (3, 7, rslora, ['down_proj', 'k_proj', 'o_proj'])
    # ours -> save -> peft again gives the same logits (the full circle)
    save_adapter(ours, tmp_path / 'o')
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / 'o').eval()
    torch.testing.assert_close(_logits(pm2, ids), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('arch', ['llama', 'qwen2'])
def test_tiny_merge(ids, arch):
    base = tiny_model(arch)
    m = _randomize(add_lora(copy.deepcopy(base), r=8, alpha=16, target_modules='all-linear')).eval()
    out = _logits(m, ids)
    merged = merge_lora(copy.deepcopy(m))
    assert not list(lora_layers(merged))
    assert [type(x) for x in merged.modules()] == [type(x) for x in base.modules()]
    torch.testing.assert_close(_logits(merged, ids), out, rtol=1e-4, atol=1e-4)
    # by hand: W0 + (alpha/r) B A
    l = m.model.layers[0].mlp.up_proj
    torch.testing.assert_close(merged.model.layers[0].mlp.up_proj.weight,
                               base.model.layers[0].mlp.up_proj.weight + 2.0 * l.lora_B.weight @ l.lora_A.weight)
    # merge/unmerge on a layer is reversible
    w = l.base.weight.detach().clone(); l.merge(); assert l.merged; l.unmerge()
    torch.testing.assert_close(l.base.weight.detach(), w, rtol=0, atol=1e-6)


def test_mixed_ranks_round_trip(tmp_path, ids):
    "Layers with different r/alpha are written as peft's rank_pattern/alpha_pattern, and peft reads them."
    base = tiny_model()
    m = add_lora(copy.deepcopy(base), r=4, alpha=8, target_modules=['q_proj'])
    m = _randomize(add_lora(m, r=2, alpha=6, target_modules=['v_proj'])).eval()
    save_adapter(m, tmp_path / 'mix')
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / 'mix').eval()
    torch.testing.assert_close(_logits(pm, ids), _logits(m, ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(load_adapter(copy.deepcopy(base), tmp_path / 'mix').eval(), ids), _logits(m, ids))


def test_save_is_atomic_and_overwrites(tmp_path):
    m = _randomize(add_lora(tiny_model(), r=2))
    save_adapter(m, tmp_path / 'a')
    (tmp_path / 'a' / 'stale.txt').write_text('old')
    save_adapter(m, tmp_path / 'a')
    assert sorted(p.name for p in (tmp_path / 'a').iterdir()) == ['adapter_config.json', 'adapter_model.safetensors']
    assert [p.name for p in tmp_path.iterdir()] == ['a']   # no temp folders left behind


def test_errors(tmp_path):
    base = tiny_model()
    with pytest.raises(ValueError, match='matched no linear layer'): add_lora(copy.deepcopy(base), target_modules=['wq'])
    with pytest.raises(ValueError, match='positive integer'): add_lora(copy.deepcopy(base), r=0)
    with pytest.raises(ValueError, match='positive integer'): LoRALinear(nn.Linear(4, 4), r=-1, alpha=1)
    save_adapter(_randomize(add_lora(copy.deepcopy(base), r=4)), tmp_path / 'a')
    # a model of another width: the message names the module and both shapes
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj.*lora_A \(4, 64\).*needs lora_A \(4, 32\)"):
        load_adapter(tiny_model(hidden_size=32, intermediate_size=64), tmp_path / 'a')
    # a model that lacks the modules
    with pytest.raises(ValueError, match='does not have'): load_adapter(tiny_model(num_hidden_layers=1), tmp_path / 'a')
    # existing adapters of another rank
    with pytest.raises(ValueError, match='needs lora_A'): load_adapter(add_lora(copy.deepcopy(base), r=2), tmp_path / 'a')
    with pytest.raises(FileNotFoundError, match='adapter_config.json'): read_adapter_config(tmp_path)
    bad = tmp_path / 'bad'; bad.mkdir(); (bad / 'adapter_config.json').write_text('{"peft_type": "IA3", "r": 1, "lora_alpha": 1}')
    with pytest.raises(ValueError, match="peft_type"): read_adapter_config(bad)
    with pytest.raises(ValueError, match='no LoRA layers'): save_adapter(base, tmp_path / 'none')


def test_targets():
    base = tiny_model()
    allin = find_targets(base, 'all-linear')
    assert len(allin) == 2 * 7 and not any('lm_head' in n for n in allin)
    assert find_targets(base, r'.*layers\.1\..*_proj') == [n for n in allin if '.1.' in n]
    class Attn(nn.Module):
        def __init__(self): super().__init__(); self.wqkv, self.wo = nn.Linear(8, 24), nn.Linear(8, 8)
    class FFN(nn.Module):
        def __init__(self): super().__init__(); self.w1, self.w3, self.w2 = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
    class Layer(nn.Module):
        def __init__(self): super().__init__(); self.attention, self.feed_forward = Attn(), FFN()
    class InternLM2ish(nn.Module):
        def __init__(self): super().__init__(); self.layers, self.output = nn.ModuleList([Layer()]), nn.Linear(8, 50)
    m = InternLM2ish()
    assert find_targets(m) == ['layers.0.attention.wqkv']
    assert find_targets(m, 'all-linear') == ['layers.0.attention.wqkv', 'layers.0.attention.wo', 'layers.0.feed_forward.w1',
                                             'layers.0.feed_forward.w3', 'layers.0.feed_forward.w2']
    assert find_targets(m, ['wo', 'down_proj']) == ['layers.0.attention.wo', 'layers.0.feed_forward.w2']


def test_budget_matches_add_lora_and_peft():
    m = meta_model(shape_config('llama2-7b'))
    assert lora_budget(m, r=8)['lora'] == 4_194_304                   # peft's print_trainable_parameters for Llama-2-7B q,v r=8
    tiny = tiny_model()
    for targets in [('q_proj', 'v_proj'), 'all-linear']:
        b = lora_budget(tiny, r=4, target_modules=targets)
        pm = peft.get_peft_model(copy.deepcopy(tiny), peft.LoraConfig(r=4, target_modules=targets))
        n_peft = sum(p.numel() for p in pm.parameters() if p.requires_grad)
        n_ours = sum(p.numel() for p in add_lora(copy.deepcopy(tiny), r=4, target_modules=targets).parameters() if p.requires_grad)
        assert b['lora'] == n_peft == n_ours


def test_quantized_bases():
    "LoRA on a 4-bit base (ft_course's LinearNF4 and bitsandbytes' Linear4bit): trains, keeps the input dtype, refuses to merge."
    bases = []
    try:
        from ft_course.nf4 import LinearNF4
        bases.append(LinearNF4.from_linear(nn.Linear(64, 32)))
    except ImportError: pass
    try:
        import bitsandbytes as bnb
        q = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type='nf4')
        q.weight = bnb.nn.Params4bit(nn.Linear(64, 32).weight.data.clone(), requires_grad=False, quant_type='nf4')
        bases.append(q.to('cpu'))
    except Exception: pass
    if not bases: pytest.skip('no 4-bit layer available')
    for q in bases:
        l = LoRALinear(q, r=4, alpha=8)
        x = torch.randn(3, 64)
        with torch.no_grad(): torch.testing.assert_close(l(x), q(x), rtol=0, atol=0)
        l(x).sum().backward()
        assert l.lora_B.weight.grad is not None and l.lora_B.weight.grad.abs().sum() > 0
        with torch.no_grad():
            l.lora_B.weight.normal_()
            torch.testing.assert_close(l(x) - q(x), 2.0 * x @ l.lora_A.weight.T @ l.lora_B.weight.T, rtol=1e-4, atol=1e-4)
        assert l(x.bfloat16()).dtype == torch.bfloat16
        with pytest.raises(RuntimeError, match='full-precision copy'): l.merge()


# ---------------------------------------------------------------- SmolLM2 (the real model)
@pytest.fixture(scope='module')
def smol():
    try: return load_model('smollm2')
    except Exception as e: pytest.skip(f'SmolLM2 not available: {e}')


def test_smollm2_round_trips_and_merge(tmp_path, smol, ids):
    x = ids[:, :8]
    ours = _randomize(add_lora(copy.deepcopy(smol), r=8, alpha=16, target_modules=('q_proj', 'v_proj')), seed=3).eval()
    out = _logits(ours, x)
    assert (out - _logits(smol, x)).abs().max() > 1e-2
    save_adapter(ours, tmp_path / 'ours')
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(smol), tmp_path / 'ours').eval()
    torch.testing.assert_close(_logits(pm, x), out, rtol=1e-5, atol=1e-4)
    del pm
    # peft -> ours, all linear layers
    torch.manual_seed(2)
    pm = peft.get_peft_model(copy.deepcopy(smol), peft.LoraConfig(r=2, lora_alpha=4, target_modules='all-linear',
                                                                   init_lora_weights=False)).eval()
    ref = _logits(pm, x)
    pm.save_pretrained(tmp_path / 'peft')
    del pm
    ours2 = load_adapter(copy.deepcopy(smol), tmp_path / 'peft').eval()
    assert len(list(lora_layers(ours2))) == 30 * 7
    torch.testing.assert_close(_logits(ours2, x), ref, rtol=1e-5, atol=1e-4)
    # merge: plain Linear layers, same logits up to round-off
    merged = merge_lora(ours2)
    assert [type(m) for m in merged.modules()] == [type(m) for m in smol.modules()]
    torch.testing.assert_close(_logits(merged, x), ref, rtol=1e-3, atol=1e-3)
