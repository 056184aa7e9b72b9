"""A run's TensorBoard log (tensorboard_log.py), read back with TensorBoard's own readers: every training step and
every epoch's results on one axis, once each, across stops, kills and a damaged file; the HParams and the Projector of
the selected model; the refusals and --overwrite."""
import math
import os
import shutil
import signal

import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import (assert_one_line_error, copy_of_run, file_digests, prefix, run_train, scalar_points,
                      session_start, signal_during_call)
import engine
import resume
import run_files
import tensorboard_log
import utils

STEPS, EPOCHS = 4, 2  # of the tiny dataset's runs with the TINY flags: 16 training images, 4 a step
TRAIN_TAGS = ('train/loss', 'train/accuracy', 'train/lr')
TEST_TAGS = ('test/recall@1', 'test/recall@2', 'test/recall@4', 'test/recall@8', 'test/map@r', 'test/r_precision')


def log_folder(results, name='tiny'):
    return results / f'{prefix(name)}_{run_files.RUN_LOG}'


def steps_of(points, tag):
    return [step for name, step, _ in points if name == tag]


# ----------------------------------------------------------------------------- what a run logs

def test_a_run_logs_every_step_and_every_epoch_once_on_one_axis(trained):
    results = trained / 'results'
    points = scalar_points(log_folder(results))
    for tag in TRAIN_TAGS:
        assert steps_of(points, tag) == list(range(1, EPOCHS * STEPS + 1)), tag
    rows = pd.read_csv(results / f'{prefix()}_results.csv')
    for tag in TEST_TAGS:
        assert steps_of(points, tag) == [epoch * STEPS for epoch in rows['epoch']], tag
        logged = [value for name, _, value in points if name == tag]
        assert logged == pytest.approx(rows[tag.replace('/', '_')].tolist(), rel=1e-6)
    # the progress bar's running means: at an epoch's last step, the epoch's mean (one process)
    for tag, column in (('train/loss', 'train_loss'), ('train/accuracy', 'train_accuracy')):
        at_ends = [value for name, step, value in points if name == tag and step % STEPS == 0]
        assert at_ends == pytest.approx(rows[column].tolist(), rel=1e-5)
    lrs = [value for name, _, value in points if name == 'train/lr']
    assert lrs == pytest.approx([1e-4] * STEPS + [1e-6] * STEPS)  # dropped after epoch 1 (milestones 1 and 1)


def test_the_hparams_hold_the_runs_flags_and_its_selected_metrics(trained):
    results = trained / 'results'
    folder = log_folder(results)
    flags = session_start(folder).hparams
    settings = run_files.run_settings(run_files.RunName.parse(prefix()).paths(str(results)))
    assert flags['ensemble_size'].number_value == 2 and flags['share_type'].string_value == 'layer4'
    # torch's hparams() writes a bool as the number 1 or 0, a list as its text
    assert flags['no_pretrained'].number_value == 1 and flags['recalls'].string_value == str(settings['recalls'])
    assert not {'resume', 'overwrite', 'mean', 'std'} & set(flags)
    row = run_files.selected_row(run_files.read_results(results / f'{prefix()}_results.csv'))
    selected = {tag: (step, value) for tag, step, value in scalar_points(folder) if tag.startswith('selected/')}
    assert selected['selected/epoch'] == (row['epoch'] * STEPS, row['epoch'])
    assert selected['selected/test_recall@1'] == (row['epoch'] * STEPS, pytest.approx(row['test_recall@1']))


@pytest.mark.parametrize('name,split,images', [('tiny', 'test', 12), ('shop', 'query', 6)])
def test_the_projector_shows_the_selected_models_test_images(trained, name, split, images):
    """Its config names one embedding, of the selected epoch's last step; the metadata gives each image's class and
    path, the tensors are the database's, and the sprite holds a thumbnail for each."""
    results = trained / 'results'
    folder = log_folder(results, name)
    config = (folder / tensorboard_log.PROJECTOR_CONFIG).read_text()
    rows = run_files.read_results(results / f'{prefix(name)}_results.csv')
    steps = max(steps_of(scalar_points(folder), 'train/loss')) // len(rows)
    selected = run_files.selected_row(rows)['epoch']
    subdir = f'{selected * steps:05d}/{split}'
    assert config.count('embeddings {') == 1 and f'tensor_name: "{split}:{selected * steps:05d}"' in config
    database = utils.safe_load(str(results / f'{prefix(name)}_data_base.pth'), 'database')
    metadata = (folder / subdir / 'metadata.tsv').read_text().splitlines()
    assert metadata[0] == 'class\tpath'
    assert metadata[1:] == [f'{label}\t{path}' for label, path in zip(database[f'{split}_labels'],
                                                                        database[f'{split}_images'])]
    tensors = torch.tensor([[float(x) for x in line.split('\t')]
                            for line in (folder / subdir / 'tensors.tsv').read_text().splitlines()])
    assert torch.allclose(tensors, database[f'{split}_features'].float(), atol=1e-3)
    side = math.ceil(images ** 0.5) * tensorboard_log.THUMBNAIL_SIDE
    assert Image.open(folder / subdir / 'sprite.png').size == (side, side)


