"""The repository's rooms: the library (model.py, utils.py, engine.py, figures.py) imports no script, and a script
imports another script only to run that script's own job."""
import ast
import os

import pytest

from conftest import REPO

LIBRARY = {'model', 'utils', 'engine', 'figures'}
SCRIPTS = {'data_utils', 'train', 'evaluate', 'inference', 'benchmark', 'architecture', 'study', 'ablation'}
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
    return names & (LIBRARY | SCRIPTS)


def test_every_module_of_the_repository_is_in_a_room():
    modules = {name[:-3] for name in os.listdir(REPO) if name.endswith('.py')}
    assert modules == LIBRARY | SCRIPTS


@pytest.mark.parametrize('module', sorted(LIBRARY))
def test_the_library_imports_no_script(module):
    assert not repository_imports(module) & SCRIPTS


@pytest.mark.parametrize('script', sorted(SCRIPTS))
def test_a_script_imports_another_only_for_its_own_job(script):
    assert {(script, other) for other in repository_imports(script) & SCRIPTS} <= OWN_JOBS
