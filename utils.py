"""The library's shared pieces: errors and the command-line convention, file names, safe file I/O,
meta-class ids, datasets and their readers, transforms, and the retrieval metrics. Functions take what
they use as arguments (is_main_process, and so warn and log, ask torch.distributed which process this is);
the constants below are the one place each value is written."""
import argparse
import errno
import fcntl
import hashlib
import json
import math
import os
import pickle
import random
import re
import sys
import tempfile
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision import transforms

from model import BACKBONES, SHARE_TYPES

RESULTS_DIR = 'results'
CROP_TYPES = ('uncropped', 'cropped')
LABEL_TYPES = ('fixed', 'random')
MAX_IMAGES_PER_CLASS = 300  # DREML/REIR cap on training images per class, keeps SOP epochs bounded
EVAL_SPLITS = (('test',), ('query', 'gallery'))  # a dataset evaluates by self-retrieval or query/gallery
EXIF_ORIENTATION = 0x0112
# what PIL raises for a file that is not a readable image (SyntaxError and ValueError for some broken headers)
UNREADABLE_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
# what evaluate.py and inference.py need of a run besides its name: train.py's defaults, which they use
# for a setting only when the user passes it (EMBEDDING_SETTINGS change an embedding and are never guessed)
EMBEDDING_DEFAULTS = dict(recalls=[1, 2, 4, 8], data_path='data', image_size=256, exact_pipeline=False)
EMBEDDING_SETTINGS = ('image_size', 'exact_pipeline')
RUN_FILE_KINDS = ('_model.pth', '_data_base.pth')  # the files of a run that evaluate.py reads
# every file train.py writes for a run, <prefix>_<kind> (the meta-class ids are named apart: RunName.ids_name)
RUN_OUTPUTS = ('results.csv', 'curves.png', 'model.pth', 'args.json', 'data_base.pth', 'checkpoint.pth')
# what a checkpoint written before a key existed stands for: the start of an epoch, no classes held out, no torchrun
# job, data dicts not fingerprinted
CHECKPOINT_KEY_DEFAULTS = {'step': 0, 'running': [], 'held_out': [], 'elastic_job': '', 'data_fingerprint': ''}
STOPPED_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): stopped on request, to be continued


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
    is nothing to save (engine.StopSignals) or where the work agrees to stop. A BaseException, as KeyboardInterrupt is,
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
    except torch.cuda.OutOfMemoryError:
        print('error: CUDA out of memory: lower --batch_size, --ensemble_size or --image_size, or pass --amp',
              file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(interrupted() if callable(interrupted) else interrupted, file=sys.stderr)
        sys.exit(130)


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


# ----------------------------------------------------------------------------- file names

@dataclass(frozen=True)
class RunName:
    """The settings that name a run's files: every file of a run starts with its prefix,
    <data_name>_<crop_type>_<label_type>_<random|unrandom>_<share_type>_<model_type>_<E>_<M>."""
    data_name: str
    crop_type: str
    label_type: str
    with_random: bool
    share_type: str
    model_type: str
    ensemble_size: int
    meta_class_size: int

    PATTERN = re.compile(
        rf'^(?P<data_name>.+)_(?P<crop_type>{"|".join(CROP_TYPES)})_(?P<label_type>{"|".join(LABEL_TYPES)})'
        rf'_(?P<randomness>random|unrandom)_(?P<share_type>{"|".join(SHARE_TYPES)})'
        rf'_(?P<model_type>{"|".join(BACKBONES)})_(?P<ensemble_size>\d+)_(?P<meta_class_size>\d+)$')

    @classmethod
    def from_args(cls, args):
        return cls(**{name: getattr(args, name) for name in cls.__dataclass_fields__})

    @classmethod
    def parse(cls, prefix):
        """The RunName whose prefix is this text, or None."""
        match = cls.PATTERN.match(prefix)
        if match is None:
            return None
        return cls(match['data_name'], match['crop_type'], match['label_type'], match['randomness'] == 'random',
                   match['share_type'], match['model_type'], int(match['ensemble_size']),
                   int(match['meta_class_size']))

    @property
    def prefix(self):
        randomness = 'random' if self.with_random else 'unrandom'
        return (f'{self.data_name}_{self.crop_type}_{self.label_type}_{randomness}_{self.share_type}_'
                f'{self.model_type}_{self.ensemble_size}_{self.meta_class_size}')

    @property
    def ids_name(self):
        """The meta-class ids depend on the classes, label type, E and M only: runs that differ elsewhere
        (share type, backbone, --with_random) can share them with --load_ids."""
        return (f'{self.data_name}_{self.crop_type}_{self.label_type}_{self.ensemble_size}_'
                f'{self.meta_class_size}_ids.pth')


def data_dicts_path(data_path, data_name, crop_type):
    return os.path.join(data_path, data_name, f'{crop_type}_data_dicts.pth')


def eval_splits(names, source):
    """('test',) for self-retrieval datasets, ('query', 'gallery') for query/gallery ones, from the split
    names that source (data dicts, or an embedding database) holds."""
    for splits in EVAL_SPLITS:
        if all(split in names for split in splits):
            return splits
    raise ReirError(f'{source}: neither a test split nor query and gallery splits, only {", ".join(sorted(names))}')


def run_of_file(path, kinds=RUN_FILE_KINDS):
    """(RunName, path without the kind, kind) of a file a run wrote, named <prefix><kind>."""
    name = os.path.basename(path)
    kind = next((k for k in kinds if name.endswith(k)), None)
    run = RunName.parse(name[:-len(kind)]) if kind else None
    if run is None:
        raise UsageError(f'{path}: expected a file named <prefix>{" or <prefix>".join(kinds)}, with the '
                         f'prefix train.py writes (<data_name>_<crop_type>_..._<E>_<M>)')
    return run, path[:-len(kind)], kind


def is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value):
    """A finite int or float (not a bool, which json and pickles also give)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def three_numbers(values):
    return isinstance(values, (list, tuple)) and len(values) == 3 and all(is_number(v) for v in values)


# what the recorded settings of a run (<prefix>_args.json, the checkpoint's args) hold where present, as (what it
# must be, test): the settings evaluate.py and inference.py read
SETTINGS_FORMAT = {
    'image_size': ('a positive integer', lambda v: is_int(v) and v > 0),
    'exact_pipeline': ('true or false', lambda v: isinstance(v, bool)),
    'recalls': ('a list of positive integers', lambda v: isinstance(v, list) and bool(v)
                and all(is_int(k) and k > 0 for k in v)),
    'data_path': ('a path', lambda v: isinstance(v, str) and bool(v)),
    'mean': ('three numbers', lambda v: v is None or three_numbers(v)),
    'std': ('three numbers above 0', lambda v: v is None or (three_numbers(v) and min(v) > 0)),
    'held_out_classes': ('a list of class names', lambda v: isinstance(v, list) and all(isinstance(k, str) for k in v)),
}


def settings_problem(settings):
    """What makes a run's recorded settings unusable (not a dict, a value of SETTINGS_FORMAT of the wrong kind), or
    None."""
    if not isinstance(settings, dict):
        return f'the settings are a {type(settings).__name__}, not a dict of flags'
    for key, (kind, fits) in SETTINGS_FORMAT.items():
        if key in settings and not fits(settings[key]):
            return f'"{key}" is {settings[key]!r}, not {kind}'
    return None


def run_settings(prefix_path):
    """The flags of the run whose files start with prefix_path, from <prefix>_args.json (written with its model)
    or else its checkpoint; None when neither exists. A file that exists but does not hold the settings in the
    form SETTINGS_FORMAT says is refused, naming it."""
    path = prefix_path + '_args.json'
    if os.path.isfile(path):
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ReirError(f'{path}: the run\'s settings cannot be read ({type(e).__name__}); write the file again '
                            f'or delete it') from None
    else:
        path = prefix_path + '_checkpoint.pth'
        checkpoint = peek_checkpoint(path)
        if checkpoint is None:
            return None
        saved = checkpoint['args']
    problem = settings_problem(saved)
    if problem:
        raise ReirError(f'{path}: {problem}; write the file again or delete it')
    return saved


def embedding_settings(prefix_path, overrides, model_needed):
    """The settings of EMBEDDING_DEFAULTS for the run whose files start with prefix_path: the overrides that
    are not None, else the run's own (run_settings). The settings that change an embedding
    (EMBEDDING_SETTINGS) are never guessed: when a model must embed images and the run's files no longer say
    them, the user is asked to pass them. The others (recalls, data_path) default. mean and std are the run's
    recorded normalization, or None (see normalization); held_out_classes the training classes it held out for
    validation (--val_classes)."""
    saved = run_settings(prefix_path) or {}
    settings = {k: saved.get(k, EMBEDDING_DEFAULTS[k]) for k in EMBEDDING_DEFAULTS if k not in EMBEDDING_SETTINGS}
    settings.update({k: saved[k] for k in EMBEDDING_SETTINGS if k in saved})
    settings.update({k: v for k, v in overrides.items() if v is not None})
    settings.update(mean=saved.get('mean'), std=saved.get('std'))  # the normalization the run used, if recorded
    settings.update(held_out_classes=saved.get('held_out_classes', []))
    missing = [k for k in EMBEDDING_SETTINGS if k not in settings]
    if model_needed and missing:
        raise ReirError(f'cannot tell the run\'s {" and ".join("--" + k for k in missing)}: {prefix_path}_args.json '
                        f'and _checkpoint.pth are gone; pass --image_size N and --exact_pipeline or '
                        f'--no-exact_pipeline as the run was trained')
    return SimpleNamespace(**settings)


def normalization(settings, data_dicts):
    """(mean, std) the run normalized its images with when its files record them, else the dataset's."""
    return settings.mean or data_dicts['mean'], settings.std or data_dicts['std']


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
    splits = ('train',) + eval_splits(data_dicts, 'data dicts')
    for split in splits:
        classes = data_dicts[split]
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


