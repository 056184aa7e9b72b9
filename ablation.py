"""Compare two runs query by query, from their embedding databases, as the original REIR's ablation.py does.

    python ablation.py --better_data_base car_uncropped_fixed_unrandom_layer1_resnet18_48_12_data_base.pth \
        --worse_data_base car_uncropped_random_unrandom_layer1_resnet18_48_12_data_base.pth

For every query of a split (test: every test image against the others, or the query split against the gallery;
train or val: within that split) counts the same-class images among each run's top --retrieval_num, and says
for how many queries each run retrieves more of them (with a sign test on the queries where they differ).
Writes results/ablation_<run>_vs_<run>_<data_type>_top<K>.csv (a row per query) and .png: for the queries where the
runs disagree most, the query and each run's top images, framed green (same class) or red.
"""
import argparse
import os

import numpy as np
import torch
from PIL import ImageFont
from scipy import stats

import figures
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
    parser.add_argument('--results_dir', default=run_files.RESULTS_DIR)
    return parser


def retrieval_task(database, path, data_type):
    """(query images, query labels, query features, gallery features or None, gallery images, gallery labels)
    of a database's split; None gallery features: the queries are their own gallery."""
    if data_type == 'test' and 'test' not in database and all(s in database for s in ('query', 'gallery')):
        (images, labels, features), gallery = database['query'], database['gallery']
        return images, labels, features, gallery[2], gallery[0], gallery[1]
    if data_type not in database:
        raise utils.ReirError(f'{path} has no {data_type} split; it holds {", ".join(sorted(database))}')
    images, labels, features = database[data_type]
    return images, labels, features, None, images, labels


def check_comparable(tasks, paths):
    """Both databases must rank the same images with the same classes."""
    first, second = tasks
    for position, what in ((0, 'query images'), (1, 'query labels'), (4, 'gallery images'), (5, 'gallery labels')):
        if first[position] != second[position]:
            raise utils.ReirError(f'{paths[0]} and {paths[1]} hold different {what}: compare two runs of one '
                                  f'dataset and split')


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


def comparison_name(paths, data_type, k):
    """ablation_<prefix>_vs_<prefix>_<data_type>_top<k>, with the runs' folders where the prefixes are equal (runs of
    a study): each comparison of the same two runs on another split or K keeps its own files."""
    names = [os.path.basename(path).removesuffix('_data_base.pth') for path in paths]
    if names[0] == names[1]:
        names = [os.path.basename(os.path.dirname(os.path.abspath(path))) for path in paths]
    return f'ablation_{names[0]}_vs_{names[1]}_{data_type}_top{k}'


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


def main(args):
    paths = [run_files.resolve_database(name) for name in (args.better_data_base, args.worse_data_base)]
    tasks = [retrieval_task(run_files.load_database(path), path, args.data_type) for path in paths]
    check_comparable(tasks, paths)
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

    name = os.path.join(args.results_dir, comparison_name(paths, args.data_type, k))
    rows = [{'query': image, 'label': label, 'better_same_class': int(a), 'worse_same_class': int(b),
             'winner': 'better' if a > b else 'worse' if b > a else 'equal'}
            for image, label, a, b in zip(tasks[0][0], tasks[0][1], counts[0].tolist(), counts[1].tolist())]
    picture = draw_disagreements(tasks, counts, k, args.examples)
    writers = {name + '.csv': run_files.csv_file(rows)}
    if picture is not None:
        writers[name + '.png'] = lambda tmp: picture.save(tmp, format='PNG')
    run_files.save_together(writers)
    if picture is None and os.path.exists(name + '.png'):
        os.remove(name + '.png')  # an earlier comparison's picture, which these numbers no longer show

    print(f'{args.data_type}: {len(rows)} queries, top {k}')
    for run, path, run_counts in zip(RUNS, paths, counts):
        print(f'  {run} ({path}): precision@{k} {100 * run_counts.float().mean().item() / k:.2f}%, '
              f'R@{k} {100 * (run_counts > 0).float().mean().item():.2f}%')
    print(f'  more same-class images in the top {k}: better run for {better} queries, worse run for {worse}, equal '
          f'for {equal} (two-sided sign test p = {p_value:.3g})')
    if picture is None and args.examples:
        print('  no query where the runs differ: nothing to draw')
    print(f'-> {" and ".join(writers)}')


if __name__ == '__main__':
    utils.run_cli(main, get_args_parser().parse_args())
