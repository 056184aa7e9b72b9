import pandas as pd
import pytest

import data_utils
from conftest import assert_one_line_error, make_folder_dataset, prefix, run_script, run_train


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """One tiny self-retrieval run and one query/gallery run, shared by the tests below."""
    root = tmp_path_factory.mktemp('evaluate')
    make_folder_dataset(str(root / 'data' / 'tiny'), {'train': 4, 'test': 3})
    make_folder_dataset(str(root / 'data' / 'shop'), {'train': 3, 'query': 2, 'gallery': 2})
    for name in ('tiny', 'shop'):
        data_utils.prepare(str(root / 'data'), name, num_workers=1)
        result = run_train(root, name=name)
        assert result.returncode == 0, result.stderr
    return root


@pytest.mark.parametrize('name', ['tiny', 'shop'])
def test_model_evaluation_reproduces_the_best_epoch(trained, name):
    results = trained / 'results'
    model_path = results / f'{prefix(name)}_model.pth'
    result = run_script('evaluate.py', model_path, '--batch_size', '4', '--num_workers', '0')
    assert result.returncode == 0, result.stderr
    assert 'R@1' in result.stdout and 'MAP@R' in result.stdout
    history = pd.read_csv(results / f'{prefix(name)}_results.csv')
    best = history.loc[history['test_recall@1'].idxmax()]  # the first epoch that reached the best R@1
    evaluation = pd.read_csv(results / f'{prefix(name)}_eval.csv')
    assert list(evaluation.columns) == [c for c in history.columns if c.startswith('test_')]
    for column in evaluation.columns:
        assert evaluation[column].iloc[0] == pytest.approx(best[column], abs=1e-4)


def test_database_evaluation_needs_no_images(trained, tmp_path):
    results = trained / 'results'
    result = run_script('evaluate.py', results / f'{prefix()}_data_base.pth', '--data_path', tmp_path)
    assert result.returncode == 0, result.stderr
    history = pd.read_csv(results / f'{prefix()}_results.csv')
    evaluation = pd.read_csv(results / f'{prefix()}_data_base_eval.csv'.replace('_data_base_eval', '_eval'))
    # float16 storage can only move near-ties
    assert evaluation['test_recall@1'].iloc[0] == pytest.approx(history['test_recall@1'].max(), abs=100 / 12)


def test_unrecognised_file_name_exits_2(trained):
    assert_one_line_error(run_script('evaluate.py', trained / 'results' / 'something.pth'), 2, 'prefix')


def test_model_that_does_not_fit_its_name(trained):
    results = trained / 'results'
    wrong = results / f'{prefix(E=3)}_model.pth'
    wrong.write_bytes((results / f'{prefix()}_model.pth').read_bytes())
    result = run_script('evaluate.py', wrong, '--num_workers', '0', '--data_path', trained / 'data',
                        '--image_size', '32')
    assert_one_line_error(result, 1, 'does not fit')
