"""A loss is one class and its entry in model.LOSSES. One written here, with parameters, state and the class labels,
trains through train.py, stops at a step and resumes to the byte; normalized softmax runs end to end; a run of
another loss than the original's never takes its file names."""
import signal

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import engine
import model
import run_files
import utils
from conftest import (TINY, assert_one_line_error, copy_of_run, file_digests, one_thread, prefix, run_main,
                      run_train, signal_during_call)
from model import EnsembleCrossEntropy, embed


class ProxyCrossEntropy(EnsembleCrossEntropy):
    """The original's loss plus a proxy loss on REIR's embedding (after Movshovitz-Attias et al., "No Fuss Distance
    Metric Learning using Proxies", ICCV 2017): every training class has a learnable proxy, and each image's
    embedding is classified among the proxies by cosine / 0.1. A buffer counts the steps it has taken."""

    def __init__(self, ensemble_size, meta_class_size, num_classes):
        super().__init__(ensemble_size, meta_class_size, num_classes)
        self.proxies = nn.Parameter(torch.randn(num_classes, ensemble_size * meta_class_size))
        self.register_buffer('steps', torch.zeros((), dtype=torch.long))

    def forward(self, logits, meta_labels, labels):
        self.steps += 1
        cosines = F.normalize(embed(logits), dim=1) @ F.normalize(self.proxies, dim=1).t()   # (B, classes)
        return super().forward(logits, meta_labels, labels) + F.cross_entropy(cosines / 0.1, labels)


@pytest.fixture(autouse=True)
def proxy_loss(monkeypatch):
    monkeypatch.setitem(model.LOSSES, 'proxy', ProxyCrossEntropy)


@pytest.fixture(scope='module')
def proxy_run(prepared, tmp_path_factory):
    """An uninterrupted run of the proxy loss on the tiny dataset, single-threaded so that others can match it to the
    bit: its results folder."""
    results = tmp_path_factory.mktemp('proxy')
    with pytest.MonkeyPatch.context() as patch, one_thread():
        patch.setitem(model.LOSSES, 'proxy', ProxyCrossEntropy)
        result = run_train(prepared, '--loss', 'proxy', '--num_epochs', '1', results=results)
    assert result.returncode == 0, result.stderr
    return results


def test_a_loss_written_here_trains_its_parameters_and_keeps_its_state(proxy_run):
    checkpoint = torch.load(proxy_run / f'{prefix()}_proxy_checkpoint.pth', weights_only=True)
    assert set(checkpoint['loss']) == {'proxies', 'steps'}
    assert int(checkpoint['loss']['steps']) == 4  # an epoch of four steps
    # the optimizer trains the proxies with the model's parameters: every one has its Adam moments
    parameters = checkpoint['optimizer']['param_groups'][0]['params']
    assert len(parameters) == len(list(model.Model(2, 2, 'layer4', pretrained=False).parameters())) + 1
    moments = [tuple(state['exp_avg'].shape) for state in checkpoint['optimizer']['state'].values()]
    assert len(moments) == len(parameters) and moments[-1] == tuple(checkpoint['loss']['proxies'].shape)
    assert len(pd.read_csv(proxy_run / f'{prefix()}_proxy_results.csv')) == 1


def test_a_loss_written_here_stops_and_resumes_to_the_byte(tiny, proxy_run, monkeypatch):
    """A SIGUSR1 during step 3 of epoch 1 stops the run with a checkpoint (the loss's state after 3 steps); --resume
    writes the results, model and loss state of the run never stopped."""
    step = signal_during_call(monkeypatch, engine, 'train_step', 3, signal.SIGUSR1)
    with one_thread():
        stopped = run_train(tiny, '--loss', 'proxy', '--num_epochs', '1', '--checkpoint_every', '0')
        assert stopped.returncode == utils.STOPPED_EXIT_CODE, stopped.stderr
        checkpoint = torch.load(tiny / 'results' / f'{prefix()}_proxy_checkpoint.pth', weights_only=True)
        assert (checkpoint['epoch'], checkpoint['step'], int(checkpoint['loss']['steps'])) == (1, 3, 3)
        monkeypatch.setattr(engine, 'train_step', step)
        resumed = run_train(tiny, '--loss', 'proxy', '--num_epochs', '1', '--resume')
    assert resumed.returncode == 0, resumed.stderr
    name = f'{prefix()}_proxy'
    assert (tiny / 'results' / f'{name}_results.csv').read_bytes() == (proxy_run / f'{name}_results.csv').read_bytes()
    for kind in ('model', 'loss'):
        state, reference = (torch.load(folder / f'{name}_checkpoint.pth', weights_only=True)[kind]
                            for folder in (tiny / 'results', proxy_run))
        assert all(torch.equal(state[key], reference[key]) for key in reference), kind


