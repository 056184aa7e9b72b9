"""What REIR is made of besides the network: datasets and their readers, transforms, meta-class ids and the
retrieval metrics (Recall@K, MAP@R, pure functions of embeddings and labels), with the small pieces every script
shares (errors and the command-line convention, safe loading). Functions take what they use as arguments
(is_main_process, and so warn and log, ask torch.distributed which process this is); the constants below are the
one place each value is written."""
import argparse
import hashlib
import json
import math
import os
import pickle
import random
import re
import sys
import zipfile
import zlib
from collections import Counter

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision import transforms

CROP_TYPES = ('uncropped', 'cropped')
LABEL_TYPES = ('fixed', 'random')
MAX_IMAGES_PER_CLASS = 300  # DREML/REIR cap on training images per class, keeps SOP epochs bounded
# Per-channel RGB statistics of the official datasets (as in the original REIR); other datasets get
# theirs computed from the train split.
KNOWN_STATS = {
    'car': ([0.4853, 0.4965, 0.4295], [0.2237, 0.2193, 0.2568]),
    'cub': ([0.4707, 0.4601, 0.4549], [0.2767, 0.2760, 0.2850]),
    'sop': ([0.5807, 0.5396, 0.5044], [0.2901, 0.2974, 0.3095]),
    'isc': ([0.8324, 0.8109, 0.8041], [0.2206, 0.2378, 0.2444]),
}
EVAL_SPLITS = (('test',), ('query', 'gallery'))  # a dataset evaluates by self-retrieval or query/gallery
EXIF_ORIENTATION = 0x0112
# what PIL raises for a file that is not a readable image (SyntaxError and ValueError for some broken headers)
UNREADABLE_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
STOPPED_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): stopped on request, to be continued
MAX_REPORTED = 5  # names of skipped files a warning shows


# ----------------------------------------------------------------------------- errors and the command line

class ReirError(Exception):
    """A problem with the user's input (files, data) that the scripts report in one line: exit code 1."""


class UsageError(ReirError):
    """A flag, or a combination of flags, that cannot work: exit code 2, as for argparse errors."""


class Stopped(Exception):
    """A run that stopped on request (a signal from a scheduler) once it had saved what continuing needs; the
    message says how to continue. Exit code STOPPED_EXIT_CODE."""


class StopRequested(BaseException):
    """A stop signal (SIGTERM, SIGUSR1; args[0] names it) that ends the work in progress at once, raised where there
    is nothing to save (resume.StopSignals) or where the work agrees to stop. A BaseException, as KeyboardInterrupt is,
    so that no `except Exception` holds it up."""


def run_cli(main_function, args, interrupted='interrupted'):
    """Run a script's main with the project's error convention: one line, exit 2 for flag errors,
    1 for data errors, never a traceback for a problem the user can fix; on Ctrl-C the line interrupted
    (or what interrupted() returns, computed then); a run stopped on request prints how to continue (rank 0 under
    torch.distributed) and exits with STOPPED_EXIT_CODE."""
    try:
        main_function(args)
    except Stopped as stop:
        if is_main_process():
            print(stop, file=sys.stderr)
        sys.exit(STOPPED_EXIT_CODE)
    except UsageError as error:
        print(f'error: {error}', file=sys.stderr)
        sys.exit(2)
    except ReirError as error:
        print(f'error: {error}', file=sys.stderr)
        sys.exit(1)
    except OSError as error:  # a file operation no part of the script expected to fail: the operating system's words
        where = f'{error.filename}: ' if error.filename else ''
        print(f'error: {where}{error.strerror or error}', file=sys.stderr)
        sys.exit(1)
    except torch.cuda.OutOfMemoryError:
        print('error: CUDA out of memory: lower --batch_size, --ensemble_size or --image_size, or pass --amp',
              file=sys.stderr)
        sys.exit(1)
    except RuntimeError as error:
        reason = shared_memory_failure(error)
        if reason is None:
            raise
        print(f'error: the data loader\'s worker processes cannot pass images through shared memory ({reason}): '
              f'raise the limit that stops them (ulimit -f, the size of /dev/shm), or pass --num_workers 0',
              file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(interrupted() if callable(interrupted) else interrupted, file=sys.stderr)
        sys.exit(130)


def shared_memory_failure(error):
    """The reason where error is a DataLoader worker's failure to put a batch in shared memory (a file-size limit, a
    full /dev/shm), as torch words it, else None."""
    text = str(error)
    if 'DataLoader worker' not in text:
        return None
    found = re.search(r'unable to (?:resize file|write to file|allocate shared memory)[^\n]*?: ([^:\n]+)$', text,
                      re.MULTILINE)
    if found:
        return found[1].strip()
    return 'out of shared memory' if 'out of shared memory' in text else None


def int_in_range(low, high=None):
    """An argparse type: an integer from low to high (inclusive; no upper bound when high is None)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not an integer') from None
        if value < low:
            raise argparse.ArgumentTypeError(f'{value} is below {low}')
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f'{value} is above {high}')
        return value
    return parse


positive_int = int_in_range(1)


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f'{value} is not above 0')
    return value


def dataset_name(text):
    """An argparse type: a dataset's folder name under --data_path (a trailing / of tab completion dropped). It
    begins the names of the run's files, so it is a name, never a path."""
    name = text.rstrip('/' + os.sep)
    if not name or name in ('.', '..') or '/' in name or os.sep in name:
        raise argparse.ArgumentTypeError(f'{text!r} is not a dataset name: name the folder under --data_path, as in '
                                         f'--data_path data --data_name cub')
    return name


def recall_list(text):
    try:
        values = [int(k) for k in text.split(',')]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f'{text!r} is not a comma-separated list of positive integers')
    return values