def test_the_projector_draws_at_most_its_images_from_the_seed():
    drawn = tensorboard_log.drawn_indices(10_000, 2000, seed=3)
    assert len(drawn) == 2000 == len(set(drawn)) and drawn == sorted(drawn)
    assert drawn == tensorboard_log.drawn_indices(10_000, 2000, 3) != tensorboard_log.drawn_indices(10_000, 2000, 4)
    assert tensorboard_log.drawn_indices(5, 2000, seed=3) == [0, 1, 2, 3, 4]


def test_an_unreadable_image_is_a_grey_thumbnail(tmp_path):
    (tmp_path / 'broken.jpg').write_bytes(b'not a jpeg')
    Image.new('RGB', (40, 20), (255, 0, 0)).save(tmp_path / 'wide.png')
    sprite = tensorboard_log.thumbnails([str(tmp_path / 'broken.jpg'), str(tmp_path / 'wide.png')])
    grey = torch.tensor(tensorboard_log.THUMBNAIL_BACKGROUND) / 255
    assert torch.allclose(sprite[0], grey[:, None, None].expand_as(sprite[0]))
    middle, top = tensorboard_log.THUMBNAIL_SIDE // 2, 0
    assert sprite[1][:, middle, middle].tolist() == [1.0, 0.0, 0.0]  # the image, whole, between grey bands
    assert torch.allclose(sprite[1][:, top, middle], grey)


# ----------------------------------------------------------------------------- stopped, killed, damaged

def test_a_run_stopped_killed_and_resumed_logs_each_point_once(trained, tiny, monkeypatch):
    """A run that checkpoints every 2 steps, stopped (SIGUSR1) at step 1 of epoch 2, resumed and stopped again at step 3
    of epoch 2 (in a second event file); then its checkpoint is put back to that of step 2 of epoch 1, as if the run
    had been killed there: the first file holds 3 steps and epoch 1's results past it, the second file only steps
    past it. Resumed to the end, the log holds every step and every epoch's results once, with the values of the run
    never stopped."""
    results = tiny / 'results'
    checkpoint = results / f'{prefix()}_checkpoint.pth'
    save = resume.Checkpointer.save

    def save_and_keep(checkpointer, step, sums):
        save(checkpointer, step, sums)
        if (checkpointer.state.epoch, step) == (1, 2):
            checkpointer.wait()
            shutil.copy(checkpoint, tiny / 'step_2.pth')
    monkeypatch.setattr(resume.Checkpointer, 'save', save_and_keep)
    train_step = signal_during_call(monkeypatch, engine, 'train_step', STEPS + 1, signal.SIGUSR1)
    assert run_train(tiny, '--checkpoint_every', '2').returncode == utils.STOPPED_EXIT_CODE
    monkeypatch.setattr(engine, 'train_step', train_step)
    signal_during_call(monkeypatch, engine, 'train_step', 2, signal.SIGUSR1)  # steps 2 and 3 of epoch 2
    stopped = run_train(tiny, '--resume')
    assert stopped.returncode == utils.STOPPED_EXIT_CODE and 'at step 3 of 4 of epoch 2' in stopped.stderr
    assert len(tensorboard_log.event_files(log_folder(results))) == 2
    assert steps_of(scalar_points(log_folder(results)), 'train/loss') == list(range(1, STEPS + 4))
    shutil.copy(tiny / 'step_2.pth', checkpoint)
    monkeypatch.setattr(engine, 'train_step', train_step)
    resumed = run_train(tiny, '--resume')
    assert resumed.returncode == 0, resumed.stderr
    assert 'at step 2 of epoch 1' in resumed.stdout and 'TensorBoard' not in resumed.stderr
    points, reference = scalar_points(log_folder(results)), scalar_points(log_folder(trained / 'results'))
    assert [(tag, step) for tag, step, _ in points] == [(tag, step) for tag, step, _ in reference]
    assert [value for *_, value in points] == pytest.approx([value for *_, value in reference], rel=1e-4)


def change_a_byte(path):
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    path.write_bytes(bytes(damaged))


@pytest.mark.parametrize('damage,fragment', [(change_a_byte, 'its record at byte'),
                                             pytest.param(os.remove, 'it is missing', marks=pytest.mark.slow)],
                         ids=['a byte changed', 'the file removed'])
