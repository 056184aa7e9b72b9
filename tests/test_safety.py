"""Runs that go wrong stop and say so, and no run loses or mixes up another's files: divergence, batch norm
on single images, existing files, the per-run lock, failed saves, damaged inputs, missing outputs."""
import argparse
import collections
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pandas as pd
import pytest
import torch

import data_base
import engine
import loaders
import resume
import run_files
import train
import utils
from conftest import (NO_LOG, REPO, TINY, assert_one_line_error, copy_of_run, file_digests, loss_becomes, prefix,
                      run_as_command, run_main, run_script, run_train, written_files)


# ----------------------------------------------------------------------------- a run that goes wrong stops

def test_non_finite_loss_stops_the_run_naming_epoch_and_step(tiny, monkeypatch):
    loss_becomes(monkeypatch, float('nan'))
    result = run_train(tiny, '--num_epochs', '1')
    assert_one_line_error(result, 1, 'epoch 1: the loss is nan at step 2 of 4',
                          'no checkpoint was written, so there is nothing to resume')
    assert not (tiny / 'results' / f'{prefix()}_model.pth').exists()


@pytest.mark.slow
def test_non_finite_embeddings_stop_the_run_keeping_the_last_good_epoch(tiny, monkeypatch):
    embed, end_epoch = engine.embed, resume.Checkpointer.end_epoch
    saved = []
    monkeypatch.setattr(resume.Checkpointer, 'end_epoch', lambda *args: (end_epoch(*args), saved.append(1)))
    monkeypatch.setattr(engine, 'embed', lambda logits: embed(logits) * (float('inf') if saved else 1))
    result = run_train(tiny, '--num_epochs', '2')
    assert_one_line_error(result, 1, 'epoch 2: the test embeddings hold NaN or infinite values',
                          f'{prefix()}_checkpoint.pth holds the run at the end of epoch 1')
    checkpoint = torch.load(tiny / 'results' / f'{prefix()}_checkpoint.pth', weights_only=True)
    assert checkpoint['epoch'] == 2


def test_a_diverged_model_is_not_kept(tiny):
    """--lr 1e10 makes the loss NaN within the first epoch (before ties were made pessimistic, such a model's
    zero embeddings scored 100% and were saved as the best)."""
    result = run_train(tiny, '--lr', '1e10')
    assert_one_line_error(result, 1, 'epoch 1: the loss is nan', 'training diverged')
    assert not (tiny / 'results' / f'{prefix()}_model.pth').exists()


def test_single_image_batches_are_refused_or_left_out(tiny):
    """At 32 px the last feature map is 1 x 1: batch norm cannot train on one image."""
    assert_one_line_error(run_train(tiny, '--batch_size', '1'), 2, '--batch_size 1 gives a device single images')
    result = run_train(tiny, '--batch_size', '5', '--num_epochs', '1')  # 16 training images: a last batch of 1
    assert result.returncode == 0, result.stderr
    assert 'the last batch of every epoch (1 images) is left out' in result.stderr


def test_drop_last_only_where_batch_norm_needs_it():
    args = train.get_args_parser().parse_args(['--image_size', '33', '--batch_size', '5'])
    assert not loaders.drop_last_batch(args, 5, 16, replicas=1)  # a 2 x 2 last feature map trains on one image
    args.image_size = 32
    assert loaders.drop_last_batch(args, 5, 16, replicas=1)
    assert not loaders.drop_last_batch(args, 5, 17, replicas=1)
    assert loaders.drop_last_batch(args, 6, 15, replicas=2)  # the last batch of 3 splits 2 + 1 over two GPUs
    with pytest.raises(utils.UsageError):
        loaders.drop_last_batch(args, 3, 30, replicas=2)


# ----------------------------------------------------------------------------- nothing is overwritten unasked

def test_a_finished_run_is_kept_unless_overwrite_is_passed(trained, tmp_path):
    results = copy_of_run(trained, tmp_path)
    before = written_files(results)
    result = run_train(trained, '--seed', '2', results=results)
    assert_one_line_error(result, 2, 'holds the files of a run with these settings', '--resume', '--overwrite')
    assert written_files(results) == before

    result = run_train(trained, '--num_epochs', '1', '--overwrite', results=results)
    assert result.returncode == 0, result.stderr
    assert len(pd.read_csv(results / f'{prefix()}_results.csv')) == 1


