"""The original REIR's files (leftthomas/NormSoftmax): its model state_dict and its embedding database, built here
from the layout its model.py and train.py give them, work with evaluate.py, inference.py, ablation.py and the
loader; and hubconf.py gives a usable model through torch.hub."""
import os

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import data_base
import engine
import original
import run_files
import trained
import utils
from conftest import REPO, assert_one_line_error, prefix, run_main
from model import BACKBONES, STAGES, Model

STEM = ('conv1', 'bn1', 'relu', 'maxpool')
LAYERS = ('layer1', 'layer2', 'layer3', 'layer4')


class OriginalModel(nn.Module):
    """The original's Model as its state_dict lays it out, on the CPU: the shared stages in one Sequential
    (common_extractor), the stem stages a branch owns in a Sequential per branch (head), each later stage in a
    ModuleList over the branches (layer1 ... layer4), the classifiers in a ModuleList. Every branch has its own
    random weights and batch-norm statistics, so that a branch mapped to another's place would show."""

    def __init__(self, meta_class_size, ensemble_size, share_type, model_type='resnet18'):
        super().__init__()
        constructor = BACKBONES[model_type][0]
        shared = [] if share_type == 'none' else list(STAGES[:STAGES.index(share_type) + 1])
        backbone = constructor(weights=None)
        self.common_extractor = nn.Sequential(*[getattr(backbone, name) for name in shared])
        self.head = nn.ModuleList()
        for layer in LAYERS:
            setattr(self, layer, nn.ModuleList())
        for _ in range(ensemble_size):
            branch = constructor(weights=None)
            for norm in branch.modules():
                if isinstance(norm, nn.BatchNorm2d):
                    norm.running_mean.uniform_(-0.2, 0.2)
                    norm.running_var.uniform_(0.5, 2.0)
            self.head.append(nn.Sequential(*[getattr(branch, name) for name in STEM if name not in shared]))
            for layer in LAYERS:
                if layer not in shared:
                    getattr(self, layer).append(getattr(branch, layer))
        self.classifiers = nn.ModuleList(nn.Linear(backbone.fc.in_features, meta_class_size)
                                         for _ in range(ensemble_size))

    def forward(self, x):
        common = self.common_extractor(x)
        out = []
        for i, classifier in enumerate(self.classifiers):
            feature = common
            if len(self.head[i]):
                feature = self.head[i](feature)
            for layer in LAYERS:
                if len(getattr(self, layer)):
                    feature = getattr(self, layer)[i](feature)
            out.append(classifier(F.adaptive_avg_pool2d(feature, 1).flatten(1)))
        return torch.stack(out, dim=1)


def original_model_file(folder, share_type='layer1', name='tiny', E=2, M=2, model_type='resnet18'):
    """epochs/<prefix>_model.pth as the original saved it, with PyTorch 1.3 (torch.save's format before 1.6, not a
    zip archive), and the network."""
    torch.manual_seed(0)
    network = OriginalModel(M, E, share_type, model_type).eval()
    run = run_files.RunName(name, 'uncropped', 'fixed', False, share_type, model_type, E, M)
    path = folder / 'epochs' / f'{run.prefix}_model.pth'
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), path, _use_new_zipfile_serialization=False)
    return path, network, run


@pytest.mark.parametrize('share_type,model_type', [('none', 'resnet18'), ('maxpool', 'resnet18'),
                                                   ('layer1', 'resnet18'), ('layer3', 'resnet18'),
                                                   ('layer2', 'resnet50')])
def test_an_original_model_gives_the_original_networks_outputs(tmp_path, share_type, model_type):
    path, network, run = original_model_file(tmp_path, share_type, model_type=model_type)
    assert list(network.state_dict())[0].startswith('common_extractor' if share_type != 'none' else 'head')
    model = engine.load_model(str(path), run)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(images), network(images), atol=1e-5)


