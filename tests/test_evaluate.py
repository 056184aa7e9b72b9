import json
import shutil

import pandas as pd
import pytest
import torch

import trained as trained_runs
import utils
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
    result = run_main('evaluate', wrong, '--num_workers', '0', '--data_path', trained / 'data', '--image_size', '32',
                      '--no-exact_pipeline')
    assert_one_line_error(result, 1, 'does not fit')


def test_file_that_is_not_a_database(trained, tmp_path):
    fake = tmp_path / f'{prefix()}_data_base.pth'
    fake.write_bytes((trained / 'results' / f'{prefix()}_model.pth').read_bytes())
    assert_one_line_error(run_main('evaluate', fake), 1, 'not an embedding database')


def test_settings_come_from_the_run_files_and_are_never_guessed(trained, tmp_path):
    """Without the checkpoint, <prefix>_args.json gives the run's 32 px; without it too, evaluate.py asks."""
    for kind in ('model.pth', 'args.json', 'results.csv'):
        shutil.copy(trained / 'results' / f'{prefix()}_{kind}', tmp_path)
    model = tmp_path / f'{prefix()}_model.pth'
    flags = ['--batch_size', '4', '--num_workers', '0', '--data_path', trained / 'data']
    result = run_main('evaluate', model, *flags)
    assert result.returncode == 0, result.stderr
    best = pd.read_csv(tmp_path / f'{prefix()}_results.csv')['test_recall@1'].max()
    assert pd.read_csv(tmp_path / f'{prefix()}_eval.csv')['test_recall@1'].iloc[0] == pytest.approx(best, abs=1e-4)

    (tmp_path / f'{prefix()}_args.json').unlink()
    assert_one_line_error(run_main('evaluate', model, *flags), 1,
                          "cannot tell the run's --image_size and --exact_pipeline", '--no-exact_pipeline')
    result = run_main('evaluate', model, *flags, '--image_size', '32', '--no-exact_pipeline')
    assert result.returncode == 0, result.stderr


