"""ft_course.chat: the streaming chat loop, the terminal command with piped stdin, and the web demo in a real browser.

The browser test needs Debian's `chromium` and `chromium-driver` (apt) and the `selenium` Python package (pip);
it is skipped, saying so, when they are missing.
"""
import os, shutil, socket, subprocess, sys, time, urllib.request
from pathlib import Path
import pytest

torch = pytest.importorskip('torch')
from ft_course.models import load_model, load_tokenizer, tiny_model_dir
from ft_course.chat import ChatSession, web_demo_command

pytestmark = pytest.mark.usefixtures('one_torch_thread')   # see conftest.py


ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
Q = 'What is the capital of France?'


@pytest.fixture(scope='module')
def smol():
    return load_model('smollm2', device='cpu'), load_tokenizer('smollm2')


def _generate(model, tok, messages, n):
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors='pt', return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc['input_ids'].shape[1]:], skip_special_tokens=True)


def test_session_matches_generate_and_keeps_history(smol):
    model, tok = smol
    s = ChatSession(model, tok, max_new_tokens=12)
    pieces = list(s.stream(Q))
    assert len(pieces) > 1, 'the reply should stream in several pieces'
    assert ''.join(pieces) == _generate(model, tok, [{'role': 'user', 'content': Q}], 12)
    assert 'Paris' in ''.join(pieces)
    second = s.ask('And of Germany?')
    msgs = [{'role': 'user', 'content': Q}, {'role': 'assistant', 'content': ''.join(pieces)}, {'role': 'user', 'content': 'And of Germany?'}]
    assert second == _generate(model, tok, msgs, 12)
    assert len(s.history) == 4 and s.stats['ttft_s'] > 0
    s.reset(); assert s.history == []


def test_stop_word_text_is_cut(smol):
    "A stop word that is several tokens long is matched as text and never shown."
    model, tok = smol
    s = ChatSession(model, tok, max_new_tokens=12, stop_words=[' Paris'])
    r = s.ask(Q)
    assert 'Paris' not in r and s.stats['stopped']


def test_piped_stdin_chat():
    "One prompt per line; RESET forgets the history, EXIT stops reading; output equals an in-process session's."
    tiny = str(tiny_model_dir('llama'))
    lines = ['hello there', 'and again', 'RESET', 'and again', 'EXIT', 'never read']
    p = subprocess.run([sys.executable, '-c', 'import sys; from ft_course.chat import chat_cli; sys.exit(chat_cli(sys.argv[1:]))',
                        tiny, '--max-new-tokens', '6', '--device', 'cpu'],
                       input='\n'.join(lines) + '\n', capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    model, tok = load_model(tiny, device='cpu'), load_tokenizer(tiny)
    s = ChatSession(model, tok, max_new_tokens=6)
    want = [s.ask('hello there'), s.ask('and again')]
    s.reset(); want.append(s.ask('and again'))
    assert p.stdout == ''.join(w + '\n' for w in want), (p.stdout, want)
    assert '(history cleared)' in p.stderr


def test_chat_cli_bad_adapter(tmp_path):
    from ft_course.chat import chat_cli
    assert chat_cli([str(tiny_model_dir('llama')), '--adapter', str(tmp_path / 'nope')]) == 2


# ---------------------------------------------------------------- the web demo in a real headless Chromium
CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')
CHROMEDRIVER = shutil.which('chromedriver')


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def _wait_health(port, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None: raise RuntimeError(f"web demo exited with {proc.returncode}")
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).read().strip() == b'ok': return
        except OSError: time.sleep(0.5)
    raise TimeoutError('web demo did not come up')


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason='needs Debian chromium + chromium-driver (apt-get install -y chromium chromium-driver)')
def test_web_demo_in_chromium(tmp_path, smol):
    webdriver = pytest.importorskip('selenium.webdriver', reason='needs the selenium package (pip install selenium)')
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    model, tok = smol
    want = ChatSession(model, tok, max_new_tokens=12).ask(Q)
    port = _free_port()
    log = open(tmp_path / 'server.log', 'w')
    proc = subprocess.Popen(web_demo_command('smollm2', port=port, extra=['--max-new-tokens', '12']), stdout=log, stderr=subprocess.STDOUT,
                            env={**ENV, 'STREAMLIT_BROWSER_GATHER_USAGE_STATS': 'false'}, cwd=tmp_path)
    driver = None
    try:
        _wait_health(port, proc)
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for a in ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
                  '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage', f'--user-data-dir={tmp_path / "chrome"}']:
            opts.add_argument(a)
        driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 400, poll_frequency=0.5)
        box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, 'textarea[data-testid="stChatInputTextArea"]'))
        box.send_keys(Q); box.send_keys(Keys.ENTER)

        def reply(d):
            msgs = d.find_elements(By.CSS_SELECTOR, '[data-testid="stChatMessage"]')
            if len(msgs) < 2: return False
            text = ' '.join(msgs[-1].text.split())   # the avatar's icon name comes first ('smart_toy ...')
            return text if text.endswith(' '.join(want.split())) else False
        got = wait.until(reply)
        assert 'Paris' in got
        driver.find_element(By.XPATH, "//button[.//p[text()='Reset'] or text()='Reset']").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '[data-testid="stChatMessage"]')) == 0)
    except Exception:
        log.flush(); print((tmp_path / 'server.log').read_text()[-3000:])
        if driver is not None: print(driver.find_element(By.TAG_NAME, 'body').text[-2000:])
        raise
    finally:
        if driver is not None: driver.quit()
        proc.terminate()
        try: proc.wait(20)
        except subprocess.TimeoutExpired: proc.kill()
        log.close()


def _chat(args, stdin=b''):
    r = subprocess.run([sys.executable, '-m', 'ft_course', 'chat', *args], input=stdin, capture_output=True, env=ENV, timeout=300)
    return r.returncode, r.stderr.decode('utf-8', 'replace')


@pytest.mark.parametrize('bad', [['--temperature', '0.7', '--top-p', '0'], ['--top-p', '1.5'], ['--temperature', '-0.5'],
                                 ['--max-new-tokens', '0']])
def test_chat_rejects_bad_sampling_args(bad):
    rc, err = _chat(['tiny-llama', '--device', 'cpu', *bad])
    assert rc == 2 and 'Traceback' not in err and len(err.strip().splitlines()) == 1, err


def test_chat_invalid_utf8_stdin_is_one_line():
    rc, err = _chat(['tiny-llama', '--device', 'cpu', '--max-new-tokens', '2'], stdin=b'hello \xff\xfe\n')
    assert rc == 2 and 'Traceback' not in err and 'UTF-8' in err, err


def test_chat_wrong_shape_adapter_is_one_line(tmp_path):
    "An adapter trained on a model of other shapes: one line naming the adapter, exit 2 (was a size-mismatch traceback)."
    from peft import LoraConfig, get_peft_model
    from ft_course.models import tiny_model
    other = tiny_model('llama', hidden_size=48, intermediate_size=96)
    get_peft_model(other, LoraConfig(r=2, target_modules=['q_proj'])).save_pretrained(tmp_path / 'ad')
    rc, err = _chat(['tiny-llama', '--device', 'cpu', '--adapter', str(tmp_path / 'ad')], stdin=b'hi\n')
    assert rc == 2 and 'Traceback' not in err and 'does not fit' in err, err
