"""What a run spends beyond compute, and that cutting it changes nothing computed: embeddings in batches of their own
on the unwrapped model, the training images embedded once for the database from the selected model, checkpoints
written in the background from host copies, no host sync in the training step, stops agreed without a collective at
every step, fused Adam and torch.compile."""
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import torch.distributed as dist
from torch import nn

import ablation
import data_base
import engine
import loaders
import resume
import run_files
import train
import utils
from conftest import NO_LOG, REPO, assert_one_line_error, copy_of_run, loss_becomes, prefix, run_train
from model import EnsembleCrossEntropy, Model


def tiny_model(share_type='layer4'):
    torch.manual_seed(0)
    return Model(2, 2, share_type, 'resnet18', False, pretrained=False).eval()


def image_loader(root, split, batch_size):
    """The evaluation loader of a tiny dataset's split, as train.py builds it."""
    data_dicts = utils.load_data_dicts(str(root / 'data'), 'tiny', 'uncropped')
    transform, min_side = utils.input_pipeline('uncropped', False, 32, data_dicts['mean'], data_dicts['std'], False)
    items = utils.flatten_split(data_dicts[split])
    reader = utils.EvalReader(str(root / 'data' / 'tiny'), items, [0] * len(items), transform, min_side)
    return loaders.eval_loader(reader, batch_size, loaders.loader_options(0, 0, torch.device('cpu')))


def read_database(results, name='tiny'):
    return torch.load(results / f'{prefix(name)}_data_base.pth', weights_only=True)


# ----------------------------------------------------------------------------- embedding

def test_embeddings_do_not_depend_on_the_batch_and_skip_the_wrapper(prepared):
    """The same embeddings, but for float rounding, in batches of 1 and of 5, computed by the unwrapped model: a
    DataParallel wrapper would copy the weights to its other GPUs for every batch."""
    model = tiny_model()
    wrapped = nn.DataParallel(model)
    wrapped.forward = lambda *args: pytest.fail('the wrapper ran')
    one, readable = engine.extract_features(wrapped, image_loader(prepared, 'test', 1), torch.device('cpu'), False)
    five, _ = engine.extract_features(wrapped, image_loader(prepared, 'test', 5), torch.device('cpu'), False)
    assert readable.all() and one.shape == (12, 4) and one.device.type == 'cpu'
    torch.testing.assert_close(one, five, rtol=0, atol=1e-5)  # float rounding only


def test_eval_batch_size_is_a_flag_free_on_resume(tiny):
    args = train.get_args_parser().parse_args([])
    assert args.eval_batch_size == engine.EVAL_BATCH_SIZE and args.batch_size == 10
    assert {'eval_batch_size', 'compile'} <= set(resume.RESUME_FREE_FLAGS)
    result = run_train(tiny, '--eval_batch_size', '0')
    assert result.returncode == 2 and '--eval_batch_size' in result.stderr


# ----------------------------------------------------------------------------- the database, once

def embedded_splits(monkeypatch):
    """Record the split (the first path's folder) of every loader engine.extract_features embeds."""
    extract = engine.extract_features
    splits = []

    def recording(model, loader, *args):
        splits.append(loader.dataset.paths[0].split(os.sep)[-3])
        return extract(model, loader, *args)
    monkeypatch.setattr(engine, 'extract_features', recording)
    return splits