# ----------------------------------------------------------------------------- safe file I/O

def save_together(writers):
    """Write a set of files {path: write(tmp_path)}: each to a temporary beside it, fsynced, then all renamed
    into place. A failure while writing (a full disk, a quota, a Ctrl-C) removes the temporaries and leaves
    the files as they were, never a mix of old and new; a disk error becomes a ReirError naming the file."""
    temporaries = {}
    try:
        for path, write in writers.items():
            directory = os.path.dirname(path) or '.'
            os.makedirs(directory, exist_ok=True)
            fd, temporaries[path] = tempfile.mkstemp(dir=directory, prefix=f'.{os.path.basename(path)}.',
                                                     suffix='.tmp')
            os.close(fd)
            os.chmod(temporaries[path], 0o666 & ~current_umask())  # mkstemp makes 0600 files
            try:
                write(temporaries[path])
                with open(temporaries[path], 'rb+') as f:
                    os.fsync(f.fileno())
            except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
                reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
                raise ReirError(f'could not write {path} ({reason}); the files there before are unchanged') from None
        for path, tmp in temporaries.items():
            os.replace(tmp, path)
    except BaseException:
        for tmp in temporaries.values():
            if os.path.exists(tmp):
                os.remove(tmp)
        raise


def atomic_write(path, write):
    """Call write(tmp_path), fsync, then rename over path: a kill at any moment leaves either the
    old file or the complete new one, never a half-written file."""
    save_together({path: write})


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temporaries(directory, prefix):
    """Delete the temporaries that a killed write of the run's files (<prefix>_<kind>, RUN_OUTPUTS) left; the
    kind is matched exactly, so that another run whose prefix begins with this one keeps its own."""
    for name in os.listdir(directory):
        if name.endswith('.tmp') and any(name.startswith(f'.{prefix}_{kind}.') for kind in RUN_OUTPUTS):
            os.remove(os.path.join(directory, name))