@pytest.mark.slow
def test_a_second_start_of_a_running_run_fails_at_once(tiny):
    """The lock is a POSIX record lock: another process (as a second start would be) cannot take it."""
    with run_files.RunLock(str(tiny / 'results' / f'.{prefix()}.lock'), prefix()):
        result = run_script('train.py', '--data_path', tiny / 'data', '--data_name', 'tiny',
                            '--results_dir', tiny / 'results', *TINY)
        assert [name for name in os.listdir(tiny / 'results')] == [f'.{prefix()}.lock']  # the holder's, kept
    assert_one_line_error(result, 1, 'is being trained by another process')
    assert not (tiny / 'results').exists()  # the holder's lock, and the folder it made, gone with it


@pytest.mark.slow  # a process of its own, which imports torch
def test_a_loader_worker_left_running_does_not_keep_the_process_from_exiting():
    """A stop or an error inside an epoch can leave a loader's iterator referenced (by its traceback) until the process
    exits. multiprocessing then ends the loader's workers with SIGTERM, which they ignore, and waited for them for
    ever: the run stopped by a signal hung after printing its line."""
    script = textwrap.dedent(f'''
        import sys
        sys.path.insert(0, {REPO!r})
        import torch
        import loaders
        loader = loaders.Loader(list(range(64)), batch_size=4, **loaders.loader_options(1, 0, torch.device('cpu')))
        batches = iter(loader)
        next(batches)  # the worker is alive, and the iterator held until the interpreter's exit
        print('exiting', flush=True)
    ''')
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == 'exiting\n', result.stderr


def test_loader_workers_start_with_the_stop_signals_blocked_until_they_ignore_them(tmp_path):
    """A signal to the process group as a loader's worker starts (an evaluation's first batch) once ended the worker
    before its worker_init_fn ignored the signal, and the run with a traceback: the worker starts with the signals
    blocked, ignores them, then unblocks them; the main process's mask is as it was."""
    mask_file = tmp_path / 'mask'

    def recording(worker_id):
        mask_file.write_text(','.join(sorted(s.name for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))))
        loaders.ignore_stop_signals(worker_id)
    options = {**loaders.loader_options(1, 0, torch.device('cpu')), 'worker_init_fn': recording}
    loader = loaders.Loader(list(range(8)), batch_size=4, **options)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    batches = iter(loader)
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
    assert len(list(batches)) == 2
    assert {'SIGTERM', 'SIGUSR1'} <= set(mask_file.read_text().split(','))
    worker = loader._iterator._workers[0]
    status = dict(line.split(':\t') for line in open(f'/proc/{worker.pid}/status').read().splitlines() if ':\t' in line)
    term = 1 << (signal.SIGTERM - 1)
    assert int(status['SigIgn'], 16) & term and not int(status['SigBlk'], 16) & term


def test_stale_temporaries_are_matched_by_the_exact_prefix(tmp_path):
    """A run of prefix ..._2_2 must not delete the in-flight temporaries of a run of prefix ..._2_22."""
    mine, other = prefix(E=2, M=2), prefix(E=2, M=22)
    for name in (f'.{mine}_model.pth.x1.tmp', f'.{other}_model.pth.x2.tmp', f'.{mine}_results.csv.x3.tmp'):
        (tmp_path / name).write_text('')
    run_files.remove_stale_temporaries(str(tmp_path), mine)
    assert os.listdir(tmp_path) == [f'.{other}_model.pth.x2.tmp']


