"""Compare two runs query by query, from their embedding databases, as the original REIR's ablation.py does.

    python ablation.py --better_data_base car_uncropped_fixed_unrandom_layer1_resnet18_48_12_data_base.pth \
        --worse_data_base car_uncropped_random_unrandom_layer1_resnet18_48_12_data_base.pth --save_results

For every query of a split (test: every test image against the others, or the query split against the gallery;
train or val: within that split) counts the same-class images among each run's top --retrieval_num (K), ties
ordered as the metrics order them, and prints the original's three numbers:

- AR@K: of the queries with at least one same-class image in a run's top K, the share of their top K that is
  same-class;
- GE Rate@K: the share of queries for which the better run retrieves at least as many as the worse;
- Better Ratio@K: queries where the better run retrieves more, divided by those where it retrieves fewer;

then for how many queries each run retrieves more, with a sign test. Writes
results/ablation_<run>_vs_<run>_<data_type>_top<K>.csv (a row per query) and .png (the queries where the runs
disagree most, each run's top images framed green, same class, or red). --save_results also writes the original's
folders: results/<better>----<worse>/<query>/ with query_img.jpg and better/ and worse/, each run's top K as
retrieval_img_<rank>_<similarity>.jpg, for every query where the better run retrieves more. Databases the
original REIR saved can be compared, with each other or with this repository's (their images are matched by
file name).
"""
import argparse
import contextlib
import os
import shutil
import tempfile

import numpy as np
import torch
from PIL import ImageFont
from scipy import stats
from tqdm import tqdm

import data_base
import figures
import original
import run_files
import utils

RUNS = ('better', 'worse')  # the original's names for the two databases: the run expected to win, and the other


def get_args_parser():
    parser = argparse.ArgumentParser(description='Compare two runs query by query from their embedding databases')
    parser.add_argument('--better_data_base', required=True, help='<prefix>_data_base.pth: a path or a name under '
                                                                  'results/ (the run expected to retrieve better)')
    parser.add_argument('--worse_data_base', required=True, help='the run to compare it with')
    parser.add_argument('--data_type', default='test', choices=('test', 'train', 'val'),
                        help='test: the evaluation split (query against gallery where the dataset has them); train '
                             'or val (the held-out classes of --val_classes): within that split')
    parser.add_argument('--retrieval_num', default=8, type=utils.positive_int, help='top K compared per query')
    parser.add_argument('--examples', default=6, type=utils.int_in_range(0),
                        help='queries drawn, those where the two runs differ most')
    parser.add_argument('--save_results', action='store_true',
                        help='also write, for every query the better run wins, the query and both runs\' top K framed '
                             'green or red into results/<better>----<worse>/<query>/ (the original\'s folders)')
    parser.add_argument('--results_dir', default=run_files.RESULTS_DIR)
    return parser


def retrieval_task(database, path, data_type):
    """(query images, query labels, query features, gallery features or None, gallery images, gallery labels)
    of a database's split; None gallery features: the queries are their own gallery."""
    if data_type == 'test' and 'test' not in database and all(s in database for s in ('query', 'gallery')):
        (images, labels, features), gallery = database['query'], database['gallery']
        return images, labels, features, gallery[2], gallery[0], gallery[1]
    if data_type not in database:
        unfinished = ' (a run adds its training images after its last epoch: finish it with --resume)' \
            if data_type == 'train' else ''
        raise utils.ReirError(f'{path} has no {data_type} split{unfinished}; it holds {", ".join(sorted(database))}')
    images, labels, features = database[data_type]
    return images, labels, features, None, images, labels


def comparable(task, reference, paths):
    """task, the second database's, in the order of reference, the first's: as it is when both name the same images
    with the same classes; else its images matched to the reference's by name (original.image_order: the original
    REIR's databases name its copies of the images), and its classes checked to be the reference's: the same class
    keys, or, against the original's numbers (it numbered the classes of each split from 0), the same grouping of the
    images."""
    images, labels, features, gallery, gallery_images, gallery_labels = task
    if (images, labels, gallery_images, gallery_labels) == (reference[0], reference[1], reference[4], reference[5]):
        return task
    query_order = original.image_order(reference[0], images)
    gallery_order = query_order if gallery is None else original.image_order(reference[4], gallery_images)
    for order, what in ((query_order, 'query'), (gallery_order, 'gallery')):
        if order is None:
            raise utils.ReirError(f'{paths[0]} and {paths[1]} hold different {what} images: compare two runs of one '
                                  f'dataset and split')
    named = reference[1] + reference[5]
    renamed = [labels[i] for i in query_order] + [gallery_labels[i] for i in gallery_order]
    if {type(key) for key in named} == {type(key) for key in renamed}:  # both class keys, or both numbers
        same_classes = named == renamed
    else:
        pairs = set(zip(named, renamed))
        same_classes = len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs})
    if not same_classes:
        raise utils.ReirError(f'{paths[0]} and {paths[1]} hold the same images in other classes: compare two runs of '
                              f'one dataset')
    return (reference[0], reference[1], features[query_order],
            None if gallery is None else gallery[gallery_order], reference[4], reference[5])


