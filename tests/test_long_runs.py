"""Long runs, resumed many times: the checkpoint's copy reproduces every value exactly (its size does not grow with the
resumes), a checkpoint that contradicts itself or the run's files is refused naming the field, and a refused command
leaves the disk as it found it."""
import collections
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import engine
import locks
import run_files
import train
import utils
from conftest import REPO, assert_one_line_error, copy_of_run, one_thread, prefix, run_train

Point = collections.namedtuple('Point', 'x y')
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8,
          torch.bool, torch.complex64)


def random_state(rng, depth=0):
    """A random nested state of the kinds a checkpoint holds: dicts (plain, Counter, OrderedDict, defaultdict), lists,
    tuples and namedtuples of tensors of every dtype, numbers, strings and None."""
    containers = ['dict', 'counter', 'ordered', 'default', 'list', 'tuple', 'named'] if depth < 4 else []
    kind = rng.choice(containers + ['tensor', 'int', 'float', 'str', 'none'])
    if kind == 'tensor':
        shape = tuple(rng.choices(range(4), k=rng.randrange(3)))
        tensor = torch.randn(shape, generator=torch.Generator().manual_seed(rng.randrange(2 ** 31)),
                             dtype=torch.float64) * 100
        return tensor.to(rng.choice(DTYPES))
    scalars = {'int': lambda: rng.randrange(-10 ** 12, 10 ** 12), 'float': lambda: rng.uniform(-1e6, 1e6),
               'str': lambda: rng.choice(['', 'a', 'layer1.weight', 'é']), 'none': lambda: None}
    if kind in scalars:
        return scalars[kind]()
    children = [random_state(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = rng.sample(range(-5, 50), len(children)) if rng.random() < 0.5 else [
        (rng.randrange(9), rng.randrange(9)) for _ in children]  # a key may be a tuple: what update() confuses
    if kind == 'counter':
        return collections.Counter({key: rng.randrange(1, 5) for key in keys})
    if kind in ('dict', 'ordered', 'default'):
        made = {'dict': dict, 'ordered': collections.OrderedDict,
                'default': lambda: collections.defaultdict(list)}[kind]()
        for key, child in zip(keys, children):
            made[key] = child
        return made
    if kind == 'named':
        return Point(*(children + [None, None])[:2])
    return children if kind == 'list' else tuple(children)


def assert_same_state(copied, original, where='state'):
    """copied holds what original holds, container for container of the same type, tensor for tensor equal in dtype,
    shape and value but in storage of its own on the CPU."""
    assert type(copied) is type(original), where
    if isinstance(original, torch.Tensor):
        assert copied.dtype == original.dtype and copied.shape == original.shape and copied.device.type == 'cpu', where
        assert torch.equal(copied, original), where
        assert copied.numel() == 0 or copied.data_ptr() != original.data_ptr(), where
    elif isinstance(original, dict):
        assert list(copied) == list(original), where  # the same keys, in the same order
        if isinstance(original, collections.defaultdict):
            assert copied.default_factory is original.default_factory, where
        for key in original:
            assert_same_state(copied[key], original[key], f'{where}[{key!r}]')
    elif isinstance(original, (list, tuple)):
        assert len(copied) == len(original), where
        for i, (a, b) in enumerate(zip(copied, original)):
            assert_same_state(a, b, f'{where}[{i}]')
    else:
        assert copied == original, where


def test_a_host_copy_reproduces_random_nested_states_exactly():
    rng = random.Random(0)
    for case in range(400):
        state = random_state(rng)
        assert_same_state(run_files.host_copy(state), state, f'case {case}')


def test_a_host_copy_of_a_copy_is_the_same_copy():
    """What a resume does to the scheduler's state: copied for the checkpoint, loaded, copied again, 50 times."""
    milestones = collections.Counter({1: 1, 2: 1, 3: 2})
    state = {'milestones': milestones, 'last_epoch': 2, 'nested': [(milestones, collections.OrderedDict(a=1))]}
    copied = state
    for resume in range(50):
        copied = run_files.host_copy(copied)
        assert_same_state(copied, state, f'resume {resume + 1}')


@pytest.mark.slow
def test_a_run_stopped_after_every_step_ends_with_the_checkpoint_of_a_run_never_stopped(tiny, tmp_path, monkeypatch):
    """56 stops, each resumed (one step each: 8 batches of 2 of the tiny dataset's 16 images, 7 epochs): the final
    checkpoint's scheduler state is the uninterrupted run's, each checkpoint inside an epoch is as large as the
    others of the epoch, and the results and the model are the uninterrupted run's to the byte."""
    flags = ['--batch_size', '2', '--num_epochs', '7', '--checkpoint_every', '0']
    with one_thread():
        assert run_train(tiny, *flags, results=tmp_path / 'once').returncode == 0
    step = engine.train_step

    def stopping_step(*args):  # every run stops after its first step
        os.kill(os.getpid(), signal.SIGUSR1)
        return step(*args)
    monkeypatch.setattr(engine, 'train_step', stopping_step)
    resumes, sizes = 0, collections.defaultdict(set)  # {epoch: sizes of the checkpoints inside it}
    with one_thread():
        result = run_train(tiny, *flags)
        checkpoint = tiny / 'results' / f'{prefix()}_checkpoint.pth'
        while result.returncode == utils.STOPPED_EXIT_CODE:
            position = run_files.peek_checkpoint(str(checkpoint))
            if position['step']:  # inside an epoch: with the running sums, and the results of the epochs before
                sizes[position['epoch']].add(os.path.getsize(checkpoint))
            result = run_train(tiny, *flags, '--resume')
            resumes += 1
    assert result.returncode == 0, result.stderr
    assert resumes >= 50
    once = run_files.load_checkpoint(str(tmp_path / 'once' / f'{prefix()}_checkpoint.pth'))
    resumed = run_files.load_checkpoint(str(checkpoint))
    assert resumed['scheduler'] == once['scheduler']
    assert resumed['optimizer']['param_groups'] == once['optimizer']['param_groups']
    for key in ('epoch', 'step', 'running', 'best_recall', 'results', 'train_items'):
        assert resumed[key] == once[key], key
    for kind in ('results.csv', 'model.pth'):
        assert (tiny / 'results' / f'{prefix()}_{kind}').read_bytes() == \
            (tmp_path / 'once' / f'{prefix()}_{kind}').read_bytes(), kind


# ----------------------------------------------------------------------------- a refused command writes nothing

def disk(root):
    """{path under root: (size, modification time) of a file, None for a folder} of everything there, hidden files
    too. (A folder's time changes when a file in it is made and removed again: the run's lock.)"""
    found = {}
    for folder, folders, files in os.walk(root):
        found.update({os.path.relpath(os.path.join(folder, name), root): None for name in folders})
        for name in files:
            path = os.path.join(folder, name)
            found[os.path.relpath(path, root)] = (os.path.getsize(path), os.stat(path).st_mtime_ns)
    return found


@pytest.mark.parametrize('flags, code, fragment', [
    (['--meta_class_size', '13'], 2, 'larger than the number of training classes'),
    (['--recalls', '1,100'], 2, '--recalls 100'),
    (['--val_classes', '12'], 2, '--val_classes 12'),
    (['--data_name', 'nosuch'], 1, 'nosuch'),
    (['--resume'], 1, 'no checkpoint'),
    (['--load_ids'], 1, 'meta-class ids not found'),
    (['--m_per_class', '3'], 2, '--m_per_class 3'),  # refused after the run's lock was taken
    (['--loss', 'pml.SmoothAPLoss'], 2, 'pass --m_per_class'),  # refused by the loss's trial on a batch
])
@pytest.mark.parametrize('results', ['missing', 'empty'])
def test_a_refused_command_leaves_the_disk_as_it_found_it(tiny, flags, code, fragment, results):
    """No results folder, lock, or ids file: a folder that was missing stays missing (with the folders above it that
    the run would make), an empty one stays empty, and the dataset is as it was."""
    folder = tiny / 'runs' / 'cub' if results == 'missing' else tiny / 'results'
    if results == 'empty':
        folder.mkdir()
    before = disk(tiny)
    assert_one_line_error(run_train(tiny, *flags, results=folder), code, fragment)
    assert disk(tiny) == before


def test_a_results_folder_whose_paths_are_too_long_is_refused_before_training(tiny, monkeypatch):
    """A 4,035-character --results_dir can be made, and its lock too, but not the temporaries of the run's files:
    refused before anything is trained or made."""
    folder = str(tiny)
    while len(folder) < 4035 - 201:
        folder = os.path.join(folder, 'd' * 200)
    folder = os.path.join(folder, 'd' * (4035 - len(folder) - 1))
    assert len(folder) == 4035
    monkeypatch.setattr(train, 'train_one_epoch', None)  # never called
    before = disk(tiny)
    assert_one_line_error(run_train(tiny, results=folder), 1, '--results_dir', 'bytes long', 'the file system takes')
    assert disk(tiny) == before


def test_a_results_folder_under_a_file_is_refused_before_anything_is_made(tiny):
    (tiny / 'notes').write_text('')
    before = disk(tiny)
    assert_one_line_error(run_train(tiny, results=tiny / 'notes' / 'results'), 1, 'notes is not a folder')
    assert disk(tiny) == before


def test_a_checkpoint_whose_milestones_grew_before_the_fix_resumes(trained, tmp_path):
    """Checkpoints written before host_copy kept a Counter's values hold milestones with (milestone, count) pairs
    added at every save; the run's schedule is what they hold without them, and such a run resumes."""
    results = copy_of_run(trained, tmp_path)
    path = results / f'{prefix()}_checkpoint.pth'
    checkpoint = torch.load(path, weights_only=True)
    milestones = checkpoint['scheduler']['milestones']
    grown = collections.Counter(milestones)
    grown.update(milestones.items())
    grown.update(collections.Counter(grown).items())
    checkpoint['scheduler']['milestones'] = grown
    torch.save(checkpoint, path)
    result = run_train(trained, '--resume', results=results)
    assert result.returncode == 0, result.stderr
    assert 'resumed from' in result.stdout


@pytest.mark.slow  # processes of their own, which import torch
def test_a_lock_released_and_removed_while_others_wait_is_held_by_one_process_at_a_time(tmp_path):
    """A released lock file is removed: the processes that opened it before, and wait, must lock the file at the path
    again, or one of them and a process that comes later (and makes a new file) would both hold the lock."""
    path = tmp_path / '.ids.pth.lock'
    hold = ('import sys, time; sys.path.insert(0, sys.argv[1]); import locks; '
            'lock = locks.LockFile(sys.argv[2], wait=True); print(time.monotonic(), flush=True); time.sleep(3); '
            'print(time.monotonic(), flush=True); lock.release()')

    def holder():
        return subprocess.Popen([sys.executable, '-c', hold, REPO, str(path)], stdout=subprocess.PIPE, text=True)
    with locks.LockFile(str(path), wait=True):
        holders = [holder(), holder()]
        time.sleep(4)  # both have imported torch and wait on the file
    holders.append(holder())  # comes while the first of them holds the lock
    held = sorted([float(t) for t in process.communicate(timeout=60)[0].split()] for process in holders)
    assert all(end <= start for (_, end), (start, _) in zip(held, held[1:])), held  # CLOCK_MONOTONIC: the machine's
    assert not path.exists()