@pytest.mark.slow
def test_the_training_images_are_embedded_once_by_the_selected_model(tiny, monkeypatch):
    """Each epoch embeds its test split; the training images are embedded after the last epoch, once. A stop signal
    then leaves the database of the best epoch's evaluated splits beside its model, and --resume of the finished run
    embeds the training images alone, by the selected model."""
    splits = embedded_splits(monkeypatch)
    extract = engine.extract_features

    def signalled(model, loader, *args):
        if loader.dataset.paths[0].split(os.sep)[-3] == 'train':
            os.kill(os.getpid(), signal.SIGTERM)
        return extract(model, loader, *args)
    monkeypatch.setattr(engine, 'extract_features', signalled)
    result = run_train(tiny)
    results = tiny / 'results'
    checkpoint = results / f'{prefix()}_checkpoint.pth'
    assert result.returncode == utils.STOPPED_EXIT_CODE, result.stderr
    assert result.stderr.splitlines()[-1] == (f'stopped by SIGTERM while the embedding database was written, after '
                                              f'the last epoch: {checkpoint} holds the run; continue it with the '
                                              f'same command and --resume')
    assert splits == ['test', 'test', 'train']  # two epochs' evaluations, then the database
    selected = run_files.selected_row(pd.read_csv(results / f'{prefix()}_results.csv').to_dict('records'))['epoch']
    database = read_database(results)
    assert database['epoch'] == selected and 'test_features' in database and 'train_features' not in database
    path = str(results / f'{prefix()}_data_base.pth')
    with pytest.raises(utils.ReirError, match='adds its training images after its last epoch: finish it with'):
        ablation.retrieval_task(data_base.load_database(path), path, 'train')

    monkeypatch.setattr(engine, 'extract_features', extract)
    splits = embedded_splits(monkeypatch)
    resumed = run_train(tiny, '--resume')
    assert resumed.returncode == 0, resumed.stderr
    assert f'embedding the database of the selected epoch {selected} with the training images' in resumed.stdout
    assert splits == ['train']
    model = engine.load_model(str(results / f'{prefix()}_model.pth'), run_files.RunName.parse(prefix()))
    expected, _ = extract(model, image_loader(tiny, 'train', 4), torch.device('cpu'), False)
    torch.testing.assert_close(read_database(results)['train_features'].float(), expected, rtol=0, atol=2e-3)


@pytest.mark.parametrize('damage', ['no training images', 'deleted', 'another epoch'])
def test_resume_completes_the_database(trained, tmp_path, damage):
    """A run stopped before its database was whole (or whose database was deleted, or is another epoch's): --resume
    of the finished run embeds what is missing from the selected model, to the database an uninterrupted run
    wrote."""
    results = copy_of_run(trained, tmp_path)
    path = results / f'{prefix()}_data_base.pth'
    whole = torch.load(path, weights_only=True)
    if damage == 'deleted':
        path.unlink()
    else:
        changed = {key: value for key, value in whole.items() if not key.startswith('train_')} \
            if damage == 'no training images' else {**whole, 'epoch': whole['epoch'] % 2 + 1}
        torch.save(changed, path)
    result = run_train(trained, '--resume', results=results)
    assert result.returncode == 0, result.stderr
    assert ('with the training images' in result.stdout) == (damage == 'no training images')
    database = torch.load(path, weights_only=True)
    assert set(database) == set(whole) and database['epoch'] == whole['epoch']
    for key in ('test_features', 'train_features'):
        torch.testing.assert_close(database[key].float(), whole[key].float(), rtol=0, atol=2e-3)
    assert database['train_images'] == whole['train_images']


def test_what_the_database_lacks(tmp_path):
    model, path = tmp_path / 'model.pth', tmp_path / 'data_base.pth'
    items = {'test': [('a.jpg', 'x'), ('b.jpg', 'y')]}
    assert data_base.database_to_complete(str(path), 2, items, str(model)) == 'lost'
    model.write_bytes(b'')
    assert data_base.database_to_complete(str(path), 2, items, str(model)) == 'all'
    weights = {'weight': torch.ones(3)}
    torch.save(weights, model)
    features = torch.zeros(2, 4)

    def write(splits, epoch, embedded_by=weights):
        run_files.atomic_write(str(path), data_base.database_file(splits, str(tmp_path), {}, epoch, embedded_by))
    write({'test': (items['test'], features)}, 1)
    assert data_base.database_to_complete(str(path), 2, items, str(model)) == 'all'
    write({'test': (items['test'][:1], features[:1])}, 2)
    assert data_base.database_to_complete(str(path), 2, items, str(model)) == 'all'
    write({'test': (items['test'], features)}, 2)
    assert data_base.database_to_complete(str(path), 2, items, str(model)) == 'train'
    write({'test': (items['test'], features), 'train': (items['test'], features)}, 2)
    assert data_base.database_to_complete(str(path), 2, items, str(model)) is None
    write({'test': (items['test'], features)}, 2, embedded_by={'weight': torch.zeros(3)})  # another model's
    assert data_base.database_to_complete(str(path), 2, items, str(model)) == 'all'