class RunLock:
    """An exclusive lock on results/.<prefix>.lock, held while the process lives: a second start of the same
    run fails at once instead of writing over the first's files. A POSIX record lock (lockf): the data loader's
    worker processes do not inherit it, so it ends with the process that took it, even on SIGKILL. The lock
    file stays (removing it would let two processes lock two files of one name)."""

    def __init__(self, directory, prefix):
        self.path = os.path.join(directory, f'.{prefix}.lock')
        try:
            os.makedirs(directory, exist_ok=True)
            self.file = open(self.path, 'a')
        except OSError as e:
            raise ReirError(f'cannot write the run\'s files in {directory}/ ({e.strerror}): pass a writable '
                            f'--results_dir') from None
        try:
            fcntl.lockf(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            self.file.close()
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise ReirError(f'cannot lock {self.path} ({e.strerror})') from None
            raise ReirError(f'{prefix} is being trained by another process (it holds {self.path}); wait for it, or '
                            f'change a setting of the prefix or --results_dir') from None

    def release(self):
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.release()


def torch_file(obj):
    return lambda tmp: torch.save(obj, tmp)


def checkpoint_file(trainable, progress):
    """A run's checkpoint: trainable, the model, optimizer, scheduler and scaler by name, saved by their state_dict;
    progress, the rest of CHECKPOINT_KEYS."""
    return torch_file({**{name: obj.state_dict() for name, obj in trainable.items()}, **progress})


def json_file(obj):
    def write(tmp):
        with open(tmp, 'w') as f:
            json.dump(obj, f, indent=1, sort_keys=True)
    return write


def csv_file(rows):
    """A list of {column: value} rows as a CSV."""
    return lambda tmp: pd.DataFrame(rows).to_csv(tmp, index=False)


def atomic_torch_save(obj, path):
    atomic_write(path, torch_file(obj))


def safe_load(path, what='file', verify=True, mmap=False):
    """torch.load with weights_only=True: tensors and plain containers only, never code. With verify, the zip
    archive's checksums are verified first, so that flipped bits or a truncation are refused, not loaded (it reads
    the whole file); with mmap, tensors stay on disk until used."""
    if not os.path.isfile(path):
        raise ReirError(f'{what} not found: {path}')
    damaged = f'{path}: {what} is corrupt or truncated'
    try:
        with zipfile.ZipFile(path) as archive:  # torch.save writes zip archives; anything else is damaged
            bad_member = archive.testzip() if verify else None
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
        raise ReirError(f'{damaged} ({type(e).__name__}); delete it or write it again') from None
    if bad_member is not None:
        raise ReirError(f'{damaged} (checksum mismatch in {bad_member}); delete it or write it again')
    try:
        return torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if 'Unsupported global' in line]
        reason = lines[0] if lines else 'it holds objects other than tensors and plain containers'
        raise ReirError(f'{path}: refused to load {what}, which could run code when loaded ({reason})') from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, TypeError, OSError) as e:
        raise ReirError(f'{damaged} ({type(e).__name__}); delete it or write it again') from None


