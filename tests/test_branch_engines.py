"""The grouped branch engine computes what Model.forward's loop computes, and runs only where it does."""
import copy
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import branch_engines
import model as model_module
from branch_engines import ENGINES, grouped_branches, time_engines
from conftest import DEVICES, assert_one_line_error, data_parallel_replica, run_train
from model import BACKBONES, SHARE_TYPES, CosineClassifier, Model


def run_engine(net, impl, x, seed):
    """Logits, parameter gradients and buffers after one training step of the given engine."""
    net.branch_engine = ENGINES[impl]
    net.zero_grad()
    torch.manual_seed(seed)  # the same --with_random weights for both engines
    logits = net(x)
    (logits.square().mean() + logits[:, :, 0].sum()).backward()
    grads = {name: p.grad.clone() for name, p in net.named_parameters()}
    buffers = {name: b.clone() for name, b in net.named_buffers()}
    return logits.detach(), grads, buffers


def assert_engines_agree(net, x, atol, rtol):
    initial = copy.deepcopy(net.state_dict())
    loop = run_engine(net, 'loop', x, seed=3)
    net.load_state_dict(initial)  # the same running statistics before the grouped step
    grouped = run_engine(net, 'grouped', x, seed=3)
    assert torch.allclose(loop[0], grouped[0], atol=atol, rtol=rtol), (loop[0] - grouped[0]).abs().max()
    for name in loop[1]:
        assert torch.allclose(loop[1][name], grouped[1][name], atol=atol, rtol=rtol), name
    for name in loop[2]:
        assert torch.allclose(loop[2][name].double(), grouped[2][name].double(), atol=atol, rtol=rtol), name
    assert any('running_mean' in n for n in loop[2]) or not list(net.branches[0].features.children())


# sharing nothing or only the stem, every branch is a whole backbone in float64: seconds each, in the slow tier (the
# float32 test below runs every share type in the default one)
@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('share_type', [pytest.param(share, marks=pytest.mark.slow) if share in ('none', 'maxpool')
                                        else share for share in SHARE_TYPES])
def test_grouped_engine_equals_the_loop_for_every_share_type(share_type, device):
    torch.manual_seed(0)
    net = Model(5, 2, share_type=share_type, with_random=True, pretrained=False).train().to(device)
    # in float64 the two engines agree to rounding: the same function, gradients and running statistics
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64).to(device)
    assert_engines_agree(net.double(), x, atol=1e-10, rtol=1e-9)


# the larger backbones take seconds each: resnet18 in the default run, the others in the slow tier
@pytest.mark.parametrize('model_type', [model_type if model_type == 'resnet18' else
                                        pytest.param(model_type, marks=pytest.mark.slow) for model_type in BACKBONES])
def test_grouped_engine_equals_the_loop_for_every_backbone(model_type):
    torch.manual_seed(0)
    net = Model(4, 2, share_type='layer2', model_type=model_type, pretrained=False).train().double()
    # batch 4 at 64 px: with 2 images of 1x1 features, batch norm would amplify rounding itself
    assert_engines_agree(net, torch.randn(4, 3, 64, 64, dtype=torch.float64), atol=1e-10, rtol=1e-9)


# cuDNN chooses among convolution algorithms that sum in other orders than the CPU's
FLOAT32_TOLERANCE = {'cpu': 1e-5, 'cuda': 1e-4}


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('share_type', SHARE_TYPES)
def test_grouped_engine_outputs_agree_in_float32(share_type, device):
    torch.manual_seed(0)
    net = Model(6, 4, share_type=share_type, with_random=True, pretrained=False).eval().to(device)
    x = torch.randn(3, 3, 32, 32).to(device)
    with torch.no_grad():
        loop = net(x)
        net.branch_engine = grouped_branches
        grouped = net(x)
    assert (loop - grouped).abs().max() < FLOAT32_TOLERANCE[device]


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('share_type', ['layer1', 'layer3'])
def test_grouped_engine_trains_like_the_loop_in_float32(share_type, device):
    """One float32 training step: outputs, and every gradient relative to that parameter's largest."""
    torch.manual_seed(0)
    net = Model(5, 3, share_type=share_type, with_random=True, pretrained=False).train().to(device)
    x = torch.randn(4, 3, 64, 64).to(device)
    initial = copy.deepcopy(net.state_dict())
    loop = run_engine(net, 'loop', x, seed=3)
    net.load_state_dict(initial)
    grouped = run_engine(net, 'grouped', x, seed=3)
    assert (loop[0] - grouped[0]).abs().max() < FLOAT32_TOLERANCE[device]
    for name, gradient in loop[1].items():
        assert (gradient - grouped[1][name]).abs().max() <= 1e-3 * gradient.abs().max() + 1e-6, name


