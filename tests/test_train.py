import json
import os
import shutil

import pandas as pd
import pytest
import torch
from PIL import Image

import data_utils
import engine
import figures
import loaders
import run_files
import train
import utils
from conftest import (TINY, CodeOnLoad, assert_one_line_error, copy_of_run, prefix, run_main, run_train,
                      scalar_points, written_files)
from model import Model


def test_end_to_end(trained):
    results = trained / 'results'
    frame = pd.read_csv(results / f'{prefix()}_results.csv')
    assert list(frame.columns) == ['epoch', 'train_loss', 'train_accuracy', 'test_recall@1', 'test_recall@2',
                                   'test_recall@4', 'test_recall@8', 'test_map@r', 'test_r_precision']
    assert frame['epoch'].tolist() == [1, 2]
    assert frame.drop(columns='epoch').apply(lambda c: c.between(0, 100)).all().all()

    for kind in ('model.pth', 'data_base.pth', 'checkpoint.pth'):
        torch.load(results / f'{prefix()}_{kind}', weights_only=True)
    settings = json.loads((results / f'{prefix()}_args.json').read_text())
    assert settings['image_size'] == 32 and settings['exact_pipeline'] is False
    data_dicts = torch.load(trained / 'data' / 'tiny' / 'uncropped_data_dicts.pth', weights_only=True)
    assert (settings['mean'], settings['std']) == (data_dicts['mean'], data_dicts['std'])
    database = torch.load(results / f'{prefix()}_data_base.pth', weights_only=True)
    assert database['test_features'].dtype == torch.float16
    assert database['test_features'].shape == (12, 2 * 2) and database['train_features'].shape == (16, 4)
    assert len(database['test_images']) == len(database['test_labels']) == 12
    assert all(os.path.isfile(p) for p in database['train_images'] + database['test_images'])
    assert database['test_images'][0].startswith(str(trained / 'data' / 'tiny'))

    checkpoint = torch.load(results / f'{prefix()}_checkpoint.pth', weights_only=True)
    assert sorted(checkpoint) == sorted(run_files.CHECKPOINT_KEYS)
    assert checkpoint['epoch'] == 3 and len(checkpoint['results']) == 2
    assert checkpoint['args']['seed'] == 1 and len(checkpoint['train_items']) == 16
    ids = torch.load(results / 'tiny_uncropped_fixed_2_2_ids.pth', weights_only=True)
    assert ids.shape == (2, 4) and torch.equal(ids, checkpoint['ids'])
    model = Model(2, 2, share_type='layer4', pretrained=False)
    model.load_state_dict(torch.load(results / f'{prefix()}_model.pth', weights_only=True))


def test_query_gallery_dataset_end_to_end(trained):
    frame = pd.read_csv(trained / 'results' / f'{prefix("shop")}_results.csv')
    assert list(frame.columns)[3:] == ['test_recall@1', 'test_recall@8', 'test_map@r', 'test_r_precision']
    assert (frame['test_recall@8'] == 100.0).all()  # every query has a same-class item among the 8 gallery images
    database = torch.load(trained / 'results' / f'{prefix("shop")}_data_base.pth', weights_only=True)
    # the train split too, as the original's In-shop databases
    assert set(database) == {f'{s}_{k}' for s in ('train', 'query', 'gallery')
                             for k in ('images', 'labels', 'features')} | {'working_dir', 'settings', 'epoch',
                                                                         'model_fingerprint'}
    assert database['settings']['image_size'] == int(TINY[TINY.index('--image_size') + 1])