def is_main_process():
    return not dist.is_initialized() or dist.get_rank() == 0


def warn(message):
    if is_main_process():
        print(f'warning: {message}', file=sys.stderr)


def log(message):
    if is_main_process():
        print(message, flush=True)


# ----------------------------------------------------------------------------- values and files

def is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value):
    """A finite int or float (not a bool, which json and pickles also give)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def three_numbers(values):
    return isinstance(values, (list, tuple)) and len(values) == 3 and all(is_number(v) for v in values)


def safe_load(path, what='file', verify=True, mmap=False):
    """torch.load with weights_only=True: tensors and plain containers only, never code. With verify, the zip
    archive's checksums are verified first, so that flipped bits or a truncation are refused, not loaded (it reads
    the whole file); with mmap, tensors stay on disk until used. A file in torch.save's format from before PyTorch
    1.6, not a zip archive (the original REIR's models), is read whole, checked by the unpickler alone."""
    if not os.path.isfile(path):
        raise ReirError(f'{what} not found: {path}')
    damaged = f'{path}: {what} is corrupt or truncated'
    with open(path, 'rb') as f:
        legacy = f.read(2) != b'PK'  # torch.save has written zip archives since PyTorch 1.6
    bad_member = None
    if not legacy:
        try:
            with zipfile.ZipFile(path) as archive:
                bad_member = archive.testzip() if verify else None
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
            raise ReirError(f'{damaged} ({type(e).__name__}); delete it or write it again') from None
    if bad_member is not None:
        raise ReirError(f'{damaged} (checksum mismatch in {bad_member}); delete it or write it again')
    try:
        return torch.load(path, map_location='cpu', weights_only=True, mmap=mmap and not legacy)
    except pickle.UnpicklingError as e:
        # an object it would build by running code, in the words of torch 2.4 to 2.14 ('Unsupported class', then
        # 'Unsupported global', 'unsupported GLOBAL'); else bytes that are no pickle, or a truncated one
        refused = re.compile(r'unsupported (global|class)', re.IGNORECASE)
        if not refused.search(str(e)):
            raise ReirError(f'{damaged} (UnpicklingError); delete it or write it again') from None
        lines = [line.strip() for line in str(e).splitlines() if refused.search(line)]
        reason = lines[0] if lines else 'it holds objects other than tensors and plain containers'
        raise ReirError(f'{path}: refused to load {what}, which could run code when loaded ({reason})') from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, TypeError, OSError, KeyError) as e:
        raise ReirError(f'{damaged} ({type(e).__name__}); delete it or write it again') from None


# ----------------------------------------------------------------------------- datasets

def data_dicts_path(data_path, data_name, crop_type):
    return os.path.join(data_path, data_name, f'{crop_type}_data_dicts.pth')


def eval_splits(names, source):
    """('test',) for self-retrieval datasets, ('query', 'gallery') for query/gallery ones, from the split
    names that source (data dicts, or an embedding database) holds."""
    for splits in EVAL_SPLITS:
        if all(split in names for split in splits):
            return splits
    raise ReirError(f'{source}: neither a test split nor query and gallery splits, only {", ".join(sorted(names))}')