def test_state_dict_does_not_depend_on_the_engine():
    torch.manual_seed(0)
    loop, grouped = Model(4, 3, pretrained=False), Model(4, 3, pretrained=False)
    grouped.branch_engine = grouped_branches
    assert list(loop.state_dict()) == list(grouped.state_dict())
    grouped.load_state_dict(loop.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loop.eval()(x), grouped.eval()(x), atol=1e-5)


def rng_states(device):
    return [torch.get_rng_state()] + ([torch.cuda.get_rng_state(device)] if device == 'cuda' else [])


@pytest.mark.parametrize('device', DEVICES)
def test_timing_the_engines_leaves_the_model_and_the_random_streams_untouched(device):
    torch.manual_seed(0)
    net = Model(4, 3, share_type='layer2', with_random=True, pretrained=False).eval().to(device)
    images = torch.randn(2, 3, 32, 32).to(device)
    before = copy.deepcopy(net.state_dict())
    rng = rng_states(device)
    seconds = time_engines(net, images, training=True, rounds=1)
    assert set(seconds) == {'loop', 'grouped'} and all(0 < s < float('inf') for s in seconds.values())
    assert all(torch.equal(a, b) for a, b in zip(rng_states(device), rng))
    after = net.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)  # running statistics included
    assert all(p.grad is None for p in net.parameters())
    assert net.branch_engine is None and not net.training


# ----------------------------------------------------------------------------- concurrent forward passes

ROUNDS = 12  # the engine that shared its tensors between calls failed most of them


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('impl', ['loop', 'grouped'])
# the race shows in evaluation; training, which updates batch-norm statistics too, is the slow tier's
@pytest.mark.parametrize('training', [pytest.param(False, id='eval'), pytest.param(True, id='train',
                                                                                   marks=pytest.mark.slow)])
def test_concurrent_forward_passes_compute_what_one_pass_computes(impl, training, device):
    """Two DataParallel-style replicas with different weights, and one model called from two threads: run
    concurrently, every pass must return what the same call returns alone."""
    torch.manual_seed(0)
    # with_random draws its weights from the global generator in training, so threads would draw in any order
    net = Model(5, 4, share_type='layer3', with_random=not training, pretrained=False).to(device)
    net.branch_engine = ENGINES[impl]
    replicas = [data_parallel_replica(net, 1.0).train(training), data_parallel_replica(net, 1.5).train(training)]
    net.eval()
    callers = replicas + [net, net]
    inputs = [torch.randn(2, 3, 32, 32).to(device) for _ in callers]
    with torch.no_grad():
        expected = [call(x) for call, x in zip(callers, inputs)]
        wrong = 0
        with ThreadPoolExecutor(len(callers)) as pool:
            for _ in range(ROUNDS):
                futures = [pool.submit(call, x) for call, x in zip(callers, inputs)]
                for future, reference in zip(futures, expected):
                    try:
                        wrong += not torch.allclose(future.result(), reference, atol=1e-5)
                    except RuntimeError:  # a pass that saw another pass's tensors
                        wrong += 1
    assert wrong == 0, f'{wrong} of {ROUNDS * len(callers)} concurrent passes differed from the single pass'


# ----------------------------------------------------------------------------- the choice: never another function

