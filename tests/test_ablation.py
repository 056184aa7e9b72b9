"""ablation.py: two runs compared query by query from their databases, and the per-query count it rests on."""
import os

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import data_base
import figures
import run_files
import utils
from conftest import assert_one_line_error, prefix, run_main


def oracle_same_class_in_top_k(features, labels, k):
    """Sort every query's row in full: by score, an other-class item first among equal scores."""
    counts = []
    for query in range(len(labels)):
        scores = (features @ features[query]).numpy()
        same = (labels == labels[query]).numpy()
        others = [i for i in np.lexsort((same, -scores)) if i != query]
        counts.append(int(same[others[:k]].sum()))
    return counts


@pytest.mark.parametrize('seed', range(4))
def test_same_class_in_top_k_matches_a_full_sort_with_ties(seed):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randint(-2, 3, (40, 3), generator=generator).float()  # few distinct values: many ties
    labels = torch.randint(0, 4, (40,), generator=generator)
    for k in (1, 5, 39):
        counts = utils.same_class_in_top_k(features, labels, k, memory_budget=40 * 8 * 7)  # chunks of 7 queries
        assert counts.tolist() == oracle_same_class_in_top_k(features, labels, k)
        assert (counts > 0).double().mean().item() == pytest.approx(utils.recall(features, labels, [k])[0])


def test_same_class_in_top_k_of_a_query_gallery_split():
    queries, gallery = torch.eye(2), torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert utils.same_class_in_top_k(queries, [0, 1], 2, gallery, [0, 1, 1]).tolist() == [1, 1]
    assert utils.same_class_in_top_k(queries, [0, 1], 9, gallery, [0, 1, 1]).tolist() == [1, 2]  # k capped at 3


def databases(prepared, tmp_path):
    """Two databases of the tiny test split (3 classes of 4 images): 'perfect' embeds each image as its class's
    unit vector; 'confused' gives the images of classes 0 and 1 the same vector."""
    data_dicts = torch.load(prepared / 'data' / 'tiny' / 'uncropped_data_dicts.pth', weights_only=True)
    items = utils.flatten_split(data_dicts['test'])
    classes = sorted(data_dicts['test'])
    perfect = torch.eye(3)[[classes.index(key) for _, key in items]]
    confused = torch.eye(3)[[2 if classes.index(key) == 2 else 1 for _, key in items]]
    paths = []
    for name, features in (('perfect', perfect), ('confused', confused)):
        path = tmp_path / name / 'tiny_uncropped_fixed_unrandom_layer1_resnet18_1_3_data_base.pth'
        path.parent.mkdir()
        run_files.atomic_write(str(path), data_base.database_file({'test': (items, features)},
                                                                  str(prepared / 'data' / 'tiny'), {}, 1, {}))
        paths.append(path)
    return paths


def test_ablation_counts_and_draws_where_the_runs_differ(prepared, tmp_path):
    """Top 4 of 11: 'perfect' finds the 3 same-class images of every query. In 'confused' a query of class 0 or
    1 ties 3 same-class with 4 other-class images, which rank first: 0 found; class 2 queries find 3."""
    better, worse = databases(prepared, tmp_path)
    result = run_main('ablation', '--better_data_base', better, '--worse_data_base', worse, '--retrieval_num', '4',
                      '--examples', '3', '--results_dir', tmp_path / 'out')
    assert result.returncode == 0, result.stderr
    assert 'test: 12 queries, top 4' in result.stdout
    assert 'precision@4 75.00%, R@4 100.00%' in result.stdout            # 3 of 4 for every query
    assert 'precision@4 25.00%, R@4 33.33%' in result.stdout             # 3 of 4 for the 4 class-2 queries only
    assert 'better run for 8 queries, worse run for 0, equal for 4 (two-sided sign test p = 0.00781)' in result.stdout
    name = tmp_path / 'out' / 'ablation_perfect_vs_confused_test_top4'  # equal prefixes: named by their folders
    rows = pd.read_csv(f'{name}.csv')
    assert rows['better_same_class'].tolist() == [3] * 12
    assert rows['worse_same_class'].tolist() == [0] * 8 + [3] * 4
    assert rows['winner'].tolist() == ['better'] * 8 + ['equal'] * 4
    with Image.open(f'{name}.png') as picture:  # 3 queries, a row for each run: query and its top 4
        assert picture.size == (5 * figures.TILE, 6 * (figures.TILE + figures.CAPTION))


def test_ablation_refuses_databases_of_different_images(prepared, tmp_path):
    better, worse = databases(prepared, tmp_path)
    database = torch.load(worse, weights_only=True)
    database['test_images'] = database['test_images'][::-1]  # the images in another order, their classes not
    torch.save(database, worse)
    assert_one_line_error(run_main('ablation', '--better_data_base', better, '--worse_data_base', worse,
                                   '--results_dir', tmp_path), 1, 'hold the same images in other classes')
    database['test_images'] = [path.replace('.jpg', '.png') for path in database['test_images']]
    torch.save(database, worse)
    assert_one_line_error(run_main('ablation', '--better_data_base', better, '--worse_data_base', worse,
                                   '--results_dir', tmp_path), 1, 'hold different query images')
    assert_one_line_error(run_main('ablation', '--better_data_base', better, '--worse_data_base', better,
                                   '--data_type', 'val', '--results_dir', tmp_path), 1, 'has no val split')


