import os
import shutil

import pytest
import torch
from PIL import Image

import data_base
import figures
import inference
import utils
from conftest import assert_one_line_error, copy_of_run, prefix, run_main, run_train, write_image


def test_retrieval_grid_for_a_database_image(trained):
    query = trained / 'data' / 'tiny' / 'test' / 'class_01' / '0.jpg'
    database = trained / 'results' / f'{prefix()}_data_base.pth'
    result = run_main('inference', '--query_img_name', query, '--data_base', database, '--retrieval_num', '5')
    assert result.returncode == 0, result.stderr
    output = trained / 'results' / f'{figures.query_name(str(query))}_{prefix()}_retrieval.png'
    with Image.open(output) as grid:
        assert grid.size == (6 * figures.TILE, figures.TILE + figures.CAPTION)
        grid = grid.convert('RGB')
        # every retrieved tile is framed green or red: its top-left pixel is one of the two colours
        frames = {grid.getpixel((i * figures.TILE + 1, 1)) for i in range(1, 6)}
        assert frames <= {figures.GREEN, figures.RED} and frames
    lines = [line for line in result.stdout.splitlines() if line[:1].isdigit()]
    assert len(lines) == 5 and str(query) not in result.stdout.split('->')[0]


def test_query_from_outside_the_dataset_has_no_frames(trained, tmp_path):
    query = tmp_path / 'holiday.jpg'
    write_image(str(query), size=(50, 70), seed=9)
    result = run_main('inference', '--query_img_name', query, '--data_base',
                      trained / 'results' / f'{prefix()}_data_base.pth', '--data_type', 'train')
    assert result.returncode == 0, result.stderr
    with Image.open(trained / 'results' / f'{figures.query_name(str(query))}_{prefix()}_retrieval.png') as grid:
        assert grid.width == 9 * figures.TILE
        assert grid.convert('RGB').getpixel((figures.TILE + 1, 1)) == figures.WHITE


def test_query_gallery_database_searches_the_gallery(trained):
    query = trained / 'data' / 'shop' / 'query' / 'class_00' / '0.jpg'
    result = run_main('inference', '--query_img_name', query, '--data_base',
                      trained / 'results' / f'{prefix("shop")}_data_base.pth', '--retrieval_num', '3')
    assert result.returncode == 0, result.stderr
    retrieved = [line.split()[2] for line in result.stdout.splitlines() if line[:1].isdigit()]
    assert len(retrieved) == 3 and all('/gallery/' in path for path in retrieved)


def test_database_by_name_under_results(trained, monkeypatch):
    monkeypatch.chdir(trained)
    query = trained / 'data' / 'tiny' / 'test' / 'class_00' / '1.jpg'
    result = run_main('inference', '--query_img_name', query, '--data_base', f'{prefix()}_data_base.pth')
    assert result.returncode == 0, result.stderr


def test_missing_database_or_query(trained, monkeypatch):
    monkeypatch.chdir(trained)
    assert_one_line_error(run_main('inference', '--query_img_name', 'x.jpg', '--data_base', 'nope_data_base.pth'),
                          1, 'not found')
    result = run_main('inference', '--query_img_name', trained / 'missing.jpg', '--data_base',
                      trained / 'results' / f'{prefix()}_data_base.pth')
    assert_one_line_error(result, 1, 'query image')
    result = run_main('inference', '--query_img_name', 'x.jpg', '--data_base', 'x', '--retrieval_num', '0')
    assert result.returncode == 2 and 'retrieval_num' in result.stderr and 'Traceback' not in result.stderr


def test_decompression_bomb_query_is_refused(trained, tmp_path):
    query = tmp_path / 'bomb.png'
    Image.new('1', (14_000, 14_000)).save(query)  # 196 million pixels: more than twice PIL's limit
    result = run_main('inference', '--query_img_name', query, '--data_base',
                      trained / 'results' / f'{prefix()}_data_base.pth')
    assert_one_line_error(result, 1, 'unreadable', 'DecompressionBombError')


def test_database_paths_work_from_another_working_folder(trained, tmp_path, monkeypatch):
    """A run trained with relative paths (data/tiny/...) read from another folder: the database says where
    they start."""
    database = torch.load(trained / 'results' / f'{prefix()}_data_base.pth', weights_only=True)
    for key in [k for k in database if k.endswith('_images')]:
        database[key] = [os.path.relpath(path, trained) for path in database[key]]
    database['working_dir'] = str(trained)
    path = tmp_path / f'{prefix()}_data_base.pth'
    torch.save(database, path)
    monkeypatch.chdir(tmp_path)
    images = data_base.load_database(str(path))['test'][0]
    assert images[0] == os.path.join(str(trained), database['test_images'][0]) and os.path.isfile(images[0])


