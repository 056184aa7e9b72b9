"""The repository's rooms and their sizes: the library imports no script and its modules import one another one way
(each only those before it in LIBRARY), a script imports another script only to run that script's own job, and the
size budgets hold that keep the story short (`python tests/test_layout.py` prints where the code stands)."""
import ast
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import REPO  # noqa: E402

# the library, each module above the ones it may import: the method (network, losses, embedding); what --loss names;
# engines that compute its branches faster; datasets, ids and metrics; the original REIR's files; file locks that leave
# nothing behind; a run's files and state; figures; how a run reads its images; running a model; the embedding database;
# a run's TensorBoard log; keeping and continuing a run; the original's recipes; loading a trained run; search with
# faiss; a folder of one's own images as a gallery (index.py's)
LIBRARY = ('model', 'loss_choice', 'branch_engines', 'utils', 'original', 'locks', 'run_files', 'figures', 'loaders',
           'engine', 'data_base', 'tensorboard_log', 'resume', 'recipes', 'trained', 'faiss_search', 'folder_index')
# the scripts, and hubconf.py, torch.hub's entry points, which stand on the library as they do
SCRIPTS = {'data_utils', 'train', 'evaluate', 'inference', 'benchmark', 'architecture', 'study', 'ablation', 'hubconf',
           'index'}
OWN_JOBS = {('train', 'data_utils'),       # train.py draws the demo dataset when it is missing
            ('benchmark', 'data_utils'),   # benchmark.py data prepares short-side copies
            ('study', 'data_utils'),       # study.py draws the demo once, before its runs start side by side
            ('study', 'train'),            # study.py has train.py parse and compare the flags of the runs it starts
            ('benchmark', 'index')}        # benchmark.py index times index.py's own job


# the size budgets: a function of the repository at most FUNCTION_LINES lines (an argument parser split by argument
# groups) and FUNCTION_PARAMETERS parameters (self and cls not counted); train.py at most TRAIN_LINES lines that refer
# to at most TRAIN_LIBRARY_NAMES names of the library (41 since the TensorBoard log joined the run's story); the README
# at most README_LINES lines
FUNCTION_LINES, FUNCTION_PARAMETERS = 60, 7
TRAIN_LINES, TRAIN_LIBRARY_NAMES, README_LINES = 400, 41, 300


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


# ----------------------------------------------------------------------------- size budgets

def source(module):
    return open(os.path.join(REPO, f'{module}.py')).read()


def functions(text):
    """(name, lines, parameters) of every function and method that Python source text defines."""
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = node.args
            names = [a.arg for a in arguments.posonlyargs + arguments.args + arguments.kwonlyargs]
            names += [a.arg for a in (arguments.vararg, arguments.kwarg) if a is not None]
            if names[:1] in (['self'], ['cls']):
                names = names[1:]
            yield node.name, node.end_lineno - node.lineno + 1, len(names)


def library_names(text):
    """The names of the library's modules that Python source text refers to: module.name after import module, and
    the names of from module import name."""
    tree = ast.parse(text)
    imported, names = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.asname or alias.name for alias in node.names if alias.name in LIBRARY)
        elif isinstance(node, ast.ImportFrom) and node.module in LIBRARY:
            names.update(f'{node.module}.{alias.name}' for alias in node.names)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in imported:
            names.add(f'{node.value.id}.{node.attr}')
    return names


def line_count(name):
    return len(open(os.path.join(REPO, name)).read().splitlines())


def test_no_function_is_over_the_line_or_parameter_budget():
    over = [f'{module}.{name}: {lines} lines, {parameters} parameters' for module in sorted(set(LIBRARY) | SCRIPTS)
            for name, lines, parameters in functions(source(module))
            if lines > FUNCTION_LINES or parameters > FUNCTION_PARAMETERS]
    assert not over, f'over {FUNCTION_LINES} lines or {FUNCTION_PARAMETERS} parameters: {over}'


def test_train_py_tells_its_story_in_few_lines_and_few_library_names():
    assert line_count('train.py') <= TRAIN_LINES
    names = library_names(source('train'))
    assert len(names) <= TRAIN_LIBRARY_NAMES, sorted(names)


def test_the_readme_teaches_in_few_lines():
    assert line_count('README.md') <= README_LINES


def test_the_budget_counts_are_what_they_say():
    """The counters on a module written for them: a 3-line function of 2 parameters and a method whose self is not
    counted; two library names (one attribute of an imported module, one imported name), not the local variable
    that shares a module's name."""
    text = ('import utils\nfrom model import LOSSES\n\n\ndef f(a, b):\n    model = utils.log(a)\n'
            '    return model.train(LOSSES, b)\n\n\nclass C:\n    def m(self, x):\n        return x\n')
    assert sorted(functions(text)) == [('f', 3, 2), ('m', 2, 1)]
    assert library_names(text) == {'utils.log', 'model.LOSSES'}


if __name__ == '__main__':
    measured = [(module, name, lines, parameters) for module in sorted(set(LIBRARY) | SCRIPTS)
                for name, lines, parameters in functions(source(module))]
    longest = max(measured, key=lambda function: function[2])
    most = max(measured, key=lambda function: function[3])
    train_names = sorted(library_names(source('train')))
    print(f'longest function: {longest[0]}.{longest[1]}, {longest[2]} lines (budget {FUNCTION_LINES})')
    print(f'most parameters: {most[0]}.{most[1]}, {most[3]} (budget {FUNCTION_PARAMETERS})')
    print(f'train.py: {line_count("train.py")} lines (budget {TRAIN_LINES}), {len(train_names)} library names '
          f'(budget {TRAIN_LIBRARY_NAMES}): {", ".join(train_names)}')
    print(f'README.md: {line_count("README.md")} lines (budget {README_LINES})')