# ----------------------------------------------------------------------------- checkpoints in the background

@pytest.mark.slow  # a process of its own, which imports torch
def test_a_kill_during_a_background_write_leaves_the_previous_file(tmp_path):
    path = tmp_path / 'checkpoint.pth'
    script = textwrap.dedent(f'''
        import sys, time
        sys.path.insert(0, {REPO!r})
        import run_files
        run_files.atomic_torch_save({{'epoch': 1}}, {str(path)!r})

        def slow(tmp):
            with open(tmp, 'wb') as f:
                f.write(b'half a checkpoint')
            print('writing', flush=True)
            time.sleep(60)
        run_files.BackgroundWrites().submit({{{str(path)!r}: slow}})
        time.sleep(60)
    ''')
    process = subprocess.Popen([sys.executable, '-c', script], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == 'writing\n'
        process.kill()
    finally:
        process.wait()
    assert torch.load(path, weights_only=True) == {'epoch': 1}


def test_the_epoch_files_are_written_from_copies(tmp_path):
    """Training changes the weights and adds result rows while the epoch's files are written in the background: the
    files hold them as they were when the epoch was saved."""
    model = nn.Linear(2, 2)
    optimizer = torch.optim.Adam(model.parameters())
    trainable = dict(model=model, loss=nn.Module(), optimizer=optimizer,
                     scheduler=torch.optim.lr_scheduler.MultiStepLR(optimizer, [1]),
                     scaler=torch.amp.GradScaler('cpu', enabled=False))
    row = {'train_loss': 1.0, 'train_accuracy': 50.0, 'test_recall@1': 50.0, 'test_map@r': 5.0,
           'test_r_precision': 5.0}
    state = run_files.RunState(args={'num_epochs': 1}, ids=torch.zeros(2, 3).long(), train_items=[('a.jpg', 0)],
                               best_recall=50.0, results=[{'epoch': 1, **row}])
    paths = run_files.RunName.parse(prefix()).paths(str(tmp_path))
    weight = model.weight.detach().clone()
    process = engine.Process(0, 1, torch.device('cpu'), [])
    signals = SimpleNamespace(received=None, deferred=contextlib.nullcontext)
    with resume.Checkpointer(0, paths, trainable, None, signals, process, NO_LOG) as checkpointer:
        checkpointer.end_epoch(state, best_features=None)
        with torch.no_grad():
            model.weight.add_(1)
        state.results.append({'epoch': 2, **row})
    checkpoint = torch.load(paths['checkpoint.pth'], weights_only=True)
    assert torch.equal(checkpoint['model']['weight'], weight) and len(checkpoint['results']) == 1
    assert len(pd.read_csv(paths['results.csv'])) == 1


def test_a_failed_background_write_is_raised_by_the_next(tmp_path):
    def full_disk(tmp):
        raise OSError(28, 'No space left on device')
    writes = run_files.BackgroundWrites()
    writes.submit({str(tmp_path / 'a'): full_disk})
    with pytest.raises(utils.ReirError, match=r'could not write .*\(No space left on device\)'):
        writes.submit({str(tmp_path / 'b'): lambda tmp: None})
    writes.wait()  # reported once
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- the step

READS = ('item', 'tolist', '__float__', '__int__', '__bool__', '__index__')


def count_host_reads(monkeypatch):
    """{function name: calls} of the tensor-to-Python conversions (each a host sync on a GPU) made by the functions
    of train.py and engine.py."""
    reads = {}
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counting(tensor, *args, original=original):
            caller = sys._getframe(1).f_code
            if os.path.basename(caller.co_filename) in ('train.py', 'engine.py'):
                reads[caller.co_name] = reads.get(caller.co_name, 0) + 1
            return original(tensor, *args)
        monkeypatch.setattr(torch.Tensor, name, counting)
    return reads


@pytest.mark.slow
def test_the_training_step_reads_nothing_from_the_device(tiny, monkeypatch):
    """With the progress bar's reads out of the way, the training loop and its step read nothing from the device,
    and an epoch reads its sums at its end, however many steps it has: 4 images a step (4 steps an epoch) or 2 (8
    steps)."""
    monkeypatch.setattr(train, 'SYNC_SECONDS', float('inf'))
    reads = count_host_reads(monkeypatch)
    counts = []
    for batch in ('4', '2'):
        reads.clear()
        result = run_train(tiny, '--batch_size', batch, '--num_epochs', '1', results=tiny / batch)
        assert result.returncode == 0, result.stderr
        counts.append({name: calls for name, calls in reads.items()
                       if name in ('train_one_epoch', 'train_step', 'add', 'read', 'means', 'epoch_stats')})
    assert counts[0] == counts[1] == {'read': 2}  # at the end: the sums in one read, then the skipped images


def test_a_non_finite_loss_read_later_names_its_step(tiny, monkeypatch):
    loss_becomes(monkeypatch, float('inf'))
    monkeypatch.setattr(train, 'SYNC_SECONDS', float('inf'))
    result = run_train(tiny, '--num_epochs', '1')
    assert result.returncode == 1 and 'epoch 1: the loss is inf at step 2 of 4' in result.stderr
    assert not (tiny / 'results' / f'{prefix()}_checkpoint.pth').exists()


def test_processes_agree_on_a_stop_every_few_steps(monkeypatch):
    """Under torch.distributed the collective that agrees on a stop (or a checkpoint by time) runs every
    STOP_AGREEMENT_EVERY steps and evaluation batches, not at every one."""
    agreed, at = [], []
    monkeypatch.setattr(dist, 'is_initialized', lambda: True)
    monkeypatch.setattr(engine, 'any_process', lambda flags, device: agreed.append(at[-1]) or [False] * len(flags))
    checkpoints = resume.Checkpointer(None, {}, {}, None, SimpleNamespace(received=None),
                                      engine.Process(0, 2, torch.device('cpu'), []), NO_LOG)
    checkpoints.saved()
    every = resume.STOP_AGREEMENT_EVERY
    assert every > 1
    for step in range(1, 31):
        at.append(step)
        checkpoints.after_step(step, SimpleNamespace(steps=40, read=None))
    assert agreed == list(range(every, 31, every))
    agreed.clear()
    for index in range(31):
        at.append(index)
        assert not checkpoints.stop_requested(index)
    assert agreed == list(range(0, 31, every))


# ----------------------------------------------------------------------------- kernels

def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 30 * 30, 4))