@pytest.mark.slow
def test_a_failed_save_keeps_the_previous_epoch(tiny, monkeypatch):
    """A full disk while writing epoch 2's checkpoint: every file still holds epoch 1, none half-written."""
    checkpoint_file = run_files.RunState.checkpoint_file
    saves = []

    def full_disk_on_second_save(state, trainable, **position):
        saves.append(1)
        if len(saves) < 2:
            return checkpoint_file(state, trainable, **position)

        def write(tmp):
            raise OSError(28, 'No space left on device')
        return write
    monkeypatch.setattr(run_files.RunState, 'checkpoint_file', full_disk_on_second_save)
    result = run_train(tiny, '--num_epochs', '2')
    assert_one_line_error(result, 1, 'could not write', '_checkpoint.pth (No space left on device)')
    results = tiny / 'results'
    assert len(pd.read_csv(results / f'{prefix()}_results.csv')) == 1
    checkpoint = torch.load(results / f'{prefix()}_checkpoint.pth', weights_only=True)
    assert checkpoint['epoch'] == 2
    model = torch.load(results / f'{prefix()}_model.pth', weights_only=True)
    assert all(torch.equal(model[k], checkpoint['model'][k]) for k in model)
    assert not [name for name in os.listdir(results) if name.endswith('.tmp')]


def test_the_checkpoint_is_renamed_last(monkeypatch):
    """A kill between the renames must leave the previous checkpoint, so that --resume redoes the epoch,
    never a checkpoint that points at a best model not yet in place."""
    order = []
    monkeypatch.setattr(run_files, 'save_together', lambda writers: order.extend(writers))
    monkeypatch.setattr(run_files.RunState, 'checkpoint_file', lambda *args, **position: None)
    monkeypatch.setattr(data_base, 'best_files', lambda paths, *args: {paths[kind]: None for kind in
                                                                        ('model.pth', 'data_base.pth', 'args.json')})
    state = run_files.RunState(args={'num_epochs': 1}, ids=torch.zeros(1, 2).long(), train_items=[],
                               results=[{'epoch': 1, 'test_recall@1': 50.0}])  # as RunState.record leaves it
    checkpointer = resume.Checkpointer(0, {kind: kind for kind in run_files.RUN_OUTPUTS}, {'model': None}, None,
                                       argparse.Namespace(received=None, deferred=contextlib.nullcontext),
                                       engine.Process(0, 1, torch.device('cpu'), []), NO_LOG)
    with checkpointer:
        checkpointer.end_epoch(state, best_features={})
    assert sorted(order) == sorted(run_files.RUN_OUTPUTS) and order[-1] == 'checkpoint.pth'


