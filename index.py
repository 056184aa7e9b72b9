"""Embed a folder of one's own images with a trained run, to search it with inference.py.

    python index.py results/cub_uncropped_fixed_unrandom_layer1_resnet18_48_12_model.pth --images ~/photos
    python index.py results/<prefix> --images ~/photos --update             # the files added or changed since
    python index.py results/<prefix> --images data/cub/images --labels folders --faiss hnsw

Embeds every image under the folder (recursively; every file a dataset would hold, unreadable ones listed and left
out, as data_utils.py does) with the run's model and input pipeline, and writes <results_dir>/<prefix>_<name>_index.pth,
a gallery in the format of a run's embedding database that names the model that embedded it: inference.py searches
it, and with --labels folders (each image's class its first folder) evaluate.py scores it and ablation.py compares two
runs' indexes of it. RUN is what torch.hub takes: a run's <prefix>_model.pth, results/<prefix>, or the original REIR's
epochs/<prefix>_model.pth.

The embeddings are written in parts as they are made: a stopped index (SIGTERM, SIGUSR1, a kill) continues with the
same command where it stopped. --faiss also writes a faiss index beside it (flat, IVF or HNSW), which inference.py then
searches with, and prints its Recall@K against the exact search.
"""
import argparse
import os

import numpy as np

import data_base
import engine
import faiss_search
import folder_index
import resume
import run_files
import trained
import utils


def get_args_parser():
    parser = argparse.ArgumentParser(description='Embed a folder of images with a trained run, to search it')
    parser.add_argument('run', help='the run\'s <prefix>_model.pth or results/<prefix> (also the original REIR\'s '
                                    'epochs/<prefix>_model.pth)')
    parser.add_argument('--images', required=True, help='the folder of images, searched recursively')
    parser.add_argument('--name', default=None, type=index_name, help='the index\'s name (default: the folder\'s)')
    parser.add_argument('--labels', default='none', choices=data_base.INDEX_LABELS,
                        help='folders: each image\'s class is its first folder under --images (evaluate.py can then '
                             'score the index); none: no classes')
    parser.add_argument('--results_dir', default=None, help='where the index goes (default: the run\'s folder)')
    again = parser.add_mutually_exclusive_group()
    again.add_argument('--update', action='store_true',
                       help='embed only the files added or changed since the index was written; removed ones leave it')
    again.add_argument('--overwrite', action='store_true', help='index the folder anew, replacing its index')
    parser.add_argument('--faiss', default=None, choices=faiss_search.KINDS,
                        help='also write a faiss index of this kind beside it (needs faiss: pip install faiss-cpu)')
    parser.add_argument('--prefix', default=None,
                        help='the run\'s prefix, for a model file whose name does not carry it')
    parser.add_argument('--data_path', default=None, help='prepared datasets, for a run whose normalization its files '
                                                         'no longer record')
    engine.add_embedding_flags(parser)
    return parser


def index_name(text):
    """An index's name: one file name's part, as a folder's name is."""
    if not text or '/' in text or os.sep in text or text in ('.', '..') or text.startswith('.'):
        raise argparse.ArgumentTypeError(f'{text!r} is not a name for the index (no slashes, not hidden)')
    return text


def faiss_kind(args, stored):
    """The faiss index to write: --faiss, else the kind the earlier index had (an update keeps it matching)."""
    kind = args.faiss or (stored[data_base.INDEX_RECORD].get('faiss') if stored is not None else None)
    if kind is not None and not faiss_search.available():
        raise utils.UsageError(f'{"--faiss" if args.faiss else "the index has a faiss index beside it, which"} '
                               f'needs faiss: {faiss_search.INSTALL}; without --faiss the exact search needs nothing '
                               f'more' + ('' if args.faiss else ' (remove the .faiss file to go on without it)'))
    return kind


def embedder_of(opened, args):
    """The Embedder of the run's model, placed as evaluate.py places it (the first GPU of --gpu_ids)."""
    device, gpu_ids = engine.select_devices(args.gpu_ids)
    process = engine.Process(0, 1, device, gpu_ids[:1])
    model = engine.place_model(opened.model, process, (args.batch_size, opened.embedding['image_size']), args.amp,
                               training=False)
    model = engine.unwrap(model).eval()
    return folder_index.Embedder(model, opened.preprocess, device, args.amp, args.batch_size, args.num_workers), device


