import copy
import os
import urllib.error

import pytest
import torch

import model as model_module
from model import BACKBONES, SHARE_TYPES, Model, PretrainedWeightsUnavailable, embed


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


def test_model_has_no_device_placement():
    source = open(model_module.__file__).read()
    assert '.cuda(' not in source and 'device_ids' not in source


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


@pytest.mark.parametrize('share_type', SHARE_TYPES)
def test_grouped_engine_equals_the_loop_for_every_share_type(share_type):
    torch.manual_seed(0)
    net = Model(5, 3, share_type=share_type, with_random=True, pretrained=False).train()
    # in float64 the two engines agree to rounding: the same function, gradients and running statistics
    assert_engines_agree(net.double(), torch.randn(4, 3, 32, 32, dtype=torch.float64), atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize('model_type', list(BACKBONES))
def test_grouped_engine_equals_the_loop_for_every_backbone(model_type):
    torch.manual_seed(0)
    net = Model(4, 2, share_type='layer2', model_type=model_type, pretrained=False).train().double()
    # batch 4 at 64 px: with 2 images of 1x1 features, batch norm would amplify rounding itself
    assert_engines_agree(net, torch.randn(4, 3, 64, 64, dtype=torch.float64), atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize('share_type', SHARE_TYPES)
def test_grouped_engine_outputs_within_1e_5_in_float32(share_type):
    torch.manual_seed(0)
    net = Model(6, 4, share_type=share_type, with_random=True, pretrained=False).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        net.branch_impl = 'loop'
        loop = net(x)
        net.branch_impl = 'grouped'
        grouped = net(x)
    assert (loop - grouped).abs().max() < 1e-5


def test_state_dict_does_not_depend_on_the_engine():
    torch.manual_seed(0)
    loop = Model(4, 3, pretrained=False, branch_impl='loop')
    grouped = Model(4, 3, pretrained=False, branch_impl='grouped')
    assert list(loop.state_dict()) == list(grouped.state_dict())
    grouped.load_state_dict(loop.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loop.eval()(x), grouped.eval()(x), atol=1e-5)


def test_auto_engine_follows_the_device():
    net = Model(4, 2, pretrained=False)
    assert net.branch_impl == 'auto'
    assert net.engine(torch.device('cpu')) == 'loop' and net.engine(torch.device('cuda', 0)) == 'grouped'
    with pytest.raises(ValueError, match='branch_impl'):
        Model(4, 2, pretrained=False, branch_impl='fast')