def test_a_checkpoint_that_is_not_the_format_is_never_written(tmp_path):
    """What a checkpoint holds is checked when it is written against the same format --resume reads it by."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.Adam(model.parameters())
    trainable = dict(model=model, loss=torch.nn.Module(), optimizer=optimizer,
                     scheduler=torch.optim.lr_scheduler.MultiStepLR(optimizer, [1]),
                     scaler=engine.grad_scaler(torch.device('cpu'), False))
    state = run_files.RunState(args={}, ids=torch.zeros(2, 3).long(), train_items=[('a.jpg', 0)])
    path = str(tmp_path / 'checkpoint.pth')
    state.checkpoint_file(trainable)(path)
    assert run_files.load_checkpoint(path)['train_items'] == [('a.jpg', 0)]
    for odd, position, fragment in (({}, {'extra': 1}, "keys ['extra']"), ({}, {'epoch': '1'}, '"epoch"'),
                                    ({'loss'}, {}, "keys ['loss']")):
        with pytest.raises(ValueError, match=re.escape(fragment)):
            state.checkpoint_file({k: v for k, v in trainable.items() if k not in odd}, **position)


def test_unwritable_results_dir(tiny):
    (tiny / 'file').write_text('')
    assert_one_line_error(run_train(tiny, results=tiny / 'file'), 1, 'file is not a folder', '--results_dir')


# ----------------------------------------------------------------------------- validated before training

def write_data_dicts(tiny, change):
    path = tiny / 'data' / 'tiny' / 'uncropped_data_dicts.pth'
    data_dicts = torch.load(path, weights_only=True)
    change(data_dicts)
    torch.save(data_dicts, path)


@pytest.mark.parametrize('change, fragment', [
    (lambda d: d.pop('mean'), '"mean" is not three numbers'),
    (lambda d: d.pop('train'), 'no "train" split'),
    (lambda d: d.update(test={}), 'the test split holds no classes'),
    (lambda d: d['train'].update(class_09=[]), "class 'class_09' of the train split"),
    (lambda d: d['train']['class_01'].append('../../secret.jpg'), "image path '../../secret.jpg' of the train split"),
    (lambda d: d.update(std=[0.2, 0.0, 0.2]), '"std" holds a value that is not above 0'),
])
def test_damaged_data_dicts_are_refused_before_training(tiny, change, fragment):
    write_data_dicts(tiny, change)
    result = run_train(tiny)
    assert_one_line_error(result, 1, 'uncropped_data_dicts.pth: ' + fragment, 'data_utils.py')
    assert 'Epoch' not in result.stdout


@pytest.mark.parametrize('ids, fragment', [
    (torch.tensor([[0, 1, 0, 2], [1, 0, 1, 0]]), 'integers from 0 to 1'),
    (torch.tensor([[0, 1, 0, 1], [1, 0, -1, 0]]), 'integers from 0 to 1'),
    (torch.zeros(2, 4), 'integers from 0 to 1'),
    (torch.zeros(3, 4, dtype=torch.long), 'do not fit'),
])
def test_bad_saved_ids_are_refused(tiny, ids, fragment):
    (tiny / 'results').mkdir()
    torch.save(ids, tiny / 'results' / 'tiny_uncropped_fixed_2_2_ids.pth')
    assert_one_line_error(run_train(tiny, '--load_ids'), 1, fragment)


# ----------------------------------------------------------------------------- resume and Ctrl-C

def test_resume_writes_a_missing_model_again_from_the_best_epoch(trained, tmp_path):
    results = copy_of_run(trained, tmp_path, 'shop')  # one epoch: the checkpoint holds the best epoch
    model, database = (results / f'{prefix("shop")}_{kind}' for kind in ('model.pth', 'data_base.pth'))
    expected_model, expected_database = (torch.load(p, weights_only=True) for p in (model, database))
    model.unlink()
    database.unlink()
    result = run_train(trained, '--recalls', '1,8', '--num_epochs', '1', '--resume', name='shop', results=results)
    assert result.returncode == 0, result.stderr
    assert 'writing it again from the checkpoint' in result.stderr
    assert 'embedding the database of the selected epoch 1' in result.stdout
    restored = torch.load(model, weights_only=True)
    assert all(torch.equal(restored[k], expected_model[k]) for k in expected_model)
    restored_database = torch.load(database, weights_only=True)
    assert torch.equal(restored_database['gallery_features'], expected_database['gallery_features'])


def test_resume_refuses_when_the_best_model_is_lost(trained, tmp_path):
    results = copy_of_run(trained, tmp_path)
    checkpoint_path = results / f'{prefix()}_checkpoint.pth'
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    # epoch 1 the best: its weights are not in the checkpoint
    checkpoint['results'][0]['test_recall@1'] = checkpoint['best_recall'] = 101.0
    torch.save(checkpoint, checkpoint_path)
    (results / f'{prefix()}_results.csv').unlink()  # else it contradicts the checkpoint
    (results / f'{prefix()}_model.pth').unlink()
    result = run_train(trained, '--resume', results=results)
    assert_one_line_error(result, 1, 'the model of the best epoch, 1, is lost', '--overwrite')


def test_interrupted_note_says_what_there_is_to_resume(trained, tmp_path):
    args = train.get_args_parser().parse_args(['--data_name', 'tiny', '--results_dir', str(tmp_path), *TINY])
    assert 'there is nothing to resume' in resume.interrupted_note(args)
    args.results_dir = str(trained / 'results')
    assert 'holds the run at the end of epoch 2; continue with --resume' in resume.interrupted_note(args)


def test_ctrl_c_in_the_first_epoch_says_there_is_nothing_to_resume(tiny, monkeypatch):
    def interrupt(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(engine, 'train_step', interrupt)
    result = run_as_command('train.py', '--data_path', tiny / 'data', '--data_name', 'tiny', '--results_dir',
                            tiny / 'results', *TINY)
    assert result.returncode == 130
    assert result.stderr.splitlines()[-1] == 'interrupted before the first checkpoint: there is nothing to resume'


def test_unreadable_test_image_stops_the_run(tiny):
    """Leaving a test image out would change the metric: the run stops, naming it."""
    victim = tiny / 'data' / 'tiny' / 'test' / 'class_01' / '1.jpg'
    victim.write_bytes(b'not a jpeg any more')
    assert_one_line_error(run_train(tiny, '--num_epochs', '1'), 1, f'evaluation image {victim} is unreadable')


# ----------------------------------------------------------------------------- a refused command loses nothing

@pytest.mark.parametrize('flags, code, fragment', [
    (['--recalls', '100'], 2, '--recalls 100 is more than'),
    (['--val_classes', '1'], 2, '--val_classes 1'),
    (['--batch_size', '1'], 2, '--batch_size 1 gives a device single images'),
    (['--load_ids', '--val_classes', '2', '--recalls', '1,2'], 1, 'ids of shape (2, 4) do not fit'),
    (['--data_path', 'nowhere'], 1, 'not found'),
    ([], 1, '--no_pretrained'),  # no ImageNet weights here: the model is built after every other check
])
def test_overwrite_refused_by_a_later_check_keeps_the_earlier_run(trained, tmp_path, monkeypatch, flags, code,
                                                                  fragment):
    """Every check runs before --overwrite removes anything: one typo must not lose a finished run."""
    results = copy_of_run(trained, tmp_path)
    before = file_digests(results)
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'no_weights'))
    flags = [(str(tmp_path / flag) if flag == 'nowhere' else flag) for flag in flags]
    tiny = [flag for flag in TINY if flag != '--no_pretrained' or flags]
    result = run_main('train', '--data_path', trained / 'data', '--data_name', 'tiny', '--results_dir', results, *tiny,
                      '--overwrite', *flags)
    assert_one_line_error(result, code, fragment)
    assert file_digests(results) == before


@pytest.mark.slow
def test_overwrite_never_replaces_ids_another_run_uses(trained, tmp_path):
    """Runs that differ only in share type share one ids file: --overwrite of one with other ids (another
    --val_classes draws ids for fewer classes) must leave the other's ids alone; alone, the run may replace them."""
    results = copy_of_run(trained, tmp_path)
    ids_file = results / 'tiny_uncropped_fixed_2_2_ids.pth'
    other = results / f'{prefix(share="layer2")}_results.csv'
    shutil.copy(results / f'{prefix()}_results.csv', other)
    before = file_digests(results)
    flags = ['--overwrite', '--val_classes', '2', '--recalls', '1,2', '--num_epochs', '1']
    result = run_train(trained, *flags, results=results)
    assert_one_line_error(result, 2, 'tiny_uncropped_fixed_2_2_ids.pth holds other ids',
                          f'the run {prefix(share="layer2")} uses them')
    assert file_digests(results) == before
    other.unlink()
    result = run_train(trained, *flags, results=results)
    assert result.returncode == 0, result.stderr
    assert torch.load(ids_file, weights_only=True).shape == (2, 2)