def test_curves_are_drawn_after_every_epoch(trained, tmp_path):
    with Image.open(trained / 'results' / f'{prefix()}_curves.png') as image:
        assert image.format == 'PNG' and image.width > 400
    rows = [{'epoch': e, 'train_loss': 2.0 / e, 'train_accuracy': 10.0 * e, 'test_recall@1': 5.0 * e,
             'test_map@r': 1.0 * e, 'test_r_precision': 2.0 * e} for e in (1, 2)]
    run_files.atomic_write(str(tmp_path / 'one.png'), figures.curves_file(rows[:1]))
    run_files.atomic_write(str(tmp_path / 'two.png'), figures.curves_file(rows))
    assert (tmp_path / 'one.png').read_bytes() != (tmp_path / 'two.png').read_bytes()


@pytest.mark.slow
def test_load_ids_reuses_the_saved_ids(trained, tmp_path):
    ids_file = 'tiny_uncropped_fixed_2_2_ids.pth'
    (tmp_path / 'results').mkdir()
    shutil.copy(trained / 'results' / ids_file, tmp_path / 'results' / ids_file)
    first = torch.load(tmp_path / 'results' / ids_file, weights_only=True)
    result = run_train(trained, '--load_ids', '--seed', '5', '--num_epochs', '1', results=tmp_path / 'results')
    assert result.returncode == 0, result.stderr
    checkpoint = torch.load(tmp_path / 'results' / f'{prefix()}_checkpoint.pth', weights_only=True)
    assert torch.equal(checkpoint['ids'], first)
    assert torch.equal(torch.load(tmp_path / 'results' / ids_file, weights_only=True), first)


@pytest.mark.parametrize('label_type', ['fixed', 'random'])
def test_load_ids_trains_on_the_list_of_the_run_that_drew_them(tmp_path, label_type):
    """Classes above the 300-image cap are sampled: a run that loads the ids samples what the drawing run did."""
    train_dict = {f'class_{c}': [f'class_{c}/{i}.jpg' for i in range(utils.MAX_IMAGES_PER_CLASS + 40)]
                  for c in range(3)}
    args = train.get_args_parser().parse_args(['--results_dir', str(tmp_path), '--data_name', 'big', '--label_type',
                                               label_type, '--ensemble_size', '4', '--meta_class_size', '2'])
    run = run_files.RunName.from_args(args)
    paths = run.paths(args.results_dir)

    def begin():
        return run_files.RunState.begin(args, run, paths, {'train': train_dict, 'mean': [0.5] * 3, 'std': [0.2] * 3},
                                        None, '')
    drawn = begin()
    assert os.listdir(tmp_path) == []  # written only once the run starts, every check passed
    run_files.start_run(args, run, paths, drawn.ids)
    args.load_ids = True
    loaded = begin()
    assert torch.equal(loaded.ids, drawn.ids) and loaded.train_items == drawn.train_items
    assert len(drawn.train_items) == 3 * utils.MAX_IMAGES_PER_CLASS
    args.load_ids, args.seed = False, 2
    with pytest.raises(utils.UsageError, match='other ids'):  # another seed would replace the saved ids
        begin()
    args.overwrite = True
    assert begin().train_items != drawn.train_items


def test_training_learns(trained):
    """The tiny dataset's classes differ in colour: two epochs must lower the loss, raise the training accuracy
    and retrieve the unseen test classes far above chance (3 classes of 4 images: R@1 by chance is 3/11)."""
    frame = pd.read_csv(trained / 'results' / f'{prefix()}_results.csv')
    assert frame['train_loss'].iloc[-1] < frame['train_loss'].iloc[0]
    assert frame['train_accuracy'].iloc[-1] > frame['train_accuracy'].iloc[0]
    assert frame['test_recall@1'].min() >= 70


def test_unreadable_training_image_is_skipped(tiny):
    victim = tiny / 'data' / 'tiny' / 'train' / 'class_01' / '2.jpg'
    victim.write_bytes(b'not a jpeg any more')
    result = run_train(tiny, '--num_epochs', '1')
    assert result.returncode == 0, result.stderr
    assert f'skipping unreadable training image {victim}' in result.stderr
    assert '1 unreadable images skipped' in result.stdout


