"Tests for ft_course.llava and ft_course.llava_data (CPU, tiny models where the LLM's weights do not matter)."
import random, types
import numpy as np
import pytest
import torch

from ft_course.llava import (IMAGE_TOKEN_INDEX, IGNORE_INDEX, ImageProcessor, VisionTower, Projector, LlavaModel,
                             effnet_lite0, splice_image_embeds, tokenize_conversation, build_llava, add_llm_lora,
                             save_llava, load_llava, llava_generate, llava_settings, load_trainable)
from ft_course.llava_data import build_dataset
from ft_course.llava_data import (make_shapes_dataset, COLOURS, BACKGROUNDS, questions, random_scene, repeated_conversations,
                                  LlavaDataset, qa_messages, text_only_conversations, caption_score, real_photo)


@pytest.fixture(scope='module')
def tok():
    from ft_course.models import load_tokenizer
    return load_tokenizer('smollm2')


def test_effnet_imagenet_classes():
    import skimage.data
    m, proc = effnet_lite0(), ImageProcessor(224)
    with torch.no_grad(): p = m(proc([skimage.data.coffee(), skimage.data.rocket()])).softmax(-1)
    assert p.argmax(-1).tolist() == [967, 657]           # espresso, missile
    assert p[0, 967] > 0.5


def test_vision_tower_tokens():
    t = VisionTower('effnet-lite0', image_size=96)
    x = t.image_processor(np.zeros((120, 200, 3), np.uint8))
    assert x.shape == (1, 3, 96, 96)
    assert t(x).shape == (1, 9, 1280) and t.num_tokens() == 9 and t.num_tokens(224) == 49
    t.train(); assert not t.training and not t.net._bn0.training      # frozen BatchNorm stays in eval mode
    ms = VisionTower('effnet-lite0-ms', image_size=96)
    f, fm = t(x), ms(x)
    assert fm.shape == (1, 9, 1320) and ms.hidden_size == 1320
    torch.testing.assert_close((fm * ms.feat_std + ms.feat_mean)[..., :1280], f, atol=1e-3, rtol=1e-3)   # the last map's channels, standardised
    g = ms(ms.image_processor([d['image'] for d in make_shapes_dataset(64, seed=2024, size=96)])).flatten(0, 1)
    assert g.mean(0).abs().max() < 1e-3 and (g.std(0) - 1).abs()[ms.feat_std > 0.05].max() < 1e-3   # calibration scenes: mean 0, std 1
    with pytest.raises(ValueError, match='only for effnet-lite0'): VisionTower('some/clip-ms')


def test_early_map_sees_colour():
    "The linear probe of notebook 10, smaller: the last feature map is nearly colour-blind, the early channels are not."
    from ft_course.llava_data import image_features, object_tokens, linear_probe, CHANCE
    tr, te = make_shapes_dataset(160, seed=777, size=96), make_shapes_dataset(60, seed=12345, size=96)
    ftr = image_features([d['image'] for d in tr], vision_tower='effnet-lite0-ms', progress=False)
    fte = image_features([d['image'] for d in te], vision_tower='effnet-lite0-ms', progress=False)
    acc = {}
    for name, sl in [('last', slice(0, 1280)), ('early', slice(1280, None))]:
        (Xa, ca, sa), (Xb, cb, sb) = object_tokens(tr, ftr[..., sl]), object_tokens(te, fte[..., sl])
        acc[name] = linear_probe(Xa, ca, Xb, cb), linear_probe(Xa, sa, Xb, sb)
    assert acc['last'][0] < 0.7 and acc['early'][0] > 0.9, acc
    assert acc['early'][1] > 0.8, acc
    Xs, cs, ss = object_tokens(tr[:2], ftr[:2])
    assert len(cs) == sum(len(d['scene'].objects) for d in tr[:2]) and Xs.shape[1] == 1320
    with pytest.raises(ValueError, match='square grid'): object_tokens(tr[:1], ftr[:1, :8])


