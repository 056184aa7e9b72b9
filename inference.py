"""Retrieve the images most similar to a query with a trained run, and draw them.

    python inference.py --query_img_name data/cub/images/200.Common_Yellowthroat/x.jpg \
        --data_base cub_uncropped_fixed_unrandom_layer1_resnet18_48_12_data_base.pth --retrieval_num 8

Embeds the query with the run's best model (--model, by default <prefix>_model.pth beside the database), ranks the
database split by similarity and writes results/<query name>-<hash of its path>_<prefix>_retrieval.png (two queries
of one name in other folders get files of their own): the query, then its top K,
each labelled with rank and similarity and framed green (same class) or red (other class) when the
query's class is known, that is when the query is an image of the database. Runs on the CPU.

A database the original REIR saved works too, with its model (--model epochs/<prefix>_model.pth) or, as the
original's inference.py, without one for a query that is one of its images: its stored embedding is used.
"""
import argparse
import os

import torch
from PIL import ImageFont

import data_base
import figures
import run_files
import trained
import utils


def get_args_parser():
    parser = argparse.ArgumentParser(description='Retrieve and draw the nearest images of a query')
    parser.add_argument('--query_img_name', required=True, help='path of the query image')
    parser.add_argument('--data_base', required=True,
                        help='<prefix>_data_base.pth: a name under results/ or a path')
    parser.add_argument('--data_type', default=None, choices=('train', 'test', 'query', 'gallery'),
                        help='database split to search (default: test, or gallery for query/gallery datasets)')
    parser.add_argument('--retrieval_num', default=8, type=utils.positive_int, help='images to retrieve')
    parser.add_argument('--model', default=None,
                        help='the run\'s <prefix>_model.pth (default: beside the database; the original REIR kept it '
                             'in epochs/)')
    parser.add_argument('--data_path', default=None, help='prepared datasets (default: the run\'s)')
    parser.add_argument('--image_size', default=None, type=utils.positive_int, help='default: the run\'s')
    parser.add_argument('--exact_pipeline', action=argparse.BooleanOptionalAction, default=None,
                        help='decode and resize as the original REIR does, or not (default: as the run did)')
    return parser


def query_class(query_path, database):
    """The class key of the query when it is one of the database's images, else None."""
    query_path = os.path.abspath(query_path)
    for images, labels, _ in database.values():
        for path, label in zip(images, labels):
            if os.path.abspath(path) == query_path:
                return label
    return None


def retrieve(query_feature, query_label, split, query_path, count):
    """Indices and similarities of the count database images of split (images, labels, features) most similar to
    the query, the query itself excluded, in the order of the metrics (utils.ranking: among equal scores an image of
    another class than query_label first)."""
    images, labels, features = split
    scores = features.float() @ query_feature                                   # (N,)
    own = torch.tensor([os.path.abspath(p) == os.path.abspath(query_path) for p in images])
    scores[own] = float('-inf')
    top = utils.ranking(scores.numpy(), [label == query_label for label in labels], min(count, int((~own).sum())))
    return top, scores[top].tolist()


def query_embedding(args, run, database_path, database):
    """The query's embedding (E*M,): from the run's model (--model, else <prefix>_model.pth beside the database);
    where there is no model file (an original REIR database alone), the stored one of the query when it is one of
    the database's images, as the original's inference.py does."""
    model_path = args.model or run_files.run_of_file(database_path, kinds=('data_base.pth',))[1]['model.pth']
    if not os.path.isfile(model_path):
        query = os.path.abspath(args.query_img_name)
        stored = [features[i] for images, _, features in database.values()
                  for i, path in enumerate(images) if os.path.abspath(path) == query]
        if not stored:
            raise utils.ReirError(f'no model at {model_path} to embed the query with: pass --model <prefix>_model.pth '
                                  f'(the original REIR kept it in epochs/), or query an image of the database')
        utils.log(f'no model at {model_path}: the query\'s embedding is the one stored in {database_path}')
        return stored[0].float()
    own = run_files.RunName.parse(os.path.basename(model_path).removesuffix('_model.pth'))
    if own is not None and own != run:
        raise utils.ReirError(f'{model_path} is the model of {own.prefix}, not of the database\'s run {run.prefix}')
    model, transform = trained.load_run(model_path, run.prefix, args.image_size, args.exact_pipeline,
                                        args.data_path)
    data_base.check_embedded_by(database_path, model_path, model.state_dict())
    try:
        query = transform(args.query_img_name)[None]                                 # (1, 3, S, S)
    except utils.UNREADABLE_IMAGE_ERRORS as e:
        raise utils.ReirError(f'query image {args.query_img_name} is unreadable ({type(e).__name__})') from None
    with torch.inference_mode():
        return model.embedding(query)[0]                                         # (E * M,)


def main(args):
    database_path = data_base.resolve_database(args.data_base)
    run, _, _ = run_files.run_of_file(database_path, kinds=('data_base.pth',))
    database = data_base.load_database(database_path)
    split = args.data_type or utils.eval_splits(database, database_path)[-1]  # test, or gallery
    if split not in database:
        raise utils.ReirError(f'{database_path} has no {split} split; it holds {", ".join(database)}')
    if not os.path.isfile(args.query_img_name):
        raise utils.ReirError(f'query image {args.query_img_name} not found')
    query_feature = query_embedding(args, run, database_path, database)

    images, labels, _ = database[split]
    label = query_class(args.query_img_name, database)
    indices, similarities = retrieve(query_feature, label, database[split], args.query_img_name, args.retrieval_num)
    results = [(images[i], s, labels[i]) for i, s in zip(indices, similarities)]
    try:
        grid = figures.draw_grid(args.query_img_name, results, label, ImageFont.load_default())
    except utils.UNREADABLE_IMAGE_ERRORS as e:
        raise utils.ReirError(f'cannot draw a retrieved image ({e}): run from the folder the database was trained '
                              f'in, or keep the dataset where it was') from None

    output = os.path.join(os.path.dirname(database_path),
                          f'{figures.query_name(args.query_img_name)}_{run.prefix}_retrieval.png')
    run_files.atomic_write(output, lambda tmp: grid.save(tmp, format='PNG'))
    for rank, (path, similarity, other) in enumerate(results, start=1):
        mark = ' (same class)' if label is not None and other == label else ''
        print(f'{rank}: {similarity:.4f} {path}{mark}')
    print(f'-> {output}')


if __name__ == '__main__':
    utils.run_cli(main, get_args_parser().parse_args())
