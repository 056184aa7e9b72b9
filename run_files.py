"""A run's name and files: the prefix that names them and every path it gives, the lock that claims a run, safe
writes (temporary files renamed into place together), the formats of the files a run writes and the scripts read
(results CSV and the selection rule, settings, checkpoint), each checked in one place, and the RunState its
checkpoint holds besides the trainable states."""
import contextlib
import copy
import json
import math
import os
import re
import shutil
import socket
import tempfile
import threading
from dataclasses import dataclass, field, fields
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch

import locks
import loss_choice
import original
import utils
from model import BACKBONES, DEFAULT_LOSS, SHARE_TYPES

RESULTS_DIR = 'results'
# every file train.py writes for a run, <prefix>_<kind>, and --overwrite removes (RunName.paths names them all)
RUN_OUTPUTS = ('results.csv', 'curves.png', 'model.pth', 'args.json', 'data_base.pth', 'checkpoint.pth')
# the run's TensorBoard log, a folder (tensorboard_log.py), which --overwrite removes too; one without the run's other
# files is of a start that saved nothing, which a new start replaces (so it does not count as the run's files)
RUN_LOG = 'tensorboard'
RUN_FILE_KINDS = ('model.pth', 'data_base.pth')  # the files of a run that evaluate.py reads
# what evaluate.py and inference.py need of a run besides its name: train.py's defaults, which they use
# for a setting only when the user passes it (EMBEDDING_SETTINGS change an embedding and are never guessed)
EMBEDDING_DEFAULTS = dict(recalls=[1, 2, 4, 8], data_path='data', image_size=256, exact_pipeline=False)
EMBEDDING_SETTINGS = ('image_size', 'exact_pipeline')
# what a checkpoint written before a key existed stands for: the start of an epoch, no classes held out, no torchrun
# job, data dicts not fingerprinted, the original's loss (which holds no state)
CHECKPOINT_KEY_DEFAULTS = {'step': 0, 'running': [], 'held_out': [], 'elastic_job': '', 'data_fingerprint': '',
                           'loss': {}, 'log': {}}
TEMPORARY_SUFFIX = '.tmp'  # of the temporary a file is written to before it is renamed into place (save_together)
HOLD_OUT_DRAW = -1  # the held-out classes are drawn as "epoch -1", the training list as "epoch 0" (utils.epoch_seed)


# ----------------------------------------------------------------------------- a run's name and paths

@dataclass(frozen=True)
class RunName:
    """The settings that name a run's files: every file of a run starts with its prefix,
    <data_name>_<crop_type>_<label_type>_<random|unrandom>_<share_type>_<model_type>_<E>_<M>, as the original
    REIR's, followed by _<loss> for a loss other than the original's (model.DEFAULT_LOSS), its settings given other
    values than their defaults after it (_normsoftmax-temperature=0.1: loss_choice.prefix_part). loss: the --loss
    text (loss_choice.LossChoice.text)."""
    data_name: str
    crop_type: str
    label_type: str
    with_random: bool
    share_type: str
    model_type: str
    ensemble_size: int
    meta_class_size: int
    loss: str = DEFAULT_LOSS

    PATTERN = re.compile(
        rf'^(?P<data_name>.+)_(?P<crop_type>{"|".join(utils.CROP_TYPES)})_(?P<label_type>{"|".join(utils.LABEL_TYPES)})'
        rf'_(?P<randomness>random|unrandom)_(?P<share_type>{"|".join(SHARE_TYPES)})'
        rf'_(?P<model_type>{"|".join(BACKBONES)})_(?P<ensemble_size>\d+)_(?P<meta_class_size>\d+)'
        rf'(?:_(?P<loss>{loss_choice.PREFIX_PATTERN}))?$')

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
                   int(match['meta_class_size']),
                   loss_choice.text_of_prefix_part(match['loss']) if match['loss'] else DEFAULT_LOSS)

    @property
    def prefix(self):
        randomness = 'random' if self.with_random else 'unrandom'
        loss = '' if self.loss == DEFAULT_LOSS else f'_{loss_choice.prefix_part(self.loss)}'
        return (f'{self.data_name}_{self.crop_type}_{self.label_type}_{randomness}_{self.share_type}_'
                f'{self.model_type}_{self.ensemble_size}_{self.meta_class_size}{loss}')

    def paths(self, results_dir):
        """Every file of the run in results_dir, by kind: <prefix>_<kind> for each of RUN_OUTPUTS, for evaluate.py's
        'eval.csv' and for the log folder (RUN_LOG); 'ids', the meta-class ids, which runs that differ only in share
        type, backbone, --with_random or --loss share; 'lock' (RunLock)."""
        prefix_path = os.path.join(results_dir, self.prefix)
        return {**{kind: f'{prefix_path}_{kind}' for kind in (*RUN_OUTPUTS, 'eval.csv', RUN_LOG)},
                'ids': os.path.join(results_dir, self.ids_name),
                'lock': os.path.join(results_dir, f'.{self.prefix}.lock')}

    @property
    def ids_name(self):
        """The meta-class ids depend on the classes, label type, E and M only: runs that differ elsewhere
        (share type, backbone, --with_random, --loss) can share them with --load_ids."""
        return (f'{self.data_name}_{self.crop_type}_{self.label_type}_{self.ensemble_size}_'
                f'{self.meta_class_size}_ids.pth')


