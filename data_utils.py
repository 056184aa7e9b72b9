"""Turn downloaded datasets into the pickles REIR trains from, and generate the offline demo.

    python data_utils.py                          # every dataset folder under data/
    python data_utils.py --data_name cub car      # only these
    python data_utils.py --data_name demo         # synthetic dataset, no download
    python data_utils.py --data_name sop --short_side 256   # also smaller copies to train from

For each dataset it writes data/<name>/uncropped_data_dicts.pth (and cropped_data_dicts.pth with
bounding-box crops under data/<name>/cropped/ for car and cub): {'train': {class: [paths]},
'test' or 'query'/'gallery': {...}, 'mean': [r, g, b], 'std': [r, g, b]}, paths relative to
data/<name>/. Every image is decoded once; unreadable ones are reported and left out.
"""
import argparse
import math
import multiprocessing
import os
import signal
import sys
from pathlib import PurePosixPath

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from run_files import atomic_torch_save, atomic_write
from utils import (EVAL_SPLITS, KNOWN_STATS, UNREADABLE_IMAGE_ERRORS, ReirError, data_dicts_path, dataset_name,
                   is_visible, positive_int, run_cli, short_side_size, shown, to_rgb)

DOWNLOADS = {
    'car': 'Cars196: https://ai.stanford.edu/~jkrause/cars/car_dataset.html (car_ims.tgz, cars_annos.mat)',
    'cub': 'CUB-200-2011: https://www.vision.caltech.edu/datasets/cub_200_2011/ (CUB_200_2011.tgz)',
    'sop': 'Stanford Online Products: https://cvgl.stanford.edu/projects/lifted_struct/ (Stanford_Online_Products.zip)',
    'isc': 'In-shop Clothes: https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html '
           '(img.zip, list_eval_partition.txt)',
}
CAR_TRAIN_CLASSES = range(1, 99)   # classes 1-98 train, 99-196 test
CUB_TRAIN_CLASSES = range(1, 101)  # classes 1-100 train, 101-200 test
FOLDER_SPLITS = tuple(('train',) + splits for splits in EVAL_SPLITS)
CROP_QUALITY = 95
SHORT_SIDE_DIR = 'short'  # data/<name>/short<N>/: copies resized by --short_side N
POOL_MIN_TASKS = 64  # fewer tasks than this are done in the process itself (map_in_workers)

DEMO_CLASSES = 200
DEMO_IMAGES_PER_CLASS = 24
DEMO_IMAGE_SIZE = 72
DEMO_SEED = 0


class DatasetError(ReirError):
    pass


# ----------------------------------------------------------------------------- readers
# Each reader returns ({split: [(relative path, class key)]}, {relative path: (x1, y1, x2, y2)} or None).

def require_file(root, name, *candidates):
    for relpath in candidates:
        path = os.path.join(root, relpath)
        if os.path.isfile(path):
            return path
    where = ' or '.join(os.path.join(root, c) for c in candidates)
    raise DatasetError(f'{where} not found; download {DOWNLOADS[name]} and extract it into {root}/')


def read_rows(path, num_fields, skip=0):
    """(line number, fields) of a whitespace-separated annotation file."""
    with open(path, encoding='utf-8') as f:
        for number, line in enumerate(f, start=1):
            if number <= skip or not line.strip():
                continue
            fields = line.split()
            if len(fields) != num_fields:
                raise DatasetError(f'{path}:{number}: expected {num_fields} fields, got {len(fields)}: '
                                   f'{line.strip()!r}')
            yield number, fields


def parse_number(value, path, number, kind=int):
    try:
        return kind(value)
    except ValueError:
        raise DatasetError(f'{path}:{number}: {value!r} is not a number') from None


def read_car(root):
    from scipy.io import loadmat
    path = require_file(root, 'car', 'cars_annos.mat')
    try:
        annotations = loadmat(path, squeeze_me=True)['annotations']
    except (KeyError, ValueError, OSError, TypeError) as e:
        raise DatasetError(f'{path}: not a Cars196 annotation file with an "annotations" struct ({e})') from None
    fields = ('relative_im_path', 'bbox_x1', 'bbox_y1', 'bbox_x2', 'bbox_y2', 'class')
    missing = [f for f in fields if f not in (annotations.dtype.names or ())]
    if missing:
        raise DatasetError(f'{path}: annotations lack the fields {", ".join(missing)}')
    splits, boxes = {'train': [], 'test': []}, {}
    for a in np.atleast_1d(annotations):
        relpath, label = str(a['relative_im_path']), int(a['class'])
        split = 'train' if label in CAR_TRAIN_CLASSES else 'test'
        splits[split].append((relpath, str(label)))
        boxes[relpath] = tuple(int(a[f]) for f in ('bbox_x1', 'bbox_y1', 'bbox_x2', 'bbox_y2'))
    return splits, boxes