def test_grouped_engine_computes_any_classifier_its_branches_end_in():
    """The engine runs a branch's own classifier when it is not nn.Linear: a head changed in model.py (normalized
    softmax's, or a small MLP) is computed as the loop computes it."""
    torch.manual_seed(0)
    for classifier in (CosineClassifier, lambda i, o: nn.Sequential(nn.Linear(i, 8), nn.ReLU(), nn.Linear(8, o))):
        net = Model(5, 3, share_type='layer3', pretrained=False, classifier=classifier).train()
        assert branch_engines.engine_difference(net, torch.randn(4, 3, 32, 32)) is None


def max_pooled_branch(self, x):
    """A Branch.forward a researcher might try: max pooling instead of average pooling (which differ from 64 px up,
    where the last feature map is larger than 1 x 1)."""
    return self.fc(torch.flatten(F.adaptive_max_pool2d(self.features(x), 1), 1))


@pytest.fixture
def changed_branch(monkeypatch):
    monkeypatch.setattr(model_module.Branch, 'forward', max_pooled_branch)


@pytest.fixture
def grouped_timed_faster(monkeypatch):
    """auto as on a GPU where the grouped engine is the faster: timed on the CPU too, grouped winning."""
    monkeypatch.setattr(branch_engines, 'TIMED_DEVICES', ('cuda', 'cpu'))
    monkeypatch.setattr(branch_engines, 'time_engines', lambda *args, **kwargs: {'loop': 2.0, 'grouped': 1.0})


def test_auto_runs_the_grouped_engine_where_it_is_faster_and_equal(grouped_timed_faster):
    net = Model(5, 3, share_type='layer3', pretrained=False)
    line = branch_engines.choose(net, 'auto', torch.randn(4, 3, 32, 32))
    assert net.branch_engine is grouped_branches
    assert 'grouped' in line and 'checked against the loop' in line


def test_auto_falls_back_to_the_loop_on_a_changed_branch(changed_branch, grouped_timed_faster):
    net = Model(5, 3, share_type='layer3', pretrained=False)
    line = branch_engines.choose(net, 'auto', torch.randn(4, 3, 64, 64))
    assert net.branch_engine is None
    assert line.startswith('branch engine: loop') and 'does not compute this model\'s branches' in line
    assert 'logits differ' in line


def test_grouped_asked_for_on_a_changed_branch_is_refused(changed_branch):
    net = Model(5, 3, share_type='layer3', pretrained=False)
    with pytest.raises(branch_engines.EngineRefused, match='--branch_impl loop or auto'):
        branch_engines.choose(net, 'grouped', torch.randn(4, 3, 64, 64))
    assert net.branch_engine is None


def max_pooled_in_evaluation(self, x):
    """A Branch.forward that trains as REIR's and embeds otherwise: max pooling in evaluation only."""
    pool = F.adaptive_avg_pool2d if self.training else F.adaptive_max_pool2d
    return self.fc(torch.flatten(pool(self.features(x), 1), 1))


def with_dropout(net):
    """Every branch's stages followed by a Dropout, a module the grouped engine does not know."""
    for branch in net.branches:
        branch.features.append(nn.Dropout(0.1))
    return net


@pytest.fixture
def timed_after_the_check(monkeypatch):
    """auto's CUDA path on the CPU: timed (grouped faster) by a fake timer that records when it runs, after the real
    check or not at all."""
    events = []
    check = branch_engines.engine_difference

    def checked(*args, **kwargs):
        events.append('check')
        return check(*args, **kwargs)

    def timed(*args, **kwargs):
        events.append('timing')
        return {'loop': 2.0, 'grouped': 1.0}
    monkeypatch.setattr(branch_engines, 'TIMED_DEVICES', ('cuda', 'cpu'))
    monkeypatch.setattr(branch_engines, 'engine_difference', checked)
    monkeypatch.setattr(branch_engines, 'time_engines', timed)
    return events


