"""A loss is one class and its entry in model.LOSSES, its settings its constructor's keyword arguments. One written
here, with parameters, state, a setting and the class labels, trains through train.py, stops at a step and resumes to
the byte; normalized softmax runs end to end; a run of another loss, or of other settings, never takes another's file
names and is rebuilt from its own; --loss NAME:KEY=VALUE,... is checked before anything is written; every loss of
pytorch-metric-learning trains REIR's embedding or is refused in one line."""
import inspect
import json
import os
import signal
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from torch import nn

import engine
import hubconf
import loss_choice
import model
import run_files
import study
import utils
from conftest import (TINY, assert_one_line_error, copy_of_run, file_digests, one_thread, prefix, run_main,
                      run_train, signal_during_call, written_files)
from loss_choice import LossChoice
from model import EnsembleCrossEntropy, embed


class ProxyCrossEntropy(EnsembleCrossEntropy):
    """The original's loss plus a proxy loss on REIR's embedding (after Movshovitz-Attias et al., "No Fuss Distance
    Metric Learning using Proxies", ICCV 2017): every training class has a learnable proxy, and each image's
    embedding is classified among the proxies by cosine / temperature. A buffer counts the steps it has taken."""

    def __init__(self, ensemble_size, meta_class_size, num_classes, temperature=0.1):
        super().__init__(ensemble_size, meta_class_size, num_classes)
        self.proxies = nn.Parameter(torch.randn(num_classes, ensemble_size * meta_class_size))
        self.temperature = temperature
        self.register_buffer('steps', torch.zeros((), dtype=torch.long))

    def forward(self, logits, meta_labels, labels):
        self.steps += 1
        cosines = F.normalize(embed(logits), dim=1) @ F.normalize(self.proxies, dim=1).t()   # (B, classes)
        return super().forward(logits, meta_labels, labels) + F.cross_entropy(cosines / self.temperature, labels)


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


@pytest.mark.slow
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


@pytest.mark.slow
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


# ----------------------------------------------------------------------------- a loss's settings in one --loss value

@pytest.mark.parametrize('text, canonical, prefix_end', [
    ('ce', 'ce', ''),
    ('normsoftmax', 'normsoftmax', '_normsoftmax'),
    ('normsoftmax:temperature=0.05', 'normsoftmax', '_normsoftmax'),          # a default names the same run
    (' normsoftmax : temperature = 1e-1 ', 'normsoftmax:temperature=0.1', '_normsoftmax-temperature=0.1'),
    ('pml.ProxyAnchorLoss:margin=0.1,alpha=32', 'pml.ProxyAnchorLoss', '_pml.ProxyAnchorLoss'),
    ('pml.ProxyAnchorLoss:margin=0.2,alpha=16.0', 'pml.ProxyAnchorLoss:alpha=16.0,margin=0.2',
     '_pml.ProxyAnchorLoss-alpha=16.0-margin=0.2'),
    ('pml.ContrastiveLoss:neg_margin=-0.5,pos_margin=1e-5', 'pml.ContrastiveLoss:neg_margin=-0.5,pos_margin=1e-05',
     '_pml.ContrastiveLoss-neg_margin=-0.5-pos_margin=1e-05'),
    ('pml.TripletMarginLoss:swap=true,triplets_per_anchor=5', 'pml.TripletMarginLoss:swap=true,triplets_per_anchor=5',
     '_pml.TripletMarginLoss-swap=true-triplets_per_anchor=5'),
    ('pml.PNPLoss:variant=Ds', 'pml.PNPLoss:variant=Ds', '_pml.PNPLoss-variant=Ds'),
    ('pml.RankedListLoss:margin=0.4,Tn=1', 'pml.RankedListLoss:Tn=1,margin=0.4',
     '_pml.RankedListLoss-Tn=1-margin=0.4')])
def test_a_loss_s_settings_travel_in_one_value_written_one_way(text, canonical, prefix_end):
    """--loss text is written one way (settings at their defaults left out, the others by key, each value as Python
    writes its kind); a run's prefix ends with it readably, and the prefix gives it back."""
    assert loss_choice.loss_flag(text) == canonical
    run = run_files.RunName('tiny', 'uncropped', 'fixed', False, 'layer4', 'resnet18', 2, 2, canonical)
    assert run.prefix == prefix() + prefix_end
    assert run_files.RunName.parse(run.prefix) == run
    assert run_files.RunName.parse(f'{run.prefix}_model.pth'.removesuffix('_model.pth')).loss == canonical


