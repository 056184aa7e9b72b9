import os
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data_utils
import utils
from conftest import assert_one_line_error, make_folder_dataset, run_main, write_image


def load_dicts(root, crop_type='uncropped'):
    return torch.load(os.path.join(root, f'{crop_type}_data_dicts.pth'), weights_only=True)


def prepare(root):
    return data_utils.prepare(os.path.dirname(root), os.path.basename(root), num_workers=2)


def all_paths(split_dict):
    return [p for paths in split_dict.values() for p in paths]


def assert_relative_and_existing(root, data_dicts, splits):
    for split in splits:
        for path in all_paths(data_dicts[split]):
            assert not os.path.isabs(path) and '..' not in path
            assert os.path.isfile(os.path.join(root, path)), path


def test_car_split_boundary_crops_and_stats(car_root):
    summary = prepare(str(car_root))
    assert len(summary) == 2
    dicts = load_dicts(car_root)
    assert sorted(dicts['train'], key=int) == ['1', '97', '98']
    assert sorted(dicts['test'], key=int) == ['99', '100', '196']
    assert (dicts['mean'], dicts['std']) == data_utils.KNOWN_STATS['car']
    assert_relative_and_existing(car_root, dicts, ('train', 'test'))

    cropped = load_dicts(car_root, 'cropped')
    assert_relative_and_existing(car_root, cropped, ('train', 'test'))
    for i, path in enumerate(sorted(all_paths(cropped['train']) + all_paths(cropped['test']))):
        assert path.startswith('cropped/car_ims/')
        with Image.open(car_root / path) as crop:  # the fixture's boxes: x1, 5, x1 + 30 + i, 40
            assert crop.size == (30 + i, 35)


def test_cub_split_boundary_and_float_boxes(cub_root):
    prepare(str(cub_root))
    dicts = load_dicts(cub_root)
    assert sorted(dicts['train'], key=int) == ['1', '2', '100']
    assert sorted(dicts['test'], key=int) == ['101', '150', '200']
    assert dicts['train']['100'][0].startswith('images/100.Bird_100/')
    cropped = load_dicts(cub_root, 'cropped')
    lines = (cub_root / 'bounding_boxes.txt').read_text().splitlines()
    images = dict(line.split() for line in (cub_root / 'images.txt').read_text().splitlines())
    for line in lines:
        image_id, x, y, w, h = line.split()
        x, y, w, h = map(float, (x, y, w, h))
        with Image.open(cub_root / 'cropped' / 'images' / images[image_id]) as crop:
            assert crop.size == (int(x + w) - int(x), int(y + h) - int(y))
    assert sum(map(len, cropped['test'].values())) == 6


def test_sop_splits_by_file(sop_root):
    prepare(str(sop_root))
    dicts = load_dicts(sop_root)
    assert sorted(dicts['train']) == ['1', '2', '3'] and sorted(dicts['test']) == ['11319', '11320']
    assert all(len(v) == 3 for v in dicts['test'].values())
    assert dicts['mean'] == data_utils.KNOWN_STATS['sop'][0]
    assert not os.path.exists(sop_root / 'cropped_data_dicts.pth')


def test_isc_query_gallery(isc_root):
    prepare(str(isc_root))
    dicts = load_dicts(isc_root)
    assert set(dicts) == {'train', 'query', 'gallery', 'mean', 'std'}
    assert sorted(dicts['train']) == ['id_00000001', 'id_00000002']
    assert {k: len(v) for k, v in dicts['query'].items()} == {'id_00000003': 1, 'id_00000004': 1}
    assert {k: len(v) for k, v in dicts['gallery'].items()} == {'id_00000003': 2, 'id_00000004': 1}
    assert_relative_and_existing(isc_root, dicts, ('train', 'query', 'gallery'))


def test_isc_partition_file_at_top_of_folder(isc_root):
    os.replace(isc_root / 'Eval' / 'list_eval_partition.txt', isc_root / 'list_eval_partition.txt')
    prepare(str(isc_root))
    assert len(load_dicts(isc_root)['query']) == 2


