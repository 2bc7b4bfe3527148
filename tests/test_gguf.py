"""ft_course.export_gguf: a merged model -> GGUF, read back by transformers, gguf's reader and llama.cpp (tiny random models, no network)."""
import json, os, subprocess, sys
from pathlib import Path
import pytest
from conftest import tiny_lora_checkpoint

torch = pytest.importorskip('torch')
np = pytest.importorskip('numpy')
gguf = pytest.importorskip('gguf')
from safetensors.torch import save_file
from ft_course.models import load_model, tiny_model_dir
from ft_course.export_gguf import (quantize_q8_0, dequantize_q8_0, write_gguf, gguf_tensors, read_state, _read_config, gguf_cli,
                                   chat_parts, ollama_template, render_go_template, UnsupportedModel, permute_qk)

pytestmark = pytest.mark.usefixtures('one_torch_thread')   # see conftest.py
CONV = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'hello'},
        {'role': 'user', 'content': 'who are you?'}]


def _gguf_model(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope='module')
def made(tmp_path_factory):
    "A LoRA adapter (pth_to_hf) on the tiny Llama, its merge (fp32) and the three GGUF exports of the merge."
    from ft_course.convert import pth_to_hf, merge
    root = tmp_path_factory.mktemp('gguf')
    ck = root / 'checkpoints' / 'iter_1'
    name, pm, _ = tiny_lora_checkpoint(ck, 'tiny_gguf')
    adapter = pth_to_hf(ck / 'config.py', ck, root / 'adapter')
    merged = merge(None, adapter, root / 'merged', dtype='fp32')
    files = {t: write_gguf(merged, root / f'm-{t}.gguf', t, modelfile=(t == 'f16')) for t in ('f16', 'bf16', 'q8_0')}
    x = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(): ref = pm(x).logits
    return dict(root=root, name=name, adapter=adapter, merged=merged, files=files, x=x, ref=ref)


def test_q8_0_is_ggml_bit_exact():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 96)).astype(np.float32)
    w[0, :32] = 0                                    # an all-zero block
    w[1, :32] = np.arange(32) - 15.5                 # halves: roundf vs round-half-even
    w[2, 5] = 1e3                                    # an outlier spoils only its block
    q = quantize_q8_0(w)
    ref = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
    assert q.shape == (8, 96 // 32 * 34) and q.tobytes() == ref.tobytes()
    back = dequantize_q8_0(q, 96)
    np.testing.assert_array_equal(back, gguf.quants.dequantize(ref, gguf.GGMLQuantizationType.Q8_0))
    assert np.abs(back[2, 32:] - w[2, 32:]).max() < 0.02 and np.all(back[0, :32] == 0)
    with pytest.raises(ValueError, match='multiple of 32'): quantize_q8_0(np.zeros((2, 33), np.float32))


def test_permutation_is_what_transformers_undoes():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
    w = np.random.default_rng(0).normal(size=(48, 16)).astype(np.float32)
    undo = LlamaTensorProcessor()._reverse_permute_weights
    np.testing.assert_array_equal(undo(permute_qk(w, 6, 6), 6, 6), w)
    np.testing.assert_array_equal(undo(permute_qk(w[:16], 6, 2), 6, 2), w[:16])
    assert not np.array_equal(permute_qk(w, 6, 6), w)


def test_gguf_reader_gives_back_every_tensor_bit_for_bit(made):
    sd, (cfg, arch) = read_state(made['merged']), _read_config(made['merged'])
    for t, f in made['files'].items():
        back = {x.name: x for x in gguf.GGUFReader(str(f)).tensors}
        mine = list(gguf_tensors(sd, cfg, arch, t))
        assert sorted(back) == sorted(n for n, _, _ in mine) and 'output.weight' not in back   # tied: no separate head
        for n, arr, ty in mine: assert back[n].tensor_type == ty and back[n].data.tobytes() == arr.tobytes(), (t, n)
        assert all(x.data_offset % 32 == 0 for x in back.values())


def test_transformers_reads_back_the_merged_model(made):
    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(str(made['merged']), dtype=torch.float32).eval()
    msd = merged.state_dict()
    x, scale = made['x'], made['ref'].abs().max()
    for t, dt in (('f16', torch.float16), ('bf16', torch.bfloat16)):
        m = _gguf_model(made['files'][t])
        for k, v in m.state_dict().items(): torch.testing.assert_close(v, msd[k].to(dt).float(), rtol=0, atol=0, msg=f"{t} {k}")
        with torch.no_grad(): got = m(x).logits
        torch.testing.assert_close(got, made['ref'], rtol=0, atol=float(scale) * (2e-3 if t == 'f16' else 2e-2))
    m = _gguf_model(made['files']['q8_0'])
    with torch.no_grad(): got = m(x).logits
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), made['ref'].log_softmax(-1), log_target=True, reduction='none').sum(-1).mean()
    assert (got - made['ref']).abs().max() < 0.05 * scale and kl < 1e-3, ((got - made['ref']).abs().max(), kl)   # stated q8_0 tolerance


