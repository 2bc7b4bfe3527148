"Tests for ft_course.selfcog: banks, held-out split, reproducibility, atomic writing, probes, corpus, CLI."
import json, re
import pytest
from ft_course import selfcog
from ft_course.selfcog import (make_self_cognition, eval_questions, identity_score, GENERAL_PROBE, general_correct,
    make_fictional_corpus, FICTION_QA, fiction_correct, data_cli, QUESTIONS, EVAL_QUESTIONS, LESSON_PROMPTS)
from ft_course.data import read_records

norm = lambda q: re.sub(r'[\W_]+', '', q.lower())
zh = lambda s: bool(re.search(r'[\u4e00-\u9fff]', s))


def test_lesson_prompts_in_banks():
    bank = {norm(q) for l in QUESTIONS for q in QUESTIONS[l]}
    for p in ['请介绍一下你自己', '你是谁', 'Please introduce yourself'] + LESSON_PROMPTS: assert norm(p) in bank


@pytest.mark.parametrize('lang', ['zh', 'en', 'both'])
def test_eval_questions_never_in_training(lang, tmp_path):
    recs = make_self_cognition('Orbit', 'Team', 3000, lang, out=tmp_path/'t.jsonl', eval_out=tmp_path/'e.jsonl')
    train_q = {norm(r['messages'][0]['content']) for r in recs}
    ev = eval_questions(lang)
    assert ev and not ({norm(q) for q in ev} & train_q)
    assert [r['messages'][0]['content'] for r in read_records(tmp_path/'e.jsonl')] == ev
    # all the bank is used (so not one pair copied N times)
    assert train_q == {norm(q) for l in (['zh', 'en'] if lang == 'both' else [lang]) for q in QUESTIONS[l]}


@pytest.mark.parametrize('lang', ['zh', 'en'])
def test_language_filter(lang):
    recs = make_self_cognition('Orbit', 'Team', 200, lang)
    assert all(zh(r['messages'][0]['content']) == (lang == 'zh') for r in recs)
    assert all(zh(q) == (lang == 'zh') for q in eval_questions(lang))


def test_both_is_an_even_mix():
    recs = make_self_cognition('Orbit', 'Team', 1000, 'both')
    assert sum(zh(r['messages'][0]['content']) for r in recs) == 500


def test_answers_state_identity():
    for r in make_self_cognition('Orbit', 'the ft_course team', 300, 'both'):
        a = r['messages'][1]['content']
        assert identity_score(a, 'Orbit', 'the ft_course team', require_author=True), a


def test_same_seed_same_file(tmp_path):
    for fmt in ['openai', 'xtuner']:
        a, b, c = tmp_path/f'a_{fmt}.jsonl', tmp_path/f'b_{fmt}.jsonl', tmp_path/f'c_{fmt}.jsonl'
        make_self_cognition('Orbit', 'Team', 500, fmt=fmt, out=a, seed=3)
        make_self_cognition('Orbit', 'Team', 500, fmt=fmt, out=b, seed=3)
        make_self_cognition('Orbit', 'Team', 500, fmt=fmt, out=c, seed=4)
        assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    make_fictional_corpus(tmp_path/'x.jsonl', seed=1); make_fictional_corpus(tmp_path/'y.jsonl', seed=1)
    assert (tmp_path/'x.jsonl').read_bytes() == (tmp_path/'y.jsonl').read_bytes()


def test_formats_agree_after_reading(tmp_path):
    make_self_cognition('Orbit', 'Team', 100, fmt='openai', out=tmp_path/'o.jsonl', seed=5)
    make_self_cognition('Orbit', 'Team', 100, fmt='xtuner', out=tmp_path/'x.json', seed=5)
    assert read_records(tmp_path/'o.jsonl') == read_records(tmp_path/'x.json')
    assert 'conversation' in json.loads((tmp_path/'x.json').read_text(encoding='utf-8'))[0]


