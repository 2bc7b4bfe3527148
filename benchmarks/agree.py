"""Loss curves of the standard stack (transformers + peft + bitsandbytes) and ft_course's fast path on the same
NF4 weights, LoRA initialisation, data and seed (CUDA, bf16). Prints one JSON line.
`--keep-all`: the fast path with no layer recomputed (`keep_layers` = all, the memory budget's far end)."""
import json, os, sys, time, torch
from transformers import AutoModelForCausalLM
from ft_course.models import shape_config
from ft_course.fast import load_qlora_pair, train_losses
from ft_course.kernels import FastConfig
keep_all = '--keep-all' in sys.argv[1:]
shape, layers, steps, bs, seq, lr = 'internlm2-1.8b', 6, 40, 4, 512, 1e-3
path = f'/tmp/agree-{shape}-{layers}'
if not os.path.exists(path):
    torch.manual_seed(0)
    with torch.device('cuda'):
        m = AutoModelForCausalLM.from_config(shape_config(shape, num_hidden_layers=layers), dtype=torch.bfloat16)
    m.save_pretrained(path); del m; torch.cuda.empty_cache()
ref, fast = load_qlora_pair(path, r=64, alpha=16, **({'cfg': FastConfig(keep_layers=layers)} if keep_all else {}))
V = ref.config.vocab_size
t = time.time(); a = train_losses(ref, steps, bs, seq, V, lr=lr); ta = time.time() - t
t = time.time(); b = train_losses(fast, steps, bs, seq, V, lr=lr, opt='in_backward'); tb = time.time() - t
print(json.dumps(dict(model=f'{shape}-shape, {layers} layers', keep_layers=layers if keep_all else 0, seq=seq, bs=bs, steps=steps, lr=lr, ref_losses=[round(x, 4) for x in a],
                      fast_losses=[round(x, 4) for x in b], final_rel_diff=round(abs(a[-1] - b[-1]) / a[-1], 5),
                      max_rel_diff=round(max(abs(x - y) / x for x, y in zip(a, b)), 5), ref_s=round(ta, 1), fast_s=round(tb, 1))))