def test_splice_bookkeeping():
    ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, 2], [3, 4, 0]])
    labels = torch.tensor([[-100, -100, 2], [-100, 4, -100]])
    am = torch.tensor([[1, 1, 1], [1, 1, 0]])
    img = torch.tensor([[[10.], [11.]]])
    e, m, l = splice_image_embeds(ids, lambda t: t[..., None].float(), img, labels, am)
    assert e[..., 0].tolist() == [[1, 10, 11, 2], [3, 4, 0, 0]]
    assert m.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert l.tolist() == [[-100, -100, -100, 2], [-100, 4, -100, -100]]
    with pytest.raises(ValueError, match='2 images'):
        splice_image_embeds(ids, lambda t: t[..., None].float(), torch.cat([img, img]), labels, am)


def test_tokenize_matches_chat_template(tok):
    msgs = [{'role': 'user', 'content': '<image>\nWhat colour is the circle?'}, {'role': 'assistant', 'content': 'red'},
            {'role': 'user', 'content': 'And the star?'}, {'role': 'assistant', 'content': 'blue'}]
    enc = tokenize_conversation(tok, msgs, system='You are helpful.')
    ids = enc['input_ids']
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    text = ''.join('<image>' if i == IMAGE_TOKEN_INDEX else tok.decode([i]) for i in ids)
    ref = tok.apply_chat_template([{'role': 'system', 'content': 'You are helpful.'}] + msgs, tokenize=False)
    assert text == ref
    trained = tok.decode([i for i, l in zip(ids, enc['labels']) if l != IGNORE_INDEX])
    assert trained == 'red<|im_end|>blue<|im_end|>'


def test_shapes_ground_truth():
    for d in make_shapes_dataset(20, seed=3, size=96):
        a = np.asarray(d['image']).astype(int)
        assert np.abs(a[0, 0] - BACKGROUNDS[d['scene'].background]).max() < 5
        for o in d['scene'].objects:
            if o.shape in ('circle', 'square'):
                assert np.abs(a[int(o.y * 96), int(o.x * 96)] - COLOURS[o.colour]).max() < 30
        for t, q, ans in d['qa']:
            if t == 'count': assert int(ans) == sum(o.shape in q for o in d['scene'].objects)
            if t == 'colour': assert ans in COLOURS
    assert len(repeated_conversations('coffee', 200)) == 1200
    assert real_photo('grace_hopper').size[0] > 100


def _tiny_llava():
    torch.manual_seed(0)
    return build_llava('tiny-llama', 'effnet-lite0', image_size=64)


def test_llava_forward_mixed_batch_and_text_only(tok):
    model, tk = _tiny_llava()
    pix = model.image_processor([np.full((64, 64, 3), 200, np.uint8)])
    a = tokenize_conversation(tk, [{'role': 'user', 'content': '<image>\nHi'}, {'role': 'assistant', 'content': 'ok'}])
    b = tokenize_conversation(tk, [{'role': 'user', 'content': 'Hello there, no picture'}, {'role': 'assistant', 'content': 'yes'}])
    L = max(len(a['input_ids']), len(b['input_ids']))
    ids = torch.tensor([x['input_ids'] + [0] * (L - len(x['input_ids'])) for x in (a, b)])
    lab = torch.tensor([x['labels'] + [-100] * (L - len(x['labels'])) for x in (a, b)])
    am = torch.tensor([[1] * len(x['input_ids']) + [0] * (L - len(x['input_ids'])) for x in (a, b)])
    with torch.no_grad():
        out = model(ids, lab, am, pixel_values=pix)
        assert out.logits.shape[1] == len(a['input_ids']) - 1 + 4       # 64 px -> 2x2 = 4 visual tokens
        tb = torch.tensor([b['input_ids']])
        ref = model.llm(input_ids=tb).logits
        torch.testing.assert_close(out.logits[1, :tb.shape[1]], ref[0], atol=1e-4, rtol=1e-4)
        # the loss equals the LLM's loss on the hand-spliced embeddings
        p = a['input_ids'].index(IMAGE_TOKEN_INDEX)
        E = model.llm.get_input_embeddings(); ta = torch.tensor([a['input_ids']])
        emb = torch.cat([E(ta[:, :p]), model.projector(model.encode_images(pix)), E(ta[:, p + 1:])], 1)
        la = torch.tensor([a['labels'][:p] + [-100] * 4 + a['labels'][p + 1:]])
        torch.testing.assert_close(model(ta, torch.tensor([a['labels']]), pixel_values=pix).loss,
                                   model.llm(inputs_embeds=emb, labels=la).loss)