def write_results_csv(rows, path):
    atomic_write(path, csv_file(rows))


def read_results(path):
    """The rows of a run's results CSV ({column: number}, one per epoch from epoch 1 on), refused (naming the file)
    when it is unreadable or empty, lacks the epoch or a recall column, or holds a value that is not a number."""
    try:
        frame = pd.read_csv(path)
    except FileNotFoundError:
        raise ReirError(f'{path} not found') from None
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, OSError) as e:
        raise ReirError(f'{path}: not a results CSV ({type(e).__name__})') from None
    if frame.empty:
        raise ReirError(f'{path}: holds no epoch')
    if 'epoch' not in frame or not any(c.startswith(('test_recall@', 'val_recall@')) for c in frame.columns):
        raise ReirError(f'{path}: not a results CSV (no epoch and recall columns)')
    numbers = frame.apply(pd.to_numeric, errors='coerce')
    if numbers.isna().any().any() or not np.isfinite(numbers.to_numpy(dtype=np.float64)).all():
        raise ReirError(f'{path}: holds a value that is not a number')
    if numbers['epoch'].tolist() != list(range(1, len(frame) + 1)):
        raise ReirError(f'{path}: its epochs are not 1 to {len(frame)} in order')
    rows = numbers.to_dict('records')
    return [{**row, 'epoch': int(row['epoch'])} for row in rows]