def run_of_file(path, kinds=RUN_FILE_KINDS, prefix=None, prefix_option='--prefix'):
    """(RunName, RunName.paths, kind) of a file a run wrote, named <prefix>_<kind> (the original REIR named its files so
    too). prefix: the run's prefix, for a file whose name does not carry it; the paths are then those of that prefix
    beside the file, with the file itself as its kind. The loss the prefix names must be one there is. prefix_option:
    how the caller gives prefix (evaluate.py's --prefix, torch.hub's prefix=), for the advice."""
    name = os.path.basename(path)
    given = f'{prefix_option}{prefix}' if prefix_option.endswith('=') else f'{prefix_option} {prefix}'
    kind = next((k for k in kinds if name.endswith(f'_{k}')), None)
    if kind is None and prefix:
        raise utils.UsageError(f'{path}: expected a file whose name ends in _{" or _".join(kinds)}')
    run = RunName.parse(prefix or name[:-len(kind) - 1]) if kind else None
    if run is None and prefix:
        raise utils.UsageError(f'{given}: not a run\'s prefix (<data_name>_<crop_type>_<label_type>_'
                               f'<random|unrandom>_<share_type>_<model_type>_<E>_<M>)')
    if run is None:
        raise utils.UsageError(f'{path}: expected a file named <prefix>_{" or <prefix>_".join(kinds)}, with the '
                               f'prefix train.py writes (<data_name>_<crop_type>_..._<E>_<M>), or pass '
                               f'{prefix_option}')
    try:
        loss_choice.LossChoice.parse(run.loss)
    except ValueError as e:
        raise utils.UsageError(f'{prefix or name}: its prefix names the loss {run.loss}: {e}') from None
    return run, {**run.paths(os.path.dirname(path)), kind: path}, kind


# ----------------------------------------------------------------------------- safe writes

def save_together(writers):
    """Write a set of files {path: write(tmp_path)}: each to a temporary beside it, fsynced, then all renamed
    into place. A failure at any of these (a folder that cannot be made or written, a full disk, a file-size limit,
    a Ctrl-C) removes the temporaries and leaves the files as they were, never a mix of old and new; a disk error
    becomes a ReirError naming the file and the operating system's reason."""
    temporaries = {}
    path = None
    try:
        for path, write in writers.items():
            directory = os.path.dirname(path) or '.'
            os.makedirs(directory, exist_ok=True)
            fd, temporaries[path] = tempfile.mkstemp(dir=directory, prefix=temporary_prefix(path),
                                                     suffix=TEMPORARY_SUFFIX)
            os.close(fd)
            os.chmod(temporaries[path], 0o666 & ~current_umask())  # mkstemp makes 0600 files
            write(temporaries[path])
            with open(temporaries[path], 'rb+') as f:
                os.fsync(f.fileno())
        for path, tmp in temporaries.items():
            os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write it cannot trace as a RuntimeError
        remove_temporaries(temporaries)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise utils.ReirError(f'could not write {path} ({reason}); the files there before are unchanged') from None
    except BaseException:
        remove_temporaries(temporaries)
        raise


def temporary_prefix(path):
    """The name a file's temporary starts with: .<name>. (then mkstemp's 8 random characters, TEMPORARY_SUFFIX)."""
    return f'.{os.path.basename(path)}.'


def remove_temporaries(temporaries):
    for tmp in temporaries.values():
        with contextlib.suppress(OSError):
            os.remove(tmp)


class BackgroundWrites:
    """save_together in a thread of its own, so that training goes on while a checkpoint is written: one set of files
    at a time (submit waits for the one before), from host copies its writers hold (checkpoint_file, host_copy).
    A kill during a write leaves the files as they were (save_together); a failed write is raised by the next submit
    or wait, and leaving the block waits for the write in flight."""

    def __init__(self):
        self.thread, self.failure = None, None

    def submit(self, writers):
        self.wait()
        self.thread = threading.Thread(target=self.write, args=(writers,), name='reir-writes')
        self.thread.start()

    def write(self, writers):
        try:
            save_together(writers)
        except BaseException as e:  # raised in the main thread by wait()
            self.failure = e

    def wait(self):
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        failure, self.failure = self.failure, None
        if failure is not None:
            raise failure

    def __enter__(self):
        return self

    def __exit__(self, kind, *exc_info):
        if kind is None:
            self.wait()
        elif self.thread is not None:
            self.thread.join()  # the files in flight are written; the failure in progress is the one to report


def host_copy(obj):
    """obj with every tensor copied to the CPU, containers copied too, each of its own type and with the same keys and
    values (a scheduler's milestones are a Counter, a module's state an OrderedDict): what a write in the background
    may read while training changes the originals."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to('cpu', copy=True)
    if isinstance(obj, dict):
        copied = copy.copy(obj)  # of its own type, with its attributes (an OrderedDict's _metadata, a default_factory)
        for key, value in obj.items():
            copied[key] = host_copy(value)  # assigned: a Counter's update() would add counts
        return copied
    if isinstance(obj, list):
        return [host_copy(value) for value in obj]
    if isinstance(obj, tuple):
        values = [host_copy(value) for value in obj]
        return type(obj)(*values) if hasattr(obj, '_fields') else type(obj)(values)  # a namedtuple takes fields
    return obj


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
        if name.endswith(TEMPORARY_SUFFIX) and any(name.startswith(temporary_prefix(f'{prefix}_{kind}'))
                                                   for kind in RUN_OUTPUTS):
            os.remove(os.path.join(directory, name))


class _RecordedFile:
    """A file torch.save writes to through Python, which keeps the operating system's error: torch reports a write
    that failed (no space, a file-size limit) only as '[enforce fail at inline_container.cc] unexpected pos'."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.file.flush()