def load_data_dicts(data_path, data_name, crop_type):
    """The pickle data_utils.py wrote for a dataset and crop type."""
    path = data_dicts_path(data_path, data_name, crop_type)
    if crop_type == 'cropped' and data_name not in ('car', 'cub') and not os.path.isfile(path):
        raise UsageError(f'--crop_type cropped needs bounding boxes, which only car and cub have; '
                         f'use --crop_type uncropped for {data_name}')
    if not os.path.isfile(path):
        raise ReirError(f'{path} not found: download {data_name} into {os.path.join(data_path, data_name)}/ and '
                        f'run python data_utils.py --data_path {data_path} --data_name {data_name}')
    data_dicts = safe_load(path, 'data dicts')
    problem = data_dicts_problem(data_dicts)
    if problem:
        raise ReirError(f'{path}: {problem}; run python data_utils.py --data_path {data_path} --data_name '
                        f'{data_name} again')
    return data_dicts


def data_dicts_problem(data_dicts):
    """What makes data dicts unusable (a missing key, a wrong type, an empty split or class, an image path
    outside the dataset folder), or None."""
    if not isinstance(data_dicts, dict):
        return f'not data dicts but a {type(data_dicts).__name__}'
    for key in ('mean', 'std'):
        if not three_numbers(data_dicts.get(key)):
            return f'"{key}" is not three numbers'
    if min(data_dicts['std']) <= 0:
        return '"std" holds a value that is not above 0'
    if 'train' not in data_dicts:
        return 'no "train" split'
    if not any(all(split in data_dicts for split in names) for names in EVAL_SPLITS):
        return 'neither a "test" split nor "query" and "gallery" splits'
    for split in ('train',) + eval_splits(data_dicts, 'data dicts'):
        problem = split_problem(split, data_dicts[split])
        if problem:
            return problem
    return None


def split_problem(split, classes):
    """What makes a split of data dicts ({class: [image paths]}) unusable, or None."""
    if not isinstance(classes, dict) or not classes:
        return f'the {split} split holds no classes'
    for key, paths in classes.items():
        if not isinstance(key, str) or not isinstance(paths, list) or not paths:
            return f'class {key!r} of the {split} split is not a class name with a non-empty list of images'
        for path in paths:
            if not isinstance(path, str) or os.path.isabs(path) or '..' in re.split(r'[\\/]', path):
                return f'image path {path!r} of the {split} split is not inside the dataset folder'
    return None


def data_fingerprint(data_dicts):
    """A short hash of everything data dicts tell a run: its splits, classes, image paths, mean and std. A dataset
    prepared again with other images (or copies, --short_side) has another."""
    canonical = json.dumps(data_dicts, sort_keys=True, separators=(',', ':'))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


FINGERPRINT_LENGTH = 16  # hexadecimal digits of a weights_fingerprint


def weights_fingerprint(state_dict):
    """A short hash of a model's weights (the names, types, shapes and values of its state_dict): which model embedded
    an embedding database."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f'{name}:{tensor.dtype}:{tuple(tensor.shape)};'.encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:FINGERPRINT_LENGTH]


def is_weights_fingerprint(value):
    """Whether value has the form of a weights_fingerprint."""
    return isinstance(value, str) and re.fullmatch(f'[0-9a-f]{{{FINGERPRINT_LENGTH}}}', value) is not None


# ----------------------------------------------------------------------------- randomness

def set_seed(seed):
    """Seed python, numpy and torch (all devices) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def epoch_seed(seed, epoch):
    """A distinct seed for every (seed, epoch): an epoch's randomness depends on nothing else, so a resumed
    run repeats exactly what the uninterrupted run would have done."""
    return seed * 1_000_003 + epoch


# ----------------------------------------------------------------------------- meta-class ids

def create_id(meta_class_size, num_class, ensemble_size, label_type='fixed', generator=None, max_retries=10):
    """Meta-class ids of DREML: an (ensemble_size, num_class) int64 tensor whose row e maps every
    training class to one of meta_class_size meta-classes for ensemble member e.

    'fixed': each row is a shuffled balanced assignment and the columns (the classes' codes across all
    members) are distinct, so that the concatenated embedding can separate every training class.
    Rows are redrawn up to max_retries times; classes still sharing a code are then separated by swapping
    meta-classes between two classes of one row (which keeps the rows balanced), and as a last resort
    given unused codes.
    'random' (the original's create_random_id): the same balanced shuffled rows, without the distinctness
    check, so two classes may share a code.
    """
    M, C, E = meta_class_size, num_class, ensemble_size
    if min(M, C, E) < 1:
        raise ValueError(f'meta_class_size, num_class and ensemble_size must be >= 1, got {M}, {C}, {E}')
    if label_type not in LABEL_TYPES:
        raise ValueError(f"label_type must be 'fixed' or 'random', got {label_type!r}")
    if M > C:
        raise ValueError(f'meta_class_size {M} is larger than the number of training classes {C}: '
                         f'every meta-class needs at least one class')
    if label_type == 'random':
        return _balanced_rows(M, C, E, generator)
    if M ** E < C:
        raise ValueError(f'{M} meta-classes and {E} ensemble members give only {M ** E} distinct codes for '
                         f'{C} classes: increase --ensemble_size or --meta_class_size')
    for _ in range(max_retries):
        ids = _balanced_rows(M, C, E, generator)
        if torch.unique(ids, dim=1).shape[1] == C:
            return ids
    ids = _separate_by_swaps(ids, generator)
    return _complete_with_unused_codes(ids, M, generator)