def selection_column(columns):
    """The results column that chooses a run's model: validation Recall@K for the first K of --recalls when
    the run held classes out (--val_classes), else test Recall@K."""
    recalls = [c for c in columns if c.startswith('val_recall@')] \
        or [c for c in columns if c.startswith('test_recall@')]
    if not recalls:
        raise ReirError(f'no val_recall@K or test_recall@K column among {", ".join(columns)}')
    return recalls[0]


def selected_row(rows):
    """The row (epoch) of a run's results whose model is the run's model: the first with the highest
    selection_column, as train.py keeps the first best epoch."""
    column = selection_column(list(rows[0]))
    return max(rows, key=lambda row: row[column])


def figure_file(draw, figsize, columns=1, dpi=80):
    """A writer of a PNG that draw(axes) draws on a new matplotlib figure of columns panels (the Agg backend, so
    that no display is needed); the figure is closed once written."""
    def write(tmp):
        import matplotlib
        matplotlib.use('Agg')
        from matplotlib import pyplot as plt
        figure, axes = plt.subplots(1, columns, figsize=figsize)
        try:
            draw(axes)
            figure.tight_layout()
            figure.savefig(tmp, format='png', dpi=dpi)
        finally:
            plt.close(figure)
    return write


def curves_file(results):
    """results/<prefix>_curves.png: loss, training accuracy and the retrieval metrics over the epochs (test
    solid, validation dashed)."""
    def draw(axes):
        frame = pd.DataFrame(results)
        retrieval = [c for c in frame.columns if c.startswith(('test_', 'val_'))]
        panels = (('train loss', ['train_loss']), ('train accuracy (%)', ['train_accuracy']),
                  ('retrieval (%)' if any(c.startswith('val_') for c in retrieval) else 'test retrieval (%)',
                   retrieval))
        for axis, (title, columns) in zip(axes, panels):
            for column in columns:
                style = '--' if column.startswith('val_') else '-'
                label = column.removeprefix('test_').replace('val_', 'val ')
                axis.plot(frame['epoch'], frame[column], style, marker='o', label=label)
            axis.set_title(title)
            axis.set_xlabel('epoch')
            axis.grid(alpha=0.3)
            if len(columns) > 1:
                axis.legend(fontsize='small')
    return figure_file(draw, (15, 4), columns=3)


def database_file(splits, dataset_root, settings):
    """The embedding database that evaluate.py and inference.py read: for every split, from
    splits[split] = ([(path relative to dataset_root, class key)], (N, E*M) features), the image paths from
    the working folder, the class keys and the features in float16; with the folder those paths start from
    and the run's settings (plain values), so that the file describes itself."""
    database = {'working_dir': os.getcwd(), 'settings': settings}
    for split, (items, features) in splits.items():
        database[f'{split}_images'] = [os.path.join(dataset_root, p) for p, _ in items]
        database[f'{split}_labels'] = [key for _, key in items]
        database[f'{split}_features'] = features.half()
    return torch_file(database)


def resolve_database(name):
    """An embedding database given as a path or as a file name under results/."""
    if os.path.isfile(name):
        return name
    candidate = os.path.join(RESULTS_DIR, name)
    if os.path.isfile(candidate):
        return candidate
    raise ReirError(f'embedding database {name} not found (as a path or under {RESULTS_DIR}/); '
                    f'train.py writes <prefix>_data_base.pth there')