def test_folder_dataset_mean_std_from_train(folder_root):
    prepare(folder_root)
    dicts = load_dicts(folder_root)
    assert len(dicts['train']) == 4 and len(dicts['test']) == 3
    pixels = np.concatenate([np.asarray(Image.open(os.path.join(folder_root, p)).convert('RGB'), np.float64)
                             .reshape(-1, 3) / 255 for p in all_paths(dicts['train'])])
    assert dicts['mean'] == pytest.approx(pixels.mean(0).tolist(), abs=1e-4)
    assert dicts['std'] == pytest.approx(pixels.std(0).tolist(), abs=1e-4)


def test_folder_dataset_with_query_and_gallery(tmp_path):
    root = make_folder_dataset(str(tmp_path / 'qg'), {'train': 2, 'query': 2, 'gallery': 2})
    prepare(root)
    assert {'train', 'query', 'gallery'} <= set(load_dicts(root))


def test_hidden_temporary_and_dangling_files_are_left_out(folder_root, capsys):
    """A SIGKILL during a write leaves .<name>.<random>.tmp files; macOS leaves .DS_Store; a broken symlink
    points at nothing: none of them is an image of the dataset."""
    class_dir = os.path.join(folder_root, 'train', 'class_00')
    for name in ('.0.jpg.abc123.tmp', '.DS_Store', 'half.tmp'):
        with open(os.path.join(class_dir, name), 'wb') as f:
            f.write(b'\xff\xd8 partial')
    os.symlink(os.path.join(folder_root, 'gone.jpg'), os.path.join(class_dir, 'link.jpg'))
    os.makedirs(os.path.join(folder_root, 'train', '.hidden_class'))
    write_image(os.path.join(folder_root, 'train', '.hidden_class', '0.jpg'))
    summary = prepare(folder_root)
    assert 'train 4 classes / 16 images' in summary[0] and '0 excluded' in summary[0]
    assert 'left out 1 symbolic links to nothing: train/class_00/link.jpg' in capsys.readouterr().err


def test_sixteen_bit_images_are_scaled_not_clipped(folder_root):
    path = os.path.join(folder_root, 'train', 'class_00', '0.jpg')
    os.remove(path)
    Image.fromarray(np.full((36, 40), 30_000, dtype=np.uint16)).save(path[:-4] + '.png')
    prepare(folder_root)
    image = utils.load_rgb(path[:-4] + '.png')
    assert image.getpixel((0, 0)) == (117, 117, 117)  # 30000 / 257; PIL's convert('RGB') gives white


def test_exif_orientation_is_applied_except_in_the_exact_pipeline(tmp_path):
    path = str(tmp_path / 'rotated.jpg')
    exif = Image.Exif()
    exif[utils.EXIF_ORIENTATION] = 6  # stored sideways: turn 90 degrees clockwise to view
    Image.new('RGB', (80, 40), (200, 30, 30)).save(path, exif=exif)
    assert utils.load_rgb(path, min_side=40).size == (40, 80)
    assert utils.load_rgb(path).size == (80, 40)  # the original REIR's decoding ignores orientation


def test_split_left_empty_is_an_error(folder_root):
    for name in os.listdir(os.path.join(folder_root, 'test')):
        for image in os.listdir(os.path.join(folder_root, 'test', name)):
            with open(os.path.join(folder_root, 'test', name, image), 'wb') as f:
                f.write(b'not an image')
    result = run_main('data_utils', '--data_path', os.path.dirname(folder_root), '--data_name', 'tiny')
    assert_one_line_error(result, 1, 'no readable image is left in the test split')
    assert not os.path.exists(os.path.join(folder_root, 'uncropped_data_dicts.pth'))