def _balanced_rows(M, C, E, generator):
    """(E, C): every row a shuffled assignment of the C classes to M meta-classes of floor(C/M) or
    ceil(C/M) classes each."""
    balanced = torch.arange(C) % M
    return torch.stack([balanced[torch.randperm(C, generator=generator)] for _ in range(E)])


def _separate_by_swaps(ids, generator, tries_per_class=2000):
    """Swap the meta-classes of two classes within one row (row balance unchanged) whenever that gives
    a repeated code a new unique one without repeating another."""
    E, C = ids.shape
    ids = ids.clone()
    counts = Counter(tuple(column) for column in ids.T.tolist())
    for c in range(C):
        for _ in range(tries_per_class):
            if counts[tuple(ids[:, c].tolist())] == 1:
                break
            e = int(torch.randint(E, (1,), generator=generator))
            other = int(torch.randint(C, (1,), generator=generator))
            if ids[e, other] == ids[e, c]:
                continue
            old = [tuple(ids[:, c].tolist()), tuple(ids[:, other].tolist())]
            ids[e, c], ids[e, other] = ids[e, other].clone(), ids[e, c].clone()
            new = [tuple(ids[:, c].tolist()), tuple(ids[:, other].tolist())]
            counts.subtract(old)
            if counts[new[0]] == 0 and counts[new[1]] == 0:
                counts.update(new)
            else:  # the swap would repeat another code: undo it
                counts.update(old)
                ids[e, c], ids[e, other] = ids[e, other].clone(), ids[e, c].clone()
    return ids


def _complete_with_unused_codes(ids, meta_class_size, generator):
    """Give every class whose code repeats an earlier class's code a random code no class uses yet."""
    E, C = ids.shape
    ids = ids.clone()
    used = set()
    for c in range(C):
        code = tuple(ids[:, c].tolist())
        while code in used:
            ids[:, c] = torch.randint(meta_class_size, (E,), generator=generator)
            code = tuple(ids[:, c].tolist())
        used.add(code)
    return ids


def check_ids(ids, path, ensemble_size, num_class, meta_class_size):
    """Refuse meta-class ids (from a file or a checkpoint) that do not map num_class classes for every member."""
    expected = (ensemble_size, num_class)
    if tuple(ids.shape) != expected:
        raise ReirError(f'{path}: ids of shape {tuple(ids.shape)} do not fit --ensemble_size {ensemble_size} '
                        f'and {num_class} training classes (expected {expected})')
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool \
            or int(ids.min()) < 0 or int(ids.max()) >= meta_class_size:
        raise ReirError(f'{path}: ids must be integers from 0 to {meta_class_size - 1} '
                        f'(--meta_class_size {meta_class_size})')


# ----------------------------------------------------------------------------- images

def sample_train_images(train_dict, generator, max_per_class=MAX_IMAGES_PER_CLASS):
    """The run's training list: at most max_per_class images of every class (sorted by class key),
    as (relative path, class index) pairs."""
    images = []
    for index, key in enumerate(sorted(train_dict)):
        paths = train_dict[key]
        if len(paths) > max_per_class:
            chosen = torch.randperm(len(paths), generator=generator)[:max_per_class].sort().values
            paths = [paths[i] for i in chosen]
        images.extend((path, index) for path in paths)
    return images


def hold_out_classes(train_dict, count, generator):
    """(classes kept for training, classes held out): count training classes drawn at random, as two
    {class: [image paths]} dicts. The held-out classes serve as a zero-shot validation split."""
    keys = sorted(train_dict)
    held_out = {keys[i] for i in torch.randperm(len(keys), generator=generator)[:count].tolist()}
    return ({k: v for k, v in train_dict.items() if k not in held_out},
            {k: v for k, v in train_dict.items() if k in held_out})


def flatten_split(split_dict):
    """Every image of a split in a fixed order (sorted class keys) with its class key."""
    return [(path, key) for key in sorted(split_dict) for path in split_dict[key]]