def top_images(task, query, k):
    """Indices and similarities of a query's top k gallery items, in the order the metrics rank them (an
    other-class item before a same-class item of equal score)."""
    images, labels, features, gallery, gallery_images, gallery_labels = task
    scores = ((features if gallery is None else gallery).float() @ features[query].float()).numpy()
    if gallery is None:
        scores[query] = -np.inf
    order = utils.ranking(scores, [label == labels[query] for label in gallery_labels],
                          min(k, len(scores) - (gallery is None)))
    return order, scores[order].tolist()


def run_names(paths):
    """The two runs' names: their prefixes, or their folders where the prefixes are equal (runs of a study), so that
    the comparisons of other runs keep files of their own."""
    names = [os.path.basename(path).removesuffix('_data_base.pth').removesuffix(f'_{data_base.INDEX_KIND}')
             for path in paths]
    if names[0] == names[1]:
        names = [os.path.basename(os.path.dirname(os.path.abspath(path))) for path in paths]
    return names


def original_numbers(counts, k):
    """The original ablation.py's AR@K of each run, GE Rate@K and Better Ratio@K (in percent, but the ratio), from
    the runs' same-class counts per query."""
    average_recalls = []
    for run_counts in counts:
        hit = run_counts > 0
        average_recalls.append(100 * run_counts[hit].sum().item() / (k * hit.sum().item()) if hit.any() else 0.0)
    better, worse = int((counts[0] > counts[1]).sum()), int((counts[0] < counts[1]).sum())
    ge_rate = 100 * (len(counts[0]) - worse) / len(counts[0])
    better_ratio = better / worse if worse else float('inf')
    return average_recalls, ge_rate, better_ratio


def draw_disagreements(tasks, counts, k, count):
    """Two rows for each of the count queries where the runs' numbers of same-class images differ most."""
    difference = (counts[0] - counts[1]).abs()
    chosen = [q for q in torch.argsort(difference, descending=True, stable=True).tolist() if difference[q] > 0][:count]
    if not chosen:
        return None
    font = ImageFont.load_default()
    rows = []
    for query in chosen:
        for run, task, run_counts in zip(RUNS, tasks, counts):
            indices, scores = top_images(task, query, k)
            results = [(task[4][i], s, task[5][i]) for i, s in zip(indices, scores)]
            rows.append(figures.draw_grid(task[0][query], results, task[1][query], font,
                                          query_caption=f'{run}: {int(run_counts[query])} of {len(indices)}'))
    return figures.stack(rows)


def save_results(tasks, counts, k, folder):
    """The original's --save_results: for every query the better run wins, folder/<query>/query_img.jpg and better/
    and worse/, each run's top k as retrieval_img_<rank>_<similarity>.jpg (the cosine similarity, which is the
    original's mean over the members), 256 x 256 and framed green or red as the original's were (5 and 8 pixels).
    The folder is written beside its place and then put there whole, replacing an earlier one of these two runs."""
    wins = torch.nonzero(counts[0] > counts[1]).flatten().tolist()
    norms = [(task[2] if task[3] is None else task[3]).float().norm(dim=1) for task in tasks]  # (N,) of each run
    parent = os.path.dirname(folder) or '.'
    with writing(folder):
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(dir=parent, prefix=f'.{os.path.basename(folder)}.')
    try:
        for query in tqdm(wins, desc='saving the queries the better run wins', leave=False):
            query_path, query_label = tasks[0][0][query], tasks[0][1][query]
            query_dir = os.path.join(staging, figures.query_name(query_path))
            images = {os.path.join(query_dir, 'query_img.jpg'): figures.framed(query_path)}
            for run, task, gallery_norms, width in zip(RUNS, tasks, norms, (5, 8)):
                query_norm = task[2][query].float().norm().item()
                indices, scores = top_images(task, query, k)
                for rank, (i, score) in enumerate(zip(indices, scores), start=1):
                    norm = query_norm * gallery_norms[i].item()
                    cosine = score / norm if norm else 0.0  # an all-zero embedding (a collapsed model)
                    image = figures.framed(task[4][i], task[5][i] == query_label, width)
                    images[os.path.join(query_dir, run, f'retrieval_img_{rank}_{cosine:.4f}.jpg')] = image
            with writing(folder):
                for path, image in images.items():
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    image.save(path)
        with writing(folder):
            replace_folder(staging, folder)
    except utils.UNREADABLE_IMAGE_ERRORS as e:
        raise utils.ReirError(f'cannot save the retrieved images ({e}): run from the folder the databases were '
                              f'written in, or keep the dataset where it was') from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return len(wins)