def test_save_load_roundtrip(tmp_path):
    model, tk = _tiny_llava()
    add_llm_lora(model, r=4, alpha=8, targets=['q_proj', 'v_proj'])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if 'lora_B' in n or 'projector' in n: p.add_(torch.randn_like(p) * 0.05)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith('projector.') for n in trainable) and any('lora_A' in n for n in trainable)
    assert not any(n.startswith(('vision_tower.', 'llm.model.embed_tokens')) for n in trainable)
    save_llava(model, tmp_path / 'f')
    assert {'adapter_config.json', 'adapter_model.safetensors', 'llava_config.json', 'projector.safetensors'} <= {p.name for p in (tmp_path / 'f').iterdir()}
    m2, tk2, proc = load_llava(tmp_path / 'f')
    im = np.random.RandomState(0).randint(0, 255, (64, 64, 3)).astype(np.uint8)
    ids = torch.tensor([tokenize_conversation(tk, [{'role': 'user', 'content': '<image>\nHi'}])['input_ids']])
    with torch.no_grad():
        torch.testing.assert_close(m2(ids, pixel_values=proc(im)).logits, model.eval()(ids, pixel_values=proc(im)).logits)
    assert llava_generate(m2, tk2, im, 'Hi', max_new_tokens=5) == llava_generate(model, tk, im, 'Hi', max_new_tokens=5)
    with pytest.raises(FileNotFoundError, match='llava_config.json'): load_llava(tmp_path)


def test_dataset_hook_and_settings(tok, tmp_path, monkeypatch):
    monkeypatch.setenv('FT_COURSE_HOME', str(tmp_path))
    cfg = types.SimpleNamespace(data_generator=dict(kind='llava', stage='finetune', n_images=6, image_size=64, repeats=2,
                                                    photos=['coffee']), max_length=256, name='t')
    ds, collate = build_dataset(cfg, tok)
    assert len(ds) == 6 + 6 * 2 + len(text_only_conversations())
    items = [ds[0], ds[len(ds) - 1]]                       # one with an image, one text-only
    b = collate(items)
    # default tower effnet-lite0-ms: 1280 + 40 channels
    assert b['image_features'].shape == (1, 4, 1320) and (b['input_ids'] == IMAGE_TOKEN_INDEX).sum() == 1
    with pytest.raises(KeyError, match='unknown LLaVA keys'):
        llava_settings(types.SimpleNamespace(data_generator=dict(stage='pretrain', typo=1), name='x'))


def test_caption_score():
    from ft_course.llava_data import Scene, Shape
    sc = Scene([Shape('circle', 'red', .2, .5, 'small')], 'white')
    assert caption_score(sc, 'A small red circle on the left') == 1.0 and caption_score(sc, 'a blue circle') == 0.0


@pytest.fixture
def trainer_config(monkeypatch):
    "Replace the trainer by a stub that only loads the config train_llava hands it; returns where that config lands."
    import ft_course.train as T
    seen = {}
    def fake_train(cfg, work_dir, cfg_options=None, progress=True, overwrite=True):
        seen['cfg'] = T.load_config(cfg, cfg_options); seen['s'] = llava_settings(seen['cfg'])   # what build_model/build_dataset check
    monkeypatch.setattr(T, 'train', fake_train)
    return seen