def test_queries_of_one_name_in_two_folders_get_a_grid_each(trained, tmp_path):
    database = tmp_path / f'{prefix()}_data_base.pth'
    for kind in ('model.pth', 'data_base.pth', 'args.json'):
        (tmp_path / f'{prefix()}_{kind}').write_bytes((trained / 'results' / f'{prefix()}_{kind}').read_bytes())
    queries = [trained / 'data' / 'tiny' / 'test' / f'class_0{c}' / '0.jpg' for c in (0, 1)]
    for query in queries:
        assert run_main('inference', '--query_img_name', query, '--data_base', database).returncode == 0
    grids = sorted(name for name in os.listdir(tmp_path) if name.endswith('_retrieval.png'))
    assert grids == sorted(f'{figures.query_name(str(query))}_{prefix()}_retrieval.png' for query in queries)
    assert len(set(grids)) == 2 and all(name.startswith('0-') for name in grids)


@pytest.mark.parametrize('k', [1, 2, 3, 4])
def test_the_grid_ranks_ties_as_the_metrics_do(k):
    """Among equal scores an image of another class goes before one of the query's class, as in every metric: the
    grid's top k holds as many images of the query's class as the metrics count."""
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # the first three score alike
    labels = ['a', 'b', 'a', 'b']
    split = ([f'{i}.jpg' for i in range(4)], labels, features)
    top, scores = inference.retrieve(torch.tensor([1.0, 0.0]), 'a', split, None, k)
    assert top == [1, 0, 2, 3][:k] and scores == [1.0, 1.0, 1.0, 0.0][:k]
    counted = utils.same_class_in_top_k(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), k, features,
                                        torch.tensor([0, 1, 0, 1]))
    assert sum(labels[i] == 'a' for i in top) == int(counted[0])


def test_a_database_names_its_model_and_another_model_is_refused(trained, tmp_path):
    """Run B (the same prefix in another folder, other weights): its model cannot embed a query for run A's database,
    and a database beside a model that did not embed it is neither scored nor compared."""
    results = trained / 'results'
    database = results / f'{prefix()}_data_base.pth'
    weights = torch.load(results / f'{prefix()}_model.pth', weights_only=True)
    assert torch.load(database, weights_only=True)['model_fingerprint'] == utils.weights_fingerprint(weights)
    other = tmp_path / 'other'
    other.mkdir()
    weights['classifier.weight' if 'classifier.weight' in weights else next(iter(weights))].add_(1)
    torch.save(weights, other / f'{prefix()}_model.pth')
    shutil.copy(results / f'{prefix()}_args.json', other)
    query = trained / 'data' / 'tiny' / 'test' / 'class_01' / '0.jpg'
    result = run_main('inference', '--query_img_name', query, '--data_base', database, '--model',
                      other / f'{prefix()}_model.pth')
    assert_one_line_error(result, 1, 'was embedded by another model than', str(other))
    shutil.copy(database, other)
    mixed = other / f'{prefix()}_data_base.pth'
    assert_one_line_error(run_main('evaluate', mixed), 1, 'was embedded by another model')
    assert_one_line_error(run_main('ablation', '--better_data_base', mixed, '--worse_data_base', database,
                                   '--results_dir', tmp_path / 'out'), 1, 'was embedded by another model')
    assert run_main('ablation', '--better_data_base', database, '--worse_data_base', database, '--results_dir',
                    tmp_path / 'out').returncode == 0


@pytest.mark.parametrize('fingerprint', ['removed', None, 5, 'not hexadecimal!'])
def test_a_database_of_this_repository_that_names_no_model_is_refused(trained, tmp_path, fingerprint):
    """Only the original REIR's layout may lack the model's name: a database of this repository without it (removed,
    or not a fingerprint) is neither queried, scored nor compared."""
    results = copy_of_run(trained, tmp_path)
    database = results / f'{prefix()}_data_base.pth'
    stored = torch.load(database, weights_only=True)
    if fingerprint == 'removed':
        del stored['model_fingerprint']
    else:
        stored['model_fingerprint'] = fingerprint
    torch.save(stored, database)
    query = trained / 'data' / 'tiny' / 'test' / 'class_01' / '0.jpg'
    for result in (run_main('inference', '--query_img_name', query, '--data_base', database),
                   run_main('evaluate', database),
                   run_main('ablation', '--better_data_base', database, '--worse_data_base', database,
                            '--results_dir', tmp_path / 'out')):
        assert_one_line_error(result, 1, 'names no model that embedded it', 'train.py --resume')
    if fingerprint == 'removed':  # as the line says, the run writes it again
        assert run_train(trained, '--resume', results=results).returncode == 0
        assert run_main('evaluate', database).returncode == 0