def test_corrupted_model_is_refused(trained, tmp_path):
    model = tmp_path / f'{prefix()}_model.pth'
    data = bytearray((trained / 'results' / f'{prefix()}_model.pth').read_bytes())
    data[len(data) // 2:len(data) // 2 + 4096] = bytes(b ^ 0xFF for b in data[len(data) // 2:len(data) // 2 + 4096])
    model.write_bytes(bytes(data))
    result = run_main('evaluate', model, '--data_path', trained / 'data', '--image_size', '32', '--no-exact_pipeline')
    assert_one_line_error(result, 1, 'corrupt', 'checksum')


def test_the_runs_normalization_is_used_after_the_dataset_changes(trained, tmp_path):
    """A folder dataset prepared again (more images) gets another mean and std; the model keeps its own."""
    shutil.copytree(trained / 'data' / 'tiny', tmp_path / 'data' / 'tiny')
    path = tmp_path / 'data' / 'tiny' / 'uncropped_data_dicts.pth'
    data_dicts = torch.load(path, weights_only=True)
    torch.save(dict(data_dicts, mean=[0.9, 0.1, 0.5], std=[0.05, 0.05, 0.05]), path)
    for kind in ('model.pth', 'args.json', 'results.csv'):
        shutil.copy(trained / 'results' / f'{prefix()}_{kind}', tmp_path)
    result = run_main('evaluate', tmp_path / f'{prefix()}_model.pth', '--num_workers', '0', '--data_path',
                      tmp_path / 'data')
    assert result.returncode == 0, result.stderr
    history = pd.read_csv(tmp_path / f'{prefix()}_results.csv')
    evaluation = pd.read_csv(tmp_path / f'{prefix()}_eval.csv')
    for column in evaluation.columns:
        assert evaluation[column].iloc[0] == pytest.approx(history[column].loc[history['test_recall@1'].idxmax()],
                                                           abs=1e-4)


def damage_database(database):
    """A copy of a database with one problem of each kind a reader must refuse."""
    nan = dict(database, test_features=database['test_features'].clone())
    nan['test_features'][3, 1] = float('nan')
    return {'nan': (nan, 'test_features holds NaN or infinite values'),
            'short': (dict(database, test_features=database['test_features'][:-2]),
                      'test_features has 10 rows for 12 labels and 12 images'),
            'labels': (dict(database, test_labels=None), 'test_labels is not a list of class ids')}


@pytest.mark.parametrize('damage', ['nan', 'short', 'labels'])
@pytest.mark.parametrize('script', ['evaluate', 'ablation'])
def test_a_damaged_database_is_one_line(trained, tmp_path, damage, script):
    database = torch.load(trained / 'results' / f'{prefix()}_data_base.pth', weights_only=True)
    damaged, fragment = damage_database(database)[damage]
    path = tmp_path / f'{prefix()}_data_base.pth'
    torch.save(damaged, path)
    flags = [path] if script == 'evaluate' else ['--better_data_base', path, '--worse_data_base',
                                                 trained / 'results' / f'{prefix()}_data_base.pth',
                                                 '--results_dir', tmp_path]
    assert_one_line_error(run_main(script, *flags), 1, f'{path}: {fragment}')


@pytest.mark.parametrize('change, fragment', [
    (dict(image_size='32'), '"image_size" is \'32\', not a positive integer'),
    (dict(image_size=None), '"image_size" is None, not a positive integer'),
    (dict(mean=[0.5, 0.5]), '"mean" is [0.5, 0.5], not three numbers'),
    (dict(std=[0.2, 0.0, 0.2]), '"std" is [0.2, 0.0, 0.2], not three numbers above 0'),
    (dict(exact_pipeline='no'), '"exact_pipeline" is \'no\', not true or false'),
])
@pytest.mark.parametrize('script', ['evaluate', 'inference'])
def test_damaged_run_settings_are_one_line(trained, tmp_path, change, fragment, script):
    for kind in ('model.pth', 'data_base.pth'):
        shutil.copy(trained / 'results' / f'{prefix()}_{kind}', tmp_path)
    settings = json.loads((trained / 'results' / f'{prefix()}_args.json').read_text())
    path = tmp_path / f'{prefix()}_args.json'
    path.write_text(json.dumps({**settings, **change}))
    query = trained / 'data' / 'tiny' / 'test' / 'class_01' / '0.jpg'
    flags = [tmp_path / f'{prefix()}_model.pth'] if script == 'evaluate' else \
        ['--query_img_name', query, '--data_base', tmp_path / f'{prefix()}_data_base.pth']
    assert_one_line_error(run_main(script, *flags), 1, f'{path}: {fragment}')


def test_an_args_json_that_disagrees_with_the_checkpoint_is_refused(trained, tmp_path):
    """A hand-edited image size in args.json was used silently; a flag that says it settles it."""
    for kind in ('model.pth', 'args.json', 'checkpoint.pth'):
        shutil.copy(trained / 'results' / f'{prefix()}_{kind}', tmp_path)
    settings = json.loads((tmp_path / f'{prefix()}_args.json').read_text())
    (tmp_path / f'{prefix()}_args.json').write_text(json.dumps({**settings, 'image_size': 64}))
    flags = [tmp_path / f'{prefix()}_model.pth', '--batch_size', '4', '--num_workers', '0']
    assert_one_line_error(run_main('evaluate', *flags), 1, 'args.json says image_size 64, the run\'s checkpoint 32',
                          '--image_size')
    assert run_main('evaluate', *flags, '--image_size', '32').returncode == 0


def test_load_run_names_what_is_wrong_with_the_model(trained, tmp_path):
    """trained.load_run (torch.hub's entry) blamed the data or args.json for a missing model or one of another prefix,
    and ended an image size of 0 in a ZeroDivisionError."""
    results = trained / 'results'
    with pytest.raises(utils.ReirError, match='model not found'):
        trained_runs.load_run(str(tmp_path / f'{prefix()}_model.pth'))
    with pytest.raises(utils.ReirError, match='does not fit the model'):
        trained_runs.load_run(str(results / f'{prefix()}_model.pth'), prefix=prefix(E=3))
    with pytest.raises(utils.UsageError, match='image_size 0'):
        trained_runs.load_run(str(results / prefix()), image_size=0)
