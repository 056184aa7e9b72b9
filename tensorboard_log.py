"""A run's TensorBoard log, <prefix>_tensorboard/, written with torch.utils.tensorboard (TensorBoard's own format), by
the main process only. On one axis of training steps: every step's training loss, accuracy and learning rate, as the
progress bar shows them (the epoch's running means in this process), and after every epoch the test (and val) metrics
of its results row; after the run, the HParams of its flags and selected metrics, and the Projector of the selected
model's test (or query) embeddings from its database, each image with its class, path and thumbnail.

A checkpoint records the log's event files and their sizes (RunLog.position); a resumed run cuts the files back to
them (resumed_files), so that the steps it trains again are logged once. TensorBoard's purge_step would drop them in
TensorBoard's view only, leaving files that hold the steps twice for any other reader. A recorded file that is missing
or damaged is set aside (its name no longer marks it an event file) and the log goes on in a new file, holding what
could be read of it and the results of every epoch done."""
import os
import shutil
import struct

import torch
from google.protobuf.message import DecodeError
from PIL import Image, ImageOps
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.summary.writer.record_writer import masked_crc32c
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

import data_base
import run_files
import utils

EVENT_FILE_MARK = 'tfevents'  # TensorBoard reads a log folder's files whose names hold it
SET_ASIDE_MARK = 'damaged'  # replaces it in the name of a damaged event file, which TensorBoard then passes over
PROJECTOR_IMAGES = 2000  # the most embeddings the Projector shows, drawn from --seed
THUMBNAIL_SIDE = 64  # of an image in the Projector's sprite (its sprite is at most 8192 pixels a side)
THUMBNAIL_BACKGROUND = (128, 128, 128)  # around an image that is not square, and for one that cannot be read
PROJECTOR_CONFIG = 'projector_config.pbtxt'  # where torch's add_embedding describes the Projector's files
FINISH_TAGS = ('_hparams_/', 'selected/')  # the tags a run's finish writes, by their beginning
FINISHED_TAG = 'selected/epoch'  # the finish's last
COMMAND_FLAGS = ('resume', 'overwrite')  # flags of the command, not of the run: left out of its HParams
NOT_FLAGS = ('mean', 'std', 'held_out_classes')  # what the recorded settings hold besides the flags
RESULT_ROLES = ('test', 'val')  # the results columns <role>_<metric> logged as <role>/<metric> after every epoch