def test_a_loss_declares_its_settings_and_their_defaults_in_model_py():
    assert LossChoice.parse('normsoftmax').settings() == {'temperature': 0.05}
    assert LossChoice.parse('normsoftmax:temperature=0.1').settings() == {'temperature': 0.1}
    assert LossChoice.parse('ce').settings() == {}
    assert LossChoice.parse('proxy:temperature=0.2').settings() == {'temperature': 0.2}  # a loss written in a test
    assert LossChoice.parse('proxy:temperature=0.2').build(2, 3, 4).temperature == 0.2
    settings = LossChoice.parse('pml.ProxyAnchorLoss:alpha=16').settings()
    assert settings == {'margin': 0.1, 'alpha': 16}  # what the run fills in (classes, embedding size) is no setting
    assert LossChoice.parse('pml.MultiSimilarityLoss').settings() == {'alpha': 2, 'beta': 50, 'base': 0.5}


@pytest.mark.parametrize('text, fragment', [
    ('nosuch', "no loss 'nosuch' in model.LOSSES (ce, normsoftmax, proxy), nor pml.<ClassName>"),
    ('ce:margin=1', "ce has no setting 'margin' (it has none)"),
    ('normsoftmax:temprature=0.1', "normsoftmax has no setting 'temprature' (its settings: temperature=0.05)"),
    ('normsoftmax:temperature=hot', 'temperature=hot: temperature is a number'),
    ('normsoftmax:temperature=nan', 'temperature=nan: not a finite number'),
    ('normsoftmax:temperature=0.1,temperature=0.2', "normsoftmax's temperature is given twice"),
    ('normsoftmax:temperature', "'temperature' is not KEY=VALUE"),
    ('normsoftmax:temperature=1/2', "temperature='1/2': a setting is a number, true or false, or a word"),
    ('pml.TripletMarginLoss:swap=1', 'swap=1: swap is true or false'),
    ('pml.TripletMarginLoss:triplets_per_anchor=0.5', 'triplets_per_anchor is a word or an integer'),
    ('pml.ProxyAnchorLoss:num_classes=3', "has no setting 'num_classes'"),        # the run fills it in
    ('pml.ProxyAnchorLoss:distance=2', "has no setting 'distance'"),              # an object, not a setting
    ('pml.RankedListLoss', 'pml.RankedListLoss has no default for margin, Tn: give margin=VALUE'),
    ('pml.NoSuchLoss', "pytorch-metric-learning's NoSuchLoss is not one of its losses"),
    ('pml.CrossBatchMemory', "pytorch-metric-learning's CrossBatchMemory is a base or a wrapper of its losses"),
    ('pml.GenericPairLoss', "GenericPairLoss is a base or a wrapper of its losses")])
def test_a_loss_the_run_cannot_have_is_refused_before_anything_is_written(tiny, text, fragment):
    result = run_train(tiny, '--loss', text)
    assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr
    line = result.stderr.splitlines()[-1]
    assert line.startswith('__main__.py: error: argument --loss: ') and fragment in line
    assert not (tiny / 'results').exists()


def test_a_loss_registered_under_a_name_the_prefix_cannot_carry_is_refused(tiny, monkeypatch):
    monkeypatch.setitem(model.LOSSES, 'my_loss', ProxyCrossEntropy)
    result = run_train(tiny, '--loss', 'my_loss')
    assert result.returncode == 2 and "model.LOSSES registers 'my_loss', a name a run's file prefix cannot carry" \
        in result.stderr
    assert not (tiny / 'results').exists()


@pytest.fixture(scope='module')
def settings_run(prepared, tmp_path_factory):
    """A run of normsoftmax at another temperature than its default, one epoch: its results folder."""
    results = tmp_path_factory.mktemp('settings')
    result = run_train(prepared, '--loss', 'normsoftmax:temperature=0.1', '--num_epochs', '1', results=results)
    assert result.returncode == 0, result.stderr
    return results