def test_a_refusal_of_shared_ids_does_not_advise_the_overwrite_it_would_refuse(trained, tmp_path):
    """Only the other run's files and the ids: the refusal names that run and does not advise --overwrite."""
    results = tmp_path / 'results'
    results.mkdir()
    shutil.copy(trained / 'results' / 'tiny_uncropped_fixed_2_2_ids.pth', results)
    shutil.copy(trained / 'results' / f'{prefix()}_results.csv', results / f'{prefix(share="layer2")}_results.csv')
    result = run_train(trained, '--val_classes', '2', '--recalls', '1,2', results=results)
    assert_one_line_error(result, 2, 'holds other ids', f'the run {prefix(share="layer2")} uses them')
    assert '--overwrite' not in result.stderr


# holds the lock file argv[1] as a run in progress does (run_files.RunLock), until killed
HOLD_LOCK = ('import fcntl, sys, time; f = open(sys.argv[1], "a"); fcntl.lockf(f, fcntl.LOCK_EX); '
             'print(1, flush=True); time.sleep(120)')


def test_a_run_that_shares_the_ids_file_cannot_replace_the_ids_another_just_wrote(tiny, monkeypatch):
    """Two runs that share one ids file (they differ in share type) start together with other seeds: run A, in
    progress, writes its ids after run B checked the file. B must not save its own over them (both runs would claim
    ids only one trained on): its start is refused, under the ids file's lock, and A's ids stay."""
    results, other = tiny / 'results', prefix(share='layer2')
    ids_file = results / 'tiny_uncropped_fixed_2_2_ids.pth'
    theirs = 1 - utils.create_id(2, 4, 2, 'fixed', torch.Generator().manual_seed(2))  # not what --seed 2 draws
    training_model, holders = engine.training_model, []

    def another_run_writes_meanwhile(*args):
        holders.append(subprocess.Popen([sys.executable, '-c', HOLD_LOCK, str(results / f'.{other}.lock')],
                                        stdout=subprocess.PIPE, text=True))
        holders[0].stdout.readline()
        torch.save(theirs, ids_file)
        return training_model(*args)
    monkeypatch.setattr(engine, 'training_model', another_run_writes_meanwhile)
    try:
        result = run_train(tiny, '--seed', '2')
    finally:
        holders[0].kill()
        holders[0].wait()
    assert_one_line_error(result, 2, 'holds other ids than --seed 2 draws', f'the run {other} uses them')
    assert torch.equal(torch.load(ids_file, weights_only=True), theirs)
    assert file_digests(results) == {ids_file.name: file_digests(results)[ids_file.name]}  # nothing else written