def database_problem(splits):
    """What makes an embedding database's splits {name: (image paths, class keys, features)} unusable (values of the
    wrong kind, as many feature rows as neither labels nor images, non-finite features, splits of other widths), or
    None."""
    widths = set()
    for name, (images, labels, features) in splits.items():
        if not isinstance(images, list) or not all(isinstance(path, str) for path in images):
            return f'{name}_images is not a list of image paths'
        if not isinstance(labels, list) or not all(isinstance(key, (str, int)) for key in labels):
            return f'{name}_labels is not a list of class ids'
        if not isinstance(features, torch.Tensor) or features.dim() != 2 or not features.is_floating_point():
            return f'{name}_features is not an (N, d) tensor of floats'
        if not len(images) == len(labels) == features.shape[0]:
            return (f'{name}_features has {features.shape[0]} rows for {len(labels)} labels and {len(images)} '
                    f'images')
        if not len(labels):
            return f'the {name} split is empty'
        if not all_finite(features):
            return f'{name}_features holds NaN or infinite values'
        widths.add(features.shape[1])
    if len(widths) > 1:
        return f'its splits have features of different widths ({", ".join(map(str, sorted(widths)))})'
    return None


def load_database(path):
    """{split: (image paths, class keys, (N, E*M) float16 features)} of an embedding database, refused (naming the
    file) unless each split is whole (database_problem). Relative image paths are read from the folder the run
    worked in when they are not found from this one."""
    database = safe_load(path, 'embedding database')
    names = [key[:-len('_features')] for key in database if key.endswith('_features')] \
        if isinstance(database, dict) else []
    if not names or any(f'{name}_{kind}' not in database for name in names for kind in ('images', 'labels')):
        raise ReirError(f'{path}: not an embedding database (<split>_images, _labels and _features)')
    splits = {name: (database[f'{name}_images'], database[f'{name}_labels'], database[f'{name}_features'])
              for name in names}
    problem = database_problem(splits)
    if problem:
        raise ReirError(f'{path}: {problem}; write it again (evaluate.py or train.py --resume)')
    origin = database.get('working_dir')
    first = next((images[0] for images, _, _ in splits.values() if images), None)
    if isinstance(origin, str) and first is not None and not os.path.exists(first) \
            and os.path.exists(os.path.join(origin, first)):
        splits = {name: ([os.path.join(origin, p) for p in images], labels, features)
                  for name, (images, labels, features) in splits.items()}
    return splits


def is_state(value):
    return isinstance(value, dict) and all(isinstance(key, (str, int)) for key in value)


def is_model_state(value):
    """Whether value is a model's state_dict: tensors by name."""
    return is_state(value) and all(isinstance(tensor, torch.Tensor) for tensor in value.values())


# what <prefix>_checkpoint.pth holds, everything --resume needs, as {key: (what it must be, test)}
CHECKPOINT_FORMAT = {
    'model': ('a state_dict of tensors', is_model_state),
    'optimizer': ('a state_dict', lambda v: is_state(v) and {'state', 'param_groups'} <= set(v)),
    'scheduler': ('a state_dict', is_state),
    'scaler': ('a state_dict', is_state),
    'epoch': ('an epoch number from 1', lambda v: is_int(v) and v >= 1),
    'step': ('a step count from 0', lambda v: is_int(v) and v >= 0),
    'running': ('a list of running sums and random states', lambda v: isinstance(v, list) and all(
        isinstance(p, dict) and isinstance(p.get('sums'), list) and len(p['sums']) == 4
        and all(is_number(x) for x in p['sums']) and isinstance(p.get('rng'), dict) for p in v)),
    'best_recall': ('a number', is_number),
    'results': ('a list of result rows', lambda v: isinstance(v, list) and all(
        isinstance(row, dict) and is_int(row.get('epoch')) for row in v)),
    'args': ('a dict of flags', lambda v: isinstance(v, dict)),
    'ids': ('an (E, C) tensor of integers', lambda v: isinstance(v, torch.Tensor) and v.dim() == 2
            and not (v.is_floating_point() or v.is_complex() or v.dtype == torch.bool)),
    'train_items': ('a list of (image path, class index) pairs', lambda v: isinstance(v, list) and all(
        isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str) and is_int(item[1])
        for item in v)),
    'held_out': ('a list of class names', lambda v: isinstance(v, list) and all(isinstance(k, str) for k in v)),
    'elastic_job': ('a torchrun job id', lambda v: isinstance(v, str)),
    'data_fingerprint': ('a data fingerprint', lambda v: isinstance(v, str)),
}
CHECKPOINT_KEYS = tuple(CHECKPOINT_FORMAT)


