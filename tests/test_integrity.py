"""The integrity scan's file-access finding: every route to a file outside the notebook's own
folder is flagged (hostile cells written by hand, one per route), and ordinary work is not
(NumPy/torch code, files in the notebook's own folder, every cell of every solution notebook).

The scan is static: these tests never run the hostile code.
"""

from pathlib import Path

import nbformat
import pytest

from qkv.grading.integrity import _aliases_and_names, scan_code

REPO = Path(__file__).resolve().parents[1]
SETUP_ALIASES = {"np": "numpy", "torch": "torch", "F": "torch.nn.functional"}


def file_findings(code: str, aliases=SETUP_ALIASES) -> list[str]:
    return [f.detail for f in scan_code(code, "cell", aliases, set()) if f.finding == "file-access"]


HOSTILE = {
    # open()
    "open-absolute": "print(open('/etc/passwd').read())",
    "open-climbing": "with open('../../../gradebook.db', 'rb') as f:\n    data = f.read()",
    "open-write-absolute": "with open('/tmp/qkv-x/source/nb.ipynb', 'w') as f:\n    f.write('')",
    # pathlib
    "pathlib-climbing": "from pathlib import Path\nprint(list((Path('..') / '..').iterdir()))",
    "pathlib-parent-of-resolved": "from pathlib import Path\n"
                                  "print(list(Path('.').resolve().parent.iterdir()))",
    "pathlib-parents-of-cwd": "import pathlib\nroot = pathlib.Path.cwd()\n"
                              "print(list(root.parents[1].glob('*')))",
    "pathlib-home": "from pathlib import Path\nprint((Path.home() / '.bashrc').read_text())",
    "pathlib-absolute-write": "from pathlib import Path\nPath('/tmp/out.txt').write_text('x')",
    # os
    "os-listdir-pardir": "import os\nprint(os.listdir(os.pardir))",
    "os-walk-home": "import os\nfor d, _, names in os.walk(os.path.expanduser('~')):\n"
                    "    print(names)",
    "os-dirname-of-abspath": "import os\nup = os.path.dirname(os.path.abspath('.'))\n"
                             "print(os.listdir(up))",
    "os-remove-absolute": "import os\nos.remove('/tmp/qkv-grading/gradebook.db')",
    "os-sep-built": "import os\nprint(open(os.sep + 'etc' + os.sep + 'passwd').read())",
    "os-chdir": "import os\nos.chdir('..')",
    "os-getcwd": "import os\nprint(os.getcwd())",
    # io
    "io-open": "import io\nprint(io.open('/etc/hostname').read())",
    "io-fileio-write": "import io\nio.FileIO('../other.ipynb', 'w').write(b'')",
    # shutil
    "shutil-copy-in": "import shutil\nshutil.copy('../../source/ch05/masking.ipynb', 'm.ipynb')",
    "shutil-rmtree": "import shutil as sh\nsh.rmtree('..')",
    # glob
    "glob-climbing": "import glob\nprint(glob.glob('../**/*.ipynb', recursive=True))",
    "glob-absolute": "from glob import glob\nprint(glob('/home/*/'))",
    # sqlite3
    "sqlite3-gradebook": "import sqlite3\n"
                         "sqlite3.connect('../../../gradebook.db').execute('select 1')",
    # subprocess and the shell
    "subprocess-list": "import subprocess\nsubprocess.run(['cat', '../../gradebook.db'])",
    "subprocess-shell": "import subprocess as sp\nprint(sp.check_output('ls ..', shell=True))",
    "os-system": "import os\nos.system('cat ../../gradebook.db')",
    "os-popen-home": "import os\nprint(os.popen('ls ~').read())",
    "shell-env-var": "import subprocess\nsubprocess.run('cat $HOME/.bashrc', shell=True)",
    # reaching file functions by name
    "importlib-built-name": "import importlib\nm = importlib.import_module('o' + 's')\n"
                            "print(m.listdir('.'))",
    "dunder-import": "__import__('shutil').copy('notes.txt', 'copy.txt')",
    "getattr-builtins-open": "f = getattr(__builtins__, 'open')\nprint(f('notes.txt').read())",
    "getattr-built-name": "f = getattr(__builtins__, 'op' + 'en')",
    "builtins-dict": "import builtins\nprint(vars(builtins)['open']('notes.txt').read())",
    # the environment and home
    "environ-home": "import os\nprint(open(os.environ['HOME'] + '/.bashrc').read())",
    "environ-imported": "from os import environ\nprint(environ.get('HOME'))",
    "getenv": "import os\nprint(os.listdir(os.getenv('HOME')))",
    "expandvars": "import os\nprint(os.path.expandvars('$HOME/notes'))",
    "expanduser": "import os\nprint(open(os.path.expanduser('~/.ssh/id_rsa')).read())",
    # paths put together from pieces
    "concatenated": "print(open('.' + './gradebook.db').read())",
    "joined": "print(open('/'.join(['', 'etc', 'passwd'])).read())",
    "f-string": "d = 'etc'\nprint(open(f'/{d}/passwd').read())",
    "format": "print(open('{}{}/x'.format('.', '.')).read())",
    "reversed-text": "print(open('dwssap/cte/'[::-1]).read())",
    "chr-codes-folded": "print(open(''.join(map(chr, [46, 46, 47, 120]))).read())",
    "chr-codes-variable": "codes = [46, 46, 47, 120]\n"
                          "print(open(''.join(chr(c) for c in codes)).read())",
    "bytes-codes": "print(open(bytes([47, 101, 116, 99]).decode()).read())",
    "base64": "import base64\nprint(open(base64.b64decode('L2V0Yy9wYXNzd2Q=').decode()).read())",
    "os-path-join-absolute": "import os\nprint(open(os.path.join('notes', '/etc/passwd')).read())",
    # numpy and torch loading and saving
    "numpy-load": "w = np.load('../../weights.npy')",
    "numpy-save": "np.save('/tmp/w.npy', np.zeros(3))",
    "torch-save": "torch.save({'w': 1}, '../model.pt')",
    # where the temporary folder and the modules live
    "tempfile": "import tempfile\nopen(tempfile.gettempdir() + '/x', 'w').write('x')",
    "module-file": "import os\nprint(os.listdir(os.path.dirname(np.__file__)))",
    "sys-prefix": "import os, sys\nprint(os.listdir(sys.prefix))",
    "importlib-resources": "from importlib import resources\n"
                           "print(resources.files('qkv').joinpath('np').iterdir())",
    # a cell that does not parse is scanned as text
    "unparsable": "print(open('../secret.txt').read()",
}


