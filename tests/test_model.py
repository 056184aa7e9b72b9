import os
import urllib.error

import pytest
import torch
import torch.nn.functional as F

import model as model_module
from branch_engines import ENGINES
from loss_choice import LossChoice
from model import BACKBONES, LOSSES, SHARE_TYPES, CosineClassifier, Model, PretrainedWeightsUnavailable, embed


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
        net = Model(5, 3, with_random=True, pretrained=False)
    net.branch_engine = ENGINES[impl]
    assert {t.device.type for t in list(net.parameters()) + list(net.buffers())} == {'meta'}
    for training in (True, False):
        assert net.train(training)(torch.empty(2, 3, 32, 32, device='meta')).shape == (2, 3, 5)


# ----------------------------------------------------------------------------- losses

def test_the_original_loss_is_every_branch_cross_entropy_averaged():
    torch.manual_seed(0)
    logits, meta_labels = torch.randn(4, 3, 5), torch.randint(5, (4, 3))
    # by hand: branch e's mean negative log-likelihood of its own meta-class labels, then the mean over branches
    per_branch = [-F.log_softmax(logits[:, e], dim=1)[torch.arange(4), meta_labels[:, e]].mean() for e in range(3)]
    loss = LOSSES['ce'](3, 5, 10)(logits, meta_labels, torch.randint(10, (4,)))
    assert torch.allclose(loss, torch.stack(per_branch).mean())


def test_cosine_classifier_gives_cosines_over_the_temperature():
    classifier = CosineClassifier(2, 3)
    with torch.no_grad():
        classifier.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 5.0], [-1.0, -1.0]]))
    logits = classifier(torch.tensor([[3.0, 0.0], [1.0, 1.0]]))
    root = 2 ** -0.5
    assert torch.allclose(logits, torch.tensor([[1.0, 0.0, -root], [root, root, -1.0]]) / 0.05)


def test_normsoftmax_branches_end_in_cosine_classifiers():
    """With --loss normsoftmax every branch's logits are cosines / 0.05 of its pooled feature and its meta-class
    weights, and the embedding is formed from them as REIR's is."""
    torch.manual_seed(0)
    net = Model(4, 3, share_type='layer3', pretrained=False, classifier=LossChoice.parse('normsoftmax').classifier())
    net.eval()
    assert all(type(branch.fc) is CosineClassifier for branch in net.branches)
    assert 'branches.0.fc.weight' in net.state_dict() and 'branches.0.fc.bias' not in net.state_dict()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = net(x)
        pooled = net.branches[1].features(net.shared(x)).mean(dim=(2, 3))                 # (2, F)
        cosines = F.normalize(pooled, dim=1) @ F.normalize(net.branches[1].fc.weight, dim=1).t()
    assert torch.allclose(logits[:, 1], cosines / 0.05, atol=1e-5)
    assert logits.abs().max() <= 1 / 0.05 + 1e-4
    assert torch.allclose(net.embedding(x), embed(logits))


def test_normsoftmax_s_temperature_is_its_classifier_s():
    """--loss normsoftmax:temperature=0.5: the branches' logits are the cosines of the default 0.05, over 0.5."""
    x = torch.randn(2, 3, 32, 32)
    logits = {}
    for text in ('normsoftmax', 'normsoftmax:temperature=0.5'):
        torch.manual_seed(0)
        net = Model(4, 3, share_type='layer4', pretrained=False, classifier=LossChoice.parse(text).classifier()).eval()
        with torch.no_grad():
            logits[text] = net(x)
    assert {branch.fc.temperature for branch in net.branches} == {0.5}
    assert torch.allclose(logits['normsoftmax:temperature=0.5'] * 0.5, logits['normsoftmax'] * 0.05, atol=1e-6)


@pytest.mark.parametrize('name', [*LOSSES, 'normsoftmax:temperature=0.1', 'pml.ProxyAnchorLoss:margin=0.2'])
def test_every_loss_trains_the_model_it_names(name):
    """A registered loss builds with (E, M, classes) and its settings, takes (logits, meta-class labels, class labels)
    and gives a finite scalar whose gradients reach the model's branches, whatever classifier the loss names."""
    torch.manual_seed(0)
    choice = LossChoice.parse(name)
    net = Model(4, 2, share_type='layer4', pretrained=False, classifier=choice.classifier())
    criterion = choice.build(2, 4, 6)
    loss = criterion(net(torch.randn(3, 3, 32, 32)), torch.randint(4, (3, 2)), torch.randint(6, (3,)))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(branch.fc.weight.grad is not None and branch.fc.weight.grad.abs().sum() > 0 for branch in net.branches)