def torch_file(obj):
    def write(tmp):
        with open(tmp, 'wb') as f:
            recorded = _RecordedFile(f)
            try:
                torch.save(obj, recorded)
            except RuntimeError:
                if recorded.error is not None:
                    raise recorded.error from None
                raise
    return write


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


# ----------------------------------------------------------------------------- claiming a run

def write_problem(paths):
    """Why a run cannot write its files at paths (RunName.paths), or None: the folder they go to, or the nearest
    existing folder above it, is not a folder or not writable, or a path, or the temporary name a file is written under
    first (save_together), is longer than the file system takes. Checked before a run claims anything, so that a
    refused run writes nothing and an accepted one does not fail at its first save, an epoch later."""
    directory = os.path.dirname(paths['lock']) or '.'
    existing = os.path.dirname(locks.missing_folders(directory)[-1]) if not os.path.exists(directory) else directory
    if not os.path.isdir(existing):
        return f'{existing} is not a folder'
    if not os.access(existing, os.W_OK | os.X_OK):
        return f'{existing}/ is not writable'
    log = paths[RUN_LOG]
    if os.path.exists(log) and not (os.path.isdir(log) and os.access(log, os.W_OK | os.X_OK)):
        return f'{log} is not a writable folder, where the run\'s TensorBoard log goes'
    name_max, path_max = os.pathconf(existing, 'PC_NAME_MAX'), os.pathconf(existing, 'PC_PATH_MAX')
    for path in (*paths.values(), locks.lock_path(paths['ids']), *longest_log_paths(log)):
        longest = os.path.join(os.path.dirname(path), f'{temporary_prefix(path)}{"x" * 8}{TEMPORARY_SUFFIX}')
        if len(os.fsencode(longest)) >= path_max:
            return (f'its files\' paths would be {len(os.fsencode(longest))} bytes long, and the file system takes '
                    f'{path_max - 1}')
        too_long = [name for name in longest.split(os.sep) if len(os.fsencode(name)) > name_max]
        if too_long:
            return f'the name {too_long[0][:40]}... is longer than the {name_max} bytes the file system takes'
    return None


def longest_log_paths(folder):
    """The longest paths a run's TensorBoard log writes in folder: an event file, whose name holds the time, host and
    process (TensorBoard's), and the Projector's metadata under its step."""
    event = f'events.out.tfevents.{"9" * 10}.{socket.gethostname()}.{"9" * 7}.{"9" * 3}'
    return [os.path.join(folder, event), os.path.join(folder, '9' * 7, 'query', 'metadata.tsv')]


class RunLock(locks.LockFile):
    """The lock of a run in progress, results/.<prefix>.lock (locks.LockFile): a second start of the same run fails
    at once instead of writing over the first's files."""

    def __init__(self, path, prefix):
        try:
            super().__init__(path, wait=False)
        except BlockingIOError:
            raise utils.ReirError(f'{prefix} is being trained by another process (it holds {path}); wait for it, or '
                                  f'change a setting of the prefix or --results_dir') from None


def ids_lock(path):
    """The meta-class ids file at path to this process alone, waited for (a locks.LockFile beside it): runs that
    share it check what it holds and write it one at a time, so that none trains on ids another replaces."""
    return locks.LockFile(locks.lock_path(path), wait=True)


def claim_run(args, run, paths):
    """Lock the run's prefix (RunLock), once its paths are known to be writable (write_problem), and refuse a start
    that would replace an earlier run with this prefix unasked: its files need --resume (continue it) or --overwrite
    (start_run removes them once the run is certain to start). Returns the lock, whose release leaves no lock file
    and no folder it made that the run left empty."""
    problem = write_problem(paths)
    if problem:
        folder = args.results_dir if len(args.results_dir) <= 120 else \
            f'{args.results_dir[:60]}...{args.results_dir[-40:]} ({len(args.results_dir)} characters)'
        raise utils.ReirError(f'--results_dir {folder}: {problem}; pass another --results_dir')
    lock = RunLock(paths['lock'], run.prefix)
    remove_stale_temporaries(args.results_dir, run.prefix)
    existing = [paths[kind] for kind in RUN_OUTPUTS if os.path.exists(paths[kind])]
    if existing and not args.resume and not args.overwrite:
        lock.release()
        raise utils.UsageError(f'{args.results_dir}/ holds the files of a run with these settings '
                               f'({", ".join(os.path.basename(p) for p in existing)}): continue it with '
                               f'--resume, or pass --overwrite to start over')
    return lock


def start_run(args, run, paths, ids):
    """What the main process writes once every check that could refuse the run has passed: with --overwrite the
    earlier run's files go, and a run that drew its meta-class ids saves them, checked again under the ids file's
    lock (ids_refusal): another run that shares the file may have written it since draw_or_load_ids looked."""
    if args.resume or args.load_ids:
        remove_earlier_files(args, paths)
        return
    with ids_lock(paths['ids']):
        refusal = ids_refusal(args, run, paths['ids'], ids)
        if refusal:
            raise utils.UsageError(refusal)
        remove_earlier_files(args, paths)
        atomic_torch_save(ids, paths['ids'])


def remove_earlier_files(args, paths):
    if args.overwrite:
        for kind in RUN_OUTPUTS:
            if os.path.exists(paths[kind]):
                os.remove(paths[kind])
        if os.path.isdir(paths[RUN_LOG]):
            shutil.rmtree(paths[RUN_LOG])