def adam_steps(model, optimizer, steps=5):
    """Adam steps on gradients drawn from a fixed seed: the same for every optimizer."""
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for parameter in model.parameters():
            parameter.grad = torch.randn(parameter.shape, generator=generator)
        optimizer.step()
    return torch.cat([parameter.detach().flatten() for parameter in model.parameters()])


def test_fused_adam_matches_the_reference_update():
    """engine.adam fuses Adam on CUDA. torch has the fused kernel on the CPU too, where it takes the steps of the
    foreach and the single-tensor implementations, the same formula, within float tolerance."""
    weights = {}
    for name, flags in (('fused', dict(fused=True)), ('foreach', dict(foreach=True)), ('single', dict(foreach=False))):
        model = small_model()
        weights[name] = adam_steps(model, torch.optim.Adam(model.parameters(), lr=1e-2, **flags))
    assert not torch.equal(weights['single'], torch.cat([p.detach().flatten() for p in small_model().parameters()]))
    torch.testing.assert_close(weights['fused'], weights['foreach'], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights['foreach'], weights['single'], rtol=1e-5, atol=1e-6)


def test_adam_keeps_the_kernel_of_its_device_after_a_resume():
    """A checkpoint written on CUDA holds fused=True in its optimizer state: resumed on the CPU, the run takes the
    CPU's reference kernel again, as the run that started there."""
    model = small_model()
    fused = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    adam_steps(model, fused, steps=1)
    optimizer = engine.adam(model.parameters(), 1e-2, torch.device('cpu'))
    assert optimizer.param_groups[0]['fused'] is None
    optimizer.load_state_dict(fused.state_dict())
    assert optimizer.param_groups[0]['fused'] is True
    engine.use_adam_kernel(optimizer, torch.device('cpu'))
    assert optimizer.param_groups[0]['fused'] is None and optimizer.param_groups[0]['foreach'] is None