def test_demo_is_prepared_when_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(data_utils, 'DEMO_CLASSES', 4)
    monkeypatch.setattr(data_utils, 'DEMO_IMAGES_PER_CLASS', 2)
    args = train.get_args_parser().parse_args(['--data_path', str(tmp_path / 'data'), '--data_name', 'demo'])
    dicts = train.load_data_dicts(args, engine.Process(0, 1, torch.device('cpu'), []))
    assert len(dicts['train']) == 2 and len(dicts['test']) == 2


@pytest.mark.slow
def test_grouped_engine_run_is_evaluated_by_the_loop(tiny):
    """A run trained with --branch_impl grouped: its checkpoint has the loop's layout, and evaluate.py
    (the loop on the CPU) reproduces its recall."""
    result = run_train(tiny, '--num_epochs', '1', '--branch_impl', 'grouped', '--with_random', '--share_type', 'layer1')
    assert result.returncode == 0, result.stderr
    assert 'branch engine: grouped (--branch_impl grouped; checked against the loop on this model, in training and ' \
           'in evaluation)' in result.stdout
    run = prefix(share='layer1', with_random=True)
    model_path = tiny / 'results' / f'{run}_model.pth'
    assert list(torch.load(model_path, weights_only=True)) == list(Model(2, 2, pretrained=False).state_dict())
    evaluation = run_main('evaluate', model_path, '--batch_size', '4', '--num_workers', '0')
    assert evaluation.returncode == 0, evaluation.stderr
    assert 'branch engine: loop' in evaluation.stdout
    trained = pd.read_csv(tiny / 'results' / f'{run}_results.csv')
    evaluated = pd.read_csv(tiny / 'results' / f'{run}_eval.csv')
    assert evaluated['test_recall@1'].iloc[0] == pytest.approx(trained['test_recall@1'].iloc[0], abs=100 / 12)


# ----------------------------------------------------------------------------- devices

def test_cpu_fallback_and_missing_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert engine.select_devices(None) == (torch.device('cpu'), [])
    assert engine.select_devices('cpu') == (torch.device('cpu'), [])
    with pytest.raises(utils.ReirError, match='GPU 3 is not there'):
        engine.select_devices('3')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    assert engine.select_devices(None) == (torch.device('cuda:0'), [0])  # default 0,1 with one GPU
    with pytest.raises(utils.ReirError, match='GPU 1 is not there'):
        engine.select_devices('0,1')


# ----------------------------------------------------------------------------- bad input

def test_missing_dataset_says_to_run_data_utils(tmp_path):
    (tmp_path / 'data').mkdir()
    assert_one_line_error(run_train(tmp_path, name='cub'), 1, 'data_utils.py', 'cub')


@pytest.mark.parametrize('flags, fragment', [
    (['--recalls', '1,x'], 'recalls'), (['--recalls', '0,1'], 'recalls'), (['--ensemble_size', '0'], 'ensemble_size'),
    (['--batch_size', '-1'], 'batch_size'), (['--image_size', '0'], 'image_size'),
    (['--num_epochs', '0'], 'num_epochs'), (['--lr', '0'], 'lr'),
    (['--meta_class_size', '0'], 'meta_class_size'), (['--share_type', 'layer9'], 'share_type'),
    (['--meta_class_size', '1'], 'meta_class_size'), (['--seed', '-1'], 'seed'), (['--seed', str(2 ** 32)], 'seed'),
    (['--resume', '--overwrite'], '--overwrite'), (['--recalls', '1,99999999999999999999'], '99999999999999999999'),
    (['--gpu_ids', 'first'], 'gpu_ids')])
def test_bad_flags_exit_2(tiny, flags, fragment):
    result = run_train(tiny, *flags)
    assert result.returncode == 2 and fragment in result.stderr and 'Traceback' not in result.stderr
    assert not (tiny / 'results').exists()  # not even the run's lock