def draw_or_load_ids(args, run, paths, num_class, generator):
    """The run's meta-class ids (E, C): those saved under --results_dir with --load_ids, else drawn. Writes nothing
    (start_run writes drawn ids); refuses to draw ids other than the saved ones (ids_refusal)."""
    path = paths['ids']
    if args.load_ids:
        ids = utils.safe_load(path, 'meta-class ids')
        if not isinstance(ids, torch.Tensor):
            raise utils.ReirError(f'{path}: holds a {type(ids).__name__}, not a tensor of meta-class ids')
        utils.check_ids(ids, path, args.ensemble_size, num_class, args.meta_class_size)
        return ids.long()
    try:
        ids = utils.create_id(args.meta_class_size, num_class, args.ensemble_size, args.label_type, generator)
    except ValueError as e:
        raise utils.UsageError(str(e)) from None
    refusal = ids_refusal(args, run, path, ids) if utils.is_main_process() else None
    if refusal:
        raise utils.UsageError(refusal)
    return ids


def ids_refusal(args, run, path, ids):
    """Why the drawn ids may not be saved at path, or None: the file holds other ids, which --overwrite may replace
    only where no other run uses them (runs that differ in share type, backbone, --with_random or --loss share one ids
    file: its files, or a run of it in progress)."""
    if not os.path.isfile(path):
        return None
    saved = utils.safe_load(path, 'meta-class ids')
    if same_ids(saved, ids):
        return None
    sharing = runs_sharing_ids(args.results_dir, run)
    if sharing:
        return (f'{path} holds other ids than --seed {args.seed} draws, and the run {sharing[0]} uses them: reuse '
                f'them with --load_ids, or train in another --results_dir')
    if not args.overwrite:
        return (f'{path} holds other ids than --seed {args.seed} draws: reuse them with --load_ids, or pass '
                f'--overwrite to replace them')
    return None


def same_ids(saved, ids):
    """Whether what an ids file holds (saved) is the meta-class ids tensor ids."""
    return isinstance(saved, torch.Tensor) and saved.shape == ids.shape and torch.equal(saved.long(), ids.long())


def runs_sharing_ids(results_dir, run):
    """The prefixes of the other runs in results_dir that use the same meta-class ids file as run: whose files name
    it, or which are being trained (their RunLock held)."""
    prefixes = set()
    for name in os.listdir(results_dir) if os.path.isdir(results_dir) else []:
        for kind in RUN_OUTPUTS:
            other = RunName.parse(name[:-len(kind) - 1]) if name.endswith(f'_{kind}') else None
            if other is not None and other != run and other.ids_name == run.ids_name:
                prefixes.add(other.prefix)
        other = RunName.parse(name[1:-len('.lock')]) if name.startswith('.') and name.endswith('.lock') else None
        if other is not None and other != run and other.ids_name == run.ids_name \
                and locks.held_elsewhere(os.path.join(results_dir, name)):
            prefixes.add(other.prefix)
    return sorted(prefixes)


# ----------------------------------------------------------------------------- results and the selection rule

def write_results_csv(rows, path):
    atomic_write(path, csv_file(rows))


def read_results(path):
    """The rows of a run's results CSV ({column: number}, one per epoch from epoch 1 on), refused (naming the file)
    when it is unreadable or empty, lacks the epoch or a recall column, or holds a value that is not a number."""
    try:
        frame = pd.read_csv(path)
    except FileNotFoundError:
        raise utils.ReirError(f'{path} not found') from None
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, OSError) as e:
        raise utils.ReirError(f'{path}: not a results CSV ({type(e).__name__})') from None
    if frame.empty:
        raise utils.ReirError(f'{path}: holds no epoch')
    if 'epoch' not in frame or not any(c.startswith(('test_recall@', 'val_recall@')) for c in frame.columns):
        raise utils.ReirError(f'{path}: not a results CSV (no epoch and recall columns)')
    numbers = frame.apply(pd.to_numeric, errors='coerce')
    if numbers.isna().any().any() or not np.isfinite(numbers.to_numpy(dtype=np.float64)).all():
        raise utils.ReirError(f'{path}: holds a value that is not a number')
    if numbers['epoch'].tolist() != list(range(1, len(frame) + 1)):
        raise utils.ReirError(f'{path}: its epochs are not 1 to {len(frame)} in order')
    rows = numbers.to_dict('records')
    return [{**row, 'epoch': int(row['epoch'])} for row in rows]


def selection_column(columns):
    """The results column that chooses a run's model: validation Recall@K for the first K of --recalls when
    the run held classes out (--val_classes), else test Recall@K."""
    recalls = [c for c in columns if c.startswith('val_recall@')] \
        or [c for c in columns if c.startswith('test_recall@')]
    if not recalls:
        raise utils.ReirError(f'no val_recall@K or test_recall@K column among {", ".join(columns)}')
    return recalls[0]


def selected_row(rows):
    """The row (epoch) of a run's results whose model is the run's model: the first with the highest
    selection_column, as train.py keeps the first best epoch."""
    column = selection_column(list(rows[0]))
    return max(rows, key=lambda row: row[column])


# ----------------------------------------------------------------------------- settings

def recorded_settings(args, data_dicts, held_out):
    """What <prefix>_args.json and the database record of the run: its flags, every setting of its loss (those --loss
    left at their defaults too), the normalization it used (a folder dataset prepared again with more images gets
    another mean and std) and the training classes it held out for validation."""
    return dict(vars(args), loss_settings=loss_choice.LossChoice.parse(args.loss).settings(),
                mean=list(data_dicts['mean']), std=list(data_dicts['std']), held_out_classes=sorted(held_out))


