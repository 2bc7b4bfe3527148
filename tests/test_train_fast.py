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
                                     ('method="lora"', 'method'),
                                     ('lora_dropout=0.1', 'lora_dropout'), ('lora_target_modules=["q_proj"]', 'lora_target_modules')])
def test_fast_switch_validation_names_the_key(tmp_path, opt, key):
    cfg = load_config(_cfg(tmp_path, fast=True), [opt])
    with pytest.raises(ConfigError, match=f"'{key}'"): validate_config(cfg)


def test_graph_plan_on_the_fast_path_where_the_shape_is_fixed(tmp_path):
    from ft_course.train import _graph_plan
    packed = load_config(_cfg(tmp_path, fast=True, pack_to_max_length=True))
    assert _graph_plan(packed, 'cuda:0', 1) == (True, 'on: packs padded to max_length=48, one graph per micro-batch')
    assert _graph_plan(packed, 'cpu', 1) == (False, 'off: needs a CUDA device')
    assert _graph_plan(packed, 'cuda:0', 2) == (False, 'off: needs one process without DeepSpeed')
    unpacked = load_config(_cfg(tmp_path, fast=True))
    assert _graph_plan(unpacked, 'cuda:0', 1) == (False, 'off: needs pack_to_max_length=True (one batch shape)')
    assert _graph_plan(load_config(_cfg(tmp_path, fast=dict(cuda_graph=False), pack_to_max_length=True)), 'cuda:0', 1) == (False, 'off')
    assert _graph_plan(load_config(_cfg(tmp_path, pack_to_max_length=True)), 'cuda:0', 1) == (False, 'off')   # not the fast path
    asked = load_config(_cfg(tmp_path, fast=dict(cuda_graph=True)))
    validate_config(asked)                                    # a valid switch ...
    with pytest.raises(ConfigError, match="key 'fast': cuda_graph=True needs a CUDA device, pack_to_max_length=True"):
        _graph_plan(asked, 'cpu', 1)                          # ... that this run cannot honour: an error, not a silent eager run

def test_train_refuses_a_cuda_graph_it_cannot_give_before_touching_the_work_dir(tmp_path):
    if torch.cuda.is_available(): pytest.skip('on a GPU the graph is available')
    with pytest.raises(ConfigError, match='cuda_graph=True needs a CUDA device'):
        train(_cfg(tmp_path, fast=dict(cuda_graph=True), pack_to_max_length=True), tmp_path / 'w', progress=False)
    assert not (tmp_path / 'w' / 'log.jsonl').exists()

def test_packs_padded_to_max_length_count_only_real_tokens():
    from ft_course.data import collate
    from ft_course.accum import n_real
    packs = [dict(input_ids=[5, 6, 7], labels=[-100, 6, 7], position_ids=[0, 1, 2], seq_lens=[3]),
             dict(input_ids=[5, 6], labels=[-100, 6], position_ids=[0, 1], seq_lens=[2])]
    b = collate(packs, 0, pad_to=8)
    assert b['input_ids'].shape == (2, 8) and b['attention_mask'].shape == (2, 1, 8, 8)
    assert n_real(b) == 5 and n_real(collate(packs, 0)) == 5   # the padding is not counted, padded or not
    assert n_real(dict(b)) == 16                                 # a plain dict of packs: every position, as before

@pytest.mark.skipif(not torch.cuda.is_available(), reason='CUDA graphs need a GPU')
def test_graphed_micro_step_adds_the_same_gradients_as_eager():
    from transformers import LlamaConfig, AutoModelForCausalLM
    from ft_course.fast import patch_model, GraphedMicroStep
    from ft_course.kernels import FastConfig
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=1024)
    torch.manual_seed(0)
    m = patch_model(AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).cuda(), FastConfig(opt_in_backward=False), r=8, alpha=16,
                    device='cuda', dtype=torch.bfloat16).train()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if 'lora_B' in n: p.normal_(0, 0.02)            # B != 0: every LoRA tensor gets a gradient
    params = [p for p in m.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(1)
    batches = [dict(input_ids=torch.randint(0, 1024, (2, 64), generator=g)) for _ in range(4)]
    for b in batches: b['labels'] = b['input_ids'].clone()
    def eager(b, s):
        loss = m(**{k: v.cuda() for k, v in b.items()}).loss; (loss * s).backward(); return loss.detach()
    def run(step):
        for p in params: p.grad = None
        losses = [float(step(b, 0.5 + i)) for i, b in enumerate(batches)]   # read at once: the graph's loss tensor is reused
        return losses, [p.grad.clone() for p in params]
    le, ge = run(eager)
    step = GraphedMicroStep(m)
    lg, gg = run(step)                                      # eager, captured, then replayed twice
    assert step.replays == 3 and len(step.graphs) == 1
    for a, b in zip(lg, le): assert abs(a - b) <= 1e-6 * abs(b), (lg, le)   # the same kernels, replayed
    for a, b in zip(gg, ge): assert torch.allclose(a, b, rtol=1e-3, atol=1e-6), (a - b).abs().max()

def _tiny_fast(device, dtype, **sw):
    from transformers import LlamaConfig, AutoModelForCausalLM
    from ft_course.fast import patch_model
    from ft_course.kernels import FastConfig
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=1024)
    torch.manual_seed(0)
    m = patch_model(AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device), FastConfig(opt_in_backward=False, **sw), r=8, alpha=16,
                    device=device, dtype=dtype).train()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if 'lora_B' in n: p.normal_(0, 0.02)
    return m