def test_an_original_model_that_does_not_fit_its_prefix_is_one_line(tmp_path, prepared):
    path, _, run = original_model_file(tmp_path)
    wrong = path.parent / f'{prefix(E=3, share="layer1")}_model.pth'
    os.rename(path, wrong)
    result = run_main('evaluate', wrong, '--data_path', prepared / 'data', '--num_workers', '0')
    assert_one_line_error(result, 1, 'does not fit the model', 'Missing key(s)')
    other = tmp_path / 'downloaded_model.pth'
    os.rename(wrong, other)  # a name without the prefix: the prefix comes from the flag
    result = run_main('evaluate', other, '--prefix', wrong.name.removesuffix('_model.pth'), '--data_path',
                      prepared / 'data', '--num_workers', '0')
    assert_one_line_error(result, 1, 'does not fit the model tiny_uncropped_fixed_unrandom_layer1_resnet18_3_2')
    assert_one_line_error(run_main('evaluate', other, '--prefix', 'tiny_model'), 2, '--prefix tiny_model: not a run')
    assert_one_line_error(run_main('evaluate', tmp_path / 'downloaded.pth', '--prefix', prefix()), 2,
                          'expected a file whose name ends in _model.pth or _data_base.pth')
    result = run_main('evaluate', other, '--prefix', run.prefix, '--data_path', prepared / 'data', '--num_workers',
                      '0', '--image_size', '32')
    assert result.returncode == 0, result.stderr
    assert (tmp_path / f'{run.prefix}_eval.csv').exists()  # beside the file, named by the prefix


def original_embeddings(network, data_path, split, image_size, name='tiny'):
    """The original's evaluation: its transform (Resize, CenterCrop, whole images decoded) and every member's
    output L2-normalized, (N, E, M), over the split's images in data dict order."""
    data_dicts = utils.load_data_dicts(str(data_path), name, 'uncropped')
    transform = utils.get_transform('uncropped', False, image_size, data_dicts['mean'], data_dicts['std'], exact=True)
    items = utils.flatten_split(data_dicts[split])
    images = torch.stack([transform(utils.load_rgb(os.path.join(data_path, name, p))) for p, _ in items])
    with torch.no_grad():
        return F.normalize(network(images), dim=-1), items


def original_recall(features, labels, ranks):
    """The original's utils.recall: similarity the mean over members of the members' dot products, self excluded."""
    similarity = torch.einsum('qem,gem->qg', features, features) / features.shape[1]
    similarity.fill_diagonal_(-1)
    order = similarity.argsort(dim=-1, descending=True)
    labels = torch.tensor(labels)
    return [100 * (labels[order[:, :k]] == labels[:, None]).any(-1).float().mean().item() for k in ranks]


def test_evaluate_embeds_with_an_original_model_as_the_original_did(tmp_path, prepared):
    """No args.json, no checkpoint: the original's pipeline (whole images decoded); the image size from the flag,
    to keep the test small (the original's 256 otherwise)."""
    path, network, _ = original_model_file(tmp_path)
    result = run_main('evaluate', path, '--data_path', prepared / 'data', '--num_workers', '0', '--image_size', '32')
    assert result.returncode == 0, result.stderr
    features, items = original_embeddings(network, prepared / 'data', 'test', 32)
    labels = utils.class_indices({'test': [key for _, key in items]})['test']
    evaluation = pd.read_csv(str(path).replace('_model.pth', '_eval.csv'))
    expected = original_recall(features, labels, [1, 2, 4, 8])
    assert [evaluation[f'test_recall@{k}'].iloc[0] for k in (1, 2, 4, 8)] == pytest.approx(expected, abs=1e-4)


def test_the_loader_gives_an_original_model_with_the_original_transform(tmp_path, prepared):
    path, network, _ = original_model_file(tmp_path)
    model, transform = trained.load_run(str(path), image_size=32, data_path=str(prepared / 'data'))
    assert not model.training and transform.min_side is None  # whole images decoded, as the original
    features, items = original_embeddings(network, prepared / 'data', 'test', 32)
    image = os.path.join(prepared, 'data', 'tiny', items[0][0])
    with torch.no_grad():
        assert torch.allclose(model.embedding(transform(image)[None]), features[:1].flatten(1), atol=1e-5)
    with pytest.raises(utils.ReirError, match='does not fit'):
        trained.load_run(str(path), prefix=prefix(E=3), image_size=32, data_path=str(prepared / 'data'))