@pytest.mark.parametrize("route", HOSTILE)
def test_every_route_outside_the_folder_is_flagged(route):
    assert file_findings(HOSTILE[route]), HOSTILE[route]


LEGITIMATE = {
    "numpy-softmax": "def softmax(x, axis=-1):\n"
                     "    e = np.exp(x - np.max(x, axis=axis, keepdims=True))\n"
                     "    return e / e.sum(axis=axis, keepdims=True)",
    "numpy-reversal": "def flip(x):\n    return x[..., ::-1] / np.sqrt(x.shape[-1])",
    "torch-block": "def mlp(x, w_fc, b_fc, w_proj, b_proj):\n"
                   "    return F.gelu(x @ w_fc + b_fc, approximate='tanh') @ w_proj + b_proj\n"
                   "scores = torch.randn(2, 5, 5).masked_fill(~torch.ones(5, 5).bool(), "
                   "float('-inf'))",
    "tokenizer-chr": "chars = sorted(set(text))\nstoi = {c: i for i, c in enumerate(chars)}\n"
                     "decoded = ''.join(chr(c) for c in [104, 105])",
    "prose": "print(f'scores / sqrt(d_head) has shape (..., seq, seq): {x.shape}')\n"
             "print('~N(0, 1) entries; 1/sqrt(d) = %.3f' % (1 / 8 ** 0.5))\n"
             "label = r'$QKV$ and $\\sqrt{d_k}$'",
    "open-own-file": "with open('notes.txt', 'w') as f:\n    f.write('hello')\n"
                     "print(open('notes.txt').read())",
    "pathlib-own-file": "from pathlib import Path\np = Path('data') / 'tiny.txt'\n"
                        "print(p.read_text(), p.parent, Path('x.txt').exists())",
    "os-own-folder": "import os\nprint(os.listdir('.'), os.path.exists('data.txt'),\n"
                     "      os.path.join('sub', 'x.txt'))",
    "glob-own-folder": "import glob\nprint(glob.glob('*.npy'), glob.glob('**/*.txt', "
                       "recursive=True))",
    "numpy-save-own": "np.save('weights.npy', np.ones(3))\nw = np.load('weights.npy')",
    "torch-save-own": "torch.save({'w': 1}, 'model.pt')\nstate = torch.load('model.pt')",
}


@pytest.mark.parametrize("case", LEGITIMATE)
def test_ordinary_work_and_the_own_folder_are_not_flagged(case):
    assert file_findings(LEGITIMATE[case]) == []


def _code_cells(path: Path) -> list[str]:
    nb = nbformat.read(path, as_version=4)
    return [c.source for c in nb.cells if c.cell_type == "code"]


SOLUTIONS = sorted((REPO / "solutions").glob("*/*.ipynb"))


@pytest.mark.parametrize("notebook", SOLUTIONS, ids=[p.parent.name for p in SOLUTIONS])
def test_no_cell_of_a_solution_notebook_is_flagged(notebook):
    """Every code cell (setup, answers and tests alike), not only the answers."""
    nb = nbformat.read(notebook, as_version=4)
    aliases, _ = _aliases_and_names(nb.cells)
    for i, source in enumerate(_code_cells(notebook)):
        assert file_findings(source, aliases) == [], f"{notebook.name} code cell {i + 1}"


def test_one_row_per_thing_done_not_per_nested_expression():
    """`os.listdir('/proc')` is one finding, not two (the literal '/proc' and the call)."""
    from qkv.grading.integrity import scan

    released = REPO / "exercises" / "04-scores-and-softmax" / "softmax.ipynb"
    sub, rel = nbformat.read(released, as_version=4), nbformat.read(released, as_version=4)
    answer = next(c for c in sub.cells if c.metadata.get("nbgrader", {}).get("solution"))
    answer.source = "import os\nprint(os.listdir('/proc'))\nprint(open('/etc/passwd').read())"
    details = [f.detail for f in scan(sub, rel) if f.finding == "file-access"]
    assert len(details) == 2, details
    assert any("os.listdir('/proc')" in d for d in details)
    assert any("open('/etc/passwd')" in d for d in details)