def test_a_damaged_log_is_one_line_and_the_run_goes_on_in_a_new_file(tiny, trained, monkeypatch, damage, fragment):
    """A byte of the log changed (or the file removed) while the run was stopped: --resume says so in one line, sets
    the file aside, and goes on in a new file that begins with what could be read of it; the CSV is the run's, the log
    holds every epoch's results and every step from the damage on once."""
    results = tiny / 'results'
    signal_during_call(monkeypatch, engine, 'train_step', 6, signal.SIGUSR1)
    assert run_train(tiny).returncode == utils.STOPPED_EXIT_CODE  # at step 2 of epoch 2
    monkeypatch.undo()
    folder = log_folder(results)
    [name] = tensorboard_log.event_files(folder)
    damage(folder / name)
    resumed = run_train(tiny, '--resume')
    assert resumed.returncode == 0, resumed.stderr
    warnings = [line for line in resumed.stderr.splitlines() if 'TensorBoard log' in line]
    assert len(warnings) == 1 and f'{folder}: the TensorBoard log is damaged ({name}: {fragment}' in warnings[0] \
        and 'it goes on in a new file' in warnings[0]
    assert os.path.isfile(folder / name.replace('tfevents', 'damaged')) == (damage is change_a_byte)
    pd.testing.assert_frame_equal(pd.read_csv(results / f'{prefix()}_results.csv'),
                                  pd.read_csv(trained / 'results' / f'{prefix()}_results.csv'), rtol=1e-4)
    points = scalar_points(log_folder(results))
    pairs = [(tag, step) for tag, step, _ in points]
    assert len(pairs) == len(set(pairs))  # no point twice
    for tag in TEST_TAGS:
        assert steps_of(points, tag) == [STEPS, 2 * STEPS]
    # the steps before the damaged record, then those after the checkpoint: those between are lost, not made up
    logged = steps_of(points, 'train/loss')
    assert logged[-2:] == [2 * STEPS - 1, 2 * STEPS] and logged[:-2] == list(range(1, len(logged) - 1))
    assert len(logged) < 2 * STEPS


def test_a_finished_run_resumed_keeps_its_log_and_one_whose_finish_was_cut_writes_it_again(trained, tmp_path):
    results = copy_of_run(trained, tmp_path)
    folder = log_folder(results)
    before = file_digests(results)
    assert run_train(trained, '--resume', results=results).returncode == 0
    assert file_digests(results) == before
    [name] = tensorboard_log.event_files(folder)
    recorded = torch.load(results / f'{prefix()}_checkpoint.pth', weights_only=True)['log']['files'][name]
    os.truncate(folder / name, recorded + 20)  # killed while it wrote its HParams
    assert run_train(trained, '--resume', results=results).returncode == 0
    assert len(tensorboard_log.event_files(folder)) == 2
    assert scalar_points(folder) == scalar_points(log_folder(trained / 'results'))
    assert session_start(folder).hparams['lr'].number_value == pytest.approx(1e-4)


# ----------------------------------------------------------------------------- refusals and --overwrite

def test_a_log_path_that_is_not_a_writable_folder_refuses_the_run_first(tiny):
    results = tiny / 'results'
    results.mkdir()
    log_folder(results).write_text('a file where the log goes')
    before = file_digests(results)
    assert_one_line_error(run_train(tiny), 1, 'is not a writable folder, where the run\'s TensorBoard log goes')
    assert file_digests(results) == before


@pytest.mark.slow
def test_overwrite_removes_the_log_and_a_start_replaces_a_log_that_saved_nothing(trained, tmp_path):
    results = copy_of_run(trained, tmp_path)
    folder = log_folder(results)
    old = tensorboard_log.event_files(folder)
    result = run_train(trained, '--overwrite', '--num_epochs', '1', results=results)
    assert result.returncode == 0, result.stderr
    assert 'removing' not in result.stdout  # --overwrite removed it with the run's other files
    assert not set(tensorboard_log.event_files(folder)) & set(old)
    assert max(step for _, step, _ in scalar_points(folder)) == STEPS
    for kind in run_files.RUN_OUTPUTS:
        os.remove(results / f'{prefix()}_{kind}')
    (folder / 'events.out.tfevents.1.host.1.0').write_bytes(b'')  # a start killed before its first checkpoint
    result = run_train(trained, '--num_epochs', '1', results=results)
    assert result.returncode == 0, result.stderr
    assert f'removing {folder}, the log of an earlier start of the run that saved no checkpoint' in result.stdout
    assert 'events.out.tfevents.1.host.1.0' not in tensorboard_log.event_files(folder)


@pytest.mark.slow
def test_an_old_checkpoint_without_a_log_resumes_into_a_new_log_with_every_epochs_results(tiny, monkeypatch):
    """A checkpoint written before runs had a log (no "log" key, no log folder): --resume starts one, holding the
    results of the epochs before it."""
    results = tiny / 'results'
    signal_during_call(monkeypatch, engine, 'train_step', STEPS + 1, signal.SIGUSR1)
    assert run_train(tiny).returncode == utils.STOPPED_EXIT_CODE  # at step 1 of epoch 2
    monkeypatch.undo()
    checkpoint_path = results / f'{prefix()}_checkpoint.pth'
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    del checkpoint['log']
    torch.save(checkpoint, checkpoint_path)
    shutil.rmtree(log_folder(results))
    result = run_train(tiny, '--resume')
    assert result.returncode == 0, result.stderr
    points = scalar_points(log_folder(results))
    assert steps_of(points, 'test/recall@1') == [STEPS, 2 * STEPS]
    assert steps_of(points, 'train/loss') == list(range(STEPS + 2, 2 * STEPS + 1))
