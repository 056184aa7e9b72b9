"""The files the original REIR code (leftthomas/NormSoftmax) wrote, read here.

Its epochs/<prefix>_model.pth is the state_dict of its Model, whose modules have other names than this one's;
its results/<prefix>_data_base.pth keeps the members' outputs apart, (N, E, M), and names the query split of
In-shop 'test'. Both carry the prefix this repository gives a run, so the prefix says the settings.
"""
import os
import re

import torch

from model import STAGES

# what the original embedded its images with: Resize(256) and crops of 256, whole images decoded by PIL
ORIGINAL_SETTINGS = dict(image_size=256, exact_pipeline=True)
ORIGINAL_MODULES = ('common_extractor', 'head', 'layer1', 'layer2', 'layer3', 'layer4', 'classifiers')
ORIGINAL_KEY = re.compile(rf'^({"|".join(ORIGINAL_MODULES)})\.')


def is_original_state(state):
    """Whether a state_dict has the original Model's key layout."""
    return isinstance(state, dict) and bool(state) and \
        all(isinstance(key, str) and ORIGINAL_KEY.match(key) for key in state)


def state_dict_from_original(state, share_type):
    """The original Model's state_dict under this Model's names. The original keeps the shared stages in one
    Sequential, each branch's stem stages (conv1, bn1, relu, maxpool: only with share_type 'none') in another,
    each later stage in a ModuleList over the branches, and the classifiers in a ModuleList:

        common_extractor.<j>.*  ->  shared.<STAGES[j]>.*
        head.<i>.<j>.*          ->  branches.<i>.features.<STAGES[split + j]>.*   (split: the first unshared stage)
        layer<k>.<i>.*          ->  branches.<i>.features.layer<k>.*
        classifiers.<i>.*       ->  branches.<i>.fc.*

    Raises ValueError for a key that does not follow that layout."""
    split = 0 if share_type == 'none' else STAGES.index(share_type) + 1
    mapped = {}
    for key, tensor in state.items():
        module, *parts = key.split('.')
        try:
            if module == 'common_extractor':
                stage = STAGES[int(parts[0])]
                mapped['.'.join(['shared', stage, *parts[1:]])] = tensor
            elif module == 'head':
                stage = STAGES[split + int(parts[1])]
                mapped['.'.join(['branches', str(int(parts[0])), 'features', stage, *parts[2:]])] = tensor
            elif module == 'classifiers':
                mapped['.'.join(['branches', str(int(parts[0])), 'fc', *parts[1:]])] = tensor
            else:
                mapped['.'.join(['branches', str(int(parts[0])), 'features', module, *parts[1:]])] = tensor
        except (ValueError, IndexError):
            raise ValueError(f'key {key} is not of the original REIR\'s layout') from None
    return mapped


def is_original_database(database):
    """Whether a loaded embedding database is the original's: features of every member apart, (N, E, M)."""
    return isinstance(database, dict) and 'settings' not in database and any(
        key.endswith('_features') and isinstance(value, torch.Tensor) and value.dim() == 3
        for key, value in database.items())


def database_from_original(database):
    """The original's database in this repository's keys: features (N, E, M) -> (N, E*M), each member's output
    already L2-normalized, so the dot product ranks as the original's mean over members does. Its test split is
    the test set, with gallery_ a copy of it, for the self-retrieval datasets, and the query set, with gallery_ the
    gallery, for In-shop."""
    splits = {}
    for split in ('train', 'test', 'gallery'):
        if all(f'{split}_{kind}' in database for kind in ('images', 'labels', 'features')):
            features = database[f'{split}_features']
            splits[split] = (database[f'{split}_images'], database[f'{split}_labels'],
                             features.flatten(1) if features.dim() == 3 else features)
    if 'test' in splits and 'gallery' in splits and splits['gallery'][0] != splits['test'][0]:
        splits['query'] = splits.pop('test')
    else:
        splits.pop('gallery', None)
    return {f'{split}_{kind}': value for split, values in splits.items()
            for kind, value in zip(('images', 'labels', 'features'), values)}


def image_order(reference, images):
    """For every reference image, the index of the same image among images, or None when they are not the same
    images. An image is known by its file name, or by its folder and file name joined by '_': the original's copies
    under data/<name>/uncropped/ are named by the file name, In-shop's by the item folder and the file name."""
    def names(path):
        return os.path.basename(path), f'{os.path.basename(os.path.dirname(path))}_{os.path.basename(path)}'
    index, seen_twice = {}, set()
    for i, path in enumerate(images):
        for name in set(names(path)):
            if name in index:
                seen_twice.add(name)
            index[name] = i
    order = []
    for path in reference:
        found = {index[name] for name in names(path) if name in index and name not in seen_twice}
        if len(found) != 1:
            return None
        order.append(found.pop())
    return order if len(reference) == len(images) == len(set(order)) else None