class RunLog:
    """The TensorBoard log of a run in progress (open), a context manager that closes it. Steps are numbered across
    epochs: step s of epoch e is global step (e - 1) * steps_per_epoch + s. add_step keeps a step's running sums on the
    device; write_steps reads all kept ones at once (a single host sync: the progress bar's), and position writes
    them before a checkpoint records the files. Its event file is made when the first event is written. In a process
    other than the main one (main False), every method does nothing. finished: the log holds the run's finish (a
    finished run resumed), which is not written again."""

    def __init__(self, folder, steps_per_epoch, main, finished=False):
        self.folder, self.steps_per_epoch, self.main, self.finished = folder, steps_per_epoch, main, finished
        self.pending = []  # (global step, learning rate, EpochSums.snapshot) of the steps not yet written
        self.sums = None
        self._writer = None

    @classmethod
    def open(cls, paths, state, steps_per_epoch, main, resumed):
        """The log of the run whose files are paths (run_files.RunName.paths) and RunState state: a new one,
        replacing what an earlier start that saved no checkpoint left; or, resumed from a checkpoint, the files it
        recorded cut back to it (resumed_files), with the results of the epochs done that the log no longer holds."""
        folder = paths[run_files.RUN_LOG]
        if not main:
            return cls(folder, steps_per_epoch, main=False)
        if not resumed:
            if os.path.isdir(folder):
                utils.log(f'removing {folder}, the log of an earlier start of the run that saved no checkpoint')
                shutil.rmtree(folder)
            return cls(folder, steps_per_epoch, main=True)
        salvaged, logged, finished = resumed_files(folder, state.log.get('files', {}),
                                                   over=state.epoch > state.args['num_epochs'])
        log = cls(folder, steps_per_epoch, main=True, finished=finished)
        for event in salvaged:
            log.writer.file_writer.add_event(event)
        if logged is not None:
            for row in state.results:
                log.epoch_results(row, skip=logged)
        return log

    @property
    def writer(self):
        if self._writer is None:
            self._writer = SummaryWriter(self.folder)
        return self._writer

    def __enter__(self):
        return self

    def __exit__(self, kind, *exc_info):
        if self.main and kind is None:  # after an error, the steps not yet written are past the checkpoint
            self.write_steps()
        if self._writer is not None:
            self._writer.close()

    def global_step(self, epoch, step):
        return (epoch - 1) * self.steps_per_epoch + step

    def add_step(self, epoch, step, sums, lr):
        """Keep step `step` of epoch `epoch`: its running sums (sums, engine.EpochSums) and learning rate."""
        if self.main:
            self.pending.append((self.global_step(epoch, step), lr, sums.snapshot()))
            self.sums = sums

    def write_steps(self):
        """Write the kept steps' running mean loss, accuracy and learning rate."""
        if not self.pending:
            return
        means = self.sums.means_of([snapshot for _, _, snapshot in self.pending])
        for (step, lr, _), (loss, accuracy) in zip(self.pending, means):
            self.writer.add_scalar('train/loss', loss, step)
            self.writer.add_scalar('train/accuracy', accuracy, step)
            self.writer.add_scalar('train/lr', lr, step)
        self.pending = []

    def epoch_results(self, row, skip=()):
        """An epoch's results row (RunState.record): its <role>_<metric> columns as <role>/<metric> at the epoch's
        last step (after the steps kept), but for the (tag, step) pairs in skip."""
        if not self.main:
            return
        self.write_steps()
        step = self.global_step(row['epoch'], self.steps_per_epoch)
        for column, value in row.items():
            role, _, metric = column.partition('_')
            if role in RESULT_ROLES and (f'{role}/{metric}', step) not in skip:
                self.writer.add_scalar(f'{role}/{metric}', value, step)

    def position(self):
        """{'files': {event file name: size}} once everything logged so far is in them: what a checkpoint records."""
        if not self.main:
            return {}
        self.write_steps()
        if self._writer is not None:
            self._writer.flush()
        return {'files': {name: os.path.getsize(os.path.join(self.folder, name)) for name in event_files(self.folder)}}

    def finish(self, database_path, results, settings):
        """After the run: the Projector of the selected epoch's test embeddings (projector), then its HParams
        (hparams_of), at the selected epoch's last step; FINISHED_TAG last, so that a log that holds it holds the
        rest."""
        if not self.main or self.finished:
            return
        self.write_steps()
        row = run_files.selected_row(results)
        step = self.global_step(row['epoch'], self.steps_per_epoch)
        self.projector(database_path, settings['seed'], step)
        flags, metrics = hparams_of(settings, row)
        for summary in hparams(flags, metrics):
            self.writer.file_writer.add_summary(summary, step)
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()
        self.finished = True

    def projector(self, database_path, seed, step):
        """The Projector's files of the database's test (or query) split: at most PROJECTOR_IMAGES embeddings, drawn
        from seed, each with its class and image path, and a sprite of their thumbnails. Replaces those of an earlier
        finish that did not end."""
        for name in os.listdir(self.folder) if os.path.isdir(self.folder) else []:
            if name == PROJECTOR_CONFIG or name.isdigit():
                path = os.path.join(self.folder, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        splits = data_base.load_database(database_path)
        split = 'query' if 'query' in splits else 'test'
        images, labels, features = splits[split]
        chosen = drawn_indices(len(images), PROJECTOR_IMAGES, seed)
        self.writer.add_embedding(features[chosen].float(), metadata=[[str(labels[i]), images[i]] for i in chosen],
                                  metadata_header=['class', 'path'], label_img=thumbnails([images[i] for i in chosen]),
                                  global_step=step, tag=split)


def hparams_of(settings, row):
    """The HParams of a run: its flags (settings, run_files.recorded_settings, but for COMMAND_FLAGS and the values
    that are not flags), each a number, text or bool (which torch's hparams writes as 1 or 0); and its selected row's
    metrics ({'selected/<column>': value}) with the epoch."""
    flags = {}
    for name, value in settings.items():
        if name in COMMAND_FLAGS or name in NOT_FLAGS:
            continue
        flags[name] = value if isinstance(value, (bool, int, float, str)) else str(value)
    metrics = {f'selected/{column}': value for column, value in row.items()
               if column.partition('_')[0] in RESULT_ROLES}
    return flags, {**metrics, 'selected/epoch': row['epoch']}


def drawn_indices(count, most, seed):
    """Sorted indices of at most `most` of count items, drawn from seed (all of them where there are no more)."""
    if count <= most:
        return list(range(count))
    return sorted(torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:most].tolist())