def read_cub(root):
    images_file = require_file(root, 'cub', 'images.txt')
    labels_file = require_file(root, 'cub', 'image_class_labels.txt')
    boxes_file = require_file(root, 'cub', 'bounding_boxes.txt')
    paths = {fields[0]: 'images/' + fields[1] for _, fields in read_rows(images_file, 2)}
    labels = {fields[0]: (n, parse_number(fields[1], labels_file, n)) for n, fields in read_rows(labels_file, 2)}
    splits, boxes = {'train': [], 'test': []}, {}
    for number, (image_id, x, y, width, height) in read_rows(boxes_file, 5):
        x, y, width, height = (parse_number(v, boxes_file, number, float) for v in (x, y, width, height))
        if image_id not in paths or image_id not in labels:
            raise DatasetError(f'{boxes_file}:{number}: image id {image_id} is not in images.txt and '
                               f'image_class_labels.txt')
        boxes[paths[image_id]] = (int(x), int(y), int(x + width), int(y + height))
    for image_id, relpath in paths.items():
        if image_id not in labels:
            raise DatasetError(f'{labels_file}: no class for image id {image_id} of images.txt')
        if relpath not in boxes:
            raise DatasetError(f'{boxes_file}: no bounding box for image id {image_id} of images.txt')
        label = labels[image_id][1]
        splits['train' if label in CUB_TRAIN_CLASSES else 'test'].append((relpath, str(label)))
    return splits, boxes


def read_sop(root):
    splits = {}
    for split, name in (('train', 'Ebay_train.txt'), ('test', 'Ebay_test.txt')):
        path = require_file(root, 'sop', name)
        splits[split] = []
        for number, (_, class_id, _, relpath) in read_rows(path, 4, skip=1):
            splits[split].append((relpath, str(parse_number(class_id, path, number))))
    return splits, None


def read_isc(root):
    path = require_file(root, 'isc', os.path.join('Eval', 'list_eval_partition.txt'), 'list_eval_partition.txt')
    splits = {'train': [], 'query': [], 'gallery': []}
    for number, (relpath, item_id, status) in read_rows(path, 3, skip=2):
        if status not in splits:
            raise DatasetError(f'{path}:{number}: evaluation status {status!r} is not train, query or gallery')
        splits[status].append((relpath, item_id))
    return splits, None


def read_folder(root):
    """train/<class>/<image> with test/<class>/<image>, or with query/ and gallery/."""
    for names in reversed(FOLDER_SPLITS):
        if all(os.path.isdir(os.path.join(root, split)) for split in names):
            break
    else:
        raise DatasetError(f'{root}: a folder dataset needs train/ and test/ (or train/, query/ and gallery/) '
                           f'folders of class folders')
    splits, dangling = {}, []
    for split in names:
        splits[split] = class_folder_images(root, split, dangling)
        if not splits[split]:
            raise DatasetError(f'{os.path.join(root, split)}: no images in class folders')
    if dangling:
        print(f'warning: {root}: left out {len(dangling)} symbolic links to nothing: {shown(dangling)}',
              file=sys.stderr)
    return splits, None


def class_folder_images(root, split, dangling):
    """[(split/<class>/<image>, class)] of root/split's class folders; symbolic links to nothing are added to
    dangling instead."""
    images = []
    for label in visible_entries(os.path.join(root, split)):
        class_dir = os.path.join(root, split, label)
        if not os.path.isdir(class_dir):
            continue
        for name in visible_entries(class_dir):
            path = os.path.join(class_dir, name)
            if os.path.isfile(path):
                images.append((f'{split}/{label}/{name}', label))
            elif os.path.islink(path) and not os.path.exists(path):
                dangling.append(f'{split}/{label}/{name}')
    return images


def visible_entries(folder):
    """The names in a folder that are a dataset's (utils.is_visible), sorted."""
    return sorted(name for name in os.listdir(folder) if is_visible(name))


READERS = {'car': read_car, 'cub': read_cub, 'sop': read_sop, 'isc': read_isc}


def check_inside(relpath, root):
    """Reject image paths that would read outside the dataset folder."""
    parts = PurePosixPath(relpath.replace('\\', '/')).parts
    if os.path.isabs(relpath) or relpath.startswith(('/', '\\')) or '..' in parts:
        raise DatasetError(f'{root}: image path {relpath!r} escapes the dataset folder')