# what the recorded settings of a run (<prefix>_args.json, the checkpoint's args) hold where present, as (what it
# must be, test): the settings evaluate.py and inference.py read
SETTINGS_FORMAT = {
    'image_size': ('a positive integer', lambda v: utils.is_int(v) and v > 0),
    'exact_pipeline': ('true or false', lambda v: isinstance(v, bool)),
    'recalls': ('a list of positive integers', lambda v: isinstance(v, list) and bool(v)
                and all(utils.is_int(k) and k > 0 for k in v)),
    'data_path': ('a path', lambda v: isinstance(v, str) and bool(v)),
    'mean': ('three numbers', lambda v: v is None or utils.three_numbers(v)),
    'std': ('three numbers above 0', lambda v: v is None or (utils.three_numbers(v) and min(v) > 0)),
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


def run_settings(paths, records=None):
    """The flags of the run whose files are paths (RunName.paths), from the first of its records that is there
    (records: settings_records, read where not given): <prefix>_args.json, its checkpoint, its embedding database; the
    normalization from the first that records it. Where none is there, those the original REIR embedded with when the
    model is one it saved (original.ORIGINAL_SETTINGS), else None."""
    records = settings_records(paths) if records is None else records
    if not records:
        return dict(original.ORIGINAL_SETTINGS) if is_original_model(paths['model.pth']) else None
    settings = dict(records[0][1])
    for key in ('mean', 'std'):
        settings[key] = next((record[key] for _, record in records if record.get(key) is not None), None)
    return settings


def settings_records(paths):
    """[(file, the settings it records)] of the run whose files are paths, for the files that are there:
    <prefix>_args.json (written with its model), its checkpoint's flags, its embedding database's settings (where it
    can be read). A file that is there but does not hold the settings in the form SETTINGS_FORMAT says is refused,
    naming it."""
    records = []
    path = paths['args.json']
    if os.path.isfile(path):
        try:
            with open(path) as f:
                records.append((path, json.load(f)))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise utils.ReirError(f'{path}: the run\'s settings cannot be read ({type(e).__name__}); write the file '
                                  f'again or delete it') from None
    checkpoint = peek_checkpoint(paths['checkpoint.pth'])
    if checkpoint is not None:
        records.append((paths['checkpoint.pth'], checkpoint['args']))
    database = paths['data_base.pth']
    try:
        stored = utils.safe_load(database, 'embedding database', verify=False, mmap=True)
    except utils.ReirError:
        stored = None  # missing or damaged: the database itself is not what is asked for here
    if isinstance(stored, dict) and 'settings' in stored:
        records.append((database, stored['settings']))
    for path, settings in records:
        problem = settings_problem(settings)
        if problem:
            raise utils.ReirError(f'{path}: {problem}; write the file again or delete it')
    return records


def is_original_model(path):
    """Whether path is a model state_dict the original REIR saved (read memory-mapped; False when unreadable)."""
    try:
        return original.is_original_state(utils.safe_load(path, 'model', verify=False, mmap=True))
    except utils.ReirError:
        return False


def embedding_settings(paths, overrides, model_needed):
    """The settings of EMBEDDING_DEFAULTS for the run whose files are paths (RunName.paths): the overrides that
    are not None, else the run's own (run_settings), which its records must agree on (check_records_agree). The
    settings that change an embedding (EMBEDDING_SETTINGS) are never guessed: when a model must embed images and the
    run's files no longer say them, the user is asked to pass them. The others (recalls, data_path) default. mean and
    std are the run's recorded normalization, or None (see normalization); held_out_classes the training classes it
    held out for validation (--val_classes)."""
    records = settings_records(paths)
    check_records_agree(records, [k for k in EMBEDDING_SETTINGS if overrides.get(k) is None])
    saved = run_settings(paths, records) or {}
    settings = {k: saved.get(k, EMBEDDING_DEFAULTS[k]) for k in EMBEDDING_DEFAULTS if k not in EMBEDDING_SETTINGS}
    settings.update({k: saved[k] for k in EMBEDDING_SETTINGS if k in saved})
    settings.update({k: v for k, v in overrides.items() if v is not None})
    settings.update(mean=saved.get('mean'), std=saved.get('std'))  # the normalization the run used, if recorded
    settings.update(held_out_classes=saved.get('held_out_classes', []))
    missing = [k for k in EMBEDDING_SETTINGS if k not in settings]
    if model_needed and missing:
        raise utils.ReirError(f'cannot tell the run\'s {" and ".join("--" + k for k in missing)}: '
                              f'{paths["args.json"]}, its checkpoint and its database are gone; pass --image_size N '
                              f'and --exact_pipeline or --no-exact_pipeline as the run was trained')
    return SimpleNamespace(**settings)


def check_records_agree(records, keys):
    """Refuse a run whose records (settings_records) disagree on a setting of keys or on the normalization (mean,
    std), where two of them hold it: a hand-edited file, and the model would embed otherwise than it was trained. The
    advice names the value of the later record (the checkpoint's or the database's: args.json is the one a person
    edits)."""
    for key in (*keys, 'mean', 'std'):
        held = [(path, settings[key]) for path, settings in records if settings.get(key) is not None]
        differing = [(path, value) for path, value in held[1:] if value != held[0][1]]
        if differing:
            (first, value), (other, recorded) = held[0], differing[0]
            advice = f'pass {setting_flag(key, recorded)}' if key in keys else 'train the run again'
            raise utils.ReirError(f'{first} says {key} {value!r}, {os.path.basename(other)} {recorded!r}: put back '
                                  f'the file the run wrote, or {advice}')


def setting_flag(key, value):
    """The flag of evaluate.py that gives a setting of EMBEDDING_SETTINGS the value: --image_size 32,
    --no-exact_pipeline."""
    if isinstance(value, bool):
        return f'--{"" if value else "no-"}{key}'
    return f'--{key} {value}'


def normalization(settings, data_dicts):
    """(mean, std) the run normalized its images with when its files record them, else the dataset's."""
    return settings.mean or data_dicts['mean'], settings.std or data_dicts['std']


# ----------------------------------------------------------------------------- the checkpoint and the run's state

def is_state(value):
    return isinstance(value, dict) and all(isinstance(key, (str, int)) for key in value)


def is_model_state(value):
    """Whether value is a module's state_dict: tensors by name."""
    return is_state(value) and all(isinstance(tensor, torch.Tensor) for tensor in value.values())


def model_problem(path):
    """What keeps the file at path from being a whole model state_dict (missing, truncated, something else), or None;
    read memory-mapped, as far as its index says."""
    try:
        model = utils.safe_load(path, 'model', verify=False, mmap=True)
    except utils.ReirError as e:
        return str(e)
    return None if is_model_state(model) else f'{path}: not a model state_dict'


# the trainable objects a checkpoint holds, each by its state_dict: {name: (what it must be, test)}
TRAINABLE_FORMAT = {
    'model': ('a state_dict of tensors', is_model_state),
    'loss': ('a state_dict of tensors', is_model_state),
    'optimizer': ('a state_dict', lambda v: is_state(v) and {'state', 'param_groups'} <= set(v)),
    'scheduler': ('a state_dict', is_state),
    'scaler': ('a state_dict', is_state),
}


def _held(kind, fits, **default):
    """A field of RunState: what it must hold, in words and as a test (CHECKPOINT_FORMAT), and its default."""
    return field(metadata={'format': (kind, fits)}, **default)


def _is_rng_state(value):
    """Whether value is a state of torch's CPU generator (a ByteTensor of its size), as torch.set_rng_state takes."""
    return isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.shape == torch.get_rng_state().shape


def _is_running(value):
    """Whether value holds the running sums and random states of each process (resume.rng_states)."""
    return isinstance(value, list) and all(
        isinstance(p, dict) and isinstance(p.get('sums'), list) and len(p['sums']) == 4
        and all(utils.is_number(x) for x in p['sums']) and isinstance(p.get('rng'), dict)
        and _is_rng_state(p['rng'].get('cpu')) and isinstance(p['rng'].get('cuda'), list)
        and all(isinstance(state, torch.Tensor) and state.dtype == torch.uint8 for state in p['rng']['cuda'])
        for p in value)


def _is_log_record(value):
    """Whether value is what RunState.log holds (tensorboard_log.RunLog.position): {} or {'files': {name: size}}, each
    name a file's in the log folder (never a path: --resume truncates the files it names)."""
    if value == {}:
        return True
    files = value.get('files') if isinstance(value, dict) and set(value) == {'files'} else None
    return isinstance(files, dict) and all(
        isinstance(name, str) and name == os.path.basename(name) and name not in ('', '.', '..')
        and utils.is_int(size) and size >= 0 for name, size in files.items())


@dataclass
class RunState:
    """What a run's checkpoint holds besides the trainable states: the run's flags, as args.json records them
    (recorded_settings), and what it drew (meta-class ids, sampled training list, held-out classes), a fingerprint of
    the data it trains on and the torchrun job training it, where it stands (the epoch in progress, its steps done,
    each process's running sums and random states after them, and its TensorBoard log's files then:
    resume.Checkpointer) and what it has measured. One object, built when a run begins (begin) and written with the
    trainable states (checkpoint_file); each field says what it must hold (CHECKPOINT_FORMAT)."""
    args: dict = _held('a dict of flags', lambda v: isinstance(v, dict))
    ids: torch.Tensor = _held('an (E, C) tensor of integers', lambda v: isinstance(v, torch.Tensor) and v.dim() == 2
                              and not (v.is_floating_point() or v.is_complex() or v.dtype == torch.bool))
    train_items: list = _held('a list of (image path, class index) pairs', lambda v: isinstance(v, list) and all(
        isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str) and utils.is_int(item[1])
        for item in v))
    held_out: list = _held('a list of class names',
                           lambda v: isinstance(v, list) and all(isinstance(k, str) for k in v), default_factory=list)
    data_fingerprint: str = _held('a data fingerprint', lambda v: isinstance(v, str), default='')
    elastic_job: str = _held('a torchrun job id', lambda v: isinstance(v, str), default='')
    epoch: int = _held('an epoch number from 1', lambda v: utils.is_int(v) and v >= 1, default=1)
    step: int = _held('a step count from 0', lambda v: utils.is_int(v) and v >= 0, default=0)
    running: list = _held('a list of running sums and random states', _is_running, default_factory=list)
    log: dict = _held('{"files": {event file name: size}} of its TensorBoard log', _is_log_record,
                      default_factory=dict)
    best_recall: float = _held('a number', utils.is_number, default=-1.0)
    results: list = _held('a list of result rows', lambda v: isinstance(v, list) and all(
        isinstance(row, dict) and utils.is_int(row.get('epoch')) for row in v), default_factory=list)

    @classmethod
    def begin(cls, args, run, paths, data_dicts, checkpoint, elastic_job):
        """The state a run begins from: on --resume the checkpoint's (refused where it trained on other data dicts, or
        its ids, list and held-out classes no longer fit them or the flags); else the held-out classes of
        --val_classes, the meta-class ids (drawn from --seed, or those of --load_ids) and the sampled training list,
        each drawn from a generator of its own, so that a --load_ids run trains on the list of the run that drew the
        ids. The ids and the list cover the training classes that are not held out. Writes nothing (start_run saves
        drawn ids).
        elastic_job: the torchrun job of the process (engine.Process.job)."""
        current = dict(data_fingerprint=utils.data_fingerprint(data_dicts), elastic_job=elastic_job)
        if checkpoint is not None and checkpoint['data_fingerprint'] not in ('', current['data_fingerprint']):
            raise utils.ReirError(f'--resume: {utils.data_dicts_path(args.data_path, args.data_name, args.crop_type)} '
                                  f'is not the data the run started on (the dataset was prepared again, or --data_path '
                                  f'names another copy); resume on that data, or start over with --overwrite')
        if checkpoint is not None:
            lists = _checked_lists(checkpoint, paths['checkpoint.pth'], args, data_dicts['train'])
            problem = _position_problem(checkpoint, args) or _files_problem(checkpoint, paths)
            if problem:
                raise utils.ReirError(f'{paths["checkpoint.pth"]}: {problem}; delete it and start again without '
                                      f'--resume')
            return cls(**lists, args=recorded_settings(args, data_dicts, lists['held_out']), **current,
                       **{key: checkpoint[key]
                          for key in ('epoch', 'step', 'running', 'log', 'best_recall', 'results')})
        train_dict, held_out = split_validation(args, data_dicts['train'])
        ids = draw_or_load_ids(args, run, paths, len(train_dict), torch.Generator().manual_seed(args.seed))
        sampling = torch.Generator().manual_seed(utils.epoch_seed(args.seed, 0))
        return cls(ids=ids, train_items=utils.sample_train_images(train_dict, sampling), held_out=sorted(held_out),
                   args=recorded_settings(args, data_dicts, held_out), **current)

    def record(self, stats, metrics):
        """Add the epoch's row to the results: training loss and accuracy (stats), the test metrics, then the
        validation ones (--val_classes), so that the original's columns keep their places. Returns the epoch's line and
        whether the epoch is the best so far, by Recall@K of the first K on the held-out classes where the run has some,
        else on the test split."""
        recalls = self.args['recalls']
        line = (f'Epoch {self.epoch}/{self.args["num_epochs"]} | loss: {stats["loss"]:.4f} | accuracy: '
                f'{stats["accuracy"]:.2f}% | {utils.format_metrics(metrics["test"], recalls)}'
                + (f' | val {utils.format_metrics(metrics["val"], recalls)}' if 'val' in metrics else '')
                + (f' | {stats["skipped"]} unreadable images skipped' if stats['skipped'] else ''))
        self.results.append({'epoch': self.epoch, 'train_loss': stats['loss'], 'train_accuracy': stats['accuracy'],
                             **{f'{role}_{name}': value for role, values in metrics.items()
                                for name, value in values.items()}})
        selected = metrics.get('val', metrics['test'])[f'recall@{recalls[0]}']
        best = selected > self.best_recall
        self.best_recall = max(selected, self.best_recall)
        return line, best

    def selection_note(self, model_path):
        """The run's last line: the selected epoch, what selected it, and its test metrics."""
        row = selected_row(self.results)
        column = selection_column(list(row))
        test = {name.removeprefix('test_'): value for name, value in row.items() if name.startswith('test_')}
        return (f'selected epoch {row["epoch"]} by {column.replace("_", " ")} ({row[column]:.2f}%): test '
                f'{utils.format_metrics(test, self.args["recalls"])} -> {model_path}')

    def checkpoint(self, trainable, **position):
        """The run's checkpoint, a host copy: this state, with position (epoch, step, running) where given, and the
        trainable objects (model, loss, optimizer, scheduler, scaler by name) by their state_dict. What is written is
        what load_checkpoint reads: a checkpoint that is not exactly what CHECKPOINT_FORMAT says is a bug, refused
        before anything is written."""
        saved = {key.name: getattr(self, key.name) for key in fields(self)}
        checkpoint = host_copy({**{name: obj.state_dict() for name, obj in trainable.items()}, **saved, **position})
        odd = set(checkpoint) ^ set(CHECKPOINT_KEYS)
        problem = f'keys {sorted(odd)} are not those of CHECKPOINT_FORMAT' if odd else checkpoint_problem(checkpoint)
        if problem:
            raise ValueError(f'a checkpoint to write is malformed: {problem}')
        return checkpoint

    def checkpoint_file(self, trainable, **position):
        """The run's checkpoint (checkpoint) as a writer for save_together, or BackgroundWrites: it holds a host
        copy."""
        return torch_file(self.checkpoint(trainable, **position))


