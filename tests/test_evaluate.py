import pandas as pd
import pytest

from conftest import assert_one_line_error, prefix, run_main


@pytest.mark.parametrize('name', ['tiny', 'shop'])
def test_model_evaluation_reproduces_the_best_epoch(trained, name):
    results = trained / 'results'
    result = run_main('evaluate', results / f'{prefix(name)}_model.pth', '--batch_size', '4', '--num_workers', '0')
    assert result.returncode == 0, result.stderr
    assert 'R@1' in result.stdout and 'MAP@R' in result.stdout
    history = pd.read_csv(results / f'{prefix(name)}_results.csv')
    best = history.loc[history['test_recall@1'].idxmax()]  # the first epoch that reached the best R@1
    evaluation = pd.read_csv(results / f'{prefix(name)}_eval.csv')
    assert list(evaluation.columns) == [c for c in history.columns if c.startswith('test_')]  # the run's recalls
    for column in evaluation.columns:
        assert evaluation[column].iloc[0] == pytest.approx(best[column], abs=1e-4)


def test_database_evaluation_needs_no_images(trained, tmp_path):
    results = trained / 'results'
    result = run_main('evaluate', results / f'{prefix()}_data_base.pth', '--data_path', tmp_path)
    assert result.returncode == 0, result.stderr
    history = pd.read_csv(results / f'{prefix()}_results.csv')
    evaluation = pd.read_csv(results / f'{prefix()}_eval.csv')
    # float16 storage can only move near-ties
    assert evaluation['test_recall@1'].iloc[0] == pytest.approx(history['test_recall@1'].max(), abs=100 / 12)


def test_unrecognised_file_name_exits_2(trained):
    assert_one_line_error(run_main('evaluate', trained / 'results' / 'something.pth'), 2, 'prefix')


def test_model_that_does_not_fit_its_name(trained, tmp_path):
    wrong = tmp_path / f'{prefix(E=3)}_model.pth'
    wrong.write_bytes((trained / 'results' / f'{prefix()}_model.pth').read_bytes())
    result = run_main('evaluate', wrong, '--num_workers', '0', '--data_path', trained / 'data', '--image_size', '32')
    assert_one_line_error(result, 1, 'does not fit')


def test_file_that_is_not_a_database(trained, tmp_path):
    fake = tmp_path / f'{prefix()}_data_base.pth'
    fake.write_bytes((trained / 'results' / f'{prefix()}_model.pth').read_bytes())
    assert_one_line_error(run_main('evaluate', fake), 1, 'not an embedding database')
