import json
import os
import resource
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch

import data_utils
import trained as trained_runs
import utils
from conftest import REPO, assert_one_line_error, make_folder_dataset, prefix, run_main


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


@pytest.mark.parametrize('record', ['checkpoint.pth', 'data_base.pth'])
@pytest.mark.parametrize('edit, fragment, settles', [
    ({'image_size': 64}, 'says image_size 64, {record} 32', ['--image_size', '32']),
    ({'exact_pipeline': True}, 'says exact_pipeline True, {record} False', ['--no-exact_pipeline']),
    ({'mean': [0.5, 0.5, 0.5]}, 'says mean [0.5, 0.5, 0.5], {record} [', None),
])
def test_an_args_json_that_disagrees_with_the_runs_records_is_refused(trained, tmp_path, record, edit, fragment,
                                                                      settles):
    """A hand-edited setting in args.json was used silently, beside the checkpoint or, with the checkpoint gone, the
    database that records the settings it was embedded with; the advice names the recorded value."""
    for kind in ('model.pth', 'args.json', record):
        shutil.copy(trained / 'results' / f'{prefix()}_{kind}', tmp_path)
    settings = json.loads((tmp_path / f'{prefix()}_args.json').read_text())
    (tmp_path / f'{prefix()}_args.json').write_text(json.dumps({**settings, **edit}))
    flags = [tmp_path / f'{prefix()}_model.pth', '--batch_size', '4', '--num_workers', '0']
    expected = fragment.format(record=f'{prefix()}_{record}')
    assert_one_line_error(run_main('evaluate', *flags), 1, f'{prefix()}_args.json {expected}',
                          f'pass {" ".join(settles)}' if settles else 'train the run again')
    if settles:
        assert run_main('evaluate', *flags, *settles).returncode == 0


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
    with pytest.raises(utils.UsageError, match=f'{results} is a folder: pass a run\'s <prefix>_model.pth'):
        trained_runs.load_run(str(results))
    with pytest.raises(utils.ReirError, match=f'{tmp_path / "nosuch"}: model not found'):
        trained_runs.load_run(str(tmp_path / 'nosuch'))
    with pytest.raises(utils.UsageError, match='prefix=cub_x: not a run\'s prefix') as refused:
        trained_runs.load_run(str(results / f'{prefix()}_model.pth'), prefix='cub_x')
    assert '--prefix' not in str(refused.value)


def transform_mean(transform):
    return next(step for step in transform.transform.transforms if hasattr(step, 'mean')).mean


def test_load_run_takes_the_normalization_from_the_run_never_from_the_callers_folder(trained, tmp_path, monkeypatch):
    """With args.json and the checkpoint gone the database records it; with all three gone a dataset of that name in
    the caller's folder (here one prepared with other colours) is not the run's: the call names data_path, or is
    refused."""
    recorded = json.loads((trained / 'results' / f'{prefix()}_args.json').read_text())['mean']
    for kind in ('model.pth', 'data_base.pth'):
        shutil.copy(trained / 'results' / f'{prefix()}_{kind}', tmp_path)
    make_folder_dataset(str(tmp_path / 'data' / 'tiny'), {'train': 4, 'test': 3}, class_offset=90)
    data_utils.prepare(str(tmp_path / 'data'), 'tiny', num_workers=1)
    assert torch.load(tmp_path / 'data' / 'tiny' / 'uncropped_data_dicts.pth', weights_only=True)['mean'] != recorded
    monkeypatch.chdir(tmp_path)
    model = str(tmp_path / f'{prefix()}_model.pth')
    assert list(transform_mean(trained_runs.load_run(model)[1])) == recorded
    (tmp_path / f'{prefix()}_data_base.pth').unlink()
    with pytest.raises(utils.ReirError, match='recorded nowhere .* pass data_path='):
        trained_runs.load_run(model, image_size=32, exact_pipeline=False)
    _, transform = trained_runs.load_run(model, image_size=32, exact_pipeline=False, data_path=str(trained / 'data'))
    assert list(transform_mean(transform)) == recorded


def test_a_prefix_naming_an_unknown_loss_says_so_first(trained, tmp_path):
    """It asked for --image_size first (the file's settings are gone with its name)."""
    shutil.copy(trained / 'results' / f'{prefix()}_model.pth', tmp_path / 'copy_model.pth')
    result = run_main('evaluate', tmp_path / 'copy_model.pth', '--prefix', f'{prefix()}_pml.NoSuchLoss')
    assert_one_line_error(result, 2, 'its prefix names the loss pml.NoSuchLoss', 'is not one of its losses')


def test_a_worker_that_cannot_use_shared_memory_is_one_line():
    """torch's words when a DataLoader worker cannot make the shared-memory file of a batch (a file-size limit)."""
    error = RuntimeError('Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent call '
                         'last):\n  File "collate.py", line 273\nRuntimeError: unable to resize file '
                         '</torch_27801_2251333379_0> to the right size: File too large (27)\n')
    assert utils.shared_memory_failure(error) == 'File too large (27)'
    assert utils.shared_memory_failure(RuntimeError('Caught ValueError in DataLoader worker process 0.')) is None


@pytest.mark.slow  # a process of its own, under a file-size limit
def test_evaluate_under_a_file_size_limit_is_one_line(trained):
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (10 * 1024, resource.RLIM_INFINITY))  # noqa: E731
    result = subprocess.run([sys.executable, os.path.join(REPO, 'evaluate.py'),
                             trained / 'results' / f'{prefix()}_model.pth', '--num_workers', '2'],
                            capture_output=True, text=True, preexec_fn=limit, timeout=300)
    assert_one_line_error(result, 1, 'cannot pass images through shared memory (File too large (27))',
                          '--num_workers 0')