# what <prefix>_checkpoint.pth holds, everything --resume needs, as {key: (what it must be, test)}
CHECKPOINT_FORMAT = {**TRAINABLE_FORMAT, **{key.name: key.metadata['format'] for key in fields(RunState)}}
CHECKPOINT_KEYS = tuple(CHECKPOINT_FORMAT)


def split_validation(args, train_dict):
    """(training classes, held-out validation classes) for --val_classes, each {class: [image paths]}."""
    if not args.val_classes:
        return train_dict, {}
    kept = len(train_dict) - args.val_classes
    if args.val_classes == 1:
        raise utils.UsageError('--val_classes 1: retrieval within a single class says nothing; hold out at least 2')
    if kept < args.meta_class_size:
        raise utils.UsageError(f'--val_classes {args.val_classes} leaves {max(kept, 0)} of the {len(train_dict)} '
                               f'training classes, fewer than --meta_class_size {args.meta_class_size}')
    return utils.hold_out_classes(train_dict, args.val_classes,
                                  torch.Generator().manual_seed(utils.epoch_seed(args.seed, HOLD_OUT_DRAW)))


def _checked_lists(checkpoint, path, args, train_dict):
    """The meta-class ids, training list and held-out classes of the run a checkpoint (at path) holds, refused where
    they no longer fit the dataset's training classes or the flags: the list must name images of the training classes
    it indexes (sorted, the held-out ones left out), every class among them, as utils.sample_train_images draws it."""
    missing = [key for key in checkpoint['held_out'] if key not in train_dict]
    if missing:
        raise utils.ReirError(f'--resume: held-out class {missing[0]} of the run is no longer in the dataset\'s '
                              f'training split; prepare the dataset as it was, or start over with --overwrite')
    classes = [set(train_dict[key]) for key in sorted(train_dict) if key not in checkpoint['held_out']]
    utils.check_ids(checkpoint['ids'], path, args.ensemble_size, len(classes), args.meta_class_size)
    items = [tuple(item) for item in checkpoint['train_items']]
    if any(not 0 <= index < len(classes) or image not in classes[index] for image, index in items):
        raise utils.ReirError(f'{path}: its training list names images that are not of the {len(classes)} training '
                              f'classes it indexes; delete it and start again without --resume')
    if len({index for _, index in items}) != len(classes):
        raise utils.ReirError(f'{path}: its training list leaves out training classes; delete it and start again '
                              f'without --resume')
    return dict(ids=checkpoint['ids'].long(), train_items=items, held_out=sorted(checkpoint['held_out']))


