"""Every write of every script fails in one line that names the file and gives the operating system's reason, and
leaves what was there before: a folder that cannot be made, a temporary that cannot be created, a rename refused, a
full disk, a file-size limit (the tests run as root, where permissions do not bite: the refusals are raised where the
operating system would raise them)."""
import contextlib
import errno
import os
import resource
import shutil
import signal
import tempfile

import pandas as pd
import pytest
import torch
from PIL import Image

import run_files
import utils
from conftest import assert_one_line_error, prefix, run_main, run_train


def refused(*args, **kwargs):
    raise PermissionError(errno.EACCES, 'Permission denied', kwargs.get('dir') or (args[0] if args else None))


@pytest.mark.parametrize('step', ['makedirs', 'mkstemp', 'replace'])
def test_every_step_of_a_write_fails_in_one_line_and_changes_nothing(tmp_path, monkeypatch, step):
    folder = tmp_path / 'results'
    folder.mkdir()
    (folder / 'model.pth').write_text('epoch 1')
    target = {'makedirs': os, 'mkstemp': tempfile, 'replace': os}[step]
    monkeypatch.setattr(target, step, refused)
    with pytest.raises(utils.ReirError) as error:
        run_files.save_together({str(folder / 'model.pth'): lambda tmp: open(tmp, 'w').write('epoch 2'),
                                 str(folder / 'args.json'): lambda tmp: open(tmp, 'w').write('{}')})
    assert str(error.value).startswith(f'could not write {folder}/') and '(Permission denied)' in str(error.value)
    monkeypatch.undo()
    assert os.listdir(folder) == ['model.pth'] and (folder / 'model.pth').read_text() == 'epoch 1'


@contextlib.contextmanager
def file_size_limit(size):
    """A file-size limit (ulimit -f) on this process, which then gets EFBIG instead of SIGXFSZ."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_a_file_size_limit_is_said_in_the_operating_systems_words(tmp_path):
    """torch.save alone says '[enforce fail at inline_container.cc] unexpected pos'."""
    path = tmp_path / 'checkpoint.pth'
    torch.save({'epoch': 1}, path)
    before = path.read_bytes()
    with file_size_limit(100_000), pytest.raises(utils.ReirError) as error:
        run_files.atomic_torch_save({'weights': torch.zeros(100_000)}, str(path))
    assert str(error.value) == f'could not write {path} (File too large); the files there before are unchanged'
    assert path.read_bytes() == before and os.listdir(tmp_path) == ['checkpoint.pth']


@pytest.mark.slow
def test_a_results_folder_that_refuses_writes_mid_run(tiny, monkeypatch):
    """The folder turns read-only after epoch 1: epoch 2's files are refused in one line, epoch 1's kept."""
    replace, epochs_written = os.replace, []

    def refused_in_epoch_2(source, destination):
        if epochs_written:
            refused(destination)
        replace(source, destination)
        if str(destination).endswith('_checkpoint.pth'):
            epochs_written.append(destination)  # the folder turns read-only once epoch 1 is written
    monkeypatch.setattr(os, 'replace', refused_in_epoch_2)
    result = run_train(tiny, '--num_epochs', '2', '--checkpoint_every', '0')
    results = tiny / 'results'
    assert_one_line_error(result, 1, f'could not write {results}/', '(Permission denied)')
    assert len(pd.read_csv(results / f'{prefix()}_results.csv')) == 1
    assert torch.load(results / f'{prefix()}_checkpoint.pth', weights_only=True)['epoch'] == 2
    assert not [name for name in os.listdir(results) if name.endswith('.tmp')]


@pytest.fixture
def read_only_copy(trained, tmp_path):
    """A copy of the tiny run's files whose folder refuses new files (tempfile.mkstemp and os.makedirs refused)."""
    results = tmp_path / 'results'
    shutil.copytree(trained / 'results', results)
    return results


def test_evaluate_inference_and_ablation_say_the_folder_is_not_writable(trained, read_only_copy, monkeypatch):
    query = trained / 'data' / 'tiny' / 'test' / 'class_01' / '0.jpg'
    database = read_only_copy / f'{prefix()}_data_base.pth'
    monkeypatch.setattr(tempfile, 'mkstemp', refused)
    monkeypatch.setattr(tempfile, 'mkdtemp', refused)
    before = sorted(os.listdir(read_only_copy))
    commands = [('evaluate', database), ('inference', '--query_img_name', query, '--data_base', database),
                ('ablation', '--better_data_base', database, '--worse_data_base', database, '--results_dir',
                 read_only_copy, '--save_results')]
    for script, *flags in commands:
        assert_one_line_error(run_main(script, *flags), 1, f'could not write {read_only_copy}', '(Permission denied)')
    assert sorted(os.listdir(read_only_copy)) == before


def test_a_failed_image_write_of_save_results_is_one_line(prepared, tmp_path, monkeypatch):
    """The folder of --save_results cannot be filled (no space): one line, the earlier folder and nothing else left."""
    from test_ablation import databases
    perfect, confused = databases(prepared, tmp_path)
    out = tmp_path / 'out'
    flags = ['--better_data_base', perfect, '--worse_data_base', confused, '--retrieval_num', 4, '--results_dir', out,
             '--save_results']
    assert run_main('ablation', *flags).returncode == 0
    before = {root: sorted(files) for root, _, files in os.walk(out)}
    save = Image.Image.save
    monkeypatch.setattr(Image.Image, 'save', lambda image, path, *args, **kwargs: no_space() if str(path).endswith(
        '.jpg') else save(image, path, *args, **kwargs))  # the folder's images, not the picture of the comparison
    assert_one_line_error(run_main('ablation', *flags), 1, f'could not write {out}', '(No space left on device)')
    assert {root: sorted(files) for root, _, files in os.walk(out)} == before


def no_space():
    raise OSError(errno.ENOSPC, 'No space left on device')
