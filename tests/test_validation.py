"""--val_classes: training classes held out of training, embedded every epoch, and the model chosen by their
Recall@K instead of the test split's."""
import json
import os

import pandas as pd
import pytest
import torch

import data_utils
import engine
import run_files
from conftest import (TINY, assert_one_line_error, interrupt_in_epoch, make_folder_dataset, one_thread, prefix,
                      run_main, run_train)

VAL = ['--val_classes', '2', '--recalls', '1,2']


@pytest.fixture(scope='module')
def six(tmp_path_factory):
    """A folder dataset of 6 training and 3 test classes (4 images each), prepared."""
    root = tmp_path_factory.mktemp('six')
    make_folder_dataset(str(root / 'data' / 'six'), {'train': 6, 'test': 3})
    data_utils.prepare(str(root / 'data'), 'six', num_workers=1)
    return root


@pytest.fixture(scope='module')
def val_run(six):
    """A two-epoch run holding 2 of the 6 training classes out (in one thread, so that a resumed run can match
    it to the bit)."""
    with one_thread():
        result = run_train(six, *VAL, name='six')
    assert result.returncode == 0, result.stderr
    return six / 'results', result


def test_held_out_classes_are_kept_out_of_training_and_ids(six, val_run):
    results, _ = val_run
    checkpoint = torch.load(results / f'{prefix("six")}_checkpoint.pth', weights_only=True)
    held_out = checkpoint['held_out']
    train_dict = torch.load(six / 'data' / 'six' / 'uncropped_data_dicts.pth', weights_only=True)['train']
    assert len(held_out) == 2 and set(held_out) < set(train_dict)
    assert json.loads((results / f'{prefix("six")}_args.json').read_text())['held_out_classes'] == held_out

    kept = sorted(set(train_dict) - set(held_out))
    assert checkpoint['ids'].shape == (2, 4)  # (E, the 4 classes trained on)
    assert torch.equal(checkpoint['ids'], torch.load(results / 'six_uncropped_fixed_2_2_ids.pth', weights_only=True))
    trained_paths = {path for path, _ in checkpoint['train_items']}
    assert trained_paths == {path for key in kept for path in train_dict[key]}
    assert sorted({index for _, index in checkpoint['train_items']}) == [0, 1, 2, 3]

    database = torch.load(results / f'{prefix("six")}_data_base.pth', weights_only=True)
    root = str(six / 'data' / 'six')
    held_out_paths = [os.path.join(root, path) for key in held_out for path in train_dict[key]]
    assert database['val_images'] == held_out_paths and database['val_labels'] == [k for k in held_out for _ in
                                                                                   train_dict[k]]
    assert not set(database['val_images']) & (set(database['train_images']) | set(database['test_images']))
    assert set(database['train_images']) == {os.path.join(root, p) for p in trained_paths}
    assert len(database['test_images']) == 12 and database['val_features'].shape == (8, 4)


def test_the_held_out_classes_follow_the_seed():
    train_dict = {f'c{i:02d}': [f'c{i:02d}/0.jpg'] for i in range(20)}
    args = type('Args', (), dict(val_classes=5, meta_class_size=2, seed=1))
    first = run_files.split_validation(args, train_dict)
    assert run_files.split_validation(args, train_dict) == first
    assert len(first[1]) == 5 and not set(first[0]) & set(first[1]) and set(first[0]) | set(first[1]) == set(
        train_dict)
    args.seed = 2
    assert set(run_files.split_validation(args, train_dict)[1]) != set(first[1])
    args.val_classes = 0
    assert run_files.split_validation(args, train_dict) == (train_dict, {})


def test_the_csv_has_val_columns_and_the_run_names_its_selection(val_run):
    results, result = val_run
    frame = pd.read_csv(results / f'{prefix("six")}_results.csv')
    assert list(frame.columns) == ['epoch', 'train_loss', 'train_accuracy', 'test_recall@1', 'test_recall@2',
                                   'test_map@r', 'test_r_precision', 'val_recall@1', 'val_recall@2', 'val_map@r',
                                   'val_r_precision']
    assert 'held-out validation classes of 8 images' in result.stdout
    assert result.stdout.count('| val R@1: ') == 2
    selected = frame.loc[frame['val_recall@1'].idxmax()]
    assert f'selected epoch {int(selected["epoch"])} by val recall@1' in result.stdout.splitlines()[-1]
    assert f'test R@1: {selected["test_recall@1"]:.2f}%' in result.stdout.splitlines()[-1]


@pytest.mark.slow
def test_the_model_is_chosen_by_validation_not_test(six, tmp_path, monkeypatch):
    """Epoch 2 has the best validation R@1 and the worst test R@1: its model and database are the run's."""
    evaluate_epoch, features_of = engine.evaluate_epoch, {}
    test_r1, val_r1 = {1: 90.0, 2: 10.0, 3: 50.0}, {1: 20.0, 2: 60.0, 3: 40.0}

    def scripted(model, data, args, device, stop_requested=None):
        metrics, features = evaluate_epoch(model, data, args, device, stop_requested)
        epoch = len(features_of) + 1
        features_of[epoch] = features
        return {'test': {**metrics['test'], 'recall@1': test_r1[epoch]},
                'val': {**metrics['val'], 'recall@1': val_r1[epoch]}}, features
    monkeypatch.setattr(engine, 'evaluate_epoch', scripted)
    result = run_train(six, *VAL, '--num_epochs', '3', name='six', results=tmp_path)
    assert result.returncode == 0, result.stderr
    assert 'selected epoch 2 by val recall@1 (60.00%): test R@1: 10.00%' in result.stdout
    database = torch.load(tmp_path / f'{prefix("six")}_data_base.pth', weights_only=True)
    for split in ('test', 'val'):
        assert torch.equal(database[f'{split}_features'], features_of[2][split].half())
    assert torch.load(tmp_path / f'{prefix("six")}_checkpoint.pth', weights_only=True)['best_recall'] == 60.0