# ----------------------------------------------------------------------------- image checks (worker processes)

def clamp_box(box, size):
    x1, y1, x2, y2 = box
    width, height = size
    x1, y1 = min(max(x1, 0), width - 1), min(max(y1, 0), height - 1)
    return x1, y1, max(min(x2, width), x1 + 1), max(min(y2, height), y1 + 1)


def image_format(path):
    return Image.registered_extensions().get(os.path.splitext(path)[1].lower(), 'JPEG')


def check_image(task):
    """Decode one image fully (truncated files fail here), write its crop and its reduced copies unless
    valid ones exist. Returns (error or None, per-channel [sum, sum of squares, pixel count] or None,
    {crop type: path relative to the dataset folder that training reads})."""
    root, relpath, box, with_stats, short_side = task
    try:
        with Image.open(os.path.join(root, relpath)) as image:
            image.load()
            exif = image.getexif()
            rgb = to_rgb(image)
    except UNREADABLE_IMAGE_ERRORS as e:
        return f'{type(e).__name__}: {e}', None, None
    versions = {'uncropped': (relpath, rgb)}
    if box is not None:
        crop = rgb.crop(clamp_box(box, rgb.size))
        write_unless_valid(os.path.join(root, 'cropped', relpath), crop, exif)
        versions['cropped'] = ('cropped/' + relpath, crop)
    outputs = {}
    for crop_type, (path, version) in versions.items():
        if short_side is not None and min(version.size) > short_side:
            path = f'{SHORT_SIDE_DIR}{short_side}/{path}'
            write_unless_valid(os.path.join(root, path), resize_short_side(version, short_side), exif)
        outputs[crop_type] = path
    if not with_stats:
        return None, None, outputs
    pixels = np.asarray(rgb, dtype=np.float64).reshape(-1, 3) / 255  # (H*W, 3)
    return None, (pixels.sum(0), (pixels ** 2).sum(0), pixels.shape[0]), outputs


def resize_short_side(image, short_side):
    """As torchvision's Resize(short_side) does it."""
    return image.resize(short_side_size(*image.size, short_side), Image.BILINEAR)


def write_unless_valid(path, image, exif=None):
    """Write image (atomically) unless a readable file of its size is already there: re-runs redo nothing.
    exif: the source's, kept in a reduced copy so that training turns it upright as it would the source."""
    if not has_valid_image(path, image.size):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        extra = {'exif': exif} if exif else {}
        atomic_write(path, lambda tmp: image.save(tmp, format=image_format(path), quality=CROP_QUALITY, **extra))


def has_valid_image(path, expected_size):
    if not os.path.isfile(path):
        return False
    try:
        with Image.open(path) as image:
            return image.size == expected_size
    except UNREADABLE_IMAGE_ERRORS:
        return False


# ----------------------------------------------------------------------------- preparation

def map_in_workers(function, tasks, num_workers, description, unit):
    """[function(task) for task in tasks] with a progress bar: in num_workers processes started afresh (spawn), never
    forked: a fork of a process whose torch has started threads (train.py drawing the demo) can inherit a lock held
    by one of them and wait on it for ever. With one worker, or fewer than POOL_MIN_TASKS tasks (a new process
    costs seconds of imports), in this process."""
    progress = dict(total=len(tasks), desc=description, unit=unit, file=sys.stderr)
    if num_workers <= 1 or len(tasks) < POOL_MIN_TASKS:
        return list(tqdm(map(function, tasks), **progress))
    # Ctrl-C reaches every process of the terminal's process group: the workers start with it ignored (a new
    # interpreter keeps an ignored SIGINT), and the main process ends them, instead of a traceback from each
    interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        pool = multiprocessing.get_context('spawn').Pool(num_workers)
    finally:
        signal.signal(signal.SIGINT, interrupt)
    with pool:
        return list(tqdm(pool.imap(function, tasks, chunksize=8), **progress))


def collect_outcomes(tasks, outcomes):
    """(unreadable images, the channel statistics of those that gave some, {image: the paths its copies were written
    to}) of check_image's outcomes of tasks."""
    bad, stats, outputs = set(), [], {}
    for (_, relpath, *_), (error, stat, paths) in zip(tasks, outcomes):
        if error is not None:
            bad.add(relpath)
            continue
        outputs[relpath] = paths
        if stat is not None:
            stats.append(stat)
    return bad, stats, outputs


