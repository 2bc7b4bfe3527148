"""The longest single sequence that trains within 80 GiB at the Llama-3-8B shape (vocab 128,256, 8 KV heads, h4096,
32 layers, ffn 14336): ft_course's fast QLoRA path against Unsloth, measured the same way (issue 19, target 5).

    python benchmarks/long_context.py --out benchmarks/results/long_context.jsonl [--log LOG] [--budget-s 545]
                                      [--sides ft_course,unsloth] [--probes 20480,40960,61440] [--cap-gib 80]
    python benchmarks/long_context.py --side unsloth --deadline EPOCH_S     # one side alone (the driver runs this)

Method, the same for both sides, each in its own process:
- the whole process is held to `--cap-gib` with `torch.cuda.set_per_process_memory_fraction(cap / total)` (an 80 GB
  card on the H200), `PYTORCH_ALLOC_CONF=expandable_segments:True` on both (what Unsloth sets for itself);
- the random-weight model is built once: NF4 + double quant, bf16 compute, LoRA r=64 alpha=16 on all linear layers,
  each side's default gradient checkpointing (Unsloth: `use_gradient_checkpointing="unsloth"`, torch AdamW;
  ft_course: the default `FastConfig()`, i.e. each layer's input offloaded to CPU RAM, chunked cross-entropy, AdamW
  stepped in the backward); `max_position_embeddings` / `max_seq_length` 524,288 on both, so no RoPE scaling is applied;
- one warm-up step at 4,096 tokens (compilation, optimizer state), then one full training step (forward, backward,
  optimizer) at batch 1 at each probe length; its peak allocated memory (`torch.cuda.max_memory_allocated`, the
  whole process) and its time are recorded;
- peak = a + b*L is fitted by least squares; the longest L with peak <= cap, rounded down to a multiple of 1024, is
  the prediction (from peak reserved memory too: the cap limits what the allocator reserves, so the verification
  runs at the smaller of the two); step time is fitted as t = c1*L + c2*L^2, c2 no smaller than the step's attention
  FLOPs at 700 TFLOP/s (the probes' times also hold the pinned host allocations, which hide the quadratic term);
- if that step fits in the time left (the side's deadline) and its offloaded layer inputs fit in the host's free RAM
  (32 layers x L x 4096 x 2 bytes, each buffer rounded up to a power of two by torch's pinned-memory allocator), it is
  run under the cap: the verification (on running out of memory, 5% shorter, at most twice); otherwise a 'check'
  step is run at the longest length that fits in the time left (still under the cap), to test the fitted line further
  out, and the prediction stays a prediction. `--check L`: only the warm-up and one step at L (no probes, no fit).

Prints JSON lines: first the environment (date, GPU, versions), then per side 'build', 'step' (phase warmup / probe /
verify / check), 'fit' and 'result' rows. The driver appends them to --out and the raw output to --log."""
import argparse, json, os, subprocess, sys, time, gc
HERE = os.path.dirname(os.path.abspath(__file__)); ROOT = os.path.dirname(HERE)
SHAPE, MAXPOS, GiB = 'llama3-8b', 2**19, 2**30

def emit(**row): print(json.dumps(row), flush=True)

def _proc_status():
    out = {}
    try:
        for line in open('/proc/self/status'):
            k, v = line.split(':', 1)
            if k in ('VmRSS', 'VmHWM'): out[k] = round(int(v.split()[0]) / 2**20, 2)   # kB -> GiB
    except OSError: pass
    return out

def _host_pinned():
    import torch
    try: s = torch.cuda.host_memory_stats()
    except Exception: return {}
    return {k.replace('.', '_') + '_GiB': round(s[k] / GiB, 2) for k in ('allocated_bytes.current', 'allocated_bytes.peak') if k in s}

def build_ft_course():
    import torch
    from ft_course.kernels import FastConfig
    from ft_course.fast import build_fast_model, InBackwardAdamW, lora_groups, _POOL
    model = build_fast_model(SHAPE, FastConfig(), max_position_embeddings=MAXPOS)   # r=64, alpha=16, all linear layers
    opt = InBackwardAdamW(lora_groups(model), lr=2e-4)
    def step(x):
        loss = model(input_ids=x, labels=x).loss; loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        return loss
    def between(): _POOL.reset()                  # drop the pinned offload buffers of the last length
    def after_oom(): opt.zero_grad(set_to_none=True); _POOL.reset()
    import ft_course
    return model.config, step, between, after_oom, dict(impl=f'ft_course {ft_course.__version__} fast (FastConfig())', flags=str(model.fast_config))