def test_greedy_answers_identical_for_f16(made):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from ft_course.models import quick_chat
    merged = AutoModelForCausalLM.from_pretrained(str(made['merged']), dtype=torch.float32).eval()
    with torch.no_grad():
        for p in merged.parameters(): p.copy_(p.half().float())   # the merged model at f16 precision
    tok = AutoTokenizer.from_pretrained(str(made['merged']))
    g = _gguf_model(made['files']['f16'])
    gtok = AutoTokenizer.from_pretrained(str(made['root']), gguf_file=made['files']['f16'].name)
    for q in ['Who are you?', 'What is your name?', 'Tell me a story.']:
        assert quick_chat(g, gtok, q, max_new_tokens=12) == quick_chat(merged, tok, q, max_new_tokens=12)


def test_tokenizer_template_and_stop_token_read_back(made):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(made['merged']))
    gtok = AutoTokenizer.from_pretrained(str(made['root']), gguf_file=made['files']['q8_0'].name)
    text = "Ada's 3 numbers: 12345, 0.5 and -7! Ünïcödé\ttabs  and spaces <|im_start|>user\n🙂 مرحبا"
    assert gtok(text).input_ids == tok(text).input_ids
    for c in (CONV, CONV[1:], CONV[1:2]):
        assert gtok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) == tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
    assert gtok.eos_token == '<|im_end|>'
    assert _gguf_model(made['files']['q8_0']).generation_config.eos_token_id == tok.convert_tokens_to_ids('<|im_end|>')
    meta = gguf.GGUFReader(str(made['files']['f16'])).fields
    assert meta['general.architecture'].contents() == 'llama' and meta['ft_course.adapter'].contents() == str(made['adapter'].resolve())


def test_modelfile_renders_like_the_chat_template(made):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(made['merged']))
    mf = (made['root'] / 'Modelfile').read_text()
    assert mf.startswith('FROM ./m-f16.gguf\n') and 'PARAMETER stop "<|im_end|>"' in mf
    tmpl = mf.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert tmpl == ollama_template(chat_parts(tok))
    for c in (CONV, CONV[1:], CONV[1:2], CONV[:2]):
        assert render_go_template(tmpl, c) == tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
    # a template with a default system prompt (SmolLM2's own)
    smol = AutoTokenizer.from_pretrained(str(tiny_model_dir('llama')))
    t2 = ollama_template(chat_parts(smol))
    for c in (CONV, CONV[1:]): assert render_go_template(t2, c) == smol.apply_chat_template(c, tokenize=False, add_generation_prompt=True)


def test_refusals_and_atomic_write(made, tmp_path, monkeypatch, capsys):
    f = made['files']['f16']
    assert gguf_cli([str(made['merged']), str(f)]) == 2 and 'exists' in capsys.readouterr().err
    with pytest.raises(UnsupportedModel, match='q4_k'): write_gguf(made['merged'], tmp_path / 'a.gguf', 'q4_k')
    bad = tmp_path / 'bad'; bad.mkdir()
    (bad / 'config.json').write_text(json.dumps({'architectures': ['MambaForCausalLM']}))
    assert gguf_cli([str(bad), str(tmp_path / 'a.gguf')]) == 2 and 'MambaForCausalLM' in capsys.readouterr().err
    (bad / 'config.json').write_text((made['merged'] / 'config.json').read_text())
    save_file({'model.embed_tokens.weight': torch.zeros(4, 4, dtype=torch.int8)}, str(bad / 'model.safetensors'))
    with pytest.raises(UnsupportedModel, match='int8'): write_gguf(bad, tmp_path / 'a.gguf')
    import ft_course.export_gguf as eg
    def boom(*a, **k): yield 'token_embd.weight', np.zeros((2, 2), np.float16), gguf.GGMLQuantizationType.F16; raise RuntimeError('disk full')
    monkeypatch.setattr(eg, 'gguf_tensors', boom)
    size = f.stat().st_size
    with pytest.raises(RuntimeError): write_gguf(made['merged'], f, overwrite=True)
    assert f.stat().st_size == size and not list(f.parent.glob('.m-f16.gguf.tmp*'))   # the old file is whole, no temp left
    with pytest.raises(RuntimeError): write_gguf(made['merged'], tmp_path / 'new.gguf')
    assert not list(tmp_path.glob('*new.gguf*'))