def get_transform(crop_type, train, image_size, mean, std, exact=False):
    """The original REIR transforms. exact=False computes Resize(S) + RandomCrop(S) or
    CenterCrop(S) as one resize of the kept region (ResizeCrop), the same pixels up to float rounding."""
    if crop_type == 'cropped':
        steps = [transforms.Resize((image_size, image_size))]
        if train:
            steps.append(transforms.RandomHorizontalFlip())
    elif exact:
        steps = [transforms.Resize(image_size),
                 transforms.RandomCrop(image_size) if train else transforms.CenterCrop(image_size)]
        if train:
            steps.append(transforms.RandomHorizontalFlip())
    else:
        steps = [ResizeCrop(image_size, train)] + ([transforms.RandomHorizontalFlip()] if train else [])
    return transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(mean, std)])


def input_pipeline(crop_type, train, image_size, mean, std, exact=False):
    """(transform, min_side for load_rgb). exact: the original REIR's whole-image decoding and transforms;
    otherwise reduced-scale JPEG decoding and the single region resize (ResizeCrop)."""
    return get_transform(crop_type, train, image_size, mean, std, exact), None if exact else image_size


def short_side_size(width, height, size):
    """(width, height) after torchvision's Resize(size): the shorter side to size, the longer truncated."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


class ResizeCrop:
    """Resize(size) then RandomCrop(size) (random) or CenterCrop(size) of a PIL image, computed as a single
    PIL resize of the source region the crop keeps: size x size output pixels instead of the whole resized
    image, each computed from the same source pixels with the same filter. Draws the crop offset exactly
    as RandomCrop does, so the same seed gives the same crop."""

    def __init__(self, size, random):
        self.size, self.random = size, random

    def __call__(self, image):
        width, height = image.size
        size = self.size
        new_width, new_height = short_side_size(width, height, size)
        if not self.random:
            top, left = int(round((new_height - size) / 2.0)), int(round((new_width - size) / 2.0))
        elif new_width == size and new_height == size:
            top = left = 0
        else:  # the two draws of RandomCrop.get_params
            top = torch.randint(0, new_height - size + 1, size=(1,)).item()
            left = torch.randint(0, new_width - size + 1, size=(1,)).item()
        scale_x, scale_y = width / new_width, height / new_height
        box = (left * scale_x, top * scale_y, (left + size) * scale_x, (top + size) * scale_y)
        return image.resize((size, size), Image.BILINEAR, box=box)


def shown(names):
    """The first MAX_REPORTED of names, sorted, for a line that reports them."""
    return ', '.join(sorted(names)[:MAX_REPORTED]) + (', ...' if len(names) > MAX_REPORTED else '')


def is_visible(name):
    """Whether a file or folder name is one of a dataset's: not hidden (.DS_Store, the temporaries of an interrupted
    write) and not a temporary (*.tmp)."""
    return not name.startswith('.') and not name.endswith('.tmp')


def load_rgb(path, min_side=None):
    """An image as 8-bit RGB. With min_side (the default input pipeline), a JPEG at least twice that size on
    both sides is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, PIL draft), keeping both sides
    >= min_side: fewer pixels decoded for what a resize to min_side keeps; and a photo is turned upright by
    its EXIF orientation. min_side None decodes as the original REIR did: whole, orientation ignored."""
    with Image.open(path) as image:
        if min_side is not None:
            image.draft('RGB', (min_side, min_side))
            if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
                image = ImageOps.exif_transpose(image)
        return to_rgb(image)


def to_rgb(image):
    """8-bit RGB; 16-bit greyscale (a PNG of mode I;16 or I) is scaled to 8 bits, where PIL's convert would
    clip every value above 255 to white."""
    if image.mode.startswith('I;16') or image.mode == 'I':
        pixels = np.asarray(image).astype(np.float64) / 257                         # 65535 -> 255
        return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8)).convert('RGB')
    return image.convert('RGB')


class ImageReader(Dataset):
    """Images of a dataset folder with one target each, their class index. min_side: see load_rgb (None decodes
    every image whole)."""

    def __init__(self, root, items, targets, transform, min_side=None):
        self.items = items
        self.paths = [os.path.join(root, path) for path, _ in items]
        self.targets = targets
        self.transform = transform
        self.min_side = min_side

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return self.transform(load_rgb(self.paths[index], self.min_side)), self.targets[index]


class TrainReader(ImageReader):
    """Training images with their class index, read by (index, augmentation seed) items. An image
    that cannot be read is replaced by the next readable one (with a warning naming it) and counted, so one
    bad file never stops an epoch."""

    def __getitem__(self, item):
        index, seed = item
        failures = 0
        for offset in range(len(self)):
            path = self.paths[(index + offset) % len(self)]
            try:
                image = load_rgb(path, self.min_side)
            except UNREADABLE_IMAGE_ERRORS as e:
                warn(f'skipping unreadable training image {path} ({type(e).__name__})')
                failures += 1
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                image = self.transform(image)
            return image, self.targets[(index + offset) % len(self)], failures
        raise ReirError('no training image is readable')


class EvalReader(ImageReader):
    """Evaluation images with their class index and whether they could be read (the main process
    names an unreadable one; an exception raised in a worker would arrive as a traceback)."""

    def __getitem__(self, index):
        try:
            image = load_rgb(self.paths[index], self.min_side)
        except UNREADABLE_IMAGE_ERRORS:
            return self.transform(Image.new('RGB', (1, 1))), self.targets[index], False
        return self.transform(image), self.targets[index], True


# ----------------------------------------------------------------------------- retrieval metrics

def _as_label_tensor(labels, n, name):
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.numel() != n:
        raise ValueError(f'{name} must be a 1-D list of {n} labels, got shape {tuple(labels.shape)}')
    return labels.long()


def all_finite(vectors, rows=4096):
    """Whether an (N, d) tensor holds only finite values, checked in row blocks: torch.isfinite of the whole
    tensor at once holds several N x d temporaries (+830 MiB at 60,502 x 2,048)."""
    return all(bool(torch.isfinite(block).all()) for block in vectors.split(rows))


def _check_inputs(feature_vectors, feature_labels, gallery_vectors, gallery_labels):
    if feature_vectors.dim() != 2 or feature_vectors.shape[0] == 0:
        raise ValueError(f'feature_vectors must be a non-empty (N, d) tensor, got shape '
                         f'{tuple(feature_vectors.shape)}')
    query_labels = _as_label_tensor(feature_labels, feature_vectors.shape[0], 'feature_labels')
    for vectors in (feature_vectors, gallery_vectors):
        if vectors is not None and not all_finite(vectors):
            raise ValueError('the embeddings hold NaN or infinite values: no ranking can be computed from them')
    if gallery_vectors is None:
        if gallery_labels is not None:
            raise ValueError('gallery_labels given without gallery_vectors')
        return feature_vectors.detach(), query_labels, feature_vectors.detach(), query_labels, True
    if gallery_vectors.dim() != 2 or gallery_vectors.shape[0] == 0 \
            or gallery_vectors.shape[1] != feature_vectors.shape[1]:
        raise ValueError(f'gallery_vectors must be a non-empty (N, {feature_vectors.shape[1]}) tensor, got '
                         f'shape {tuple(gallery_vectors.shape)}')
    if gallery_labels is None:
        raise ValueError('gallery_vectors given without gallery_labels')
    gallery_labels = _as_label_tensor(gallery_labels, gallery_vectors.shape[0], 'gallery_labels')
    return feature_vectors.detach(), query_labels, gallery_vectors.detach(), gallery_labels, False


def _similarity(queries, gallery_t):
    """queries (c, d) @ gallery_t (d, N) -> (c, N) float32. On the CPU numpy's OpenBLAS does this product
    faster than torch (benchmark.py eval measures it), and the product dominates evaluation."""
    if queries.device.type == 'cpu':
        return torch.from_numpy(np.matmul(queries.numpy(), gallery_t.numpy()))
    return queries @ gallery_t


def _count_at_least(sims, thresholds):
    """(c,) number of entries of each row of sims at or above the row's threshold."""
    if sims.device.type == 'cpu':  # numpy counts a boolean mask several times faster than torch's sum
        return torch.from_numpy(np.count_nonzero(sims.numpy() >= thresholds.numpy()[:, None], axis=1))
    return (sims >= thresholds[:, None]).sum(1)