def build_unsloth():
    import unsloth, torch
    from unsloth import FastLanguageModel
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from ft_course.models import SHAPES
    cfg = LlamaConfig(**{**SHAPES[SHAPE], 'max_position_embeddings': MAXPOS})
    path = f'/tmp/{SHAPE}-shape-maxpos{MAXPOS}'
    if not os.path.exists(os.path.join(path, 'tokenizer.json')):
        torch.manual_seed(0)
        with torch.device('cuda'): m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        m.save_pretrained(path); del m; gc.collect(); torch.cuda.empty_cache()
        tk = Tokenizer(models.BPE(unk_token='<unk>')); tk.pre_tokenizer = pre_tokenizers.Whitespace()
        tk.train_from_iterator(['a long context of random tokens'] * 8, trainers.BpeTrainer(vocab_size=100, special_tokens=['<unk>', '<s>', '</s>', '<pad>']))
        PreTrainedTokenizerFast(tokenizer_object=tk, unk_token='<unk>', bos_token='<s>', eos_token='</s>', pad_token='<pad>').save_pretrained(path)
    model, _ = FastLanguageModel.from_pretrained(path, max_seq_length=MAXPOS, dtype=torch.bfloat16, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=64, lora_alpha=16, lora_dropout=0.0, bias='none',
        target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'], use_gradient_checkpointing='unsloth')
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    def step(x):
        loss = model(input_ids=x, labels=x).loss; loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        return loss
    def after_oom(): opt.zero_grad(set_to_none=True)
    emb = model.get_input_embeddings().weight.device
    return cfg, step, (lambda: None), after_oom, dict(impl=f'unsloth {unsloth.__version__}', embedding_device=str(emb))

def measure(side, phase, L, vocab, step, between, after_oom):
    "One training step at batch 1 and length L; its peak allocated / reserved GPU memory, its time, host memory."
    import torch
    between(); gc.collect(); torch.cuda.empty_cache()
    try: torch._C._host_emptyCache()              # pinned blocks of earlier lengths back to the OS
    except Exception: pass
    try: torch.cuda.reset_peak_host_memory_stats()
    except Exception: pass
    x = torch.randint(0, vocab, (1, L), device='cuda')
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); t = time.perf_counter()
    ok, err, loss = True, None, None
    try:
        loss = step(x).item(); torch.cuda.synchronize()
    except torch.OutOfMemoryError as e:
        ok, err = False, f'OutOfMemoryError: {str(e)[:300]}'
    dt = time.perf_counter() - t
    if not ok:
        after_oom(); gc.collect(); torch.cuda.empty_cache()
    row = dict(kind='step', side=side, phase=phase, seq=L, ok=ok, step_s=round(dt, 2),
               peak_GiB=round(torch.cuda.max_memory_allocated() / GiB, 3), reserved_GiB=round(torch.cuda.max_memory_reserved() / GiB, 3),
               loss=None if loss is None else round(loss, 4), **_host_pinned(), **_proc_status(), **({'error': err} if err else {}))
    emit(**row); del x
    return row

def fit_line(xs, ys):
    n = len(xs); mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b

def attn_c2(cfg, tflops=700):
    "Seconds per L^2 of causal attention in one step (forward, recompute, backward = 4.5 forwards) at `tflops` TFLOP/s."
    hd = getattr(cfg, 'head_dim', None) or cfg.hidden_size // cfg.num_attention_heads
    return 4.5 * 2 * cfg.num_attention_heads * hd * cfg.num_hidden_layers / (tflops * 1e12)

def pinned_bytes(cfg, L):
    "Host bytes of the offloaded layer inputs at length L, each rounded up to a power of two (torch's pinned allocator)."
    return cfg.num_hidden_layers * (1 << (L * cfg.hidden_size * 2 - 1).bit_length())

def host_available():
    try:
        for line in open('/proc/meminfo'):
            if line.startswith('MemAvailable:'): return int(line.split()[1]) * 1024
    except OSError: pass
    return None