@pytest.mark.parametrize('flags, fragment', [
    (['--meta_class_size', '5'], 'larger than the number of training classes'),
    (['--meta_class_size', '2', '--ensemble_size', '1'], 'distinct codes'),
    (['--crop_type', 'cropped'], 'only car and cub')])
def test_impossible_flag_combinations_exit_2(tiny, flags, fragment):
    assert_one_line_error(run_train(tiny, *flags), 2, fragment)


def test_explicit_missing_gpu_is_an_error(tiny):
    assert_one_line_error(run_train(tiny, '--gpu_ids', '0'), 1, 'GPU 0 is not there')


def test_load_ids_without_file_or_with_wrong_shape(tiny):
    assert_one_line_error(run_train(tiny, '--load_ids'), 1, 'meta-class ids not found')
    (tiny / 'results').mkdir()
    torch.save(torch.zeros(3, 4, dtype=torch.long), tiny / 'results' / 'tiny_uncropped_fixed_2_2_ids.pth')
    assert_one_line_error(run_train(tiny, '--load_ids'), 1, 'do not fit', '(2, 4)')


def test_tampered_data_dicts_are_refused(tiny):
    torch.save({'train': CodeOnLoad(os.system, f'touch {tiny / "pwned"}')},
               tiny / 'data' / 'tiny' / 'uncropped_data_dicts.pth')
    assert_one_line_error(run_train(tiny), 1, 'refused')
    assert not (tiny / 'pwned').exists()


# ----------------------------------------------------------------------------- resume

def test_resume_with_other_flags_is_refused(trained, tmp_path):
    results = copy_of_run(trained, tmp_path)
    result = run_train(trained, '--batch_size', '3', '--lr', '0.5', '--resume', results=results)
    assert_one_line_error(result, 2, '--batch_size 4 -> 3', '--lr 0.0001 -> 0.5')


def test_resume_after_the_last_epoch_changes_nothing(trained, tmp_path):
    results = copy_of_run(trained, tmp_path)
    before = written_files(results)
    result = run_train(trained, '--resume', '--num_workers', '1', results=results)
    assert result.returncode == 0, result.stderr
    assert 'resumed from' in result.stdout and 'Epoch' not in result.stdout
    assert written_files(results) == before


def test_resume_without_or_with_a_bad_checkpoint(tiny):
    assert_one_line_error(run_train(tiny, '--resume'), 1, 'no checkpoint')
    (tiny / 'results').mkdir()
    checkpoint = tiny / 'results' / f'{prefix()}_checkpoint.pth'
    checkpoint.write_bytes(b'\x00' * 100)
    assert_one_line_error(run_train(tiny, '--resume'), 1, 'corrupt')
    torch.save({'model': {}}, checkpoint)
    assert_one_line_error(run_train(tiny, '--resume'), 1, 'not a REIR checkpoint')


def test_tampered_checkpoint_runs_no_code(tiny):
    (tiny / 'results').mkdir()
    torch.save({'args': CodeOnLoad(os.system, f'touch {tiny / "pwned"}')},
               tiny / 'results' / f'{prefix()}_checkpoint.pth')
    assert_one_line_error(run_train(tiny, '--resume'), 1, 'refused')
    assert not (tiny / 'pwned').exists()


# ----------------------------------------------------------------------------- torch.distributed

