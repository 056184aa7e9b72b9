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
import faiss_search
import figures
import folder_index
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


def classes_by_path(database):
    """{absolute path: class key} of the database's images: a query's class, when it is one of them."""
    return {os.path.abspath(path): label for images, labels, _ in database.values()
            for path, label in zip(images, labels)}


def retrieve(query_feature, query_label, split, own, count):
    """Indices and similarities of the count database images of split (images, labels, features) most similar to
    the query, its own position own (None where it is not one of them) excluded, in the order of the metrics
    (utils.ranking: among equal scores an image of another class than query_label first)."""
    images, labels, features = split
    scores = features.float() @ query_feature                                   # (N,)
    if own is not None:
        scores[own] = float('-inf')
    available = len(images) - (own is not None)
    top = utils.ranking(scores.numpy(), [label == query_label for label in labels], min(count, available))
    return top, scores[top].tolist()


def retrieve_with_faiss(index, query_feature, own, count, size):
    """retrieve by a faiss index beside an index.py gallery of size images (faiss_search): its order, no tie rule."""
    k = min(count + (own is not None), size)
    similarities, indices = faiss_search.search(index, query_feature[None].numpy(), k)
    found = [(int(i), float(s)) for i, s in zip(indices[0], similarities[0]) if i >= 0 and i != own][:count]
    return [i for i, _ in found], [s for _, s in found]


class UnreadableQuery(utils.ReirError):
    """A query that is no readable image: one of a folder's is left out, a single one ends the command."""


def query_embedder(args, run, model_path, database_path, database):
    """A function from a query's path to its embedding (E*M,): by the run's model (--model, else <prefix>_model.pth
    beside the database); where there is no model file (an original REIR database alone), the stored one of the
    query when it is one of the database's images, as the original's inference.py does."""
    model_path = args.model or model_path
    if not os.path.isfile(model_path):
        return stored_embedding(model_path, database_path, database)
    own = run_files.RunName.parse(os.path.basename(model_path).removesuffix('_model.pth'))
    if own is not None and own != run:
        raise utils.ReirError(f'{model_path} is the model of {own.prefix}, not of the database\'s run {run.prefix}')
    model, transform = trained.load_run(model_path, run.prefix, args.image_size, args.exact_pipeline,
                                        args.data_path)
    data_base.check_embedded_by(database_path, model_path, model.state_dict())
    width = next(iter(database.values()))[2].shape[1]
    if width != model.ensemble_size * model.meta_class_size:
        raise utils.ReirError(f'{model_path} embeds {model.ensemble_size * model.meta_class_size} numbers an image, '
                              f'{database_path} holds {width}: use the model and database one run wrote together')

    def embed(path):
        try:
            query = transform(path)[None]                                        # (1, 3, S, S)
        except utils.UNREADABLE_IMAGE_ERRORS as e:
            raise UnreadableQuery(f'query image {path} is unreadable ({type(e).__name__})') from None
        with torch.inference_mode():
            return model.embedding(query)[0]                                     # (E * M,)
    return embed


def stored_embedding(model_path, database_path, database):
    """query_embedder without a model: the stored embedding of a query that is one of the database's images."""
    stored = {os.path.abspath(path): features[i] for images, _, features in database.values()
              for i, path in enumerate(images)}
    utils.log(f'no model at {model_path}: the query\'s embedding is the one stored in {database_path}')

    def embed(path):
        if os.path.abspath(path) not in stored:
            raise utils.ReirError(f'no model at {model_path} to embed the query with: pass --model <prefix>_model.pth '
                                  f'(the original REIR kept it in epochs/), or query an image of the database')
        return stored[os.path.abspath(path)].float()
    return embed


def query_paths(query):
    """The query images: the file query, or every file under the folder query (as index.py reads a folder)."""
    if os.path.isdir(query):
        return [os.path.join(query, relative) for relative in folder_index.image_files(query)]
    if not os.path.isfile(query):
        raise utils.ReirError(f'query image {query} not found')
    return [query]