def prepare(data_path, name, num_workers, short_side=None):
    """Read, verify (and crop) one dataset and write its data dicts; returns the summary lines.
    short_side: also write copies of the images whose shorter side is larger, resized to it, under
    data/<name>/short<N>/, and point the data dicts at them."""
    root = os.path.join(data_path, name)
    if name == 'demo':
        make_demo(root, num_workers)
    if not os.path.isdir(root):
        hint = f'download {DOWNLOADS[name]} and extract it there' if name in DOWNLOADS else \
            'lay out train/<class>/<image> and test/<class>/<image> there'
        raise DatasetError(f'dataset folder {root} not found; {hint}')
    splits, boxes = READERS.get(name, read_folder)(root)
    for images in splits.values():
        for relpath, _ in images:
            check_inside(relpath, root)

    stats_needed = name not in KNOWN_STATS
    tasks = [(root, relpath, boxes[relpath] if boxes else None, stats_needed and split == 'train', short_side)
             for split, images in splits.items() for relpath, _ in images]
    action = 'verifying' + (' and cropping' if boxes else '') + (' and resizing' if short_side else '')
    outcomes = map_in_workers(check_image, tasks, num_workers, f'{name}: {action}', 'img')

    bad, stats, outputs = collect_outcomes(tasks, outcomes)
    if bad:
        print(f'warning: {name}: excluded {len(bad)} unreadable or truncated images: {shown(bad)}', file=sys.stderr)
    mean, std = KNOWN_STATS[name] if name in KNOWN_STATS else channel_stats(stats, root)

    summary = []
    for crop_type in ('uncropped', 'cropped') if boxes else ('uncropped',):
        data_dicts = {split: group_by_class(images, outputs, crop_type) for split, images in splits.items()}
        empty = [split for split in splits if not data_dicts[split]]
        if empty:
            raise DatasetError(f'{root}: no readable image is left in the {" and ".join(empty)} split; nothing '
                               f'was written')
        data_dicts.update(mean=list(mean), std=list(std))
        path = data_dicts_path(data_path, name, crop_type)
        atomic_torch_save(data_dicts, path)
        counts = ', '.join(f'{split} {len(data_dicts[split])} classes / '
                           f'{sum(map(len, data_dicts[split].values()))} images' for split in splits)
        summary.append(f'{name} ({crop_type}): {counts}; {len(bad)} excluded -> {path}')
    return summary


def group_by_class(images, outputs, crop_type):
    """{class: [paths]} of the readable images, each at the path of its crop_type version."""
    classes = {}
    for relpath, label in images:
        if relpath in outputs:
            classes.setdefault(label, []).append(outputs[relpath][crop_type])
    return classes


def channel_stats(stats, root):
    if not stats:
        raise DatasetError(f'{root}: no readable training image to compute the mean and std from')
    total = sum(s[0] for s in stats)
    total_sq = sum(s[1] for s in stats)
    count = sum(s[2] for s in stats)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 0))
    return [round(float(m), 4) for m in mean], [round(float(s), 4) for s in std]


# ----------------------------------------------------------------------------- the offline demo

def demo_pattern(rng):
    """A class: 3-5 shapes, each a kind, a place, a size, an angle and a hue offset from the image's
    base hue (so colour relations, not absolute colours, belong to the class)."""
    return [dict(kind=rng.integers(4), centre=rng.uniform(0.2, 0.8, 2), size=rng.uniform(0.12, 0.3),
                 aspect=rng.uniform(0.4, 1.0), angle=rng.uniform(0, 180), hue=rng.uniform(0, 1))
            for _ in range(rng.integers(3, 6))]


def hsv_colour(hue, saturation, value):
    rgb = Image.new('HSV', (1, 1), (int(hue % 1 * 255), int(saturation * 255), int(value * 255)))
    return rgb.convert('RGB').getpixel((0, 0))


def draw_shape(draw, shape, canvas, colour):
    cx, cy = shape['centre'] * canvas
    r = shape['size'] * canvas
    theta = math.radians(shape['angle'])
    rot = lambda x, y: (cx + x * math.cos(theta) - y * math.sin(theta), cy + x * math.sin(theta) + y * math.cos(theta))
    ry = r * shape['aspect']
    if shape['kind'] == 0:    # rotated rectangle
        draw.polygon([rot(-r, -ry), rot(r, -ry), rot(r, ry), rot(-r, ry)], fill=colour)
    elif shape['kind'] == 1:  # triangle
        draw.polygon([rot(0, -r), rot(r, ry), rot(-r, ry)], fill=colour)
    elif shape['kind'] == 2:  # ellipse, as a polygon so that it rotates
        draw.polygon([rot(r * math.cos(t), ry * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 24)], fill=colour)
    else:                     # thick bar
        draw.line([rot(-r, 0), rot(r, 0)], fill=colour, width=max(2, int(ry / 2)))