def fit_time(xs, ts, c2_min=0.0):
    "t = c1*L + c2*L^2 by least squares (c2 >= c2_min)."
    s11 = sum(x * x for x in xs); s12 = sum(x ** 3 for x in xs); s22 = sum(x ** 4 for x in xs)
    r1 = sum(x * t for x, t in zip(xs, ts)); r2 = sum(x * x * t for x, t in zip(xs, ts))
    det = s11 * s22 - s12 * s12
    c1, c2 = (r1 * s22 - r2 * s12) / det, (s11 * r2 - s12 * r1) / det
    if c2 < c2_min: c2 = c2_min; c1 = (r1 - c2 * s12) / s11
    return c1, c2

def side_main(a):
    os.environ.setdefault('PYTORCH_ALLOC_CONF', 'expandable_segments:True')
    os.environ.setdefault('HF_HUB_OFFLINE', '1'); os.environ.setdefault('UNSLOTH_DISABLE_STATISTICS', '1')
    if a.side == 'unsloth': import unsloth        # first, before transformers, as Unsloth asks
    import torch
    side, cap = a.side, a.cap_gib * GiB
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(cap / total)
    t = time.time()
    cfg, step, between, after_oom, info = (build_ft_course if side == 'ft_course' else build_unsloth)()
    emit(kind='build', side=side, seconds=round(time.time() - t, 1), cap_GiB=a.cap_gib, total_GiB=round(total / GiB, 2),
         fraction=round(cap / total, 4), alloc_conf=os.environ.get('PYTORCH_ALLOC_CONF'), max_position_embeddings=MAXPOS,
         after_build_GiB=round(torch.cuda.memory_allocated() / GiB, 3), **info)
    V = cfg.vocab_size
    m = lambda phase, L: measure(side, phase, L, V, step, between, after_oom)
    m('warmup', 4096)
    if a.check:
        r = m('check', a.check)
        emit(kind='result', side=side, check_only=True, check_seq=a.check, check_ok=r['ok'], check_peak_GiB=r['peak_GiB'],
             check_reserved_GiB=r['reserved_GiB'], check_step_s=r['step_s'])
        return 0
    probes = [m('probe', L) for L in a.probes]
    good = [r for r in probes if r['ok']]
    if len(good) < 2:
        emit(kind='result', side=side, verified=False, why='fewer than two probe steps ran'); return 1
    xs = [r['seq'] for r in good]
    A, B = fit_line(xs, [r['peak_GiB'] * GiB for r in good])
    Ar, Br = fit_line(xs, [r['reserved_GiB'] * GiB for r in good])
    c2min = attn_c2(cfg)
    c1, c2 = fit_time(xs, [r['step_s'] for r in good], c2min)
    T = lambda L: c1 * L + c2 * L * L
    L_pred = int((cap - A) / B) // 1024 * 1024
    L_res = int((cap - Ar) / Br) // 1024 * 1024
    resid = max(abs(A + B * r['seq'] - r['peak_GiB'] * GiB) for r in good) / GiB
    H, nl = cfg.hidden_size, cfg.num_hidden_layers
    emit(kind='fit', side=side, a_GiB=round(A / GiB, 3), b_KiB_per_token=round(B / 1024, 2), max_resid_GiB=round(resid, 3),
         predicted_seq=L_pred, predicted_seq_reserved=L_res, predicted_step_s=round(T(L_pred), 1),
         time_fit=dict(c1_s_per_token=c1, c2_s_per_token2=c2, c2_floor=c2min),
         offload_host_GiB_at_pred=round(nl * L_pred * H * 2 / GiB, 1), pinned_host_GiB_at_pred=round(pinned_bytes(cfg, L_pred) / GiB, 1),
         host_available_GiB=round((host_available() or 0) / GiB, 1))   # the layer inputs that gradient checkpointing offloads (bf16)
    left = lambda: a.deadline - time.time() - 10
    verified, L, tries, last = None, min(L_pred, L_res), 0, None
    room = lambda L: host_available() is None or a.ignore_host_ram or pinned_bytes(cfg, L) <= host_available() - 4 * GiB
    if 1.25 * T(L) <= left() and room(L):
        while tries < 3 and 1.25 * T(L) <= left() and room(L):
            last = m('verify', L); tries += 1
            if last['ok']: verified = last; break
            L = int(L * 0.95) // 1024 * 1024
        emit(kind='result', side=side, predicted_seq=L_pred, verified=bool(verified), verified_seq=verified and verified['seq'],
             verified_peak_GiB=verified and verified['peak_GiB'], verified_step_s=verified and verified['step_s'], tries=tries,
             why=None if verified else 'out of memory or out of time')
        return 0
    step_L = 8192
    L_chk = min(L, int(((-c1 + (c1 * c1 + 4 * c2 * left() / 1.3) ** 0.5) / (2 * c2)) if c2 > 0 else left() / 1.3 / c1)) // step_L * step_L
    while L_chk > 0 and not room(L_chk): L_chk -= step_L
    chk = None
    if L_chk >= 1.2 * max(xs):
        chk = m('check', L_chk)
    why = (f'not verified: the step at {L} tokens would take about {T(L):.0f} s, more than the {max(0, left()):.0f} s left'
           if 1.25 * T(L) > left() else f'not verified: its offloaded layer inputs would pin {pinned_bytes(cfg, L) / GiB:.0f} GiB of host RAM, '
           f'{(host_available() or 0) / GiB:.0f} GiB available')
    emit(kind='result', side=side, predicted_seq=L_pred, verified=False, predicted_step_s=round(T(L_pred), 1), why=why,
         check_seq=chk and chk['seq'], check_ok=chk and chk['ok'], check_peak_GiB=chk and chk['peak_GiB'],
         check_fit_peak_GiB=chk and round((A + B * chk['seq']) / GiB, 3), check_step_s=chk and chk['step_s'],
         check_fit_step_s=chk and round(T(chk['seq']), 1))
    return 0