def thumbnails(paths):
    """(N, 3, THUMBNAIL_SIDE, THUMBNAIL_SIDE) floats in [0, 1]: each image whole, on THUMBNAIL_BACKGROUND where it is
    not square; an image that cannot be read is THUMBNAIL_BACKGROUND alone."""
    side = THUMBNAIL_SIDE
    sprite = torch.empty(len(paths), 3, side, side)
    for i, path in enumerate(paths):
        try:
            image = ImageOps.pad(utils.load_rgb(path, side), (side, side), Image.BILINEAR, THUMBNAIL_BACKGROUND)
        except (OSError, ValueError, Image.DecompressionBombError):
            image = Image.new('RGB', (side, side), THUMBNAIL_BACKGROUND)
        sprite[i] = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(side, side, 3).permute(
            2, 0, 1) / 255  # (H, W, 3) -> (3, H, W)
    return sprite


# ----------------------------------------------------------------------------- its files

def event_files(folder):
    return sorted(name for name in os.listdir(folder) if EVENT_FILE_MARK in name) if os.path.isdir(folder) else []


def read_events(path, start=0, end=None):
    """The events with a summary in an event file, from byte start to end (its end where None), and why it could not
    be read whole (None when it could): shorter than end, a record cut short, or one whose checksum fails
    (TensorBoard's record format: length, its masked CRC-32C, data, its masked CRC-32C)."""
    # read here rather than with TensorBoard's record reader, which can neither start at an offset nor stop at the
    # size a checkpoint recorded, and does not say where a damaged record begins
    events = []
    with open(path, 'rb') as f:
        f.seek(start)
        data = f.read() if end is None else f.read(end - start)
    if end is not None and len(data) < end - start:
        return events, f'it holds {start + len(data)} bytes, where the checkpoint recorded {end}'
    offset = 0
    while offset < len(data):
        header = data[offset:offset + 12]
        where = f'its record at byte {start + offset}'
        if len(header) < 12:
            return events, f'{where} is cut short'
        length, header_crc = struct.unpack('<QI', header)
        body, footer = data[offset + 12:offset + 12 + length], data[offset + 12 + length:offset + 16 + length]
        if masked_crc32c(header[:8]) != header_crc or len(body) < length or len(footer) < 4:
            return events, f'{where} is damaged'
        if masked_crc32c(body) != struct.unpack('<I', footer)[0]:
            return events, f'{where} fails its checksum'
        try:
            event = Event.FromString(body)
        except DecodeError:
            return events, f'{where} is not an event'
        if event.HasField('summary'):  # not the file's version line, which every file begins with
            events.append(event)
        offset += 16 + length
    return events, None


def tags_and_steps(events):
    return {(value.tag, event.step) for event in events for value in event.summary.value}


def holds_finish(events):
    """Whether events, those a log holds after its checkpoint, are a run's finish, whole (RunLog.finish)."""
    tags = {tag for tag, _ in tags_and_steps(events)}
    return FINISHED_TAG in tags and all(tag.startswith(FINISH_TAGS) for tag in tags)


def resumed_files(folder, recorded, over):
    """Cut the log in folder back to what its checkpoint recorded ({event file name: size}): a file written after
    the checkpoint is removed, a recorded one truncated to its size; but where the run is over (over) and what was
    written after the checkpoint is its finish, whole, the log is kept as it is. A recorded file that is missing,
    shorter or damaged is set aside, with one line. Returns the events that could be read of the damaged files up to
    their recorded sizes, to begin the new file with; the (tag, step) pairs the log holds where a file was damaged or
    none recorded, else None (no epoch's results need writing again); and whether the log holds the run's finish."""
    later = [name for name in event_files(folder) if name not in recorded]
    intact, salvaged, problems = {}, [], []
    for name, size in recorded.items():
        path = os.path.join(folder, name)
        events, problem = read_events(path, 0, size) if os.path.isfile(path) else ([], 'it is missing')
        if problem is None:
            intact[name] = size
            continue
        problems.append(f'{name}: {problem}')
        salvaged += events
        if os.path.exists(path):
            os.replace(path, os.path.join(folder, name.replace(EVENT_FILE_MARK, SET_ASIDE_MARK)))
    after = [event for name, size in intact.items() for event in read_events(os.path.join(folder, name), size)[0]]
    after += [event for name in later for event in read_events(os.path.join(folder, name))[0]]
    finished = over and not problems and holds_finish(after) and os.path.isfile(os.path.join(folder, PROJECTOR_CONFIG))
    if not finished:
        for name in later:
            os.remove(os.path.join(folder, name))
        for name, size in intact.items():
            os.truncate(os.path.join(folder, name), size)
    if recorded and not problems:
        return [], None, finished
    logged = tags_and_steps(salvaged)
    for name in event_files(folder):
        logged |= tags_and_steps(read_events(os.path.join(folder, name))[0])
    if problems:
        utils.warn(f'{folder}: the TensorBoard log is damaged ({"; ".join(problems)}): it goes on in a new file, with '
                   f'the {len(salvaged)} events that could be read and the results of every epoch done')
    return salvaged, logged, finished
