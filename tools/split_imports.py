"""Split notebook code cells that mix top-level imports with other code.

nbdev's docs processing (`proc_nbs`, used by `nbdev_docs` and `ft-course docs`) executes every cell that
contains an import, so a cell like `import torch; model = train()` would run a training job while building
docs. This moves such a cell's top-level import statements into a cell of their own just before it.
Usage: python tools/split_imports.py nbs/*.ipynb   (then nbdev_clean)
"""
import ast, sys, nbformat

def split_cell(src):
    try: tree = ast.parse(src)
    except SyntaxError: return None
    lines = src.splitlines()
    imp, rest = [], []
    for node in tree.body:
        seg = lines[node.lineno - 1: node.end_lineno]
        (imp if isinstance(node, (ast.Import, ast.ImportFrom)) else rest).append((node.lineno, node.end_lineno))
    if not imp or not rest: return None
    # only split when the same source line does not hold both kinds (e.g. `import x; y = 1`)
    imp_lines = {l for a, b in imp for l in range(a, b + 1)}
    rest_lines = {l for a, b in rest for l in range(a, b + 1)}
    if imp_lines & rest_lines: return 'mixed-line'
    keep = [l for i, l in enumerate(lines, 1) if i not in imp_lines]
    directives = [l for l in keep if l.startswith('#|')]
    body = [l for l in keep if not l.startswith('#|')]
    imports = [lines[i - 1] for i in sorted(imp_lines)]
    return '\n'.join(directives + imports), '\n'.join(directives + body).strip('\n')

def fix(path):
    nb = nbformat.read(path, as_version=4)
    out, changed = [], 0
    for c in nb.cells:
        if c.cell_type == 'code' and not any(l.startswith(('#| export', '#| exporti', '#|export')) for l in c.source.splitlines()):
            r = split_cell(c.source)
            if r == 'mixed-line':
                print(f"{path}: cannot split (import and code on one line):\n{c.source[:200]}\n"); r = None
            if r:
                a, b = r
                out.append(nbformat.v4.new_code_cell(a)); c.source = b; changed += 1
        out.append(c)
    if changed:
        nb.cells = out; nbformat.write(nb, path); print(f"{path}: split {changed} cells")

if __name__ == '__main__':
    for p in sys.argv[1:]: fix(p)