def driver(a):
    sys.path.insert(0, HERE)
    from run_all import env_info
    t0 = time.time(); out = open(a.out, 'a'); log = open(a.log, 'a') if a.log else None
    def put(line, parse=True):
        if log: log.write(line + '\n'); log.flush()
        s = line.strip()
        if parse and s.startswith('{') and s.endswith('}'):
            try: json.loads(s)
            except ValueError: return
            out.write(s + '\n'); out.flush(); print(s, flush=True)
    put(json.dumps(dict(env_info(), cap_GiB=a.cap_gib, shape=SHAPE, probes=[] if a.check else a.probes, check=a.check or None,
                        host_ram_GiB=round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GiB, 1), method='see benchmarks/long_context.py')))
    sides = a.sides.split(',')
    for i, side in enumerate(sides):
        left = a.budget_s - (time.time() - t0)
        share = left * (0.47 if i == 0 and len(sides) > 1 else 1.0)
        ts = time.time(); deadline = ts + share
        cmd = [sys.executable, os.path.abspath(__file__), '--side', side, '--deadline', str(deadline), '--cap-gib', str(a.cap_gib),
               '--probes', ','.join(map(str, a.probes))] + (['--check', str(a.check)] if a.check else [])
        put(f'$ {" ".join(cmd)}  (budget {share:.0f} s)', parse=False)
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                             env={**os.environ, 'PYTHONUNBUFFERED': '1'})
        for line in p.stdout:
            put(line.rstrip('\n'))
            if time.time() > deadline + 30: p.kill(); put(json.dumps(dict(kind='killed', side=side, why='past its deadline'))); break
        rc = p.wait()
        put(json.dumps(dict(kind='side_done', side=side, rc=rc, seconds=round(time.time() - ts))))
    return 0

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--out', default=os.path.join(HERE, 'results', 'long_context.jsonl'))
    ap.add_argument('--log', default=None)
    ap.add_argument('--budget-s', type=float, default=545, help='seconds for all sides together')
    ap.add_argument('--sides', default='ft_course,unsloth')
    ap.add_argument('--probes', type=lambda s: [int(x) for x in s.split(',')], default=[20480, 40960, 61440])
    ap.add_argument('--cap-gib', type=float, default=80.0)
    ap.add_argument('--side', choices=['ft_course', 'unsloth'], help='run one side in this process')
    ap.add_argument('--deadline', type=float, help='with --side: the epoch second by which it must be done')
    ap.add_argument('--check', type=int, default=0, help='only the warm-up and one step at this length, under the cap')
    ap.add_argument('--ignore-host-ram', action='store_true', help='verify even where the pinned offload buffers would not fit in free host RAM')
    a = ap.parse_args(argv)
    if a.side: return side_main(a if a.deadline else argparse.Namespace(**{**vars(a), 'deadline': time.time() + a.budget_s}))
    return driver(a)

if __name__ == '__main__': sys.exit(main())