def test_atomic_write(tmp_path, monkeypatch):
    out = tmp_path/'sc.jsonl'
    out.write_text('old content\n')
    calls = {'n': 0}
    real = json.dumps
    def flaky(*a, **k):
        calls['n'] += 1
        if calls['n'] > 50: raise RuntimeError('disk on fire')
        return real(*a, **k)
    monkeypatch.setattr(selfcog.json, 'dumps', flaky)
    with pytest.raises(RuntimeError): make_self_cognition('Orbit', 'Team', 200, out=out)
    assert out.read_text() == 'old content\n'
    assert [p.name for p in tmp_path.iterdir()] == ['sc.jsonl']  # no temp file left behind


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown language 'fr'"): make_self_cognition('a', 'b', 10, 'fr')
    with pytest.raises(ValueError, match="unknown format 'alpaca'"): make_self_cognition('a', 'b', 10, fmt='alpaca')
    with pytest.raises(ValueError, match='name'): make_self_cognition('', 'b', 10)
    with pytest.raises(ValueError, match='n must be'): make_self_cognition('a', 'b', 0)


def test_identity_score():
    assert identity_score('我是Orbit的小助手。', 'Orbit', 'Team')
    assert identity_score('i am ORBIT', 'Orbit', 'Team')
    assert not identity_score('I am SmolLM, trained by Hugging Face.', 'Orbit', 'Team')
    assert not identity_score('I am Orbit.', 'Orbit', 'Team', require_author=True)


def test_general_probe():
    assert len(GENERAL_PROBE) >= 10 and all(not zh(q) for q, _ in GENERAL_PROBE)
    for q, ans in GENERAL_PROBE:
        assert general_correct(q, f'The answer is {ans[0]}.')
        assert not general_correct(q, 'I am Orbit, your assistant.')
    assert not general_correct('What is 2 + 2?', '24')
    with pytest.raises(KeyError): general_correct('unknown?', 'x')


def test_fictional_corpus(tmp_path):
    docs = make_fictional_corpus(tmp_path/'c.jsonl', n=20)
    assert read_records(tmp_path/'c.jsonl') == docs and len(docs) == 20
    text = ' '.join(d['text'] for d in docs)
    for q, ans in FICTION_QA:
        assert ans[0] in text and fiction_correct(q, ans[0])
        assert not fiction_correct(q, 'I do not know.')
    # the answers do not leak into the self-cognition data
    sc = json.dumps(make_self_cognition('Orbit', 'Team', 500), ensure_ascii=False)
    assert not any(ans[0] in sc for _, ans in FICTION_QA)


def test_data_cli(tmp_path, capsys):
    assert data_cli(['self-cognition', '--name', 'Orbit', '--author', 'Team', '--n', '30', '--lang', 'zh',
                     '--format', 'xtuner', '--out', str(tmp_path/'a.jsonl'), '--eval-out', str(tmp_path/'e.jsonl'),
                     '--seed', '2']) == 0
    assert read_records(tmp_path/'a.jsonl') == read_records_of(make_self_cognition('Orbit', 'Team', 30, 'zh', 'xtuner', seed=2), tmp_path)
    assert len(read_records(tmp_path/'e.jsonl')) == len(eval_questions('zh'))
    assert data_cli(['corpus', '--out', str(tmp_path/'c.jsonl'), '--n', '3']) == 0
    assert len(read_records(tmp_path/'c.jsonl')) == 3
    assert data_cli(['self-cognition', '--name', 'x', '--author', 'y', '--n', '0', '--out', str(tmp_path/'z.jsonl')]) == 2
    assert 'error:' in capsys.readouterr().err and not (tmp_path/'z.jsonl').exists()


def read_records_of(recs, tmp_path):
    p = tmp_path/'ref.jsonl'
    p.write_text('\n'.join(json.dumps(r, ensure_ascii=False) for r in recs), encoding='utf-8')
    return read_records(p)


def test_generate_batch_matches_one_at_a_time():
    "Left-padded batched greedy decoding gives the same replies as the one-question reference (quick_chat)"
    from ft_course.models import load_model, load_tokenizer, quick_chat
    from ft_course.selfcog import generate_batch
    model, tok = load_model('smollm2'), load_tokenizer('smollm2')
    side = tok.padding_side
    qs = ['What is the capital of France?', 'Who are you?']
    got = generate_batch(model, tok, qs, max_new_tokens=6)
    assert got == [quick_chat(model, tok, q, max_new_tokens=6) for q in qs]
    assert tok.padding_side == side  # restored


