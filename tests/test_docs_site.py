"""The docs site as a reader sees it: built once with `ft_course.docs.build_docs`, served over HTTP and opened in
headless Chromium (Debian's `chromium` + `chromium-driver`, driven by selenium as in test_chat.py).
Screenshots of the checked pages are kept in `_site_test/_screenshots/` for a person to look at."""
import functools, http.server, shutil, threading, urllib.error, urllib.parse, urllib.request
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / 'nbs'
CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')
CHROMEDRIVER = shutil.which('chromedriver')
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason='needs Debian chromium + chromium-driver (apt-get install -y chromium chromium-driver)')

# LoRA, NF4 and the training notebook (06_qlora_sft, or 06_training_loop / 07_configs_checkpoints after the re-cut)
PAGES = ['02_lora', '03_nf4'] + sorted({p.stem for pat in ['*_qlora_sft.ipynb', '*_training_loop.ipynb', '*_configs_checkpoints.ipynb']
                                        for p in NBS.glob(pat)})

# Text a reader sees that still looks like LaTeX or nbdev markup: walks the text nodes outside code and rendered maths.
JS_PROBLEMS = r"""
const skip = 'pre, code, script, style, textarea, .math, .MathJax, .MathJax_CHTML, .MathJax_SVG, .MathJax_Display, .MathJax_Preview, .MJX_Assistive_MathML, mjx-container';
const out = [], w = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
let text = '';
for (let n = w.nextNode(); n; n = w.nextNode()) if (!n.parentElement.closest(skip)) text += n.nodeValue + ' ';
for (const m of text.matchAll(/\$\$|\$[^$\s][^$]{0,200}?\$|\{target=|In \[[ \d]*\]:|Out\[\d*\]:/g)) out.push('raw text on the page: ' + m[0].slice(0, 80));
const maths = document.querySelectorAll('.math.nohighlight');   // Sphinx's maths nodes (MathJax's own spans are .math too)
const done = '.MathJax, .MathJax_CHTML, .MathJax_SVG, .MathJax_Display, mjx-container';
const typeset = document.querySelectorAll('.math.nohighlight :is(' + done + ')');
if (maths.length === 0) out.push('no maths on the page');
for (const m of maths) if (!m.querySelector(done))
    out.push('maths not typeset: ' + m.textContent.slice(0, 80));
for (const img of document.images) if (!(img.complete && img.naturalWidth > 0)) out.push('image not loaded: ' + img.src);
for (const e of document.querySelectorAll('script[src], link[rel=stylesheet], img'))
    if (!(e.src || e.href).startsWith(location.origin + '/') && !(e.src || e.href).startsWith('file:')) out.push('loaded from the network: ' + (e.src || e.href));
const wide = document.documentElement.scrollWidth - document.documentElement.clientWidth;
if (wide > 2) out.push('the page scrolls sideways by ' + wide + 'px');
return [out, typeset.length];
"""


def page_problems(driver, url, timeout=60):
    "Load `url`, wait for MathJax to finish, return (problems, number of typeset maths elements)."
    from selenium.webdriver.support.ui import WebDriverWait
    driver.get(url)
    WebDriverWait(driver, timeout).until(lambda d: d.execute_script("""
        if (document.readyState !== 'complete') return false;
        if (!(window.MathJax && MathJax.Hub)) return true;
        if (!window.__mjq) { window.__mjq = true; MathJax.Hub.Queue(() => { window.__mjdone = true; }); }
        return !!window.__mjdone;"""))
    return driver.execute_script(JS_PROBLEMS)


def full_page_screenshot(driver, path):
    "The whole page, top to bottom, as one PNG (Chromium's DevTools screenshot beyond the window)."
    import base64
    shot = driver.execute_cdp_cmd('Page.captureScreenshot', {'format': 'png', 'captureBeyondViewport': True})
    Path(path).write_bytes(base64.b64decode(shot['data']))