def original_database(folder, network, data_path, name):
    """results/<prefix>_data_base.pth as the original's train.py saved it: train_, test_ and gallery_ images (paths
    of its copies, data/<name>/uncropped/<folder>_<file>, or real paths), labels numbered per split, features
    (N, E, M); gallery_ a copy of test_ for a self-retrieval dataset."""
    database = {}
    for split in ('train', 'test'):
        features, items = original_embeddings(network, data_path, split, 32)
        classes = sorted({key for _, key in items})
        database[f'{split}_images'] = [os.path.join(data_path, 'tiny', p) if name == 'real' else
                                       f'data/tiny/uncropped/{p.split("/")[-2]}_{p.split("/")[-1]}' for p, _ in items]
        database[f'{split}_labels'] = [classes.index(key) for _, key in items]
        database[f'{split}_features'] = features
    for kind in ('images', 'labels', 'features'):
        database[f'gallery_{kind}'] = database[f'test_{kind}']
    path = folder / name / 'results' / f'{prefix(share="layer1")}_data_base.pth'
    path.parent.mkdir(parents=True)
    torch.save(database, path, _use_new_zipfile_serialization=False)  # as PyTorch 1.3 wrote it
    return path, database


def test_an_original_database_is_scored_searched_and_compared(tmp_path, prepared, trained):
    _, network, _ = original_model_file(tmp_path)
    path, database = original_database(tmp_path, network, prepared / 'data', 'copies')
    result = run_main('evaluate', path)
    assert result.returncode == 0, result.stderr
    evaluation = pd.read_csv(str(path).replace('_data_base.pth', '_eval.csv'))
    expected = original_recall(database['test_features'], database['test_labels'], [1, 2, 4, 8])
    assert [evaluation[f'test_recall@{k}'].iloc[0] for k in (1, 2, 4, 8)] == pytest.approx(expected, abs=1e-4)

    # against a database written here: the images matched by name, the original's class numbers to class keys
    ours = trained / 'results' / f'{prefix()}_data_base.pth'
    for data_type in ('test', 'train'):
        result = run_main('ablation', '--better_data_base', path, '--worse_data_base', ours, '--data_type', data_type,
                          '--results_dir', tmp_path / 'out', '--retrieval_num', '2')
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith('better data base AR@2:')
    labels = database['test_labels']
    labels[0], labels[-1] = labels[-1], labels[0]  # two images in each other's class: refused
    torch.save(database, path)
    assert_one_line_error(run_main('ablation', '--better_data_base', path, '--worse_data_base', ours,
                                   '--results_dir', tmp_path / 'out'), 1, 'in other classes')
    database['test_features'] = database['test_features'][:-1]  # shapes that do not fit: one line
    torch.save(database, path)
    assert_one_line_error(run_main('evaluate', path), 1, 'test_features has 11 rows for 12 labels')


def test_an_original_in_shop_database_is_read_as_query_and_gallery(tmp_path, prepared):
    """The original's In-shop database names the query split test_ and holds the gallery beside it; each split
    numbers its classes from 0 (the same items in query and gallery get the same numbers)."""
    _, network, _ = original_model_file(tmp_path)
    database = {}
    for split, name in (('train', 'train'), ('test', 'query'), ('gallery', 'gallery')):
        features, items = original_embeddings(network, prepared / 'data', name, 32, name='shop')
        classes = sorted({key for _, key in items})
        database.update({f'{split}_images': [f'data/shop/uncropped/{p.replace("/", "_")}' for p, _ in items],
                         f'{split}_labels': [classes.index(key) for _, key in items], f'{split}_features': features})
    path = tmp_path / f'{prefix("shop", share="layer1")}_data_base.pth'
    torch.save(database, path)
    assert sorted(data_base.load_database(str(path))) == ['gallery', 'query', 'train']
    result = run_main('evaluate', path, '--recalls', '1,2')
    assert result.returncode == 0, result.stderr
    queries, gallery = database['test_features'], database['gallery_features']
    order = (torch.einsum('qem,gem->qg', queries, gallery)).argsort(dim=-1, descending=True)
    hits = torch.tensor(database['gallery_labels'])[order] == torch.tensor(database['test_labels'])[:, None]
    evaluation = pd.read_csv(str(path).replace('_data_base.pth', '_eval.csv'))
    for k in (1, 2):
        assert evaluation[f'test_recall@{k}'].iloc[0] == pytest.approx(100 * hits[:, :k].any(-1).float().mean().item())