def with_faiss(kind, features, device):
    """(the faiss index of kind over the (N, d) float16 features, {K: Recall@K against the exact search}, queries),
    or (None, None, 0) without a kind."""
    if kind is None:
        return None, None, 0
    vectors = np.ascontiguousarray(features.float().numpy())
    index = faiss_search.build(vectors, kind, gpu=device.index if device.type == 'cuda' else None)
    recalls, queries = faiss_search.recall_against_exact(index, vectors)
    return index, recalls, queries


def main(args):
    opened = trained.open_run(args.run, args.prefix, args.image_size, args.exact_pipeline, args.data_path)
    name = args.name or index_name(os.path.basename(os.path.abspath(args.images)))
    results_dir = args.results_dir or os.path.dirname(opened.path) or '.'
    path = folder_index.index_path(results_dir, opened.name, name)
    parts = folder_index.parts_folder(path)
    files = folder_index.image_files(args.images, own=(path, faiss_search.faiss_path(path), parts))
    folder_index.check_labels(files, args.labels, args.images)
    with folder_index.lock(path), resume.StopSignals(path) as signals, signals.deferred():
        stored = folder_index.earlier_index(path, args.images, args.update, args.overwrite)
        kind = faiss_kind(args, stored)
        embedder, device = embedder_of(opened, args)
        source = folder_index.source_of(args.images, opened, args.amp)
        known = folder_index.known_embeddings(stored, path, source)
        todo = folder_index.files_to_embed(files, known)
        if todo:
            os.makedirs(parts, exist_ok=True)
            folder_index.embed_in_parts(todo, args.images, embedder, parts, source, signals)
            known = folder_index.known_embeddings(stored, path, source, quiet=True)
        if signals.received:
            raise utils.Stopped(f'stopped by {signals.received} with every file embedded: run the same command to '
                                f'write the index')
        items, features, records, unreadable = folder_index.gallery(files, known, args.labels)
        if features is None:
            folder_index.remove_parts(path)
            raise utils.ReirError(f'{args.images}: none of its {len(files)} files is an image that can be read '
                                  f'({utils.shown(list(files))})')
        faiss_index, recalls, queries = with_faiss(kind, features, device)
        record = dict(prefix=opened.name.prefix, name=name, labels=args.labels, source=source, files=records,
                      unreadable=unreadable, faiss=kind, model=os.path.abspath(opened.path))
        run_files.save_together(folder_index.index_writers(path, args.images, (items, features, record), opened,
                                                           faiss_index))
        if kind is None and os.path.exists(faiss_search.faiss_path(path)):
            os.remove(faiss_search.faiss_path(path))  # an earlier index's, which --overwrite replaced without one
        folder_index.remove_parts(path)
    report(path, args, (files, todo, stored, unreadable, items), recalls, queries)


def report(path, args, counts, recalls, queries):
    """The lines that say what the index holds, what was embedded, and the faiss index's recall."""
    files, todo, stored, unreadable, items = counts
    if unreadable:
        utils.warn(f'{args.images}: left out {len(unreadable)} unreadable files: '
                   f'{utils.shown([relative for relative, *_ in unreadable])}')
    classes = f' of {len(set(label for _, label in items))} classes' if args.labels == 'folders' else ''
    done = f'{path}: {len(items)} images{classes} of {args.images}; embedded {len(todo)} files'
    if stored is not None:
        record = stored[data_base.INDEX_RECORD]
        removed = {relative for relative, *_ in record['files'] + record['unreadable']} - set(files)
        done += f' added or changed since the index of {len(record["files"])} images, {len(removed)} removed'
    print(done)
    if recalls:
        print(f'faiss {args.faiss or "index"} -> {faiss_search.faiss_path(path)}: '
              + ', '.join(f'Recall@{k} {100 * r:.2f}%' for k, r in recalls.items())
              + f' against the exact search ({queries} gallery images as queries)')
    print(f'-> {path}')


if __name__ == '__main__':
    utils.run_cli(main, get_args_parser().parse_args())