def broken_links(driver, base):
    "Internal links (same site) whose target answers 404."
    hrefs = driver.execute_script("return [...document.querySelectorAll('a[href]')].map(a => a.href)")
    bad = []
    for h in sorted({h.split('#')[0] for h in hrefs if h.startswith(base)}):
        try: urllib.request.urlopen(h, timeout=10).close()
        except urllib.error.HTTPError as e: bad.append(f"{h} -> {e.code}")
    return bad


@pytest.fixture(scope='module')
def site():
    from ft_course.docs import build_docs
    out = build_docs(NBS, ROOT / '_site_test', readme=None)
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a): pass
        def handle(self):
            try: super().handle()
            except (BrokenPipeError, ConnectionResetError): pass
    handler = functools.partial(Quiet, directory=str(out))
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield out, f"http://127.0.0.1:{srv.server_address[1]}/"
    srv.shutdown()


@pytest.fixture(scope='module')
def driver(tmp_path_factory):
    webdriver = pytest.importorskip('selenium.webdriver', reason='needs the selenium package (pip install selenium)')
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
              '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage', '--window-size=1280,1600',
              f'--user-data-dir={tmp_path_factory.mktemp("chrome")}']:
        opts.add_argument(a)
    d = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield d
    d.quit()


@pytest.mark.parametrize('page', PAGES)
def test_page_renders(site, driver, page):
    out, base = site
    problems, typeset = page_problems(driver, base + page + '.html')
    shots = out / '_screenshots'
    shots.mkdir(exist_ok=True)
    full_page_screenshot(driver, shots / f"{page}.png")
    problems += broken_links(driver, base)
    assert problems == [], '\n'.join(problems)
    assert typeset > 0
    # show_doc entries are clean API entries with a working link to the highlighted source
    srcs = driver.execute_script("return [...document.querySelectorAll('.ftc-api .ftc-api-src')].map(a => a.href)")
    assert srcs and all('/_modules/ft_course/' in s for s in srcs), srcs[:3]
    assert driver.execute_script("return document.querySelectorAll('.ftc-api .highlight pre').length") == len(srcs)
    assert driver.execute_script("return document.querySelectorAll('button.copybtn').length") > 0


def test_search_finds_lora(site, driver):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    out, base = site
    driver.get(base + 'search.html?q=lora_A')
    # Sphinx adds the hits one by one, then writes its summary ('Search finished, found N pages ...')
    WebDriverWait(driver, 60).until(lambda d: d.execute_script(
        "const s = document.querySelector('#search-results .search-summary'); return s && s.innerText.length > 0"))
    hits = [urllib.parse.urlparse(a.get_attribute('href')).path for a in driver.find_elements(By.CSS_SELECTOR, '#search-results ul.search li a')]
    assert '/02_lora.html' in hits, hits


def test_checks_can_fail(site, driver, tmp_path):
    "The same checks on a page built without the MathJax bundle and with raw nbdev markup report the problems."
    import nbformat
    from ft_course.docs import build_docs
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell('# Broken\n\nInline $h = W_0 x$ and\n\n$$\\Delta W = BA$$\n\nraw `x`{target="_blank"} text: source{target="_blank" style="float:right"}')])
    nb.cells.append(nbformat.v4.new_markdown_cell('An image that is not there: <img src="nothere.png">'))
    nb.cells.append(nbformat.v4.new_code_cell('x', outputs=[nbformat.v4.new_output('display_data', {'text/html': '<p>maths nobody typesets: $x = 1$</p>'})]))
    (tmp_path / 'nbs').mkdir()
    nbformat.write(nb, tmp_path / 'nbs' / '01_broken.ipynb')
    out = build_docs(tmp_path / 'nbs', tmp_path / 'site', readme=None, process=False, math=False)
    problems, typeset = page_problems(driver, (out / '01_broken.html').as_uri())
    assert typeset == 0
    assert any(p.startswith('maths not typeset') for p in problems), problems
    assert any('{target=' in p for p in problems), problems
    assert 'raw text on the page: $x = 1$' in problems, problems
    assert any(p.startswith('image not loaded') for p in problems), problems