def test_each_comparison_keeps_its_own_files_and_no_stale_picture(prepared, tmp_path):
    """Another K is another comparison of the same runs; the same comparison drawing nothing leaves no older PNG."""
    better, worse = databases(prepared, tmp_path)
    out = tmp_path / 'out'
    flags = ['--better_data_base', better, '--worse_data_base', worse, '--results_dir', out]
    for k in (4, 2):
        assert run_main('ablation', *flags, '--retrieval_num', k).returncode == 0
    assert sorted(os.listdir(out)) == [f'ablation_perfect_vs_confused_test_top{k}.{ext}' for k in (2, 4)
                                       for ext in ('csv', 'png')]
    result = run_main('ablation', *flags, '--retrieval_num', 2, '--examples', 0)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == ['ablation_perfect_vs_confused_test_top2.csv',
                                       'ablation_perfect_vs_confused_test_top4.csv',
                                       'ablation_perfect_vs_confused_test_top4.png']


def test_the_original_numbers_by_hand(prepared, tmp_path):
    """Top 4 of 11. AR@K counts only the queries with a same-class image in the top K: 'confused' finds 3 of 4 for
    its 4 class-2 queries and nothing for the 8 others, so its AR@4 is 75%, as 'perfect's (3 of 4 for all 12).
    'partial' separates class 0 and merges 1 with 2: it wins the 4 class-0 queries, loses the 4 class-2 ones and
    ties the 4 class-1 ones against 'confused' (GE Rate 8 / 12, Better Ratio 4 / 4)."""
    perfect, confused = databases(prepared, tmp_path)
    database = torch.load(perfect, weights_only=True)
    features = database['test_features'].float()
    database['test_features'] = torch.stack([features[:, 0], features[:, 1] + features[:, 2]], 1).half()
    partial = tmp_path / 'partial' / perfect.name
    partial.parent.mkdir()
    torch.save(database, partial)
    for better, worse, line in (
            (perfect, confused, 'better data base AR@4:75.00%----worse data base AR@4:75.00%, GE Rate@4:100.00%, '
                                'Better Ratio@4:inf'),
            (confused, perfect, 'better data base AR@4:75.00%----worse data base AR@4:75.00%, GE Rate@4:33.33%, '
                                'Better Ratio@4:0.00'),
            (partial, confused, 'better data base AR@4:75.00%----worse data base AR@4:75.00%, GE Rate@4:66.67%, '
                                'Better Ratio@4:1.00')):
        result = run_main('ablation', '--better_data_base', better, '--worse_data_base', worse, '--retrieval_num', 4,
                          '--examples', 0, '--results_dir', tmp_path / 'out')
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[0] == line


def dominant_colour(image):
    """'green' or 'red': the strongest channel of the frame's corner pixel."""
    r, g, _ = image.getpixel((1, 1))
    return 'green' if g > r else 'red'


def test_save_results_writes_the_original_folders(prepared, tmp_path):
    """For each of the 8 queries 'perfect' wins: query_img.jpg, and the top 4 of each run named by rank and cosine
    similarity, 256 x 256, framed green (same class) or red: 'perfect' ranks the 3 same-class images (similarity 1)
    first, 'confused' 4 other-class images of similarity 1 (ties: other class first)."""
    perfect, confused = databases(prepared, tmp_path)
    out = tmp_path / 'out'
    flags = ['--better_data_base', perfect, '--worse_data_base', confused, '--retrieval_num', 4, '--results_dir', out,
             '--save_results']
    result = run_main('ablation', *flags)
    assert result.returncode == 0, result.stderr
    folder = out / 'perfect----confused'
    assert f'-> {folder}/ (8 queries the better run wins)' in result.stdout
    rows = pd.read_csv(out / 'ablation_perfect_vs_confused_test_top4.csv')
    wins = rows[rows['winner'] == 'better']['query'].tolist()
    assert sorted(os.listdir(folder)) == sorted(figures.query_name(query) for query in wins)
    query_dir = folder / figures.query_name(wins[0])
    assert sorted(os.listdir(query_dir)) == ['better', 'query_img.jpg', 'worse']
    expected = {'better': [('1.0000', 'green')] * 3 + [('0.0000', 'red')], 'worse': [('1.0000', 'red')] * 4}
    for run, images in expected.items():
        assert sorted(os.listdir(query_dir / run)) == [f'retrieval_img_{rank}_{similarity}.jpg'
                                                       for rank, (similarity, _) in enumerate(images, start=1)]
        for rank, (similarity, colour) in enumerate(images, start=1):
            with Image.open(query_dir / run / f'retrieval_img_{rank}_{similarity}.jpg') as image:
                assert image.size == (256, 256) and dominant_colour(image) == colour
    (folder / 'stale').mkdir()  # a later comparison of the same runs replaces the folder whole
    assert run_main('ablation', *flags).returncode == 0
    assert 'stale' not in os.listdir(folder) and len(os.listdir(folder)) == 8
    assert not [name for name in os.listdir(out) if name.startswith('.')]


def test_a_query_gallery_database_holds_the_train_split(trained, tmp_path):
    """As the original's In-shop databases: ablation.py --data_type train compares within the training classes."""
    database = data_base.load_database(str(trained / 'results' / f'{prefix("shop")}_data_base.pth'))
    assert sorted(database) == ['gallery', 'query', 'train'] and len(database['train'][0]) == 12
    path = trained / 'results' / f'{prefix("shop")}_data_base.pth'
    result = run_main('ablation', '--better_data_base', path, '--worse_data_base', path, '--data_type', 'train',
                      '--results_dir', tmp_path)
    assert result.returncode == 0, result.stderr
    assert 'train: 12 queries, top 8' in result.stdout and 'GE Rate@8:100.00%' in result.stdout