@pytest.mark.slow
def test_two_process_gloo_run_writes_what_one_process_writes(gloo_run, trained):
    distributed, results = gloo_run.result(), gloo_run.results
    assert distributed.returncode == 0, distributed.stderr
    assert distributed.stdout.count('Epoch 3/3 |') == 1  # only rank 0 prints
    assert '2 processes of 2 images a step' in distributed.stdout
    assert sorted(os.listdir(results)) == sorted([f'{prefix()}_{kind}' for kind in run_files.RUN_OUTPUTS]
                                                 + [f'{prefix()}_{run_files.RUN_LOG}',
                                                    'tiny_uncropped_fixed_2_2_ids.pth'])  # no lock is left
    log = results / f'{prefix()}_{run_files.RUN_LOG}'
    assert len([name for name in os.listdir(log) if 'tfevents' in name]) == 1  # rank 0's alone
    points = scalar_points(log)  # 8 training images: 2 steps an epoch, of 2 images in each process
    assert [step for tag, step, _ in points if tag == 'train/loss'] == list(range(1, 7))
    assert [step for tag, step, _ in points if tag == 'val/recall@1'] == [2, 4, 6]
    database = torch.load(results / f'{prefix()}_data_base.pth', weights_only=True)
    reference = torch.load(trained / 'results' / f'{prefix()}_data_base.pth', weights_only=True)
    assert database['test_images'] == reference['test_images']  # shards gathered back in dataset order
    model = torch.load(results / f'{prefix()}_model.pth', weights_only=True)
    assert database['model_fingerprint'] == utils.weights_fingerprint(model)
    held_out = json.loads((results / f'{prefix()}_args.json').read_text())['held_out_classes']
    every_training_image = list(zip(reference['train_images'], reference['train_labels']))
    assert len(held_out) == 2
    assert database['val_images'] == [path for path, key in every_training_image if key in held_out]
    assert database['train_images'] == [path for path, key in every_training_image if key not in held_out]
    assert database['train_features'].shape == (8, 4) and database['val_features'].shape == (8, 4)
    frame = pd.read_csv(results / f'{prefix()}_results.csv')
    assert len(frame) == 3 and frame[['test_recall@1', 'val_recall@4']].stack().between(0, 100).all()


@pytest.mark.slow
def test_evaluate_reproduces_the_best_row_of_a_torchrun_run(gloo_run):
    """Every process embeds its shard with the main process's batch-norm statistics: the model that is saved."""
    assert gloo_run.result().returncode == 0, gloo_run.result().stderr
    result = run_main('evaluate', gloo_run.results / f'{prefix()}_model.pth', '--batch_size', '4',
                      '--num_workers', '0')
    assert result.returncode == 0, result.stderr
    history = pd.read_csv(gloo_run.results / f'{prefix()}_results.csv')
    best = history.loc[history['val_recall@1'].idxmax()]
    evaluation = pd.read_csv(gloo_run.results / f'{prefix()}_eval.csv')
    for column in evaluation.columns:
        assert evaluation[column].iloc[0] == pytest.approx(best[column], abs=1e-4), column


def test_seeded_sampler_shards_cover_every_sample():
    sampler = loaders.SeededSampler(10, seed=0, rank=1, num_replicas=3)
    assert len(sampler) == 4 and len(list(sampler)) == 4
    shards = [[i for i, _ in loaders.SeededSampler(10, 0, r, 3)] for r in range(3)]
    assert sorted(set(sum(shards, []))) == list(range(10))
    assert list(loaders.SeededSampler(10, 0)) == list(loaders.SeededSampler(10, 0))


def test_the_schedule_never_lowers_the_rate_before_the_first_step(trained):
    """The rate drops after 50% and 70% of the epochs, as the original's; a drop at epoch 0 (a run of one epoch, where
    the original trains at --lr / 100) is left out: the session's one-epoch run trained at --lr."""
    assert train.lr_milestones(1) == [] and train.lr_milestones(2) == [1, 1] and train.lr_milestones(3) == [1, 2]
    assert train.lr_milestones(20) == [10, 14] and train.lr_milestones(40) == [20, 28]
    checkpoint = torch.load(trained / 'results' / f'{prefix("shop")}_checkpoint.pth', weights_only=True)
    assert checkpoint['args']['num_epochs'] == 1
    assert [group['lr'] for group in checkpoint['optimizer']['param_groups']] == [1e-4]
    assert not checkpoint['scheduler']['milestones']
