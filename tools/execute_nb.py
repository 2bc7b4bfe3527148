"""Execute a notebook in place, the way a learner runs it, storing every cell's outputs; cells flagged with a directive
listed in settings.ini's tst_flags (gpu, slow, multigpu, notest) are skipped unless named with --flags, as nbdev_test does.

    FT_COURSE_SIZE=laptop python tools/execute_nb.py nbs/03_nf4.ipynb [--flags slow]
    python tools/execute_nb.py nbs/15_llava_finetune.ipynb --only ID [ID ...]

`--only` runs the notebook's set-up (exported cells and cells that only import or define) and then just the cells with
those ids, keeping every other cell's stored outputs: for cells that read committed records.

It records in the notebook's metadata (`ft_course`: the date and, for each code cell it ran, a hash of its source and
the size) what `ft-course docs --check-stale` compares the cells with: run nbdev_clean afterwards, as before a commit.
"""
import argparse, configparser, os, sys, time
from pathlib import Path
from execnb.nbio import read_nb, write_nb
from execnb.shell import CaptureShell
from nbdev.process import first_code_ln, extract_directives

def _setup(cell, d) -> bool:
    "An exported cell, or one whose statements are all imports, definitions or assignments of constants."
    import ast
    if 'export' in d or 'exports' in d: return True
    try: tree = ast.parse('\n'.join(l for l in cell.source.splitlines() if not l.lstrip().startswith(('#', '%', '!'))))
    except SyntaxError: return False
    return all(isinstance(n, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef)) for n in tree.body)

class CellSyntaxError(Exception):
    "execnb prints a cell's SyntaxError as output and goes on: we stop before running such a cell."

def main(argv=None):
    from IPython.core.inputtransformer2 import TransformerManager
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('notebook'); ap.add_argument('--flags', default='', help='space-separated flags to run too')
    ap.add_argument('--only', nargs='*', default=None, help='cell ids to run (with the set-up cells)')
    a = ap.parse_args(argv)
    ini = configparser.ConfigParser(); ini.read(Path(__file__).resolve().parents[1] / 'settings.ini')
    skip = set(ini['DEFAULT'].get('tst_flags', '').split()) - set(a.flags.split())
    path = Path(a.notebook).resolve()
    nb = read_nb(path)
    def preproc(cell):
        if cell.cell_type != 'code': return False
        d = extract_directives(cell, remove=False)
        if skip & set(d) or 'eval:' in d and str(d['eval:'][0]).lower() == 'false': return True
        if a.only is not None and cell.get('id') not in a.only: return not _setup(cell, d)
        if a.only is None or cell.get('id') in a.only: ran.add(cell.get('id'))
        try: compile(TransformerManager().transform_cell(cell.source), f"cell {cell.get('id')}", 'exec')
        except SyntaxError as e: raise CellSyntaxError(f"cell id {cell.get('id')} line {e.lineno}: {e.msg}") from None
        return False
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ft_course.core import size
    from ft_course.docs import record_execution
    sz, ran = size(), set()
    os.chdir(path.parent)
    t0 = time.time()
    if a.only is not None:
        keep = {c.get('id'): c.get('outputs') for c in nb.cells if c.cell_type == 'code' and c.get('id') not in a.only}
    try: CaptureShell(path).run_all(nb, exc_stop=True, preproc=preproc)
    except CellSyntaxError as e:
        print(f"{path.name}: {e}; notebook not written", file=sys.stderr); return 1
    if a.only is not None:
        for c in nb.cells:
            if c.get('id') in keep: c['outputs'] = keep[c['id']]
    errs = [(i, c) for i, c in enumerate(nb.cells) if c.get('id') in ran and any(o.get('output_type') == 'error' for o in c.get('outputs', []))]
    if errs:   # a SyntaxError is shown as an output, not raised: nothing is written then
        i, c = errs[0]; e = next(o for o in c['outputs'] if o.get('output_type') == 'error')
        print(f"{path.name}: cell {i} (id {c.get('id')}) failed: {e.get('ename')}: {e.get('evalue')}; notebook not written", file=sys.stderr)
        return 1
    record_execution(nb, sz, ids=ran)   # only the cells whose outputs this run made
    write_nb(nb, path)
    print(f"{path.name}: executed in {time.time() - t0:.0f} s (size {sz}), skipped flags: {' '.join(sorted(skip))}")

if __name__ == '__main__':
    sys.exit(main())
