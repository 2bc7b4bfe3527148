"""ft_course.chat: the streaming chat loop, the terminal command with piped stdin, and the web demo in a real browser.

The browser test needs Debian's `chromium` and `chromium-driver` (apt) and the `selenium` Python package (pip);
it is skipped, saying so, when they are missing.
"""
import contextlib, json, os, shutil, socket, subprocess, sys, time, urllib.request
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


NO_BROWSER = not (CHROMIUM and CHROMEDRIVER)
NEEDS_BROWSER = 'needs Debian chromium + chromium-driver (apt-get install -y chromium chromium-driver)'


@contextlib.contextmanager
def _demo_in_chromium(tmp_path, cmd, env=None):
    "Serve `cmd` (a web_demo_command) and open it in headless Chromium: yields (driver, wait); prints the server log on failure."
    webdriver = pytest.importorskip('selenium.webdriver', reason='needs the selenium package (pip install selenium)')
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    port = int(cmd[cmd.index('--server.port') + 1])
    log = open(tmp_path / 'server.log', 'w')
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env={**ENV, 'STREAMLIT_BROWSER_GATHER_USAGE_STATS': 'false', **(env or {})}, cwd=tmp_path)
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
        yield driver, WebDriverWait(driver, 400, poll_frequency=0.5)
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


def _ask_in_page(driver, wait, question):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, 'textarea[data-testid="stChatInputTextArea"]'))
    box.send_keys(question); box.send_keys(Keys.ENTER)


def _reset_page(driver, wait):
    from selenium.webdriver.common.by import By
    driver.find_element(By.XPATH, "//button[.//p[text()='Reset'] or text()='Reset']").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '[data-testid="stChatMessage"]')) == 0)


@pytest.mark.skipif(NO_BROWSER, reason=NEEDS_BROWSER)
def test_web_demo_in_chromium(tmp_path, smol):
    from selenium.webdriver.common.by import By
    model, tok = smol
    want = ChatSession(model, tok, max_new_tokens=12).ask(Q)
    with _demo_in_chromium(tmp_path, web_demo_command('smollm2', port=_free_port(), extra=['--max-new-tokens', '12'])) as (driver, wait):
        _ask_in_page(driver, wait, Q)

        def reply(d):
            msgs = d.find_elements(By.CSS_SELECTOR, '[data-testid="stChatMessage"]')
            if len(msgs) < 2: return False
            text = ' '.join(msgs[-1].text.split())   # the avatar's icon name comes first ('smart_toy ...')
            return text if text.endswith(' '.join(want.split())) else False
        got = wait.until(reply)
        assert 'Paris' in got
        _reset_page(driver, wait)


@pytest.mark.skipif(NO_BROWSER, reason=NEEDS_BROWSER)
def test_web_demo_tool_call_in_chromium(tmp_path):
    """`ft-course web-demo MODEL --tools calculator,lookup`: one question, one tool call. Scripted replies stand in for the
    model (the FT_COURSE_DEMO_REPLIES hook); the calculator runs for real, so 84.5 on the page can only be its result."""
    from selenium.webdriver.common.by import By
    from ft_course.agent import calculator
    result = calculator('12*7+0.5')
    answer = 'That makes eighty-four and a half.'
    (tmp_path / 'replies.json').write_text(json.dumps(
        ['<tool_call>{"name": "calculator", "arguments": {"expression": "12*7+0.5"}}</tool_call>', answer]))
    cmd = web_demo_command('tiny-llama', port=_free_port(), extra=['--tools', 'calculator,lookup', '--max-new-tokens', '8'])
    with _demo_in_chromium(tmp_path, cmd, {'FT_COURSE_DEMO_REPLIES': str(tmp_path / 'replies.json')}) as (driver, wait):
        from selenium.webdriver.support.ui import WebDriverWait
        WebDriverWait(driver, 120, 0.5).until(lambda d: 'FT_COURSE_DEMO_REPLIES' in d.find_element(By.TAG_NAME, 'body').text)   # the stand-in says so
        _ask_in_page(driver, wait, 'What is 12 times 7, plus a half?')

        def turn(d):
            msgs = d.find_elements(By.CSS_SELECTOR, '[data-testid="stChatMessage"]')
            if len(msgs) < 2 or answer not in msgs[-1].text: return False
            return msgs
        msgs = wait.until(turn)
        assert len(msgs) == 2, [m.text for m in msgs]
        text = ' '.join(msgs[-1].text.split())
        call = f"🔧 calculator(expression='12*7+0.5') → {result}"
        assert result == '84.5' and call in text and text.index(call) < text.index(answer), text
        calls = msgs[-1].find_elements(By.CSS_SELECTOR, '[data-testid="stExpander"]')
        assert len(calls) == 1
        calls[0].find_element(By.TAG_NAME, 'summary').click()    # open it: the arguments as JSON, the observation
        wait.until(lambda d: '{"expression": "12*7+0.5"}' in ' '.join(calls[0].text.split()))
        # a second question re-draws the first from the history (a call, then the answer) and adds its own
        _ask_in_page(driver, wait, 'Once more?')
        msgs = wait.until(lambda d: (lambda m: m if len(m) == 4 and answer in m[-1].text else False)(d.find_elements(By.CSS_SELECTOR, '[data-testid="stChatMessage"]')))
        for m in (msgs[1], msgs[3]):
            text = ' '.join(m.text.split())
            assert call in text and text.index(call) < text.index(answer) and len(m.find_elements(By.CSS_SELECTOR, '[data-testid="stExpander"]')) == 1, text
        _reset_page(driver, wait)


