"""Shared test helpers: tiny datasets in the real on-disk formats (written fresh for each test that asks for
one), tiny training runs, and DataParallel-style replicas."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import data_utils  # noqa: E402  (the repository's modules, found through REPO)
import utils  # noqa: E402

# The CUDA tier (python -m pytest -m cuda): skipped, with the reason, where CUDA is absent
CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')]
DEVICES = ['cpu', pytest.param('cuda', marks=CUDA)]


@pytest.fixture(autouse=True)
def exact_float32():
    """float32 on CUDA as on the CPU: no TF32, which keeps 10 bits of mantissa in convolutions and matmuls."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def write_image(path, size=(48, 40), seed=0):
    """A small JPEG of smooth random colour, different for every seed."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    corners = rng.uniform(0, 255, (2, 2, 3))
    small = Image.fromarray(corners.astype(np.uint8))
    small.resize(size, Image.BILINEAR).save(path, quality=95)


def run_script(script, *args, cwd=REPO):
    """Run one of the repository's scripts as a user would; returns the CompletedProcess."""
    env = dict(os.environ, PYTHONWARNINGS='ignore')
    return subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=600)


def assert_one_line_error(result, code, *fragments):
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert 'Traceback' not in result.stderr, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert len(error_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in error_lines[0], error_lines[0]


@pytest.fixture
def car_root(tmp_path):
    """Cars196 layout: cars_annos.mat (fields deliberately not in the official order) and car_ims/."""
    root = tmp_path / 'data' / 'car'
    classes = [1, 97, 98, 99, 100, 196]
    rows = []
    for i, label in enumerate(c for c in classes for _ in range(2)):
        relpath = f'car_ims/{i + 1:06d}.jpg'
        write_image(str(root / relpath), size=(60, 50), seed=i)
        x1, y1 = 3 + i % 4, 5
        rows.append((np.array([[label]], np.uint8), np.array([relpath]), np.array([[x1]], np.uint8),
                     np.array([[y1]], np.uint8), np.array([[x1 + 30 + i]], np.uint8), np.array([[40]], np.uint8),
                     np.array([[i % 2]], np.uint8)))
    dtype = [('class', 'O'), ('relative_im_path', 'O'), ('bbox_x1', 'O'), ('bbox_y1', 'O'), ('bbox_x2', 'O'),
             ('bbox_y2', 'O'), ('test', 'O')]
    annotations = np.empty((1, len(rows)), dtype=dtype)
    for i, row in enumerate(rows):
        annotations[0, i] = row
    savemat(str(root / 'cars_annos.mat'), {'annotations': annotations,
                                           'class_names': np.array(['a'] * 196, dtype=object)})
    return root


@pytest.fixture
def cub_root(tmp_path):
    root = tmp_path / 'data' / 'cub'
    classes = [1, 2, 100, 101, 150, 200]
    images, labels, boxes = [], [], []
    for i, label in enumerate(c for c in classes for _ in range(2)):
        relpath = f'{label:03d}.Bird_{label}/Bird_{label}_{i}.jpg'
        write_image(str(root / 'images' / relpath), size=(64, 48), seed=100 + i)
        images.append(f'{i + 1} {relpath}')
        labels.append(f'{i + 1} {label}')
        boxes.append(f'{i + 1} {2.5 + i} 4.0 {30.7 + i} 35.2')
    for name, lines in (('images.txt', images), ('image_class_labels.txt', labels), ('bounding_boxes.txt', boxes)):
        (root / name).write_text('\n'.join(lines) + '\n')
    return root


@pytest.fixture
def sop_root(tmp_path):
    root = tmp_path / 'data' / 'sop'
    header = 'image_id class_id super_class_id path\n'
    for name, classes, start in (('Ebay_train.txt', [1, 2, 3], 0), ('Ebay_test.txt', [11319, 11320], 100)):
        lines = []
        for i, label in enumerate(c for c in classes for _ in range(3)):
            relpath = f'bicycle_final/{label}_{i}.JPG'
            write_image(str(root / relpath), seed=start + i)
            lines.append(f'{start + i + 1} {label} 1 {relpath}')
        (root / name).write_text(header + '\n'.join(lines) + '\n')
    return root


@pytest.fixture
def isc_root(tmp_path):
    root = tmp_path / 'data' / 'isc'
    rows = []
    for i, (item, status) in enumerate([('id_00000001', 'train')] * 3 + [('id_00000002', 'train')] * 2
                                       + [('id_00000003', 'query'), ('id_00000003', 'gallery'),
                                          ('id_00000003', 'gallery'), ('id_00000004', 'query'),
                                          ('id_00000004', 'gallery')]):
        relpath = f'img/WOMEN/Dresses/{item}/{i:02d}_1_front.jpg'
        write_image(str(root / relpath), seed=200 + i)
        rows.append(f'{relpath} {item} {status}')
    (root / 'Eval').mkdir(parents=True)
    (root / 'Eval' / 'list_eval_partition.txt').write_text(
        f'{len(rows)}\nimage_name item_id evaluation_status\n' + '\n'.join(rows) + '\n')
    return root


def make_folder_dataset(root, splits, images_per_class=4, size=(40, 36), class_offset=0):
    """A folder dataset whose classes are told apart by colour, so that a tiny model can learn them."""
    for split, num_classes in splits.items():
        for c in range(num_classes):
            for i in range(images_per_class):
                hue = (c * 37 + class_offset) % 256
                path = os.path.join(root, split, f'class_{c:02d}', f'{i}.jpg')
                os.makedirs(os.path.dirname(path), exist_ok=True)
                base = np.array([hue, 255 - hue, (hue * 3) % 256], np.float64)
                noise = np.random.default_rng([c, i, len(split)]).normal(0, 20, (size[1], size[0], 3))
                Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(path, quality=95)
    return root


@pytest.fixture
def folder_root(tmp_path):
    return make_folder_dataset(str(tmp_path / 'data' / 'tiny'), {'train': 4, 'test': 3})


# ----------------------------------------------------------------------------- tiny training runs

TINY = ['--no_pretrained', '--image_size', '32', '--ensemble_size', '2', '--meta_class_size', '2',
        '--batch_size', '4', '--num_epochs', '2', '--num_workers', '0']


@pytest.fixture
def tiny(tmp_path):
    """A prepared 4-class train / 3-class test folder dataset and a results folder."""
    make_folder_dataset(str(tmp_path / 'data' / 'tiny'), {'train': 4, 'test': 3})
    data_utils.prepare(str(tmp_path / 'data'), 'tiny', num_workers=1)
    return tmp_path


def run_train(tmp_path, *extra, name='tiny'):
    return run_script('train.py', '--data_path', tmp_path / 'data', '--data_name', name,
                      '--results_dir', tmp_path / 'results', *TINY, *extra)


def prefix(name='tiny', E=2, M=2, share='layer1'):
    return utils.run_prefix(name, 'uncropped', 'fixed', False, share, 'resnet18', E, M)


# ----------------------------------------------------------------------------- replicas

def data_parallel_replica(model, scale):
    """A replica as nn.parallel.replicate makes one for another GPU: every module's plain attributes shared
    with the original (Module._replicate_for_data_parallel), its own parameters and buffers, here scaled so
    that the replica's weights differ from the original's as they would after a broadcast to another device
    in the middle of a step."""
    modules = list(model.modules())
    replicas = [module._replicate_for_data_parallel() for module in modules]
    position = {id(module): i for i, module in enumerate(modules)}
    for module, replica in zip(modules, replicas):
        for name, child in module._modules.items():
            replica._modules[name] = None if child is None else replicas[position[id(child)]]
        for name, parameter in module._parameters.items():
            replica._parameters[name] = None if parameter is None else parameter.detach() * scale
        for name, buffer in module._buffers.items():
            replica._buffers[name] = None if buffer is None else buffer.clone()
    return replicas[0]
