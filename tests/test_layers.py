"The package is layered: no import cycle among ft_course's modules (imports inside functions count) and no module over 700 lines."
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / 'ft_course'
MAX_LINES = 700
# The layers, bottom first (see the map in index.ipynb): a module may import only modules listed before it.
LAYERS = {'A foundations': ['core', 'models'],
          'B building blocks': ['lora', 'nf4', 'data', 'selfcog', 'shapes', 'export_gguf', 'agent'],
          'C fast path': ['kernels', 'fast'],
          'D trainer': ['config', 'checkpoint', 'accum', 'train'],
          'E on the trainer': ['llava', 'convert', 'llava_data'],
          'F pipelines and apps': ['selfcog_run', 'chat', 'bench', 'cli', 'docs', 'web_demo_app']}
ORDER = [m for ms in LAYERS.values() for m in ms]

def module_imports(path: Path, modules: set[str]) -> set[str]:
    "The ft_course modules `path` imports anywhere (module level, inside functions), relative or absolute."
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ''
            if node.level >= 1:   # from .x import y / from . import x
                out |= {mod.split('.')[0]} if mod else {a.name for a in node.names}
            elif mod == 'ft_course': out |= {a.name for a in node.names}
            elif mod.startswith('ft_course.'): out.add(mod.split('.')[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.split('.')[1] for a in node.names if a.name.startswith('ft_course.')}
    return (out & modules) - {path.stem}

def import_graph(pkg: Path = PKG) -> dict[str, set[str]]:
    mods = {p.stem: p for p in pkg.glob('*.py') if not p.stem.startswith('_')}
    return {m: module_imports(p, set(mods)) for m, p in mods.items()}

def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    "Strongly connected components with more than one module (Tarjan), each sorted."
    index, low, stack, on, comps = {}, {}, [], set(), []
    def visit(v):
        index[v] = low[v] = len(index); stack.append(v); on.add(v)
        for w in sorted(graph[v]):
            if w not in index: visit(w); low[v] = min(low[v], low[w])
            elif w in on: low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop(); on.discard(w); comp.append(w)
                if w == v: break
            if len(comp) > 1: comps.append(sorted(comp))
    for v in sorted(graph):
        if v not in index: visit(v)
    return comps

def test_cycle_finder_can_fail():
    g = {'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}, 'e': set()}
    assert cycles(g) == [['a', 'b', 'c']]
    assert cycles({'a': {'b'}, 'b': set()}) == []

def test_imports_are_read_everywhere(tmp_path):
    (tmp_path / 'a.py').write_text('from .b import x\ndef f():\n    from ft_course.c import y\n    import ft_course.d\n    from ft_course import e\n')
    for m in 'bcde': (tmp_path / f'{m}.py').write_text('')
    assert import_graph(tmp_path)['a'] == {'b', 'c', 'd', 'e'}

def test_no_import_cycle():
    g = import_graph()
    assert len(g) > 10
    found = cycles(g)
    msg = '; '.join(' <-> '.join(c) + ' (' + ', '.join(f'{a}->{b}' for a in c for b in sorted(g[a]) if b in c) + ')' for c in found)
    assert not found, f"import cycle among ft_course modules: {msg}"

def test_no_module_over_700_lines():
    big = {p.stem: n for p in PKG.glob('*.py') if not p.stem.startswith('_') and (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"

def test_every_module_has_a_docstring():
    missing = [p.stem for p in PKG.glob('*.py') if not p.stem.startswith('_') and not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, f"modules without a docstring: {missing}"

def test_imports_go_down_the_layers():
    g = import_graph()
    assert sorted(g) == sorted(ORDER), f"modules missing from LAYERS: {sorted(set(g) - set(ORDER))}; gone: {sorted(set(ORDER) - set(g))}"
    up = [f"{a} -> {b}" for a in g for b in sorted(g[a]) if ORDER.index(b) > ORDER.index(a)]
    assert not up, f"imports from a module of the same or a higher layer, listed after the importer: {up}"