@pytest.mark.slow
def test_a_crop_type_the_demo_lacks_is_one_line_and_draws_nothing(tmp_path):
    """It drew the whole demo again, then hung in a forked pool."""
    result = run_script('train.py', '--data_path', tmp_path / 'data', '--data_name', 'demo', '--crop_type', 'cropped',
                        '--results_dir', tmp_path / 'results', '--no_pretrained', '--num_workers', '2')
    assert_one_line_error(result, 2, '--crop_type cropped needs bounding boxes')
    assert not (tmp_path / 'data').exists() and not (tmp_path / 'results').exists()


@pytest.mark.parametrize('text, expected', [('tiny/', 'tiny'), ('tiny', 'tiny')])
def test_a_dataset_name_is_a_name(text, expected):
    assert train.get_args_parser().parse_args(['--data_name', text]).data_name == expected


@pytest.mark.parametrize('flags, fragment', [
    (['--data_name', 'data/tiny'], "'data/tiny' is not a dataset name"),
    (['--data_name', '..'], "'..' is not a dataset name"),
    (['--gpu_ids', ''], "--gpu_ids '' is not a comma-separated list"),
])
def test_a_path_for_a_dataset_name_or_no_gpu_ids_is_one_line(tiny, flags, fragment):
    result = run_main('train', '--data_path', tiny / 'data', '--results_dir', tiny / 'results', '--no_pretrained',
                      *flags)
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert fragment in result.stderr
    assert not (tiny / 'results').exists()


def test_a_stop_signal_before_training_ends_the_run_at_once(tiny, monkeypatch):
    """Outside the training steps a stop signal has nothing to wait for: one line, exit 75, nothing written."""
    build = engine.build_model

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return build(*args, **kwargs)
    monkeypatch.setattr(engine, 'build_model', signalled)
    result = run_train(tiny)
    assert result.returncode == utils.STOPPED_EXIT_CODE, result.stderr
    assert result.stderr.splitlines()[-1] == ('stopped by SIGTERM before training: no checkpoint was written, so '
                                              'there is nothing to resume; run the same command again')
    assert not (tiny / 'results').exists()  # not even the run's lock