def test_a_run_of_other_settings_has_files_of_its_own_and_is_rebuilt_from_them(prepared, settings_run):
    """Its prefix says its settings; args.json and the checkpoint record them; evaluate.py, inference.py and torch.hub
    rebuild its model, cosine classifiers at temperature 0.1, from its files."""
    name = f'{prefix()}_normsoftmax-temperature=0.1'
    kinds = (*run_files.RUN_OUTPUTS, run_files.RUN_LOG)
    assert sorted({path.split(os.sep)[0] for path in written_files(settings_run)}) == sorted(
        [f'{name}_{kind}' for kind in kinds] + ['tiny_uncropped_fixed_2_2_ids.pth'])
    settings = json.loads((settings_run / f'{name}_args.json').read_text())
    assert settings['loss'] == 'normsoftmax:temperature=0.1' and settings['loss_settings'] == {'temperature': 0.1}
    checkpoint = torch.load(settings_run / f'{name}_checkpoint.pth', weights_only=True)
    assert checkpoint['args']['loss'] == 'normsoftmax:temperature=0.1'
    net, _ = hubconf.reir(str(settings_run / name))
    assert {type(branch.fc).__name__ for branch in net.branches} == {'CosineClassifier'}
    assert {branch.fc.temperature for branch in net.branches} == {0.1}
    evaluation = run_main('evaluate', settings_run / f'{name}_model.pth', '--num_workers', '0')
    assert evaluation.returncode == 0, evaluation.stderr
    assert pd.read_csv(settings_run / f'{name}_eval.csv')['test_recall@1'].iloc[0] == \
        pd.read_csv(settings_run / f'{name}_results.csv')['test_recall@1'].iloc[0]
    query = prepared / 'data' / 'tiny' / 'test' / 'class_01' / '0.jpg'
    database = settings_run / f'{name}_data_base.pth'
    inference = run_main('inference', '--query_img_name', query, '--data_base', database, '--retrieval_num', '3')
    assert inference.returncode == 0, inference.stderr
    ablation = run_main('ablation', '--better_data_base', database, '--worse_data_base', database, '--retrieval_num',
                        '2', '--examples', '0', '--results_dir', settings_run / 'ablation')
    assert ablation.returncode == 0, ablation.stderr


def test_a_study_varies_a_loss_s_settings():
    flag, values = study.varied_flag('loss=normsoftmax,normsoftmax:temperature=0.1,pml.ProxyAnchorLoss:margin=0.2,'
                                     'alpha=16,pml.MultiSimilarityLoss')
    assert (flag, values) == ('loss', ['normsoftmax', 'normsoftmax:temperature=0.1',
                                       'pml.ProxyAnchorLoss:margin=0.2,alpha=16', 'pml.MultiSimilarityLoss'])
    args = study.get_args_parser().parse_args(['--name', 'l', '--vary', 'loss=normsoftmax,normsoftmax:temperature=0.1',
                                               '--seeds', '1'])
    _, runs = study.grid(args, ['--data_name', 'tiny'])
    assert [run.args.loss for run in runs] == ['normsoftmax', 'normsoftmax:temperature=0.1']
    assert runs[1].paths['model.pth'].endswith('_normsoftmax-temperature=0.1_model.pth')
    with pytest.raises(utils.UsageError, match='normsoftmax and normsoftmax:temperature=0.05 are the same value'):
        study.check_distinct('loss', ['normsoftmax', 'normsoftmax:temperature=0.05'],
                             vars(study.parse_train_flags([])))


# ----------------------------------------------------------------------------- pytorch-metric-learning's losses

def library_losses():
    return sorted(name for name, obj in vars(pml_losses).items() if inspect.isclass(obj) and issubclass(obj, nn.Module))


# the settings a loss of the library has no default for
REQUIRED_SETTINGS = {'RankedListLoss': ':margin=0.4,Tn=1'}


@pytest.mark.parametrize('name', library_losses())
def test_every_loss_of_pytorch_metric_learning_trains_the_embedding_or_is_refused(name):
    """pml.<ClassName> for each of the library's losses: built for the embedding (E * M) and the training classes, it
    gives batches of groups of a class a finite loss whose gradient reaches the logits, or --loss refuses it in one
    line (its bases, the wrappers of other losses), or its check before training does (a loss without labels)."""
    text = f'pml.{name}{REQUIRED_SETTINGS.get(name, "")}'
    try:
        choice = LossChoice.parse(text)
    except ValueError as e:
        assert 'is a base or a wrapper of its losses' in str(e)
        assert name in ('BaseLossWrapper', 'BaseMetricLossFunction', 'CrossBatchMemory', 'GenericPairLoss',
                        'MultipleLosses', 'SelfSupervisedLoss')
        return
    torch.manual_seed(0)
    criterion = choice.build(2, 3, 4)
    args = SimpleNamespace(ensemble_size=2, meta_class_size=3)
    problem = engine.loss_problem(criterion, [0, 0, 1, 1, 2, 2, 3, 3], args, torch.device('cpu'))
    if name in ('ManifoldLoss', 'VICRegLoss'):  # unsupervised: they take no labels
        assert problem == 'ValueError: labels are ref_labels are not supported for this loss function'
        return
    assert problem is None
    embedding_sized = [p for p in criterion.parameters() if 2 * 3 in p.shape]
    assert all(p.shape[0] in (4, 2 * 3) or p.shape[-1] in (4, 2 * 3) for p in embedding_sized)