def _position_problem(checkpoint, args):
    """What makes where a checkpoint says its run stands unusable for a run of args, or None: the epoch beyond the
    one after --num_epochs, the results not one row for every epoch before it or without the columns of --recalls,
    the best recall not that of the results, a position inside an epoch without the processes' running sums."""
    epoch, step, results = checkpoint['epoch'], checkpoint['step'], checkpoint['results']
    roles = ('test', 'val') if checkpoint['held_out'] else ('test',)
    needed = {'train_loss', 'train_accuracy', *(f'{role}_recall@{k}' for role in roles for k in args.recalls)}
    if epoch > args.num_epochs + 1 or (epoch == args.num_epochs + 1 and step):
        return f'it stands at {"step " + str(step) + " of " if step else ""}epoch {epoch} of a run of {args.num_epochs}'
    if [row['epoch'] for row in results] != list(range(1, epoch)):
        return f'its results are not one row for each epoch before epoch {epoch}'
    missing = sorted(needed - set.intersection(*(set(row) for row in results))) if results else []
    if missing or any(set(row) != set(results[0]) for row in results):
        return f'its results lack {missing[0] if missing else "some of their columns in some rows"}'
    selected = max((row[selection_column(list(results[0]))] for row in results), default=-1.0)
    if checkpoint['best_recall'] != selected:
        return f'its best recall {checkpoint["best_recall"]} is not its results\' ({selected})'
    if step and not checkpoint['running']:
        return f'it stands at step {step} without the running sums of those steps'
    return None