def _packs(seed=0, n=6, L=64):
    "Packs of random samples (lengths 5-40) greedily filled up to L tokens."
    from ft_course.data import pack_samples
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n * 3):
        k = int(torch.randint(5, 40, (1,), generator=g))
        ids = torch.randint(0, 1024, (k,), generator=g).tolist()
        samples.append(dict(input_ids=ids, labels=[-100] * 3 + ids[3:]))
    return pack_samples(samples, L)[:n]

def _loss_and_grads(m, b):
    for p in m.parameters(): p.grad = None
    dev = next(m.parameters()).device
    loss = m(**{k: v.to(dev) for k, v in b.items()}).loss; loss.backward()
    return loss.item(), [p.grad.float().clone() for p in m.parameters() if p.requires_grad]

@pytest.mark.parametrize('varlen_attn', [True, False])
def test_varlen_batches_give_the_block_mask_loss_and_gradients(varlen_attn):
    "On a CPU `varlen_attention` falls back to the segment mask; with the switch off the fast path rebuilds the block mask."
    from ft_course.data import collate
    m = _tiny_fast('cpu', torch.float32, varlen_attn=varlen_attn, checkpoint='layer')
    packs = _packs()
    la, ga = _loss_and_grads(m, collate(packs, 0, packed='mask', pad_to=64))
    lb, gb = _loss_and_grads(m, collate(packs, 0, packed='varlen', pad_to=64, max_segments=40))
    assert abs(la - lb) < 1e-5 * la, (la, lb)
    for a, b in zip(ga, gb): assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match='max_segments=2'): collate(packs, 0, packed='varlen', max_segments=2)

@pytest.mark.skipif(not torch.cuda.is_available(), reason='flash attention needs a GPU')
def test_flash_varlen_on_cuda_matches_the_block_mask():
    from ft_course.data import collate
    from ft_course.fast import _varlen_impl
    assert _varlen_impl() is not None, 'torch.nn.attention.varlen.varlen_attn is missing or has an unknown signature'
    m = _tiny_fast('cuda', torch.bfloat16)
    packs = _packs(1, n=8, L=128)
    la, ga = _loss_and_grads(m, collate(packs, 0, packed='mask', pad_to=128))
    lb, gb = _loss_and_grads(m, collate(packs, 0, packed='varlen', pad_to=128, max_segments=64))
    assert abs(la - lb) < 2e-3 * la, (la, lb)
    for a, b in zip(ga, gb): assert (a - b).norm() <= 2e-2 * a.norm() + 1e-6, ((a - b).norm(), a.norm())

def test_memory_budget_on_a_cpu_is_refused_before_touching_the_work_dir(tmp_path):
    if torch.cuda.is_available(): pytest.skip('on a GPU the budget is planned')
    with pytest.raises(ConfigError, match="key 'fast': memory_budget_gib=24 needs a CUDA GPU"):
        train(_cfg(tmp_path, fast=dict(memory_budget_gib=24), pack_to_max_length=True), tmp_path / 'w', progress=False)
    assert not (tmp_path / 'w' / 'log.jsonl').exists() and not (tmp_path / 'w' / 'checkpoints').exists()

@pytest.mark.skipif(not torch.cuda.is_available(), reason='the memory plan measures a CUDA step')
def test_memory_plan_keeps_what_fits_and_the_step_stays_within_the_budget():
    "A budget between 'everything checkpointed' and 'nothing': some layers kept, the measured peak within the budget."
    from ft_course.fast import build_fast_model, plan_memory, lora_parameters
    from ft_course.kernels import FastConfig
    import gc
    gc.collect(); torch.cuda.empty_cache()
    m = build_fast_model('internlm2-1.8b', FastConfig(opt_in_backward=False), r=16, alpha=16)
    B, S = 4, 2048
    probe = plan_memory(m, B, S, 1000)              # room for everything: every layer kept
    assert probe['keep_layers'] == m.config.num_hidden_layers, probe
    low, act = min(probe['peaks_all_checkpointed_GiB'].values()), probe['layer_activations_GiB']
    budget = low + act * 6.5 / 0.97                 # room for about 6 kept layers
    plan = plan_memory(m, B, S, budget)
    assert 4 <= plan['keep_layers'] <= 8 and m.fast_config.keep_layers == plan['keep_layers'], plan
    opt = torch.optim.AdamW(lora_parameters(m), lr=1e-4, fused=True)
    x = torch.randint(0, m.config.vocab_size, (B, S), device='cuda')
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    for _ in range(2): m(input_ids=x, labels=x).loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() / 2**30
    assert peak <= budget, (peak, budget, plan)
    assert peak >= 0.8 * plan['est_peak_GiB'], (peak, plan)    # the estimate is not wildly pessimistic either
    del m, opt; gc.collect(); torch.cuda.empty_cache()