def draw(query, results, label, output):
    """Write the grid of a query and its results [(path, similarity, class key)] to output."""
    try:
        grid = figures.draw_grid(query, results, label, ImageFont.load_default())
    except utils.UNREADABLE_IMAGE_ERRORS as e:
        raise utils.ReirError(f'cannot draw a retrieved image ({e}): run from the folder the database was trained '
                              f'in, or keep the dataset where it was') from None
    run_files.atomic_write(output, lambda tmp: grid.save(tmp, format='PNG'))


def main(args):
    database_path = data_base.resolve_database(args.data_base)
    run, paths, kind = data_base.run_of(database_path)
    database = data_base.load_database(database_path)
    split = args.data_type or utils.eval_splits(database, database_path)[-1]  # test, or gallery
    if split not in database:
        raise utils.ReirError(f'{database_path} has no {split} split; it holds {", ".join(database)}')
    queries = query_paths(args.query_img_name)
    embed = query_embedder(args, run, paths['model.pth'], database_path, database)
    images, labels, features = database[split]
    position = {os.path.abspath(path): i for i, path in enumerate(images)}  # a query among them skips itself
    searcher = faiss_search.read_beside(database_path, features.float().numpy()) \
        if kind == data_base.INDEX_KIND and split == folder_index.SPLIT else None
    if searcher is not None:
        utils.log(f'searching with {faiss_search.faiss_path(database_path)} ({type(searcher).__name__})')
    stem = os.path.basename(database_path).removesuffix(f'_{kind}').removesuffix('_index')
    folder = os.path.dirname(database_path)
    rows, unreadable, classes = [], [], classes_by_path(database)
    for query in queries:
        try:
            feature = embed(query)
        except UnreadableQuery:
            if len(queries) == 1:
                raise
            unreadable.append(query)
            continue
        label = classes.get(os.path.abspath(query))
        own = position.get(os.path.abspath(query))
        if searcher is None:
            indices, similarities = retrieve(feature, label, database[split], own, args.retrieval_num)
        else:
            indices, similarities = retrieve_with_faiss(searcher, feature, own, args.retrieval_num, len(images))
        results = [(images[i], s, labels[i]) for i, s in zip(indices, similarities)]
        output = os.path.join(folder, f'{figures.query_name(query)}_{stem}_retrieval.png')
        draw(query, results, label, output)
        print_results(query if len(queries) > 1 else None, results, label, output)
        rows += [dict(query=query, rank=rank, path=path, similarity=round(similarity, 6), label=other,
                      same_class='' if label is None else other == label)
                 for rank, (path, similarity, other) in enumerate(results, start=1)]
    finish(args.query_img_name, rows, unreadable, os.path.join(folder, f'{figures.query_name(args.query_img_name)}_'
                                                                       f'{stem}_retrieval.csv'))


def print_results(query, results, label, output):
    """The results as the lines of the grid, under the query's path where there are several queries."""
    if query is not None:
        print(f'{query}:')
    for rank, (path, similarity, other) in enumerate(results, start=1):
        mark = ' (same class)' if label is not None and other == label else ''
        print(f'{rank}: {similarity:.4f} {path}{mark}')
    print(f'-> {output}')


def finish(query, rows, unreadable, output):
    """Write the CSV of every query's results, after a warning that names the unreadable queries of a folder."""
    if unreadable:
        utils.warn(f'{query}: left out {len(unreadable)} unreadable files: '
                   f'{utils.shown([os.path.relpath(path, query) for path in unreadable])}')
    if not rows:
        raise utils.ReirError(f'{query}: none of its files is an image that can be read')
    run_files.atomic_write(output, run_files.csv_file(rows))
    print(f'-> {output}')


if __name__ == '__main__':
    utils.run_cli(main, get_args_parser().parse_args())