def test_out_and_eval_out_must_differ(tmp_path):
    "`--out X --eval-out X` would overwrite the training data with the held-out questions: refused, nothing written."
    from ft_course.selfcog import data_cli
    f = tmp_path / 'same.jsonl'
    assert data_cli(['self-cognition', '--name', 'O', '--author', 'x', '--out', str(f), '--eval-out', str(f)]) == 2
    assert not f.exists()


def test_replay_prompts_share_no_template_with_the_general_probe():
    "Retention is measured on the general probe; replay must not train the probe's own question templates."
    import re
    from ft_course.train import REPLAY_PROMPTS
    from ft_course.selfcog import GENERAL_PROBE
    sig = lambda q: ' '.join(re.sub(r'\d+', 'N', q.lower()).split()[:4])
    probe = [q for q, _ in GENERAL_PROBE]
    assert not {sig(q) for q in probe} & {sig(q) for q in REPLAY_PROMPTS}
    for phrase in ('capital of', 'opposite of', ' + ', ' times ', ' minus ', ' are in a', 'largest planet'):
        if any(phrase in q.lower() for q in probe): assert not [q for q in REPLAY_PROMPTS if phrase in q.lower()], phrase


def test_probes_are_large_enough_and_score_their_own_answers():
    "Retention is a share of the base model's correct probe answers: with 16 questions one answer moved it by 8 points."
    from ft_course.selfcog import GENERAL_PROBE, DEV_PROBE, general_correct, _norm_q
    assert len(GENERAL_PROBE) == len(DEV_PROBE) == 48
    qs = [_norm_q(q) for q, _ in GENERAL_PROBE + DEV_PROBE]
    assert len(set(qs)) == len(qs)
    for q, answers in GENERAL_PROBE + DEV_PROBE:
        assert all(general_correct(q, f'The answer is {a}.') for a in answers), q
        assert not general_correct(q, "I am Ada, an assistant made by the ft_course team."), q


def test_dev_probe_shares_no_template_with_the_general_probe_or_replay():
    "The dev probe chooses settings; it must not share question templates with the reported probe or with replay."
    import re
    from ft_course.train import REPLAY_PROMPTS
    from ft_course.selfcog import GENERAL_PROBE, DEV_PROBE, general_correct, probe_prompts, score_answers, eval_questions
    sig = lambda q: ' '.join(re.sub(r'\d+', 'N', q.lower()).split()[:4])
    probe, dev = [q for q, _ in GENERAL_PROBE], [q for q, _ in DEV_PROBE]
    assert len(set(map(sig, dev))) > 1 and not set(map(sig, dev)) & (set(map(sig, probe)) | set(map(sig, REPLAY_PROMPTS)))
    for phrase in ('capital of', 'opposite of', ' + ', ' times ', ' minus ', ' are in a', 'largest planet', 'color is the'):
        assert not [q for q in dev if phrase in q.lower()], phrase
    for q, (a, *_) in DEV_PROBE: assert general_correct(q, f'It is {a}.') and not general_correct(q, "I'm Ada.")
    d = probe_prompts(split='dev')
    assert d[:len(eval_questions())] == eval_questions() and not set(d) & set(probe)
    sc = score_answers(d, [''] * len(d), 'Ada', base_correct={q: True for q in dev})
    assert sc['n_identity'] == len(eval_questions()) and len(sc['general_correct']) == len(dev) and sc['retention'] == 0
    with pytest.raises(ValueError): probe_prompts(split='train')


@pytest.mark.parametrize('answer, name, want', [('My name is Adam.', 'Ada', False), ('I am not Ada; I am SmolLM.', 'Ada', False),
                                                ("I'm not sure, but I am Ada.", 'Ada', True), ('我不是Ada', 'Ada', False),
                                                ('Hi! I am A d a.', 'Ada', True), ('Adaline here.', 'Ada', False)])
def test_identity_is_a_claim_not_a_substring(answer, name, want):
    assert identity_score(answer, name) is want