def test_inference_on_an_original_database_without_its_model(tmp_path, prepared):
    """The original's inference.py needs no model: the query is one of the database's images, its stored
    embedding is used. With the model (--model, from the original's epochs/) the query is embedded anew, the
    same."""
    model_path, network, _ = original_model_file(tmp_path)
    path, database = original_database(tmp_path, network, prepared / 'data', 'real')
    query = database['test_images'][0]
    result = run_main('inference', '--query_img_name', query, '--data_base', path, '--retrieval_num', '3')
    assert result.returncode == 0, result.stderr
    note, *stored = result.stdout.splitlines()
    assert 'the query\'s embedding is the one stored in' in note
    result = run_main('inference', '--query_img_name', query, '--data_base', path, '--retrieval_num', '3',
                      '--model', model_path, '--image_size', '32', '--data_path', prepared / 'data')
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == stored
    outside = tmp_path / 'outside.jpg'
    outside.write_bytes(open(query, 'rb').read())
    assert_one_line_error(run_main('inference', '--query_img_name', outside, '--data_base', path), 1,
                          'no model at', '--model')


def test_torch_hub_gives_a_run_as_its_database_embedded_it(trained, tmp_path, monkeypatch):
    """From another folder, as another project would: the best epoch's model and transform embed a test image as
    the run's database holds it."""
    monkeypatch.chdir(tmp_path)
    results = trained / 'results'
    model, transform = torch.hub.load(REPO, 'reir', str(results / prefix()), source='local')
    database = data_base.load_database(str(results / f'{prefix()}_data_base.pth'))
    images, _, features = database['test']
    with torch.no_grad():
        embedding = model.embedding(transform(os.path.join(trained, images[0]))[None])
    assert not model.training and embedding.shape == (1, 4)
    assert torch.allclose(embedding[0], features[0].float(), atol=2e-3)  # the database holds float16


def test_the_original_cars196_model_maps_key_for_key_onto_this_model():
    """At full size, on the meta device (shapes, no memory): the original's Cars196 model, ResNet-18, E = 48, M = 12,
    layer1 shared, whose 529,365,376 parameters its README gives, maps onto this Model key for key, shape for shape."""
    with torch.device('meta'):
        network = OriginalModel(12, 48, 'layer1')
        model = Model(12, 48, 'layer1', pretrained=False)
    assert sum(p.numel() for p in network.parameters()) == 529_365_376
    mapped = original.state_dict_from_original(network.state_dict(), 'layer1')
    assert {key: value.shape for key, value in mapped.items()} == \
        {key: value.shape for key, value in model.state_dict().items()}


@pytest.mark.slow
def test_index_py_embeds_a_folder_with_an_original_model(tmp_path, prepared):
    """index.py takes the original's epochs/<prefix>_model.pth as torch.hub does: the index beside it holds the
    embeddings its network gives, as the original embedded (256 pixels, whole images decoded)."""
    model_path, _, run = original_model_file(tmp_path)
    folder = prepared / 'data' / 'tiny' / 'test'
    result = run_main('index', model_path, '--images', folder, '--data_path', prepared / 'data', '--num_workers', '0',
                      '--labels', 'folders')
    assert result.returncode == 0, result.stderr
    index = torch.load(tmp_path / 'epochs' / f'{run.prefix}_test_index.pth', weights_only=True)
    model, transform = trained.load_run(model_path, data_path=prepared / 'data')
    with torch.no_grad():
        first = model.embedding(transform(index['test_images'][0])[None])[0]
    assert index['settings']['image_size'] == 256 and index['settings']['exact_pipeline'] is True
    assert torch.allclose(index['test_features'][0].float(), first, atol=1e-3)
    assert run_main('evaluate', tmp_path / 'epochs' / f'{run.prefix}_test_index.pth').returncode == 0
