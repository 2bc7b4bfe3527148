"The staleness check of stored outputs (ft-course docs --check-stale) and the records tools/execute_nb.py writes."
import json, os, subprocess, sys
from pathlib import Path
import nbformat, pytest
from ft_course.docs import cell_hash, check_stale, check_stale_cli, record_execution, stale_cells, STALE_PENDING

ROOT = Path(__file__).resolve().parents[1]

def _nb(*sources):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell('# t')])
    for i, src in enumerate(sources):
        c = nbformat.v4.new_code_cell(src); c.id = f'c{i}'; nb.cells.append(c)
    return nb

def _execute(tmp_path, size, *sources):
    "A notebook written to tmp_path and run by tools/execute_nb.py at `size`, as a developer would."
    p = tmp_path / 'n.ipynb'
    nbformat.write(_nb(*sources), p)
    env = dict(os.environ, FT_COURSE_SIZE=size, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    subprocess.run([sys.executable, str(ROOT / 'tools/execute_nb.py'), str(p)], check=True, env=env, capture_output=True)
    return p

@pytest.fixture(scope='module')
def executed(tmp_path_factory):
    return _execute(tmp_path_factory.mktemp('laptop'), 'laptop', 'x = 6', 'print(x * 7)', '#| slow\nprint("skipped")')

def test_fresh_record_passes(executed, capsys):
    nb = json.loads(executed.read_text())
    test_out = nb['cells'][2]['outputs'][0]['text']
    assert ''.join(test_out) == '42\n'
    cells = nb['metadata']['ft_course']['cells']
    assert cells == {'c0': f"{cell_hash('x = 6')} laptop", 'c1': f"{cell_hash('print(x * 7)')} laptop"}   # the slow cell did not run
    assert check_stale(executed.parent) == ([], [])
    assert check_stale_cli(executed.parent) == 0

def test_edited_cell_fails(executed, tmp_path, capsys):
    nb = json.loads(executed.read_text())
    nb['cells'][2]['source'] = 'print(x * 8)'
    (tmp_path / 'n.ipynb').write_text(json.dumps(nb))
    problems, _ = check_stale(tmp_path)
    assert problems == [f'{tmp_path}/n.ipynb cell 2 (id c1): source edited since its outputs were made: print(x * 8)']
    assert check_stale_cli(tmp_path) == 1
    assert 'cell 2 (id c1)' in capsys.readouterr().out
    (tmp_path / STALE_PENDING).write_text('n.ipynb old outputs\n')          # the pending list does not hide an edit
    assert check_stale(tmp_path)[0][0].endswith('source edited since its outputs were made: print(x * 8)')

def test_test_size_record_fails(tmp_path):
    p = _execute(tmp_path, 'test', 'print(1)')
    assert stale_cells(json.loads(p.read_text()), 'n') == ["n cell 1 (id c0): outputs from a 'test'-size run: print(1)"]
    assert check_stale_cli(tmp_path) == 1

def test_unrecorded_outputs_fail_unless_pending(tmp_path):
    nb = _nb('print(1)'); nb.cells[1].outputs = [nbformat.v4.new_output('stream', text='1\n')]
    nbformat.write(nb, tmp_path / 'old.ipynb')
    assert check_stale(tmp_path)[0] == [f'{tmp_path}/old.ipynb cell 1 (id c0): outputs no execution recorded: print(1)']
    (tmp_path / STALE_PENDING).write_text('old.ipynb run before the records\n')
    assert check_stale(tmp_path) == ([], ['old.ipynb: pending (1 cells without a record): run before the records'])
    record_execution(nb, 'laptop'); nbformat.write(nb, tmp_path / 'old.ipynb')
    assert check_stale(tmp_path)[0] == [f'{STALE_PENDING}: old.ipynb has no cell left to excuse: remove its line']

def test_nbdev_clean_keeps_the_record(executed, tmp_path):
    import shutil
    shutil.copy(ROOT / 'settings.ini', tmp_path / 'settings.ini')
    (tmp_path / 'nbs').mkdir(); p = tmp_path / 'nbs' / 'n.ipynb'; shutil.copy(executed, p)
    subprocess.run(['nbdev_clean', '--fname', str(p)], check=True, cwd=tmp_path, capture_output=True)
    assert json.loads(p.read_text())['metadata']['ft_course'] == json.loads(executed.read_text())['metadata']['ft_course']

def test_repository_notebooks_are_current():
    problems, _ = check_stale(ROOT / 'nbs')
    assert problems == [], '\n'.join(problems)

def test_execute_stops_on_a_syntax_error(tmp_path):
    "execnb prints a SyntaxError as the cell's output and goes on; execute_nb.py writes nothing then."
    p = tmp_path / 'n.ipynb'
    nbformat.write(_nb('x = 1', "print('a' b')"), p)
    before = p.read_text()
    env = dict(os.environ, FT_COURSE_SIZE='laptop', PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, str(ROOT / 'tools/execute_nb.py'), str(p)], env=env, capture_output=True, text=True)
    assert r.returncode == 1 and 'cell id c1 line 1' in r.stderr, r.stderr
    assert p.read_text() == before