# ---------------------------------------------------------------- tools in the widget, the session, the command line
def _scripted(*replies): return __import__('ft_course.chat', fromlist=['x']).scripted_generate(replies)


def test_tool_session_history_and_widget():
    "Each call is a history entry (name, arguments, the tool's observation) before the answer; the widget shows it as a block."
    from ft_course.chat import ToolSession, chat_widget, call_text
    seen = []
    gen = _scripted('<tool_call>{"name": "calculator", "arguments": {"expression": "6*7"}}</tool_call>', 'It is forty-two.', 'Hi!')
    ts = ToolSession(None, None, 'calculator,lookup', generate_fn=lambda texts: seen.extend(texts) or gen(texts))
    ui = chat_widget(ts)
    ui.submit('What is 6 times 7?')
    assert [m['role'] for m in ts.history] == ['user', 'tool', 'assistant']
    assert ts.history[1] | {'reply': None} == dict(role='tool', name='calculator', arguments={'expression': '6*7'}, content='42', ok=True, reply=None)
    assert call_text(ts.history[1]) == "🔧 calculator(expression='6*7') → 42" and ts.stats == dict(tool_calls=1, stopped='answer')
    log = ui.chat_log.value
    assert log.count("class='ft-tool'") == 1 and "calculator(expression=&#x27;6*7&#x27;) → 42" in log
    assert log.index('you:') < log.index('ft-tool') < log.index('<b>model:</b> It is forty-two.')
    assert '42' in seen[1] and len(seen) == 2           # the observation went back to the model
    ui.submit('hello')
    assert ts.history[-1]['content'] == 'Hi!' and 'It is forty-two.' in seen[-1] and 'Hi!' in ui.chat_log.value
    ui.reset_button.click()
    assert ts.history == [] and ui.chat_log.value == ''


def test_tool_session_limit_and_bad_calls_are_shown():
    from ft_course.chat import ToolSession, call_text
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "1+1"}}</tool_call>'
    ts = ToolSession(None, None, 'calculator', max_calls=1, generate_fn=_scripted(call, call, call))
    assert ts.ask('q') == '(no answer: max_calls)'
    assert [(m['content'], m['ok']) for m in ts.history[1:3]] == [('2', True), ('error: the limit of 1 tool calls is reached; answer without tools', False)]
    assert not ts.history[3]['ok'] and 'not run' in ts.history[3]['content']
    ts = ToolSession(None, None, 'calculator', generate_fn=_scripted('<tool_call>{"name": 3}</tool_call>', 'ok'))
    assert ts.ask('q') == 'ok' and call_text(ts.history[1]).startswith("⚠ unreadable tool call '<tool_call>{\"name\": 3}")


def test_widget_tools_wraps_a_chat_session(smol):
    from ft_course.chat import chat_widget
    model, tok = smol
    ui = chat_widget(ChatSession(model, tok, template='chatml', max_new_tokens=4), tools='calculator')
    assert type(ui.session).__name__ == 'ToolSession' and list(ui.session.tools) == ['calculator']
    assert ui.session.model is model and ui.session.template.name == 'chatml' and ui.session.max_new_tokens == 4


def test_web_demo_cli_passes_tools(monkeypatch):
    import subprocess as sp
    from ft_course.chat import web_demo_cli
    got = []
    monkeypatch.setattr(sp, 'call', lambda cmd: got.append(cmd) or 0)
    assert web_demo_cli(['tiny-llama', '--tools', 'calculator,lookup', '--max-tool-calls', '2', '--port', '8600']) == 0
    rest = got[0][got[0].index('--') + 1:]
    assert rest[0] == 'tiny-llama' and rest[rest.index('--tools') + 1] == 'calculator,lookup'
    assert rest[rest.index('--max-tool-calls') + 1] == '2' and rest[rest.index('--tool-format') + 1] == 'json'
    assert web_demo_cli(['tiny-llama']) == 0 and '--tools' not in got[1]


def test_web_demo_cli_unknown_tool(capsys, monkeypatch):
    "An unknown tool name: one line, exit 2, and no server started."
    import subprocess as sp
    from ft_course.chat import web_demo_cli
    started = []
    monkeypatch.setattr(sp, 'call', lambda cmd: started.append(cmd) or 0)
    assert web_demo_cli(['tiny-llama', '--tools', 'calculator,shell']) == 2 and started == []
    err = capsys.readouterr().err
    assert 'unknown tool' in err and 'shell' in err and len(err.strip().splitlines()) == 1, err


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
