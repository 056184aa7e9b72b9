"""Evaluate a trained REIR run on its test split, without training.

    python evaluate.py results/cub_uncropped_fixed_unrandom_layer1_resnet18_48_12_model.pth
    python evaluate.py results/cub_uncropped_fixed_unrandom_layer1_resnet18_48_12_data_base.pth

A `_model.pth` is re-embedded over the test images (query and gallery where the dataset has them); a
`_data_base.pth` is scored from its stored embeddings, with no images needed. A run trained with
--val_classes is scored on its held-out training classes too (the val_ metrics of its results CSV). The run's
settings come from the file name (the prefix) and, for the image size, input pipeline, data path and recalls, from the
run's <prefix>_args.json (or its checkpoint); flags override them, and a model is never run with a guessed
image size or pipeline. Prints the metrics line of train.py and writes <prefix>_eval.csv beside
the input. An index.py index of a labelled folder (--labels folders) is scored as a database, each image querying the
others, into <prefix>_<name>_index_eval.csv.

The files the original REIR saved work too: its model state_dict (epochs/<prefix>_model.pth) is mapped onto this
Model and embeds as the original did (256 pixels, whole images decoded; original.py), and its database is scored
from its stored features.
"""
import argparse
import os

import data_base
import engine
import loaders
import run_files
import utils


def get_args_parser():
    parser = argparse.ArgumentParser(description='Evaluate a trained REIR model or embedding database')
    parser.add_argument('path', help='results/<prefix>_model.pth or results/<prefix>_data_base.pth (also the '
                                     'original REIR\'s epochs/<prefix>_model.pth and results/<prefix>_data_base.pth, '
                                     'and index.py\'s <prefix>_<name>_index.pth of a folder indexed with --labels '
                                     'folders)')
    parser.add_argument('--prefix', default=None,
                        help='the run\'s prefix, for a file whose name does not carry it (<data_name>_<crop_type>_'
                             '<label_type>_<random|unrandom>_<share_type>_<model_type>_<E>_<M>)')
    parser.add_argument('--recalls', default=None, type=utils.recall_list,
                        help='K of Recall@K (default: the run\'s, else 1,2,4,8)')
    parser.add_argument('--data_path', default=None, help='prepared datasets (default: the run\'s, else data)')
    engine.add_embedding_flags(parser)
    return parser


def evaluate_database(path, recalls):
    """{'test': metrics, and 'val': metrics when the database holds the run's held-out classes}; refused where the
    run's model beside it is not the one that embedded it."""
    database = data_base.load_run_database(path)
    roles = {'test': utils.eval_splits(database, path)}
    if 'val' in database:
        roles['val'] = ('val',)
    scores = {}
    for role, splits in roles.items():
        # a lone 'val' split is scored by self-retrieval, as a test split is
        names = {split: 'test' if split == 'val' else split for split in splits}
        features = {names[split]: database[split][2].float() for split in splits}
        labels = utils.class_indices({names[split]: database[split][1] for split in splits})
        loaders.check_recalls(recalls, {split: len(split_labels) for split, split_labels in labels.items()})
        scores[role] = engine.retrieval_scores(features, labels, recalls)
    return scores


def evaluate_model(path, run, settings, args):
    device, gpu_ids = engine.select_devices(args.gpu_ids)
    data_dicts = utils.load_data_dicts(settings.data_path, run.data_name, run.crop_type)
    transform, min_side = utils.input_pipeline(run.crop_type, False, settings.image_size,
                                               *run_files.normalization(settings, data_dicts), settings.exact_pipeline)
    options = loaders.loader_options(args.num_workers, 0, device)
    dataset_root = os.path.join(settings.data_path, run.data_name)
    roles = {'test': data_dicts}
    if settings.held_out_classes:
        missing = [key for key in settings.held_out_classes if key not in data_dicts['train']]
        if missing:
            raise utils.ReirError(f'held-out class {missing[0]} of the run is not in the training split of '
                                  f'{utils.data_dicts_path(settings.data_path, run.data_name, run.crop_type)}')
        roles['val'] = {'test': {key: data_dicts['train'][key] for key in settings.held_out_classes}}
    data = {}
    for role, splits in roles.items():
        _, labels, split_loaders = loaders.build_eval_data(splits, dataset_root, transform, min_side, args.batch_size,
                                                           options)
        loaders.check_recalls(settings.recalls, {split: len(split_labels) for split, split_labels in labels.items()})
        data[role] = labels, split_loaders
    process = engine.Process(0, 1, device, gpu_ids[:1])
    model = engine.place_model(engine.load_model(path, run), process, (args.batch_size, settings.image_size), args.amp,
                               training=False)
    return {role: engine.evaluate(model, split_loaders, labels, settings.recalls, device, args.amp)[0]
            for role, (labels, split_loaders) in data.items()}


def main(args):
    run, paths, kind = data_base.run_of(args.path, run_files.RUN_FILE_KINDS, args.prefix)
    settings = run_files.embedding_settings(paths, {k: getattr(args, k) for k in run_files.EMBEDDING_DEFAULTS},
                                            model_needed=kind == 'model.pth')
    if kind != 'model.pth':  # a run's database, or index.py's index of a labelled folder
        scores = evaluate_database(args.path, settings.recalls)
    else:
        scores = evaluate_model(args.path, run, settings, args)
    line = ' | '.join(f'{"val " if role == "val" else ""}{utils.format_metrics(metrics, settings.recalls)}'
                      for role, metrics in scores.items())
    print(f'{os.path.basename(args.path)} | {line}')
    run_files.write_results_csv([{f'{role}_{name}': value for role, metrics in scores.items()
                                  for name, value in metrics.items()}], paths['eval.csv'])
    return scores


if __name__ == '__main__':
    utils.run_cli(main, get_args_parser().parse_args())