@pytest.mark.slow
def test_an_interrupted_run_resumes_to_the_same_results(six, val_run, tmp_path):
    """Ctrl-C in epoch 2, --resume: the CSV and the selected model equal those of the uninterrupted run."""
    results, _ = val_run
    flags = ['--data_path', six / 'data', '--data_name', 'six', '--results_dir', tmp_path, *TINY, *VAL]
    with one_thread():
        interrupt_in_epoch(flags)
        assert torch.load(tmp_path / f'{prefix("six")}_checkpoint.pth', weights_only=True)['epoch'] == 2
        resumed = run_train(six, *VAL, '--resume', name='six', results=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert 'resumed from' in resumed.stdout
    name = f'{prefix("six")}_results.csv'
    assert (tmp_path / name).read_text() == (results / name).read_text()
    model, reference = (torch.load(folder / f'{prefix("six")}_model.pth', weights_only=True)
                        for folder in (tmp_path, results))
    assert all(torch.equal(model[key], reference[key]) for key in reference)


def test_evaluate_scores_the_held_out_classes(val_run, tmp_path):
    results, _ = val_run
    frame = pd.read_csv(results / f'{prefix("six")}_results.csv')
    selected = frame.loc[frame['val_recall@1'].idxmax()]
    for kind in ('model.pth', 'data_base.pth'):
        result = run_main('evaluate', results / f'{prefix("six")}_{kind}', '--num_workers', '0', '--batch_size', '4')
        assert result.returncode == 0, result.stderr
        assert '| val R@1: ' in result.stdout
        evaluation = pd.read_csv(results / f'{prefix("six")}_eval.csv')
        assert list(evaluation.columns) == list(frame.columns[3:])
        tolerance = 1e-4 if kind == 'model.pth' else 100 / 8  # float16 storage can only move near-ties
        for column in evaluation.columns:
            assert evaluation[column].iloc[0] == pytest.approx(selected[column], abs=tolerance)


@pytest.mark.parametrize('flags, fragment', [
    (['--val_classes', '1'], 'at least 2'),
    (['--val_classes', '5'], 'leaves 1 of the 6 training classes, fewer than --meta_class_size 2'),
    (['--val_classes', '2'], '--recalls 8 is more than the 7 images each validation query is ranked against'),
])
def test_impossible_validation_splits_exit_2(six, tmp_path, flags, fragment):
    assert_one_line_error(run_train(six, *flags, name='six', results=tmp_path), 2, fragment)


def test_selection_picks_the_first_best_validation_epoch():
    rows = [{'epoch': 1, 'test_recall@1': 50.0, 'val_recall@1': 10.0},
            {'epoch': 2, 'test_recall@1': 10.0, 'val_recall@1': 30.0},
            {'epoch': 3, 'test_recall@1': 90.0, 'val_recall@1': 30.0}]
    assert run_files.selection_column(list(rows[0])) == 'val_recall@1'
    assert run_files.selected_row(rows)['epoch'] == 2
    assert run_files.selected_row([{k: v for k, v in row.items() if not k.startswith('val_')} for row in rows]) == \
        {'epoch': 3, 'test_recall@1': 90.0}


def test_a_checkpoint_from_before_val_classes_resumes(six, tmp_path):
    """A run started before --val_classes and --loss existed: its checkpoint has neither flag, nor held_out, nor a
    loss state (it resumes as a ce run)."""
    flags = ['--recalls', '1,2', '--num_epochs', '1', '--ensemble_size', '3']  # 8 codes for the 6 classes
    result = run_train(six, *flags, name='six', results=tmp_path)
    assert result.returncode == 0, result.stderr
    path = tmp_path / f'{prefix("six", E=3)}_checkpoint.pth'
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint['held_out'], checkpoint['args']['val_classes'], checkpoint['loss'], checkpoint['args']['loss']
    torch.save(checkpoint, path)
    result = run_train(six, *flags, '--resume', name='six', results=tmp_path)
    assert result.returncode == 0, result.stderr
    assert 'resumed from' in result.stdout


def test_a_query_gallery_dataset_validates_by_self_retrieval(tmp_path):
    make_folder_dataset(str(tmp_path / 'data' / 'shop6'), {'train': 6, 'query': 2, 'gallery': 2})
    data_utils.prepare(str(tmp_path / 'data'), 'shop6', num_workers=1)
    result = run_train(tmp_path, *VAL, '--num_epochs', '1', name='shop6')
    assert result.returncode == 0, result.stderr
    database = torch.load(tmp_path / 'results' / f'{prefix("shop6")}_data_base.pth', weights_only=True)
    assert {key.rsplit('_', 1)[0] for key in database if key.endswith('_features')} == {'train', 'query', 'gallery',
                                                                                        'val'}
    assert len(database['val_images']) == 8 and len(set(database['val_labels'])) == 2
    frame = pd.read_csv(tmp_path / 'results' / f'{prefix("shop6")}_results.csv')
    assert frame[['test_recall@1', 'val_recall@1']].notna().all().all()
