"""The repository's rooms: the library imports no script and its modules import one another one way (each only
those before it in LIBRARY), and a script imports another script only to run that script's own job."""
import ast
import os
import re

import pytest

from conftest import REPO

# the library, each module above the ones it may import: the network; datasets, ids and metrics; the original REIR's
# files; a run's files; figures; training and evaluation; continuing a run; the original's recipes; loading a trained
# run
LIBRARY = ('model', 'utils', 'original', 'run_files', 'figures', 'engine', 'resume', 'recipes', 'trained')
# the scripts, and hubconf.py, torch.hub's entry points, which stand on the library as they do
SCRIPTS = {'data_utils', 'train', 'evaluate', 'inference', 'benchmark', 'architecture', 'study', 'ablation', 'hubconf'}
OWN_JOBS = {('train', 'data_utils'),       # train.py draws the demo dataset when it is missing
            ('benchmark', 'data_utils'),   # benchmark.py data prepares short-side copies
            ('study', 'data_utils'),       # study.py draws the demo once, before its runs start side by side
            ('study', 'train')}            # study.py has train.py parse and compare the flags of the runs it starts


def repository_imports(module):
    """The repository's modules that module imports, at the top or inside functions."""
    tree = ast.parse(open(os.path.join(REPO, f'{module}.py')).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split('.')[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split('.')[0])
    return names & (set(LIBRARY) | SCRIPTS)


def test_every_module_of_the_repository_is_in_a_room():
    modules = {name[:-3] for name in os.listdir(REPO) if name.endswith('.py')}
    assert modules == set(LIBRARY) | SCRIPTS


@pytest.mark.parametrize('module', LIBRARY)
def test_the_library_imports_no_script(module):
    assert not repository_imports(module) & SCRIPTS


@pytest.mark.parametrize('module', LIBRARY)
def test_a_library_module_imports_only_the_modules_below_it(module):
    assert repository_imports(module) <= set(LIBRARY[:LIBRARY.index(module)])


@pytest.mark.parametrize('script', sorted(SCRIPTS))
def test_a_script_imports_another_only_for_its_own_job(script):
    assert {(script, other) for other in repository_imports(script) & SCRIPTS} <= OWN_JOBS


def test_every_link_between_the_documents_finds_its_heading():
    """README.md, REFERENCE.md and BENCHMARKS.md link to each other's sections by GitHub's anchors."""
    documents = ('README.md', 'REFERENCE.md', 'BENCHMARKS.md')
    anchors = {}
    for name in documents:
        headings = re.findall(r'^#+ (.+)$', open(os.path.join(REPO, name)).read(), flags=re.MULTILINE)
        anchors[name] = {re.sub(r'[^\w\- ]', '', heading.lower()).replace(' ', '-') for heading in headings}
    links = [(name, target or name, anchor) for name in documents
             for target, anchor in re.findall(r'\]\(((?:README|REFERENCE|BENCHMARKS)\.md)?#([\w-]+)\)',
                                              open(os.path.join(REPO, name)).read())]
    assert len(links) >= 5
    for name, target, anchor in links:
        assert anchor in anchors[target], f'{name} links to {target}#{anchor}'