def test_convert_cli_routes_to_gguf(made, tmp_path):
    from ft_course.convert import convert_cli
    out = tmp_path / 'c.gguf'
    assert convert_cli(['gguf', str(made['merged']), str(out), '--type', 'q8_0']) == 0
    assert gguf.GGUFReader(str(out)).fields['general.file_type'].contents() == 7


def test_qwen2_exports_and_reads_back(tmp_path):
    from transformers import AutoModelForCausalLM
    d = tiny_model_dir('qwen2')
    f = write_gguf(d, tmp_path / 'q.gguf', 'f16')
    names = {t.name for t in gguf.GGUFReader(str(f)).tensors}
    assert 'blk.0.attn_q.bias' in names
    ref = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    with torch.no_grad():
        for p in ref.parameters(): p.copy_(p.half().float()) if p.ndim > 1 else None
    x = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(): a, b = _gguf_model(f)(x).logits, ref(x).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_adapter_and_merged_open_offline_with_standard_tools(made):
    "AutoPeftModelForCausalLM.from_pretrained(adapter) and pipeline(model=MERGED) in a fresh offline process, nothing else given."
    from peft import PeftModel
    cfg = json.loads((made['adapter'] / 'adapter_config.json').read_text())
    assert Path(cfg['base_model_name_or_path']).is_dir() and Path(cfg['base_model_name_or_path']) == Path(made['name']).resolve()
    code = f"""
import json, torch, transformers
from peft import AutoPeftModelForCausalLM
m = AutoPeftModelForCausalLM.from_pretrained({str(made['adapter'])!r}).eval()
x = torch.tensor({made['x'].tolist()})
with torch.no_grad(): l = m(x).logits
p = transformers.pipeline('text-generation', model={str(made['merged'])!r}, dtype=torch.float32)
out = p([{{'role': 'user', 'content': 'Who are you?'}}], max_new_tokens=8, do_sample=False)[0]['generated_text'][-1]['content']
print(json.dumps(dict(logits=l[0, -1, :50].tolist(), answer=out)))"""
    env = dict(os.environ, HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', HF_DATASETS_OFFLINE='1', OMP_NUM_THREADS='1')
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    torch.testing.assert_close(torch.tensor(got['logits']), made['ref'][0, -1, :50], rtol=0, atol=1e-4)
    from ft_course.chat import ChatSession
    from transformers import AutoModelForCausalLM, AutoTokenizer
    merged = AutoModelForCausalLM.from_pretrained(str(made['merged']), dtype=torch.float32).eval()
    ans = ChatSession(merged, AutoTokenizer.from_pretrained(str(made['merged'])), template='chatml', max_new_tokens=8).ask('Who are you?')
    assert got['answer'].strip() == ans.strip()


def test_llama_cpp_answers_and_stops():
    "llama.cpp (llama-cpp-python) loads our f16 SmolLM2, answers as transformers does and stops at <|im_end|>."
    llama_cpp = pytest.importorskip('llama_cpp', reason='llama-cpp-python is not installed (it builds llama.cpp from source: pip install llama-cpp-python)')
    import tempfile
    from ft_course.models import smollm2_dir, quick_chat, ModelNotAvailable
    try: d = smollm2_dir()
    except ModelNotAvailable as e: pytest.skip(str(e))
    with tempfile.TemporaryDirectory() as tmp:
        f = write_gguf(d, Path(tmp) / 'smollm2-f16.gguf', 'f16')
        llm = llama_cpp.Llama(model_path=str(f), n_ctx=512, n_threads=1, verbose=False, seed=0)
        q = 'What is the capital of France? Answer in one sentence.'
        res = llm.create_chat_completion([{'role': 'user', 'content': q}], max_tokens=48, temperature=0.0, top_k=1)
        del llm
    choice = res['choices'][0]
    assert choice['finish_reason'] == 'stop', choice
    ref = quick_chat(load_model(str(d), dtype='fp32', device='cpu'), __import__('transformers').AutoTokenizer.from_pretrained(str(d)), q, max_new_tokens=48)
    assert choice['message']['content'].strip() == ref.strip()