def demo_image(pattern, rng, size):
    """One random view of a class pattern: rotation, scale, translation, base hue, background
    gradient, blur and pixel noise."""
    canvas = 2 * size
    base_hue = rng.uniform(0, 1)
    layer = Image.new('RGBA', (canvas, canvas), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for shape in pattern:
        draw_shape(draw, shape, canvas, hsv_colour(base_hue + shape['hue'], rng.uniform(0.5, 1), rng.uniform(0.5, 1)))
    scale = rng.uniform(0.75, 1.15)
    layer = layer.rotate(rng.uniform(-40, 40), resample=Image.BILINEAR)
    scaled = max(8, int(canvas * scale))
    layer = layer.resize((scaled, scaled), Image.BILINEAR)
    low, high = rng.uniform(0, 0.6, 3) * 255, rng.uniform(0.4, 1, 3) * 255
    ramp = np.linspace(0, 1, canvas)[:, None, None] if rng.uniform() < 0.5 else np.linspace(0, 1, canvas)[None, :, None]
    background = (low + (high - low) * ramp) * np.ones((canvas, canvas, 1))  # (canvas, canvas, 3)
    image = Image.fromarray(background.astype(np.uint8))
    offset = ((canvas - scaled) / 2 + rng.uniform(-0.12, 0.12, 2) * canvas).astype(int)
    image.paste(layer, tuple(int(o) for o in offset), layer)
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.2))).resize((size, size), Image.BILINEAR)
    pixels = np.asarray(image, dtype=np.float64) + rng.normal(0, rng.uniform(2, 12), (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_demo_class(task):
    root, index, split, seed, images, size = task
    pattern = demo_pattern(np.random.default_rng([seed, index]))
    class_dir = os.path.join(root, split, f'class_{index:03d}')
    os.makedirs(class_dir, exist_ok=True)
    for i in range(images):
        image = demo_image(pattern, np.random.default_rng([seed, index, i]), size)
        path = os.path.join(class_dir, f'{i:03d}.jpg')
        atomic_write(path, lambda tmp: image.save(tmp, format='JPEG', quality=90))


def make_demo(root, num_workers, seed=DEMO_SEED):
    """A synthetic retrieval dataset as a folder dataset: DEMO_CLASSES classes of procedurally drawn
    patterns, the first half train, the second half test. Deterministic for a seed."""
    tasks = [(root, index, 'train' if index < DEMO_CLASSES // 2 else 'test', seed, DEMO_IMAGES_PER_CLASS,
              DEMO_IMAGE_SIZE) for index in range(DEMO_CLASSES)]
    map_in_workers(write_demo_class, tasks, num_workers, 'demo: drawing', 'class')


def prepare_demo_if_missing(data_path, crop_type, num_workers):
    """Draw and prepare the demo when its data dicts are missing; returns the summary lines. The demo has no
    bounding boxes: for another crop type nothing is drawn, and reading its data dicts says so."""
    if crop_type != 'uncropped' or os.path.isfile(data_dicts_path(data_path, 'demo', crop_type)):
        return []
    return prepare(data_path, 'demo', num_workers)


# ----------------------------------------------------------------------------- command line

def get_args_parser():
    parser = argparse.ArgumentParser(description='Prepare datasets for REIR training')
    parser.add_argument('--data_path', default='data', help='folder holding one folder per dataset')
    parser.add_argument('--data_name', nargs='*', default=None, type=dataset_name,
                        help='datasets to prepare (car, cub, sop, isc, demo or a folder dataset); '
                             'default: every dataset folder under --data_path')
    parser.add_argument('--short_side', type=positive_int, default=None,
                        help='also write copies whose shorter side is reduced to this (when larger) and train from '
                             'them: less to decode every epoch; keep it >= train.py --image_size')
    parser.add_argument('--num_workers', type=int, default=os.cpu_count() or 1,
                        help='worker processes that decode and crop images')
    return parser


def find_datasets(data_path):
    if not os.path.isdir(data_path):
        raise DatasetError(f'{data_path} not found: create it and extract datasets into {data_path}/<name>/, '
                           f'or pass --data_name demo')
    names = sorted(n for n in os.listdir(data_path) if os.path.isdir(os.path.join(data_path, n)))
    if not names:
        raise DatasetError(f'no dataset folders under {data_path}/: extract one there or pass --data_name demo')
    return names


def main(args):
    names = args.data_name or find_datasets(args.data_path)
    for name in names:
        for line in prepare(args.data_path, name, max(1, args.num_workers), args.short_side):
            print(line)


if __name__ == '__main__':
    run_cli(main, get_args_parser().parse_args())
