"""Evaluate a trained REIR run on its test split, without training.

    python evaluate.py results/cub_uncropped_fixed_unrandom_layer1_resnet18_48_12_model.pth
    python evaluate.py results/cub_uncropped_fixed_unrandom_layer1_resnet18_48_12_data_base.pth

A `_model.pth` is re-embedded over the test images (query and gallery where the dataset has them); a
`_data_base.pth` is scored from its stored embeddings, with no images needed. The run's settings come
from the file name (the prefix) and, for the image size and data path, from the run's checkpoint when it
is there. Prints the metrics line of train.py and writes <prefix>_eval.csv beside the input.
"""
import argparse
import os
import pickle
import re

import torch

import train
import utils
from model import BACKBONES, SHARE_TYPES

PREFIX_PATTERN = re.compile(
    rf'^(?P<data_name>.+)_(?P<crop_type>{"|".join(utils.CROP_TYPES)})_(?P<label_type>{"|".join(utils.LABEL_TYPES)})'
    rf'_(?P<randomness>random|unrandom)_(?P<share_type>{"|".join(SHARE_TYPES)})_(?P<model_type>{"|".join(BACKBONES)})'
    rf'_(?P<ensemble_size>\d+)_(?P<meta_class_size>\d+)$')
KINDS = ('_model.pth', '_data_base.pth')


def get_args_parser():
    parser = argparse.ArgumentParser(description='Evaluate a trained REIR model or embedding database')
    parser.add_argument('path', help='results/<prefix>_model.pth or results/<prefix>_data_base.pth')
    parser.add_argument('--recalls', default=None, type=train.recall_list,
                        help='K of Recall@K (default: the run\'s, else 1,2,4,8)')
    parser.add_argument('--data_path', default=None, help='prepared datasets (default: the run\'s, else data)')
    parser.add_argument('--image_size', default=None, type=train.positive_int,
                        help='network input side (default: the run\'s, else 256)')
    parser.add_argument('--exact_pipeline', action='store_true', default=None,
                        help='decode and resize as the original REIR does (default: as the run did)')
    parser.add_argument('--batch_size', default=32, type=train.positive_int)
    parser.add_argument('--gpu_ids', default=None, help='as in train.py')
    parser.add_argument('--num_workers', default=min(8, os.cpu_count() or 1), type=int)
    parser.add_argument('--amp', action='store_true', help='mixed precision on CUDA')
    return parser


def run_settings(path, overrides, kinds=KINDS):
    """The run's flags: from the prefix of the file name, completed from the run's checkpoint (read
    memory-mapped, so its tensors are not loaded) and by the overrides that are not None.
    Returns (settings namespace, prefix path, kind)."""
    name = os.path.basename(path)
    kind = next((k for k in kinds if name.endswith(k)), None)
    match = PREFIX_PATTERN.match(name[:-len(kind)]) if kind else None
    if match is None:
        raise train.UsageError(f'{path}: expected a file named <prefix>{" or <prefix>".join(kinds)}, with the '
                               f'prefix train.py writes (<data_name>_<crop_type>_..._<E>_<M>)')
    settings = dict(match.groupdict(), with_random=match['randomness'] == 'random',
                    ensemble_size=int(match['ensemble_size']), meta_class_size=int(match['meta_class_size']),
                    recalls=[1, 2, 4, 8], data_path='data', image_size=256, exact_pipeline=False)
    del settings['randomness']
    prefix_path = path[:-len(kind)]
    checkpoint = prefix_path + '_checkpoint.pth'
    if os.path.isfile(checkpoint):
        try:
            saved = torch.load(checkpoint, map_location='cpu', weights_only=True, mmap=True)['args']
            settings.update({k: saved[k] for k in ('recalls', 'data_path', 'image_size', 'exact_pipeline')
                             if k in saved})
        except (pickle.UnpicklingError, RuntimeError, KeyError, TypeError, OSError, EOFError):
            train.warn(f'could not read the run\'s settings from {checkpoint}: using defaults and flags')
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return argparse.Namespace(**settings), prefix_path, kind


def load_model(path, settings):
    """The run's model with the weights of path, on the CPU, in evaluation mode."""
    model = train.build_model(settings, pretrained=False)
    try:
        model.load_state_dict(utils.safe_load(path, 'model'))
    except (RuntimeError, TypeError) as e:
        raise utils.ReirError(f'{path}: does not fit the model its name describes ({str(e).splitlines()[0]})') from None
    return model.eval()


def evaluate_database(path, recalls):
    database = utils.safe_load(path, 'embedding database')
    splits = next((s for s in utils.EVAL_SPLITS if all(f'{split}_features' in database for split in s)), None)
    if splits is None:
        raise utils.ReirError(f'{path}: no test_features, nor query_features and gallery_features')
    keys = sorted({k for split in splits for k in database[f'{split}_labels']})
    index = {k: i for i, k in enumerate(keys)}
    features = {split: database[f'{split}_features'].float() for split in splits}
    labels = {split: [index[k] for k in database[f'{split}_labels']] for split in splits}
    return train.retrieval_scores(features, labels, recalls)


def evaluate_model(path, settings, args):
    device, gpu_ids = train.select_devices(args.gpu_ids)
    data_dicts = train.load_data_dicts(settings)
    transform, min_side = utils.input_pipeline(settings.crop_type, False, settings.image_size, data_dicts['mean'],
                                               data_dicts['std'], settings.exact_pipeline)
    options = train.loader_options(args.num_workers, 0, device)
    dataset_root = os.path.join(settings.data_path, settings.data_name)
    _, labels, loaders = train.build_eval_data(data_dicts, dataset_root, transform, min_side, args.batch_size,
                                                 options)
    model = load_model(path, settings)
    model = model.to(device, memory_format=train.memory_format(device, args.amp))
    replica_batch = -(-args.batch_size // max(1, len(gpu_ids)))
    train.log(train.choose_branch_impl(model, 'auto', device, replica_batch, settings.image_size, args.amp,
                                       training=False))
    if len(gpu_ids) > 1:
        model = torch.nn.DataParallel(model, device_ids=gpu_ids)
    metrics, _ = train.evaluate(model, loaders, labels, settings.recalls, device, args.amp)
    return metrics


def main(args):
    overrides = {k: getattr(args, k) for k in ('recalls', 'data_path', 'image_size', 'exact_pipeline', 'num_workers')}
    settings, prefix_path, kind = run_settings(args.path, overrides)
    if kind == '_data_base.pth':
        metrics = evaluate_database(args.path, settings.recalls)
    else:
        metrics = evaluate_model(args.path, settings, args)
    print(f'{os.path.basename(args.path)} | {train.format_metrics(metrics, settings.recalls)}')
    train.write_results_csv([{f'test_{name}': value for name, value in metrics.items()}], prefix_path + '_eval.csv')
    return metrics


if __name__ == '__main__':
    train.run_cli(main, get_args_parser().parse_args())
