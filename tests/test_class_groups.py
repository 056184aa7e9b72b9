"""--m_per_class N: every batch is groups of N images of a class, drawn from (--seed, epoch) alone, so that a stopped
run resumes to the byte, under torchrun too; a combination of flags that cannot form such batches is one line, and
--m_per_class 0 keeps the original's uniform draw."""
import signal
from types import SimpleNamespace

import pytest
import torch

import engine
import loaders
import resume
import train
import utils
from conftest import TINY, assert_one_line_error, one_thread, prefix, run_train, signal_during_call

LABELS = [c for c in range(7) for _ in range(7)] + [7, 7]  # 7 classes of 7 images and one of 2


def batches(sampler, size):
    indices = [index for index, _ in sampler]
    return [indices[i:i + size] for i in range(0, len(indices), size)]


def test_every_batch_is_groups_of_a_class_from_distinct_classes():
    sampler = loaders.ClassGroupSampler(LABELS, 3, 12, seed=1)
    sampler.set_epoch(1)
    drawn = batches(sampler, 12)
    assert len(drawn) == -(-len(LABELS) // 12)  # as many steps as the uniform draw
    for batch in drawn:
        classes = [LABELS[i] for i in batch]
        groups = [classes[i:i + 3] for i in range(0, 12, 3)]
        assert all(len(set(group)) == 1 for group in groups)
        assert len({group[0] for group in groups}) == 4
        for group, members in zip(groups, (batch[i:i + 3] for i in range(0, 12, 3))):
            # without replacement where the class has 3 images; class 7 has 2, drawn with replacement
            assert group[0] == 7 or len(set(members)) == 3


def test_the_draw_depends_on_seed_and_epoch_alone():
    def draw(seed, epoch):
        sampler = loaders.ClassGroupSampler(LABELS, 3, 12, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)
    assert draw(1, 2) == draw(1, 2)
    assert draw(1, 2) != draw(1, 3) and draw(1, 2) != draw(2, 2)
    seeds = [seed for _, seed in draw(1, 2)]
    assert len(set(seeds)) == len(seeds)  # every sample its own augmentation seed


@pytest.mark.parametrize('world', [1, 2, 4])
def test_processes_take_whole_groups_and_a_resume_skips_whole_batches(world):
    """Each of world processes takes its contiguous part of every batch (whole groups of a class); the parts make the
    batch of one process; skipping k steps of the whole batch leaves each process the rest of its parts."""
    whole = batches(loaders.ClassGroupSampler(LABELS, 2, 8, seed=3), 8)
    parts = [batches(loaders.ClassGroupSampler(LABELS, 2, 8, seed=3, rank=rank, num_replicas=world), 8 // world)
             for rank in range(world)]
    assert [sum((part[b] for part in parts), []) for b in range(len(whole))] == whole
    for rank in range(world):
        sampler = loaders.ClassGroupSampler(LABELS, 2, 8, seed=3, rank=rank, num_replicas=world)
        full = list(sampler)
        sampler.set_epoch(0, skip=2 * 8)
        assert list(sampler) == full[2 * 8 // world:] and len(sampler) == len(full) - 2 * 8 // world


@pytest.mark.parametrize('flags, fragment', [
    (['--m_per_class', '3'], '--m_per_class 3: --batch_size 4 cannot be groups of 3 images of a class; make '
                             '--batch_size a multiple of 3'),
    (['--m_per_class', '1'], 'a batch of 4 images would need 4 classes, and the run trains on 2'),
    (['--m_per_class', '2', '--batch_size', '8'], 'a batch of 8 images would need 4 classes')])
def test_batches_that_cannot_be_formed_are_one_line_before_anything_is_written(tiny, flags, fragment):
    assert_one_line_error(run_train(tiny, '--val_classes', '2', '--recalls', '1', *flags), 2, fragment)
    assert not (tiny / 'results').exists()  # not even the run's lock


def test_every_process_s_share_of_a_batch_must_be_whole_groups():
    """Under torchrun each process's share of a batch is groups of its own: 4 images over 2 processes cannot be
    groups of 4."""
    args = SimpleNamespace(m_per_class=4, batch_size=4)
    with pytest.raises(utils.UsageError, match="each of the 2 processes' 2 images cannot be groups of 4 images of a "
                                               "class; make --batch_size a multiple of 8"):
        loaders.check_class_groups(args, num_classes=4, world=2)
    loaders.check_class_groups(args, num_classes=4, world=1)


@pytest.mark.slow
def test_a_run_in_class_groups_stopped_at_a_step_resumes_to_the_byte(tiny, monkeypatch, tmp_path):
    """A run with --m_per_class 2 stopped by a SIGUSR1 during step 2 of epoch 2, then --resume: the results CSV of
    the run never stopped, to the byte."""
    with one_thread():
        reference = run_train(tiny, '--m_per_class', '2', results=tmp_path / 'reference')
        assert reference.returncode == 0, reference.stderr
        step = signal_during_call(monkeypatch, engine, 'train_step', 6, signal.SIGUSR1)  # epoch 1 has 4 steps
        stopped = run_train(tiny, '--m_per_class', '2', '--checkpoint_every', '0')
        assert stopped.returncode == utils.STOPPED_EXIT_CODE, stopped.stderr
        monkeypatch.setattr(engine, 'train_step', step)
        resumed = run_train(tiny, '--m_per_class', '2', '--resume')
    assert resumed.returncode == 0, resumed.stderr
    assert 'at step 2 of epoch 2' in resumed.stdout
    name = f'{prefix()}_results.csv'
    assert (tiny / 'results' / name).read_bytes() == (tmp_path / 'reference' / name).read_bytes()


def test_resume_refuses_another_m_per_class():
    """--m_per_class changes what a run computes: a --resume with another value is refused, naming it; a checkpoint
    from before the flag resumes as --m_per_class 0."""
    args = train.get_args_parser().parse_args(['--m_per_class', '2'])
    saved = dict(vars(args), resume=True)
    assert resume.differing_flags(saved, args) == []
    assert resume.differing_flags(dict(saved, m_per_class=4), args) == ['--m_per_class 4 -> 2']
    before_the_flag = {name: value for name, value in vars(args).items() if name != 'm_per_class'}
    assert resume.differing_flags(before_the_flag, args) == ['--m_per_class 0 -> 2']


def test_m_per_class_0_keeps_the_uniform_draw(prepared):
    """--m_per_class 0, the default, trains on the original's uniform draw: the training loader's sampler gives the
    (sample, augmentation seed) order of SeededSampler, as before the flag existed."""
    args = train.get_args_parser().parse_args(['--data_path', str(prepared / 'data'), '--data_name', 'tiny', *TINY])
    assert args.m_per_class == 0
    data_dicts = utils.load_data_dicts(args.data_path, args.data_name, args.crop_type)
    train_dict = data_dicts['train']
    items = [(path, index) for index, key in enumerate(sorted(train_dict)) for path in train_dict[key]]
    process = engine.Process(0, 1, torch.device('cpu'), [])
    loader = loaders.train_loader(args, data_dicts, items, loaders.loader_options(0, args.seed, process.device),
                                  process)
    for epoch in (1, 2):
        loader.sampler.set_epoch(epoch)
        reference = loaders.SeededSampler(len(items), args.seed)
        reference.set_epoch(epoch)
        assert list(loader.sampler) == list(reference)