@pytest.mark.slow
def test_compile_gives_the_same_outputs_and_gradients():
    """--compile (torch.compile, in place so that the state_dict keeps its keys): the same embeddings and the same
    training step as the model it compiles, within float tolerance."""
    model = tiny_model()
    compiled = tiny_model()
    compiled.compile()
    assert list(compiled.state_dict()) == list(model.state_dict())
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        torch.testing.assert_close(compiled(images), model(images), rtol=1e-4, atol=1e-5)
    labels, codes = torch.tensor([0, 1, 2, 1]), torch.tensor([[0, 1], [1, 0], [1, 1]])
    losses = []
    for net in (model, compiled):
        net.train()
        trainable = dict(loss=EnsembleCrossEntropy(2, 2, 3), optimizer=torch.optim.Adam(net.parameters(), lr=0),
                         scaler=engine.grad_scaler(images.device, False))
        losses.append(engine.train_step(net, trainable, (images, labels), codes, False)[0])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    gradients = [torch.cat([p.grad.flatten() for p in net.parameters()]) for net in (model, compiled)]
    assert (gradients[1] - gradients[0]).norm() <= 1e-4 * gradients[0].norm()


@pytest.mark.slow
def test_a_compiled_run_writes_the_files_of_a_plain_one(tiny):
    """--compile meets a run's files: its model and checkpoint keep the plain state_dict keys, and the run resumes
    without --compile (a flag free on resume)."""
    result = run_train(tiny, '--compile', '--num_epochs', '1')
    assert result.returncode == 0, result.stderr
    keys = set(tiny_model().state_dict())
    results = tiny / 'results'
    assert set(torch.load(results / f'{prefix()}_model.pth', weights_only=True)) == keys
    assert set(torch.load(results / f'{prefix()}_checkpoint.pth', weights_only=True)['model']) == keys
    resumed = run_train(tiny, '--num_epochs', '1', '--resume')
    assert resumed.returncode == 0 and 'at the end of epoch 1' in resumed.stdout, resumed.stderr


def test_compile_without_a_compiler_is_one_line_before_anything_is_written(tiny, monkeypatch):
    """Offline machines often lack a C++ compiler: torch.compile would fail at the first step with a traceback."""
    monkeypatch.setattr(engine.shutil, 'which', lambda name: None)
    assert 'no C++ compiler' in engine.compiler_problem(torch.device('cpu'))
    result = run_train(tiny, '--compile')
    assert_one_line_error(result, 2, '--compile: no C++ compiler', 'leave out --compile')
    assert not (tiny / 'results').exists()  # not even the run's lock


def test_data_parallel_says_when_torchrun_is_faster():
    note = engine.data_parallel_note(tiny_model(), [0, 1])
    gib = sum(p.numel() * 4 for p in tiny_model().parameters()) / 2 ** 30
    assert note.startswith(f'DataParallel over GPUs 0,1: every step copies the {gib:.1f} GiB of weights')
    assert 'torchrun --nproc_per_node=2 train.py' in note


def test_a_host_copy_keeps_the_state_it_copies():
    """The scheduler's milestones are a Counter (a missing epoch counts 0): the copy a checkpoint is written from keeps
    every container's type, and no tensor it shares with the live state."""
    optimizer = torch.optim.Adam(nn.Linear(2, 2).parameters())
    state = {'scheduler': torch.optim.lr_scheduler.MultiStepLR(optimizer, [3, 5]).state_dict(),
             'items': [('a.jpg', 0)], 'ids': torch.zeros(2, 3)}
    copied = run_files.host_copy(state)
    assert type(copied['scheduler']['milestones']) is type(state['scheduler']['milestones'])
    assert copied['items'] == [('a.jpg', 0)] and copied['items'] is not state['items']
    state['ids'] += 1
    assert torch.equal(copied['ids'], torch.zeros(2, 3))