def test_a_library_loss_keeps_all_its_state_in_its_state_dict():
    """DynamicSoftMarginLoss keeps a histogram as a plain tensor attribute; here it is a buffer, in the checkpoint."""
    criterion = LossChoice.parse('pml.DynamicSoftMarginLoss').build(2, 3, 4)
    assert 'loss.hist_' in criterion.state_dict()
    criterion(torch.randn(8, 2, 3), torch.zeros(8, 2, dtype=torch.long), torch.arange(8) // 2)
    assert criterion.state_dict()['loss.hist_'].sum() > 0


def test_a_loss_that_cannot_train_on_the_run_s_batches_is_one_line(tiny):
    """SmoothAPLoss needs as many images of every class in a batch: refused, pointing to --m_per_class; VICRegLoss
    takes no labels: refused; neither writes the run's files."""
    assert_one_line_error(run_train(tiny, '--loss', 'pml.SmoothAPLoss'), 2,
                          'pml.SmoothAPLoss cannot train on this run\'s batches (ValueError: All classes must have '
                          'the same number', 'pass --m_per_class')
    result = run_train(tiny, '--loss', 'pml.VICRegLoss')
    assert_one_line_error(result, 2, 'pml.VICRegLoss cannot train on this run\'s batches (ValueError')
    assert 'm_per_class' not in result.stderr
    assert not (tiny / 'results').exists()  # not even the run's lock


def test_a_loss_of_pairs_without_pairs_in_the_batch_is_warned_of():
    """A triplet loss on a batch of four classes has no triplet: no gradient, which the run warns of."""
    criterion = LossChoice.parse('pml.TripletMarginLoss').build(2, 3, 4)
    args = SimpleNamespace(ensemble_size=2, meta_class_size=3)
    assert engine.loss_problem(criterion, [0, 1, 2, 3], args, torch.device('cpu')) == \
        'no gradient on the first batch of 4 images of 4 classes'
    assert engine.loss_problem(criterion, [0, 0, 1, 1], args, torch.device('cpu')) is None


def test_a_run_warns_of_a_loss_without_gradient_on_its_first_batch(capsys):
    loader = SimpleNamespace(dataset=SimpleNamespace(targets=[0, 1, 2, 3]), sampler=[(i, 0) for i in range(4)],
                             batch_size=4)
    args = SimpleNamespace(loss='pml.TripletMarginLoss', ensemble_size=2, meta_class_size=3, m_per_class=0)
    criterion = engine.training_loss(args, 4, loader, torch.device('cpu'))
    assert isinstance(criterion, model.MetricLearningLoss)
    assert 'warning: --loss pml.TripletMarginLoss gives no gradient on the first batch of 4 images of 4 classes: ' \
           'losses that compare images of a class need several of one in a batch (--m_per_class)' \
        in capsys.readouterr().err


PML_FLAGS = ['--loss', 'pml.ProxyAnchorLoss:margin=0.2', '--m_per_class', '2', '--num_epochs', '1']


@pytest.fixture(scope='module')
def proxy_anchor_run(prepared, tmp_path_factory):
    """An uninterrupted run of pytorch-metric-learning's ProxyAnchorLoss in batches of pairs, single-threaded."""
    results = tmp_path_factory.mktemp('proxy_anchor')
    with one_thread():
        result = run_train(prepared, *PML_FLAGS, results=results)
    assert result.returncode == 0, result.stderr
    return results


def test_a_library_loss_with_proxies_trains_them_and_resumes_to_the_byte(tiny, proxy_anchor_run, monkeypatch):
    """Its proxies, one per training class in the embedding's size, train with the model (Adam moments) and are
    saved in the checkpoint; stopped by a SIGUSR1 at step 3, --resume writes the results, model and proxies of the
    run never stopped."""
    name = f'{prefix()}_pml.ProxyAnchorLoss-margin=0.2'
    reference = torch.load(proxy_anchor_run / f'{name}_checkpoint.pth', weights_only=True)
    assert reference['loss']['loss.proxies'].shape == (4, 2 * 2)
    moments = [tuple(state['exp_avg'].shape) for state in reference['optimizer']['state'].values()]
    assert moments[-1] == (4, 2 * 2)
    step = signal_during_call(monkeypatch, engine, 'train_step', 3, signal.SIGUSR1)
    with one_thread():
        stopped = run_train(tiny, *PML_FLAGS, '--checkpoint_every', '0')
        assert stopped.returncode == utils.STOPPED_EXIT_CODE, stopped.stderr
        monkeypatch.setattr(engine, 'train_step', step)
        resumed = run_train(tiny, *PML_FLAGS, '--resume')
    assert resumed.returncode == 0, resumed.stderr
    assert (tiny / 'results' / f'{name}_results.csv').read_bytes() == \
        (proxy_anchor_run / f'{name}_results.csv').read_bytes()
    for kind in ('model', 'loss'):
        state = torch.load(tiny / 'results' / f'{name}_checkpoint.pth', weights_only=True)[kind]
        assert all(torch.equal(state[key], reference[kind][key]) for key in reference[kind]), kind