def test_auto_checks_before_it_times_and_falls_back_on_either_change(monkeypatch, timed_after_the_check):
    """A branch that embeds otherwise in evaluation, and one with a module the grouped engine cannot run, each run the
    loop under auto, with one line saying why, and neither is timed; an unchanged model is checked, then timed."""
    net = Model(5, 3, share_type='layer3', pretrained=False)
    line = branch_engines.choose(net, 'auto', torch.randn(4, 3, 64, 64))
    assert net.branch_engine is grouped_branches and timed_after_the_check == ['check', 'timing']
    timed_after_the_check.clear()
    with monkeypatch.context() as patch:
        patch.setattr(model_module.Branch, 'forward', max_pooled_in_evaluation)
        net = Model(5, 3, share_type='layer3', pretrained=False)
        line = branch_engines.choose(net, 'auto', torch.randn(4, 3, 64, 64))
    assert net.branch_engine is None and timed_after_the_check == ['check']
    assert line.startswith('branch engine: loop (--branch_impl auto; the grouped engine does not compute this')
    assert 'its logits differ from the loop\'s by' in line and line.endswith('of their norm in evaluation)')
    timed_after_the_check.clear()
    net = with_dropout(Model(5, 3, share_type='layer3', pretrained=False))
    line = branch_engines.choose(net, 'auto', torch.randn(4, 3, 64, 64))
    assert net.branch_engine is None and timed_after_the_check == ['check']
    assert line.endswith('it fails on this model (TypeError: the grouped branch engine cannot run Dropout) in '
                         'training)')


def test_grouped_is_refused_on_either_change_in_one_line(monkeypatch, tiny):
    net = with_dropout(Model(5, 3, share_type='layer3', pretrained=False))
    with pytest.raises(branch_engines.EngineRefused, match='cannot run Dropout'):
        branch_engines.choose(net, 'grouped', torch.randn(4, 3, 64, 64))
    monkeypatch.setattr(model_module.Branch, 'forward', max_pooled_in_evaluation)
    result = run_train(tiny, '--branch_impl', 'grouped', '--image_size', '64')
    assert_one_line_error(result, 2, '--branch_impl grouped does not compute this model\'s branches: its logits '
                                     'differ', 'in evaluation; use --branch_impl loop or auto')
    assert not (tiny / 'results').exists()  # not even the run's lock


def test_the_engines_are_compared_where_batch_norm_does_not_amplify_rounding():
    """A run's batch can be 2 images of 1 x 1 last feature maps, where batch norm amplifies float rounding into
    gradients 2% apart; the engines are compared on a batch of their own."""
    torch.manual_seed(0)
    net = Model(4, 3, share_type='layer2', with_random=True, pretrained=False)
    assert 'gradients differ' in branch_engines.engine_difference(net, torch.randn(2, 3, 32, 32))
    branch_engines.choose(net, 'grouped', torch.randn(2, 3, 32, 32))
    assert net.branch_engine is grouped_branches


def test_checking_an_engine_leaves_the_model_untouched():
    torch.manual_seed(0)
    net = Model(4, 3, share_type='layer2', with_random=True, pretrained=False).eval()
    before, rng = copy.deepcopy(net.state_dict()), torch.get_rng_state()
    assert branch_engines.engine_difference(net, branch_engines.check_images(torch.empty(1, 3, 8, 8))) is None
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[name], tensor) for name, tensor in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters()) and not net.training and net.branch_engine is None


class OneBranchReLU(nn.ReLU):
    """A module written for one branch's 512 channels, refusing others with an error without a message: the grouped
    engine runs it on the channels of every branch at once."""

    def forward(self, x):
        if x.shape[1] != 512:
            raise ValueError()
        return super().forward(x)


def test_a_module_that_fails_without_a_message_falls_back_in_one_line():
    net = Model(5, 3, share_type='layer3', pretrained=False)
    for branch in net.branches:
        branch.features.append(OneBranchReLU())
    difference = branch_engines.engine_difference(net, torch.randn(4, 3, 64, 64))
    assert difference == 'it fails on this model (ValueError: no message) in training'