def test_truncated_image_is_excluded_and_reported(cub_root):
    victim = next((cub_root / 'images').rglob('*.jpg'))
    data = victim.read_bytes()
    victim.write_bytes(data[:len(data) // 2])
    result = run_main('data_utils', '--data_path', cub_root.parent, '--data_name', 'cub')
    assert result.returncode == 0, result.stderr
    assert 'excluded 1 unreadable' in result.stderr and victim.name in result.stderr
    dicts = load_dicts(cub_root)
    assert sum(map(len, dicts['train'].values())) + sum(map(len, dicts['test'].values())) == 11
    for crop_type in ('uncropped', 'cropped'):  # the summary counts what the data dicts hold
        line = next(line for line in result.stdout.splitlines() if line.startswith(f'cub ({crop_type})'))
        assert sum(map(int, re.findall(r'(\d+) images', line))) == 11 and '; 1 excluded ->' in line


def test_rerun_is_idempotent_and_keeps_valid_crops(car_root):
    prepare(str(car_root))
    crops = sorted((car_root / 'cropped').rglob('*.jpg'))
    stamps = [os.stat(c).st_mtime_ns for c in crops]
    first = load_dicts(car_root, 'cropped')
    prepare(str(car_root))
    assert [os.stat(c).st_mtime_ns for c in crops] == stamps
    assert load_dicts(car_root, 'cropped') == first
    leftovers = [n for n in os.listdir(car_root) if n.endswith('.tmp')]
    assert leftovers == []


@pytest.mark.slow
def test_demo_is_large_enough_and_deterministic(tmp_path):
    data_utils.prepare(str(tmp_path / 'a'), 'demo', num_workers=2)
    dicts = load_dicts(tmp_path / 'a' / 'demo')
    assert len(dicts['train']) + len(dicts['test']) >= 200 and len(dicts['train']) == len(dicts['test'])
    assert min(len(v) for v in list(dicts['train'].values()) + list(dicts['test'].values())) >= 20
    first = sorted(dicts['train'])[0]
    with Image.open(tmp_path / 'a' / 'demo' / dicts['train'][first][0]) as image:
        assert min(image.size) >= 64
    # the same seed draws the same bytes, whichever process draws them
    for index in (0, 150):
        split = 'train' if index < 100 else 'test'
        data_utils.write_demo_class((str(tmp_path / 'b' / 'demo'), index, split, data_utils.DEMO_SEED,
                                     data_utils.DEMO_IMAGES_PER_CLASS, data_utils.DEMO_IMAGE_SIZE))
        for name in os.listdir(tmp_path / 'b' / 'demo' / split / f'class_{index:03d}'):
            relative = os.path.join(split, f'class_{index:03d}', name)
            first, second = (tmp_path / 'a' / 'demo' / relative), (tmp_path / 'b' / 'demo' / relative)
            assert first.read_bytes() == second.read_bytes()


# ----------------------------------------------------------------------------- bad input

def test_missing_dataset_folder(tmp_path):
    (tmp_path / 'data').mkdir()
    result = run_main('data_utils', '--data_path', tmp_path / 'data', '--data_name', 'cub')
    assert_one_line_error(result, 1, 'cub', 'not found', 'CUB-200-2011')


def test_missing_annotation_file(cub_root):
    os.remove(cub_root / 'bounding_boxes.txt')
    result = run_main('data_utils', '--data_path', cub_root.parent, '--data_name', 'cub')
    assert_one_line_error(result, 1, 'bounding_boxes.txt', 'download')


def test_missing_car_annotations(car_root):
    os.remove(car_root / 'cars_annos.mat')
    result = run_main('data_utils', '--data_path', car_root.parent, '--data_name', 'car')
    assert_one_line_error(result, 1, 'cars_annos.mat', 'Cars196')


def test_malformed_line_names_file_and_line(cub_root):
    lines = (cub_root / 'image_class_labels.txt').read_text().splitlines()
    lines[2] = '3 7 extra'
    (cub_root / 'image_class_labels.txt').write_text('\n'.join(lines) + '\n')
    result = run_main('data_utils', '--data_path', cub_root.parent, '--data_name', 'cub')
    assert_one_line_error(result, 1, 'image_class_labels.txt:3')


@pytest.mark.parametrize('bad_path', ['../outside.JPG', '/etc/passwd'])
def test_path_escaping_the_dataset_is_refused(sop_root, bad_path):
    text = (sop_root / 'Ebay_train.txt').read_text()
    (sop_root / 'Ebay_train.txt').write_text(text + f'99 3 1 {bad_path}\n')
    result = run_main('data_utils', '--data_path', sop_root.parent, '--data_name', 'sop')
    assert_one_line_error(result, 1, 'escapes the dataset folder', bad_path)
    assert not os.path.exists(sop_root / 'uncropped_data_dicts.pth')


def test_failed_rerun_keeps_the_previous_pickle(sop_root):
    prepare(str(sop_root))
    before = (sop_root / 'uncropped_data_dicts.pth').read_bytes()
    (sop_root / 'Ebay_test.txt').write_text('header\n1 2\n')
    result = run_main('data_utils', '--data_path', sop_root.parent, '--data_name', 'sop')
    assert_one_line_error(result, 1, 'Ebay_test.txt:2')
    assert (sop_root / 'uncropped_data_dicts.pth').read_bytes() == before


def test_cli_prepares_every_folder_by_default(tmp_path):
    make_folder_dataset(str(tmp_path / 'data' / 'one'), {'train': 2, 'test': 2}, images_per_class=2)
    make_folder_dataset(str(tmp_path / 'data' / 'two'), {'train': 2, 'test': 2}, images_per_class=2)
    write_image(str(tmp_path / 'data' / 'two' / 'train' / 'class_00' / 'extra.jpg'))
    result = run_main('data_utils', '--data_path', tmp_path / 'data')
    assert result.returncode == 0, result.stderr
    assert 'one (uncropped): train 2 classes / 4 images' in result.stdout
    assert 'two (uncropped): train 2 classes / 5 images' in result.stdout


@pytest.mark.parametrize('value', ['0', 'x'])
def test_bad_short_side_exits_2(tmp_path, value):
    result = run_main('data_utils', '--data_path', tmp_path, '--short_side', value)
    assert result.returncode == 2 and '--short_side' in result.stderr and 'Traceback' not in result.stderr


def test_short_side_copies_are_written_and_used(cub_root):
    summary = data_utils.prepare(str(cub_root.parent), 'cub', num_workers=2, short_side=32)
    assert len(summary) == 2
    for crop_type, prefix in (('uncropped', 'short32/images/'), ('cropped', 'short32/cropped/images/')):
        dicts = load_dicts(cub_root, crop_type)
        paths = all_paths(dicts['train']) + all_paths(dicts['test'])
        assert len(paths) == 12
        for path in paths:
            with Image.open(cub_root / path) as image:
                if path.startswith(prefix):
                    assert min(image.size) == 32
                else:  # already small enough: the original is used
                    assert min(image.size) <= 32 and not path.startswith('short')
    assert any(p.startswith('short32/images/') for p in all_paths(load_dicts(cub_root)['train']))
    stamps = {p: os.stat(p).st_mtime_ns for p in (cub_root / 'short32').rglob('*.jpg')}
    data_utils.prepare(str(cub_root.parent), 'cub', num_workers=2, short_side=32)
    assert {p: os.stat(p).st_mtime_ns for p in (cub_root / 'short32').rglob('*.jpg')} == stamps


FORK_MARKER = 'as imported'


def fork_marker(_):
    return FORK_MARKER


@pytest.mark.slow
def test_pool_workers_are_started_afresh_never_forked(monkeypatch):
    """A forked worker inherits the parent's memory (this module's changed marker, and the locks torch's threads
    held): train.py hung for ever drawing the demo in one. A spawned worker imports the modules afresh."""
    monkeypatch.setattr(sys.modules[__name__], 'FORK_MARKER', 'changed in the parent')
    tasks = list(range(data_utils.POOL_MIN_TASKS))
    assert data_utils.map_in_workers(fork_marker, tasks, 2, 'test', 'task') == ['as imported'] * len(tasks)
    # one worker, or few tasks: in this process
    assert set(data_utils.map_in_workers(fork_marker, tasks, 1, 'test', 'task')) == {'changed in the parent'}
    assert set(data_utils.map_in_workers(fork_marker, tasks[1:], 2, 'test', 'task')) == {'changed in the parent'}