def test_configs_and_train_llava_options(trainer_config):
    "Both built-in configs use the multi-scale tower; train_llava hands its settings to the trainer as cfg options."
    import ft_course.train as T
    from ft_course.llava_data import train_llava, PRETRAIN_CFG, FINETUNE_CFG, VISION_TOWER
    for name, stage in ((PRETRAIN_CFG, 'pretrain'), (FINETUNE_CFG, 'finetune')):
        s = llava_settings(T.load_config(name))
        assert s['vision_tower'] == VISION_TOWER == 'effnet-lite0-ms' and s['stage'] == stage
    train_llava('finetune', 'unused', n_images=10, image_size=96, batch_size=4, max_steps=3, lr=1e-3, max_turns=1, text_only=False)
    c, s = trainer_config['cfg'], trainer_config['s']
    assert (c.batch_size, c.max_steps, c.lr, s['n_images'], s['image_size'], s['max_turns'], s['text_only'], s['vision_tower']) == \
           (4, 3, 1e-3, 10, 96, 1, False, 'effnet-lite0-ms')
    with pytest.raises(KeyError, match='unknown LLaVA keys'):
        train_llava('pretrain', 'unused', n_images=10, typo_key=1)


@pytest.mark.parametrize('name', ['test', 'cpu', 'laptop', 'gpu', 'gpu128'])
def test_recipes_reach_the_trainer(name, trainer_config):
    "Every stage of every recipe is a valid train_llava call whose settings arrive in the trainer's config unchanged."
    from ft_course.llava_data import train_llava, recipe, RECIPES
    assert set(RECIPES) >= {'test', 'cpu', 'gpu'}
    for stage in ('pretrain', 'finetune'):
        r = recipe(stage, name)
        train_llava(stage, 'unused', **r)
        c, s = trainer_config['cfg'], trainer_config['s']
        assert (c.batch_size, c.lr, s['image_size'], s['n_images'], s['stage']) == (r['batch_size'], r['lr'], r['image_size'], r['n_images'], stage)
        assert c.max_steps == r.get('max_steps') and s['photos'] == list(r.get('photos', ['coffee']))
        if stage == 'finetune': assert (c.lora_r, c.lora_alpha) == (r['lora_r'], r['lora_alpha'])


def test_gpu_record_is_the_gpu_recipe():
    "The committed GPU measurement (benchmarks/results/llava_gpu) was made with the settings RECIPES['gpu'] holds now."
    import json
    from pathlib import Path
    from ft_course.llava_data import RECIPES, CHANCE
    rec = Path(__file__).parent.parent / 'benchmarks' / 'results' / 'llava_gpu' / 'g96-a.json'
    r = json.loads(rec.read_text())
    assert r['settings']['pretrain'] == RECIPES['gpu']['pretrain'] and r['settings']['finetune'] == RECIPES['gpu']['finetune']
    assert r['settings']['n_test'] == 200 and r['machine']['device'] == 'cuda' and r['chance'] == CHANCE


def test_laptop_record_is_the_laptop_recipe_and_the_dev_choice():
    "RECIPES['laptop'] is the candidate with the best mean dev accuracy among the committed laptop-budget records."
    import json
    from pathlib import Path
    from ft_course.llava_data import RECIPES, QUESTION_TYPES
    recs = [json.loads(f.read_text()) for f in (Path(__file__).parent.parent / 'benchmarks' / 'results' / 'llava_laptop').glob('lap-*.json')]
    assert len(recs) >= 5
    best = max(recs, key=lambda r: sum(r['dev']['model'][t]['acc'] for t in QUESTION_TYPES))
    assert best['recipe'] == RECIPES['laptop']
    assert all(r['recipe']['finetune']['max_steps'] * r['recipe']['finetune']['batch_size'] <= 2240 for r in recs)   # the CPU budget


@pytest.mark.parametrize('size, name', [('test', 'test'), ('laptop', 'laptop'), ('full', 'gpu')])
def test_default_recipe_follows_the_size(monkeypatch, size, name):
    from ft_course.llava_data import recipe, RECIPES, llava_run_dir
    monkeypatch.setenv('FT_COURSE_SIZE', size)
    assert recipe('finetune') == RECIPES[name]['finetune']
    assert llava_run_dir('pretrain').parent.name == size       # one run folder per size