class _ClassIndex:
    """Where each query's same-class gallery items are: gallery indices sorted by label, and for each query
    the start and length of its class's run in that order."""

    def __init__(self, query_labels, gallery_labels):
        sorted_labels, self.order = torch.sort(gallery_labels, stable=True)
        self.start = torch.searchsorted(sorted_labels, query_labels, right=False)
        self.count = torch.searchsorted(sorted_labels, query_labels, right=True) - self.start

    def positives(self, rows):
        """(c, R) gallery indices of the same-class items of the queries `rows`, and a (c, R) validity mask."""
        count = self.count[rows]
        width = max(int(count.max()), 1)
        offsets = torch.arange(width, device=count.device)
        valid = offsets[None, :] < count[:, None]                                 # (c, R)
        index = (self.start[rows, None] + offsets[None, :]).clamp(max=len(self.order) - 1)
        return self.order[index], valid


def _default_chunk_size(num_gallery, memory_budget):
    # per similarity: 4 bytes of float32 score and 1 byte of comparison mask
    return max(1, min(4096, memory_budget // (5 * num_gallery)))


def retrieval_metrics(feature_vectors, feature_labels, rank, gallery_vectors=None, gallery_labels=None,
                      chunk_size=None, memory_budget=512 * 2 ** 20):
    """Recall@K for every K in rank, MAP@R and R-precision, exact, in one pass over query chunks.

    Memory is bounded by memory_budget bytes of similarities (chunk_size query rows at a time), never the
    N_query x N_gallery matrix. With feature_vectors as its own gallery (gallery_vectors None) each query's
    own entry is excluded. Ties never help: items are ranked by score, and an item of another class goes
    before a same-class item of equal score, so that a degenerate embedding (all vectors equal) scores 0,
    not 100%. The j-th best same-class item therefore has rank j + (other-class items scoring at least as
    high), and a query is a hit at K exactly when fewer than K other-class items score at least as high as
    its best same-class item. MAP@R averages, over the first R ranks, the precision at ranks that hold a
    same-class item (R = the query's same-class gallery items); R-precision is the same-class fraction of
    the first R. Queries with R = 0 are misses for Recall@K and left out of MAP@R and R-precision.
    Returns (recalls, map_at_r, r_precision) as fractions.
    """
    queries, query_labels, gallery, gallery_labels, self_retrieval = _check_inputs(
        feature_vectors, feature_labels, gallery_vectors, gallery_labels)
    ks = torch.as_tensor([int(k) for k in rank], dtype=torch.long)
    if ks.numel() == 0 or (ks < 1).any():
        raise ValueError(f'rank must be positive integers, got {list(rank)}')
    device = gallery.device
    query_labels, gallery_labels, ks = query_labels.to(device), gallery_labels.to(device), ks.to(device)
    # (d, N): a transposed view, except for float16 storage, which the product needs as float32
    gallery_t = gallery.t() if gallery.dtype == torch.float32 else gallery.t().float()
    classes = _ClassIndex(query_labels, gallery_labels)
    chunk_size = chunk_size or _default_chunk_size(gallery.shape[0], memory_budget)

    hits = torch.zeros(len(ks), dtype=torch.long, device=device)
    ap_sum = rp_sum = 0.0
    with_positives = 0
    for start in range(0, queries.shape[0], chunk_size):
        rows = torch.arange(start, min(start + chunk_size, queries.shape[0]), device=device)
        chunk = _chunk_statistics(queries[start:start + chunk_size].to(device).float(), rows, gallery_t, classes,
                                  ks, self_retrieval)
        hits += chunk[0]
        ap_sum, rp_sum, with_positives = ap_sum + chunk[1], rp_sum + chunk[2], with_positives + chunk[3]
    recalls = [float(h) / queries.shape[0] for h in hits.cpu()]
    if with_positives == 0:
        return recalls, 0.0, 0.0
    return recalls, ap_sum / with_positives, rp_sum / with_positives


def _chunk_statistics(queries, rows, gallery_t, classes, ks, self_retrieval):
    """Hits per K, sums of AP@R and R-precision, and the number of queries with a same-class item, for the
    queries `rows` (its (c, N) similarities are freed on return, before the next chunk's exist)."""
    device = gallery_t.device
    sims = _similarity(queries, gallery_t)                                       # (c, N)
    positive_index, valid = classes.positives(rows)                             # (c, R)
    if self_retrieval:
        sims[rows - rows[0], rows] = float('-inf')
        valid &= positive_index != rows[:, None]
    positive_scores = sims.gather(1, positive_index).masked_fill(~valid, float('-inf'))
    positive_scores = positive_scores.sort(dim=1, descending=True).values      # (c, R), -inf last
    num_positive = valid.sum(1)                                                  # (c,)
    found = num_positive > 0
    # from here on sims holds the other-class scores only (a row without same-class items is never read)
    sims.scatter_(1, torch.where(valid, positive_index, positive_index[:, :1]), float('-inf'))

    # The top r_max other-class scores of a row decide its Recall@K for K <= r_max and all of its MAP@R:
    # an item that ranks before the j-th same-class item while that item is within rank R is among them.
    r_max = max(int(num_positive.max()), 1)
    top = sims.topk(r_max, dim=1).values                                         # (c, r_max)
    best = positive_scores[:, 0]
    others_before_best = (top >= best[:, None]).sum(1)                           # (c,), exact below r_max
    # only rows whose best same-class item is not in the top r_max need a full count, and only for K > r_max
    uncounted = (found & (others_before_best == r_max)).nonzero().flatten() if int(ks.max()) > r_max else []
    for block in torch.split(torch.as_tensor(uncounted, dtype=torch.long), 256):
        others_before_best[block] = _count_at_least(sims[block], best[block]).to(device)
    hits = (found[:, None] & (others_before_best[:, None] < ks[None, :])).sum(0)  # (len(ks),)
    if not found.any():
        return hits, 0.0, 0.0, 0
    scores = positive_scores[:, :r_max]                                          # (c, r_max)
    others_before = (top[:, None, :] >= scores[:, :, None]).sum(2)               # (c, r_max)
    j = torch.arange(1, r_max + 1, device=device)
    ranks = j[None, :] + others_before                                           # (c, r_max)
    in_top_r = (j[None, :] <= num_positive[:, None]) & (ranks <= num_positive[:, None])
    r = num_positive[found].double()
    ap_sum = float(((in_top_r * j / ranks).sum(1)[found] / r).sum())
    rp_sum = float((in_top_r.sum(1)[found] / r).sum())
    return hits, ap_sum, rp_sum, int(found.sum())


def format_metrics(metrics, recalls):
    """Retrieval metrics in percent ({'recall@K': ..., 'map@r': ..., 'r_precision': ...}) as one line."""
    parts = [f'R@{k}: {metrics[f"recall@{k}"]:.2f}%' for k in recalls]
    return ' '.join(parts) + f' | MAP@R: {metrics["map@r"]:.2f}% | R-precision: {metrics["r_precision"]:.2f}%'


def recall(feature_vectors, feature_labels, rank, gallery_vectors=None, gallery_labels=None, **kwargs):
    """Recall@K for every K in rank, as fractions in [0, 1] (see retrieval_metrics)."""
    return retrieval_metrics(feature_vectors, feature_labels, rank, gallery_vectors, gallery_labels,
                             **kwargs)[0]


def map_at_r(feature_vectors, feature_labels, gallery_vectors=None, gallery_labels=None, **kwargs):
    """(MAP@R, R-precision) as fractions (see retrieval_metrics)."""
    _, map_r, r_precision = retrieval_metrics(feature_vectors, feature_labels, [1], gallery_vectors,
                                              gallery_labels, **kwargs)
    return map_r, r_precision


def same_class_in_top_k(feature_vectors, feature_labels, k, gallery_vectors=None, gallery_labels=None,
                        memory_budget=512 * 2 ** 20):
    """(N_query,) number of same-class gallery items among each query's k most similar, in the order of
    retrieval_metrics (an other-class item ranks before a same-class item of equal score; with no gallery
    given, each query's own entry is excluded). k is capped at the number of items a query is ranked against."""
    queries, query_labels, gallery, gallery_labels, self_retrieval = _check_inputs(
        feature_vectors, feature_labels, gallery_vectors, gallery_labels)
    k = min(int(k), gallery.shape[0] - self_retrieval)
    gallery_t = gallery.t().float()                                              # (d, N)
    # per similarity: its float32 score and four boolean masks
    chunk_size = max(1, min(4096, memory_budget // (8 * gallery.shape[0])))
    counts = []
    for start in range(0, queries.shape[0], chunk_size):
        rows = torch.arange(start, min(start + chunk_size, queries.shape[0]))
        sims = _similarity(queries[rows].float(), gallery_t)                     # (c, N)
        if self_retrieval:
            sims[rows - start, rows] = float('-inf')
        same = query_labels[rows, None] == gallery_labels[None, :]               # (c, N)
        kth = sims.topk(k, dim=1).values[:, -1:]                                 # (c, 1)
        above, tied = sims > kth, sims == kth
        # the places left after the items above the k-th score go to the tied items, other classes first
        left = k - above.sum(1)
        tied_others, tied_same = (tied & ~same).sum(1), (tied & same).sum(1)
        counts.append((above & same).sum(1) + (left - tied_others).clamp(min=0).minimum(tied_same))
    return torch.cat(counts)


def ranking(scores, same_class, k):
    """The indices of the k best of scores (N,), in the order of retrieval_metrics: by score, an item of another
    class (same_class (N,) False) before an item of the query's class of equal score, then by index."""
    order = np.lexsort((np.asarray(same_class, dtype=bool), -np.asarray(scores)))
    return order[:k].tolist()


def class_indices(labels):
    """{split: [class index]} for {split: [class key]}: one numbering of the classes of all the splits, in the order
    of their keys, so that a query and a gallery image of one class get one index."""
    index = {key: i for i, key in enumerate(sorted({key for keys in labels.values() for key in keys}))}
    return {split: [index[key] for key in keys] for split, keys in labels.items()}