@contextlib.contextmanager
def writing(folder):
    """A failed write of the results folder as one line, in the operating system's words (ReirError is no OSError, so
    that it is not taken for an unreadable image)."""
    try:
        yield
    except OSError as e:
        raise utils.ReirError(f'could not write {folder} ({e.strerror or e}); an earlier folder there is '
                              f'unchanged') from None


def replace_folder(new, folder):
    """Put the folder new at folder, an earlier folder there removed only once the new one is in place."""
    old = None
    if os.path.exists(folder):
        old = tempfile.mkdtemp(dir=os.path.dirname(new), prefix=f'.{os.path.basename(folder)}.old.')
        os.rename(folder, os.path.join(old, 'folder'))
    os.rename(new, folder)
    if old:
        shutil.rmtree(old)


def main(args):
    paths = [data_base.resolve_database(name) for name in (args.better_data_base, args.worse_data_base)]
    tasks = [retrieval_task(data_base.load_run_database(path), path, args.data_type) for path in paths]
    tasks[1] = comparable(tasks[1], tasks[0], paths)
    numbered = utils.class_indices({'query': tasks[0][1], 'gallery': tasks[0][5]})
    query_labels, gallery_labels = torch.tensor(numbered['query']), torch.tensor(numbered['gallery'])
    counts = []
    for _, _, features, gallery, _, _ in tasks:
        counts.append(utils.same_class_in_top_k(features.float(), query_labels, args.retrieval_num,
                                                None if gallery is None else gallery.float(),
                                                None if gallery is None else gallery_labels))
    k = min(args.retrieval_num, len(tasks[0][4]) - (tasks[0][3] is None))
    better, worse = int((counts[0] > counts[1]).sum()), int((counts[0] < counts[1]).sum())
    equal = len(counts[0]) - better - worse
    p_value = stats.binomtest(better, better + worse).pvalue if better + worse else 1.0
    average_recalls, ge_rate, better_ratio = original_numbers(counts, k)

    names = run_names(paths)
    name = os.path.join(args.results_dir, f'ablation_{names[0]}_vs_{names[1]}_{args.data_type}_top{k}')
    rows = [{'query': image, 'label': label, 'better_same_class': int(a), 'worse_same_class': int(b),
             'winner': 'better' if a > b else 'worse' if b > a else 'equal'}
            for image, label, a, b in zip(tasks[0][0], tasks[0][1], counts[0].tolist(), counts[1].tolist())]
    try:
        picture, unreadable = draw_disagreements(tasks, counts, k, args.examples), None
    except utils.UNREADABLE_IMAGE_ERRORS as e:  # the numbers need no image: the original's database names its copies
        picture, unreadable = None, e
    writers = {name + '.csv': run_files.csv_file(rows)}
    if picture is not None:
        writers[name + '.png'] = lambda tmp: picture.save(tmp, format='PNG')
    run_files.save_together(writers)
    if picture is None and os.path.exists(name + '.png'):
        os.remove(name + '.png')  # an earlier comparison's picture, which these numbers no longer show
    if args.save_results:
        folder = os.path.join(args.results_dir, f'{names[0]}----{names[1]}')
        saved = save_results(tasks, counts, k, folder)

    print(f'better data base AR@{k}:{average_recalls[0]:.2f}%----worse data base AR@{k}:{average_recalls[1]:.2f}%, '
          f'GE Rate@{k}:{ge_rate:.2f}%, Better Ratio@{k}:{better_ratio:.2f}')
    print(f'{args.data_type}: {len(rows)} queries, top {k}')
    for run, path, run_counts in zip(RUNS, paths, counts):
        print(f'  {run} ({path}): precision@{k} {100 * run_counts.float().mean().item() / k:.2f}%, '
              f'R@{k} {100 * (run_counts > 0).float().mean().item():.2f}%')
    print(f'  more same-class images in the top {k}: better run for {better} queries, worse run for {worse}, equal '
          f'for {equal} (two-sided sign test p = {p_value:.3g})')
    if unreadable:
        utils.warn(f'no picture: an image of the databases cannot be read here ({unreadable}); the numbers and the '
                   f'CSV need none')
    elif picture is None and args.examples:
        print('  no query where the runs differ: nothing to draw')
    print(f'-> {" and ".join(writers)}')
    if args.save_results:
        print(f'-> {folder}/ ({saved} queries the better run wins)')


if __name__ == '__main__':
    utils.run_cli(main, get_args_parser().parse_args())