@pytest.mark.slow
def test_a_stop_signal_while_train_py_loads_its_modules_is_one_line(tiny):
    """train.py takes seconds to import torch and the rest: a SIGTERM then ended it with -15 and no word."""
    process = subprocess.Popen([sys.executable, os.path.join(REPO, 'train.py'), '--data_path', tiny / 'data',
                                '--data_name', 'tiny', '--results_dir', tiny / 'results', *TINY],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == utils.STOPPED_EXIT_CODE, stderr
    assert stderr.splitlines()[-1].startswith('stopped by SIGTERM before training: no checkpoint was written')
    assert not (tiny / 'results').exists()


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT], ids=['SIGTERM', 'Ctrl-C'])
@pytest.mark.slow
def test_a_signal_while_the_demo_is_drawn_ends_the_run_in_seconds(tmp_path, signum):
    """The demo is drawn by a pool of processes: a signal to the process group (as a terminal's Ctrl-C and a
    scheduler's SIGTERM are sent) ends them and the run at once, with one line and no worker's traceback."""
    # SIGINT at its default, as in a terminal: a suite run in the background by a shell without job control hands
    # it down ignored, and Python then never turns it into KeyboardInterrupt
    process = subprocess.Popen([sys.executable, os.path.join(REPO, 'train.py'), '--data_path', tmp_path / 'data',
                                '--data_name', 'demo', '--results_dir', tmp_path / 'results', '--no_pretrained',
                                '--num_workers', '2'], stderr=subprocess.PIPE, text=True, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while not (tmp_path / 'data' / 'demo' / 'train').exists() and time.time() < deadline:
            time.sleep(0.05)
        sent = time.time()
        os.killpg(process.pid, signum)
        _, stderr = process.communicate(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert time.time() - sent < 10
    assert 'Traceback' not in stderr
    if signum == signal.SIGTERM:
        assert process.returncode == utils.STOPPED_EXIT_CODE
        assert stderr.splitlines()[-1].startswith('stopped by SIGTERM before training')
    else:
        assert process.returncode == 130
        assert stderr.splitlines()[-1] == 'interrupted before the first checkpoint: there is nothing to resume'


# ----------------------------------------------------------------------------- files checked for what the reader needs

@pytest.mark.parametrize('change, fragment', [
    (lambda c: c.update(args=[1, 2]), 'its "args" is not a dict of flags'),
    (lambda c: c.update(epoch='3'), 'its "epoch" is not an epoch number'),
    (lambda c: c.update(results=None), 'its "results" is not a list of result rows'),
    (lambda c: c.pop('optimizer'), 'missing optimizer'),
    (lambda c: c['model'].pop(next(iter(c['model']))), 'its model state does not fit this run'),
    (lambda c: c.update(ids=c['ids'][:, :3]), 'ids of shape (2, 3) do not fit'),
    (lambda c: c.update(train_items=[('train/x.jpg', 7)]), 'its training list names images that are not'),
    (lambda c: c.update(train_items=c['train_items'][:1]), 'its training list leaves out training classes'),
    (lambda c: inside_epoch_2(c, running=[]), 'it stands at step 2 without the running sums'),
    (lambda c: inside_epoch_2(c, step=50), 'its "step" 50 is beyond the 4 steps of an epoch'),
    (lambda c: inside_epoch_2(c, running=[{'sums': [0, 0, 0, 0], 'rng': {}}]), 'its "running" is not'),
    # a log record naming a path, which --resume would truncate, or of another shape
    (lambda c: c.update(log={'files': {'../../victim': 0}}), 'its "log" is not'),
    (lambda c: c.update(log={'files': [1]}), 'its "log" is not'),
    # fields each of the right kind, that contradict each other or the run's files
    (lambda c: inside_epoch_2(c, step=0), 'its "step" is 0 with the running sums of 8 images'),
    (lambda c: inside_epoch_2(c, step=3), 'its "step" 3 contradicts its running sums, of 8 images where 3 steps '
                                          'take 12'),
    (lambda c: inside_epoch_2(c, step=4), 'its "step" 4 contradicts its running sums'),  # the epoch's last step
    (lambda c: inside_epoch_2(c, running=[{'sums': [1.0, 17, 8, 0], 'rng': {'cpu': torch.get_rng_state(),
                                                                          'cuda': []}}]), 'count 17 correct labels'),
    (lambda c: c.update(ids=c['ids'][[1, 0]]), 'its "ids" are not those of'),
    (lambda c: c.update(epoch=1, results=[], best_recall=-1.0), 'its "epoch" 1 is behind'),
    (lambda c: c['results'][0].update(train_loss=c['results'][0]['train_loss'] + 1),
     'its "results" are not those of'),
    (lambda c: c['optimizer']['param_groups'][0].update(lr=1e-3), 'its "optimizer" learning rate 0.001 is not the '
                                                                  "schedule's 1e-06 at epoch 3"),
    (lambda c: c['scheduler'].update(last_epoch=1), 'its "scheduler" last_epoch is 1, where at epoch 3 it is 2'),
    (lambda c: c['scheduler'].update(milestones=collections.Counter({2: 1})), 'its "scheduler" milestones is'),
    (lambda c: c['scheduler'].update(base_lrs=[0.1]), 'its "scheduler" base_lrs is [0.1], the run\'s [0.0001]'),
])
def test_a_damaged_checkpoint_is_one_line_on_resume(trained, tmp_path, change, fragment):
    """Refused before anything is trained or written."""
    results = copy_of_run(trained, tmp_path)
    path = results / f'{prefix()}_checkpoint.pth'
    checkpoint = torch.load(path, weights_only=True)
    change(checkpoint)
    torch.save(checkpoint, path)
    before = written_files(results)
    assert_one_line_error(run_train(trained, '--resume', results=results), 1, f'{path}: ' * ('ids' not in fragment),
                          fragment)
    assert written_files(results) == before


@pytest.mark.parametrize('change, fragment', [
    (lambda c: c.update(epoch=5), 'it stands at epoch 5 of a run of 2'),
    (lambda c: c.update(results=c['results'] + c['results'][-1:]), 'not one row for each epoch before epoch 3'),
    (lambda c: c['results'][1].pop('test_recall@1'), 'its results lack test_recall@1'),
    (lambda c: c.update(best_recall=c['best_recall'] - 1), 'its best recall'),
])
def test_a_checkpoint_whose_position_does_not_fit_the_run_is_refused(trained, change, fragment):
    """What --resume did with them: an epoch beyond the last "finished" the run with its rows; a row twice or a best
    recall not the results' went on to write a CSV and select a model that do not agree."""
    path = trained / 'results' / f'{prefix()}_checkpoint.pth'
    checkpoint = run_files.load_checkpoint(str(path))
    change(checkpoint)
    args = train.get_args_parser().parse_args(['--data_path', str(trained / 'data'), '--data_name', 'tiny', *TINY,
                                               '--results_dir', str(trained / 'results'), '--resume'])
    run = run_files.RunName.from_args(args)
    data_dicts = utils.load_data_dicts(args.data_path, 'tiny', 'uncropped')
    with pytest.raises(utils.ReirError, match=re.escape(fragment)):
        run_files.RunState.begin(args, run, run.paths(args.results_dir), data_dicts, checkpoint, '')


def inside_epoch_2(checkpoint, **changes):
    """A finished tiny run's checkpoint as if written after step 2 of epoch 2, changed."""
    first = checkpoint['results'][0]
    checkpoint.update(epoch=2, step=2, results=[first], best_recall=first['test_recall@1'],
                      running=[{'sums': [1.0, 4, 8, 0], 'rng': {'cpu': torch.get_rng_state(), 'cuda': []}}])
    checkpoint.update(changes)


def test_a_resumed_run_refuses_data_prepared_again(trained, tmp_path):
    """The checkpoint holds a fingerprint of the data dicts it started on."""
    shutil.copytree(trained / 'data' / 'tiny', tmp_path / 'data' / 'tiny')
    results = copy_of_run(trained, tmp_path)
    write_data_dicts(tmp_path, lambda d: d['test'].pop(sorted(d['test'])[0]))
    result = run_train(tmp_path, '--resume', results=results)
    assert_one_line_error(result, 1, 'is not the data the run started on')


def test_resume_of_a_finished_run_writes_its_lost_results_again(trained, tmp_path):
    results = copy_of_run(trained, tmp_path)
    before = file_digests(results)
    (results / f'{prefix()}_results.csv').write_text('epoch,train_loss\n')  # header only
    (results / f'{prefix()}_curves.png').unlink()
    result = run_train(trained, '--resume', results=results)
    assert result.returncode == 0, result.stderr
    assert 'writing them again from the checkpoint' in result.stderr
    assert file_digests(results)[f'{prefix()}_results.csv'] == before[f'{prefix()}_results.csv']
    assert (results / f'{prefix()}_curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
