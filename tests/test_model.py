import copy
import os
import urllib.error
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import model as model_module
from conftest import DEVICES, data_parallel_replica
from model import BACKBONES, SHARE_TYPES, Model, PretrainedWeightsUnavailable, embed, time_branch_impls


@pytest.mark.parametrize('share_type', SHARE_TYPES)
def test_forward_shape_for_every_share_type(share_type):
    net = Model(5, 3, share_type=share_type, pretrained=False).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, 3, 5)
    shared = [name for name, _ in net.shared.named_children()]
    expected = [] if share_type == 'none' else list(model_module.STAGES[:model_module.STAGES.index(share_type) + 1])
    assert shared == expected
    assert [n for n, _ in net.branches[0].features.named_children()] == list(model_module.STAGES[len(expected):])


@pytest.mark.parametrize('model_type', list(BACKBONES))
def test_forward_shape_for_every_backbone(model_type):
    net = Model(4, 2, share_type='layer3', model_type=model_type, pretrained=False).eval()
    with torch.no_grad():
        logits = net(torch.randn(1, 3, 32, 32))
    assert logits.shape == (1, 2, 4)
    assert net.branches[0].fc.in_features == (512 if model_type in ('resnet18', 'resnet34') else 2048)


def test_branches_start_from_the_same_backbone_weights():
    net = Model(4, 3, pretrained=False)
    first, second = net.branches[0].features.state_dict(), net.branches[2].features.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert first['layer2.0.conv1.weight'].data_ptr() != second['layer2.0.conv1.weight'].data_ptr()


def test_with_random_is_deterministic_in_evaluation_and_random_in_training():
    torch.manual_seed(0)
    net = Model(4, 3, share_type='layer1', with_random=True, pretrained=False)
    x = torch.randn(2, 3, 32, 32)
    net.eval()
    with torch.no_grad():
        a, b = net(x), net(x)
        shared = net.shared(x)
        expected = torch.stack([branch(shared / 3) for branch in net.branches], dim=1)
    assert torch.equal(a, b)
    assert torch.allclose(a, expected, atol=1e-6)
    net.train()
    with torch.no_grad():
        c, d = net(x), net(x)
    assert not torch.allclose(c, d)


def test_embedding_is_normalized_per_branch():
    logits = torch.randn(5, 3, 4)
    features = embed(logits)
    assert features.shape == (5, 12)
    assert torch.allclose(features.view(5, 3, 4).norm(dim=-1), torch.ones(5, 3))


def test_pretrained_weights_load_from_the_hub_cache(tmp_path, monkeypatch):
    """A user who is online gets the file in TORCH_HOME/hub/checkpoints; here we place it ourselves."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    reference = BACKBONES['resnet18'][0](weights=None).state_dict()
    weights = {k: torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v
               for k, v in reference.items()}
    file_name = BACKBONES['resnet18'][1].IMAGENET1K_V1.url.rsplit('/', 1)[-1]
    os.makedirs(tmp_path / 'hub' / 'checkpoints')
    torch.save(weights, tmp_path / 'hub' / 'checkpoints' / file_name)

    net = Model(4, 2, share_type='layer1', pretrained=True)
    assert torch.equal(net.shared.conv1.weight, weights['conv1.weight'])
    for branch in net.branches:
        assert torch.equal(branch.features.layer4[1].conv2.weight, weights['layer4.1.conv2.weight'])


def test_missing_pretrained_weights_offline_fail_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError('no network')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', offline)
    with pytest.raises(PretrainedWeightsUnavailable, match='--no_pretrained') as error:
        Model(4, 2, pretrained=True)
    assert 'resnet18-f37072fd.pth' in str(error.value) and str(tmp_path) in str(error.value)


@pytest.mark.parametrize('impl', ['loop', 'grouped'])
def test_model_lives_on_the_device_it_is_given(impl):
    """model.py chooses no device: built under a default device every tensor is there, and the forward pass
    (with --with_random's weights) runs on its input's device. 'meta' tensors have shapes and no memory."""
    with torch.device('meta'):
        net = Model(5, 3, with_random=True, pretrained=False, branch_impl=impl)
    assert {t.device.type for t in list(net.parameters()) + list(net.buffers())} == {'meta'}
    for training in (True, False):
        assert net.train(training)(torch.empty(2, 3, 32, 32, device='meta')).shape == (2, 3, 5)


# ----------------------------------------------------------------------------- the grouped branch engine

def run_engine(net, impl, x, seed):
    """Logits, parameter gradients and buffers after one training step of the given engine."""
    net.branch_impl = impl
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


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('share_type', SHARE_TYPES)
def test_grouped_engine_equals_the_loop_for_every_share_type(share_type, device):
    torch.manual_seed(0)
    net = Model(5, 3, share_type=share_type, with_random=True, pretrained=False).train().to(device)
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
        net.branch_impl = 'loop'
        loop = net(x)
        net.branch_impl = 'grouped'
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
    loop = Model(4, 3, pretrained=False, branch_impl='loop')
    grouped = Model(4, 3, pretrained=False, branch_impl='grouped')
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
    seconds = time_branch_impls(net, images, training=True, rounds=1)
    assert set(seconds) == {'loop', 'grouped'} and all(0 < s < float('inf') for s in seconds.values())
    assert all(torch.equal(a, b) for a, b in zip(rng_states(device), rng))
    after = net.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)  # running statistics included
    assert all(p.grad is None for p in net.parameters())
    assert net.branch_impl == 'auto' and not net.training


def test_unknown_engine_is_refused():
    with pytest.raises(ValueError, match='branch_impl'):
        Model(4, 2, pretrained=False, branch_impl='fast')


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
    net = Model(5, 4, share_type='layer3', with_random=not training, pretrained=False, branch_impl=impl).to(device)
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