def checkpoint_problem(checkpoint, required=CHECKPOINT_KEYS):
    """What makes a checkpoint unusable (not a dict, a required key missing, any value not of the kind
    CHECKPOINT_FORMAT says), or None. Keys of CHECKPOINT_KEY_DEFAULTS may be absent (older checkpoints)."""
    if not isinstance(checkpoint, dict):
        return f'not a REIR checkpoint but a {type(checkpoint).__name__}'
    missing = [key for key in required if key not in checkpoint and key not in CHECKPOINT_KEY_DEFAULTS]
    if missing:
        return f'not a REIR checkpoint (missing {", ".join(missing)})'
    for key, (kind, fits) in CHECKPOINT_FORMAT.items():
        if key in checkpoint and not fits(checkpoint[key]):
            return f'its "{key}" is not {kind}'
    return None


def load_checkpoint(path):
    """A run's checkpoint, refused (naming the file and the problem) unless it is whole and every key of
    CHECKPOINT_FORMAT holds what it should; keys of CHECKPOINT_KEY_DEFAULTS may be absent and take their defaults."""
    checkpoint = safe_load(path, 'checkpoint')
    problem = checkpoint_problem(checkpoint)
    if problem:
        raise ReirError(f'{path}: {problem}; delete it and start again without --resume')
    return {**CHECKPOINT_KEY_DEFAULTS, **checkpoint}


def peek_checkpoint(path):
    """A run's checkpoint read memory-mapped (its tensors stay on disk, their checksums unread), for its flags and
    position; None when it is absent, unreadable, or lacks args and epoch or holds a key of the wrong kind."""
    try:
        checkpoint = safe_load(path, 'checkpoint', verify=False, mmap=True)
    except ReirError:
        return None
    if checkpoint_problem(checkpoint, required=('args', 'epoch')):
        return None
    return {**CHECKPOINT_KEY_DEFAULTS, **checkpoint}


# ----------------------------------------------------------------------------- randomness

def set_seed(seed):
    """Seed python, numpy and torch (all devices) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


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


# ----------------------------------------------------------------------------- data

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
    """Images of a dataset folder with one target each: the (E,) meta-class labels for training,
    the class index for evaluation. min_side: see load_rgb (None decodes every image whole)."""

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
    """Training images with their (E,) meta-class labels, read by (index, augmentation seed) items. An image
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


def recall(feature_vectors, feature_labels, rank, gallery_vectors=None, gallery_labels=None, **kwargs):
    """Recall@K for every K in rank, as fractions in [0, 1] (see retrieval_metrics)."""
    return retrieval_metrics(feature_vectors, feature_labels, rank, gallery_vectors, gallery_labels,
                             **kwargs)[0]


def map_at_r(feature_vectors, feature_labels, gallery_vectors=None, gallery_labels=None, **kwargs):
    """(MAP@R, R-precision) as fractions (see retrieval_metrics)."""
    _, map_r, r_precision = retrieval_metrics(feature_vectors, feature_labels, [1], gallery_vectors,
                                              gallery_labels, **kwargs)
    return map_r, r_precision

