"""Turn a percent-format draft (`# %%` code cells, `# %% [markdown]` cells) into a notebook.

Authoring aid for maintainers: `python tools/pct2nb.py draft.py nbs/02_lora.ipynb`.
Markdown cells are written with a leading `# ` on each line (stripped here); code cells as they are.
The notebook in `nbs/` stays the source of truth; drafts are not committed.
"""
import sys, re, nbformat

def convert(src, dst):
    text = open(src, encoding='utf-8').read()
    parts = re.split(r'^# %%(.*)$', text, flags=re.M)
    cells = []
    for hdr, body in zip(parts[1::2], parts[2::2]):
        body = body.strip('\n')
        if '[markdown]' in hdr:
            lines = [l[2:] if l.startswith('# ') else l.lstrip('#') for l in body.splitlines()]
            cells.append(nbformat.v4.new_markdown_cell('\n'.join(lines).strip('\n')))
        else:
            cells.append(nbformat.v4.new_code_cell(body))
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata = {"kernelspec": {"display_name": "python3", "language": "python", "name": "python3"}}
    nbformat.write(nb, dst)

if __name__ == '__main__': convert(sys.argv[1], sys.argv[2])