def test_another_loss_never_takes_the_original_s_file_names(trained, tmp_path):
    """A normsoftmax run beside a ce run of the same flags writes files of its own (_normsoftmax), ends its branches
    in cosine classifiers, and evaluate.py rebuilds that model from the file name; a --resume of the other loss finds
    no checkpoint of its own."""
    results = copy_of_run(trained, tmp_path)
    ce_files = file_digests(results)
    result = run_train(trained, '--loss', 'normsoftmax', '--num_epochs', '1', results=results)
    assert result.returncode == 0, result.stderr
    # the meta-class ids are the ce run's (the same seed draws them): saved again, the same tensor
    ids = 'tiny_uncropped_fixed_2_2_ids.pth'
    assert {name: digest for name, digest in file_digests(results).items() if name in ce_files and name != ids} == \
        {name: digest for name, digest in ce_files.items() if name != ids}
    assert torch.equal(torch.load(results / ids, weights_only=True), torch.load(trained / 'results' / ids,
                                                                                 weights_only=True))
    run = run_files.RunName.parse(f'{prefix()}_normsoftmax')
    assert run.loss == 'normsoftmax' and run.prefix == f'{prefix()}_normsoftmax'
    assert run_files.RunName.parse(prefix()).loss == 'ce'
    state = torch.load(results / f'{run.prefix}_model.pth', weights_only=True)
    assert 'branches.0.fc.weight' in state and 'branches.0.fc.bias' not in state
    evaluation = run_main('evaluate', results / f'{run.prefix}_model.pth', '--num_workers', '0')
    assert evaluation.returncode == 0, evaluation.stderr
    trained_r1 = pd.read_csv(results / f'{run.prefix}_results.csv')['test_recall@1'].iloc[0]
    assert pd.read_csv(results / f'{run.prefix}_eval.csv')['test_recall@1'].iloc[0] == pytest.approx(trained_r1,
                                                                                                     abs=100 / 12)
    other = run_main('train', '--data_path', trained / 'data', '--data_name', 'tiny', '--results_dir', results, *TINY,
                     '--loss', 'proxy', '--resume')
    assert other.returncode == 1 and f'no checkpoint {results / prefix()}_proxy_checkpoint.pth' in other.stderr
    unknown = results / f'{prefix()}_nosuch_model.pth'  # a loss registered in another session
    unknown.write_bytes((results / f'{run.prefix}_model.pth').read_bytes())
    assert_one_line_error(run_main('evaluate', unknown, '--image_size', '32', '--no-exact_pipeline', '--data_path',
                                   trained / 'data'), 2, "no loss 'nosuch' in model.LOSSES")


def test_the_loss_s_own_gradients_are_averaged_over_the_processes(monkeypatch):
    """Under torch.distributed each process's loss sees its own images: the gradients of the loss's parameters are
    averaged over the processes, as DistributedDataParallel averages the model's."""
    torch.manual_seed(0)
    net = model.Model(3, 2, share_type='layer4', pretrained=False)
    criterion = ProxyCrossEntropy(2, 3, 4)
    optimizer = torch.optim.SGD([*net.parameters(), *criterion.parameters()], lr=0.1)
    batch = (torch.randn(2, 3, 32, 32), torch.tensor([0, 3]), torch.randint(3, (2, 2)))
    scaler = engine.grad_scaler(torch.device('cpu'), False)
    engine.forward_backward(net, criterion, batch, optimizer, scaler, False)
    alone = criterion.proxies.grad.clone()
    other = torch.ones_like(alone)  # what the other process's images give

    def all_reduce(tensor):
        tensor += other
    monkeypatch.setattr(torch.distributed, 'is_initialized', lambda: True)
    monkeypatch.setattr(torch.distributed, 'get_world_size', lambda: 2)
    monkeypatch.setattr(torch.distributed, 'all_reduce', all_reduce)
    engine.forward_backward(net, criterion, batch, optimizer, scaler, False)
    assert torch.allclose(criterion.proxies.grad, (alone + other) / 2)