def _files_problem(checkpoint, paths):
    """What of a checkpoint contradicts the run's files beside it (RunName.paths), where they are there, or None: its
    ids not those of the ids file the run wrote, its results not the results CSV's, whose rows may run one epoch
    ahead of it (a kill between the renames of an epoch's files leaves the checkpoint of the epoch's start)."""
    if os.path.isfile(paths['ids']):
        saved = utils.safe_load(paths['ids'], 'meta-class ids')
        if not same_ids(saved, checkpoint['ids']):
            return f'its "ids" are not those of {paths["ids"]}, which the run wrote'
    try:
        written = read_results(paths['results.csv'])
    except utils.ReirError:
        return None  # missing or damaged: --resume writes it again from the checkpoint
    results, epoch = checkpoint['results'], checkpoint['epoch']
    if len(written) > epoch:
        return f'its "epoch" {epoch} is behind {paths["results.csv"]}, which holds {len(written)} epochs'
    for row, saved in zip(written, results):
        if set(row) != set(saved) or any(not math.isclose(row[key], saved[key], rel_tol=1e-9) for key in row):
            return f'its "results" are not those of {paths["results.csv"]} at epoch {row["epoch"]}'
    return None


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
    checkpoint = utils.safe_load(path, 'checkpoint')
    problem = checkpoint_problem(checkpoint)
    if problem:
        raise utils.ReirError(f'{path}: {problem}; delete it and start again without --resume')
    return {**CHECKPOINT_KEY_DEFAULTS, **checkpoint}


def peek_checkpoint(path):
    """A run's checkpoint read memory-mapped (its tensors stay on disk, their checksums unread), for its flags and
    position; None when it is absent, unreadable, or lacks args and epoch or holds a key of the wrong kind."""
    try:
        checkpoint = utils.safe_load(path, 'checkpoint', verify=False, mmap=True)
    except utils.ReirError:
        return None
    if checkpoint_problem(checkpoint, required=('args', 'epoch')):
        return None
    return {**CHECKPOINT_KEY_DEFAULTS, **checkpoint}
