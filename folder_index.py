"""A folder of one's own images as a gallery that a trained run searches: index.py's <prefix>_<name>_index.pth, in the
format of a run's embedding database (data_base.database_file) with one split, 'test', the split a self-retrieval
dataset is scored on: evaluate.py scores a labelled index, inference.py searches it and ablation.py compares two runs'
indexes of one folder, as they do a run's database. The embeddings are written in parts as they are made
(<index>.parts/): a stopped or killed index continues where it stopped, to the file one pass writes; an update embeds
only the files added or changed since, to one pass's images, classes and records (and embeddings, where a kernel's
result does not depend on the batch an image shares)."""
import os
import shutil
import stat
import sys
from dataclasses import dataclass

import torch
from tqdm import tqdm

import data_base
import engine
import faiss_search
import loaders
import locks
import run_files
import utils

SPLIT = 'test'
BATCHES_PER_PART = 8  # batches a part holds: what a kill can lose
PART_PREFIX = 'part-'


# ----------------------------------------------------------------------------- the folder

def image_files(folder, own=()):
    """{path relative to folder, '/'-separated: (size, modification time in ns)} of every file under folder that a
    dataset would hold (utils.is_visible, in visible subfolders), in the order of the paths' parts (a folder dataset's:
    class folder, then name); a symbolic link to nothing as (-1, 0), to be reported unreadable. The paths own (an
    index's own files and parts, written into the folder it indexes) are left out. Refused where the folder is missing
    or holds no file."""
    if not os.path.isdir(folder):
        raise utils.ReirError(f'{folder}: no such folder of images')
    own = {os.path.abspath(path) for path in own}
    found = []
    for directory, subfolders, names in os.walk(folder):
        subfolders[:] = [name for name in subfolders if utils.is_visible(name)
                         and os.path.abspath(os.path.join(directory, name)) not in own]
        for name in filter(utils.is_visible, names):
            path = os.path.join(directory, name)
            if os.path.abspath(path) in own:
                continue
            try:
                status = os.stat(path)
            except OSError:
                status = None  # a link to nothing
            if status is None or stat.S_ISREG(status.st_mode):
                stamp = (-1, 0) if status is None else (status.st_size, status.st_mtime_ns)
                found.append((os.path.relpath(path, folder).replace(os.sep, '/'), stamp))
    if not found:
        raise utils.ReirError(f'{folder}: no files in it (hidden files and *.tmp left aside)')
    return dict(sorted(found, key=lambda item: item[0].split('/')))


def class_of(relative, labels):
    """An image's class key: its first folder under the indexed folder (labels 'folders'), else its own path: each
    image of an unlabelled index is a class of its own, so that none is ever called another's class."""
    return relative.split('/')[0] if labels == 'folders' else relative


def check_labels(files, labels, folder):
    """With labels 'folders' every file must lie in a class folder."""
    loose = [relative for relative in files if '/' not in relative]
    if labels == 'folders' and loose:
        raise utils.UsageError(f'--labels folders takes each image\'s class from its first folder under {folder}, and '
                               f'{len(loose)} files lie in none ({utils.shown(loose)}): move them into a class '
                               f'folder, or index without --labels')


# ----------------------------------------------------------------------------- where it goes

def index_path(results_dir, run, name):
    return os.path.join(results_dir, f'{run.prefix}_{name}_{data_base.INDEX_KIND}')


def parts_folder(path):
    return path.removesuffix('.pth') + '.parts'


def lock(path):
    """The index at path to this process alone (locks.LockFile beside it)."""
    try:
        return locks.LockFile(locks.lock_path(path), wait=False)
    except BlockingIOError:
        raise utils.ReirError(f'another index.py is writing {path}; wait for it') from None


def source_of(folder, opened, amp):
    """What every embedding of an index depends on besides its file: the folder, the model (its weights' fingerprint)
    and how it embeds (image size, pipeline, normalization, mixed precision; opened: trained.open_run). Embeddings
    of an earlier start or index are kept only where it is the same."""
    return {'root': os.path.abspath(folder), 'model_fingerprint': utils.weights_fingerprint(opened.model.state_dict()),
            'embedding': dict(opened.embedding, amp=amp)}


# ----------------------------------------------------------------------------- what is embedded already

def earlier_index(path, folder, update, overwrite):
    """The loaded index at path that an update keeps what it can of; None where there is none, or with overwrite.
    Without either flag an index there is refused, so that no command replaces it unasked; an update of another
    folder's index is refused too."""
    if not os.path.exists(path) or overwrite:
        return None
    if not update:
        raise utils.UsageError(f'{path} exists: pass --update to embed the files added or changed since (removed '
                               f'ones leave it), or --overwrite to index the folder anew')
    stored = utils.safe_load(path, 'index')
    record = data_base.index_record(path, stored)
    features = stored.get(f'{SPLIT}_features')
    records = record['files'] + record['unreadable']
    if not isinstance(features, torch.Tensor) or len(features) != len(record['files']) or not all(
            isinstance(r, list) and len(r) == 3 and isinstance(r[0], str) and all(map(utils.is_int, r[1:]))
            for r in records):
        raise utils.ReirError(f'{path}: its record of the files does not fit its embeddings; index the folder anew '
                              f'with --overwrite')
    if record['source'].get('root') != os.path.abspath(folder):
        raise utils.UsageError(f'{path} indexes {record["source"].get("root")}, not {os.path.abspath(folder)}: pass '
                               f'--name to index this folder under another name, or --overwrite')
    return stored


def known_embeddings(stored, path, source, quiet=False):
    """{relative path: (stamp, (d,) feature or None where the file was unreadable)} of the files that the earlier
    index stored (index.py --update) and the parts of the index at path (a stopped start) embedded under source, the
    later over the earlier. Parts of another source, and temporaries that a kill left, are removed."""
    known = {}
    if stored is not None:
        record = data_base.index_record(path, stored)
        if record['source'] == source:
            features = stored[f'{SPLIT}_features']
            known.update((relative, ((size, mtime), features[i])) for i, (relative, size, mtime)
                         in enumerate(record['files']))
            known.update((relative, ((size, mtime), None)) for relative, size, mtime in record['unreadable'])
        elif not quiet:
            utils.log(f'{path} was embedded by another model or with other settings: embedding every file again')
    for part_path in part_files(parts_folder(path)):
        try:
            part = utils.safe_load(part_path, 'part of an index')
        except utils.ReirError as e:  # a disk error: its files are embedded again
            utils.warn(f'{e}: embedding its files again')
            part = None
        if not isinstance(part, dict) or part.get('source') != source:
            os.remove(part_path)
            continue
        rows = iter(part['features'])
        for (relative, size, mtime), readable in zip(part['files'], part['readable']):
            known[relative] = ((size, mtime), next(rows) if readable else None)
    return known


def part_files(folder):
    """The parts in folder in the order they were written; the temporaries of a write that a kill cut are removed."""
    if not os.path.isdir(folder):
        return []
    for name in os.listdir(folder):
        if name.endswith(run_files.TEMPORARY_SUFFIX):
            os.remove(os.path.join(folder, name))
    return [os.path.join(folder, name) for name in sorted(os.listdir(folder)) if name.startswith(PART_PREFIX)]


def files_to_embed(files, known):
    """[(relative path, stamp)] of the files, in their order, that known holds no embedding of with their stamp: the
    files added or changed since (a changed file has another size or modification time)."""
    return [(relative, stamp) for relative, stamp in files.items()
            if relative not in known or tuple(known[relative][0]) != stamp]


# ----------------------------------------------------------------------------- embedding, in parts

@dataclass
class Embedder:
    """How index.py embeds: the run's model (placed on device, unwrapped, in evaluation mode), its Preprocess (the
    run's evaluation transform and decoding), mixed precision, and the loader's batch size and workers."""
    model: torch.nn.Module
    preprocess: object
    device: torch.device
    amp: bool
    batch_size: int
    num_workers: int

    def batches(self, folder, relatives):
        """(features (B, E*M) float32 on the CPU, readable (B,) bool) of relatives in consecutive batches."""
        items = [(relative, None) for relative in relatives]
        reader = utils.EvalReader(folder, items, [0] * len(items), self.preprocess.transform, self.preprocess.min_side)
        loader = loaders.Loader(reader, batch_size=self.batch_size, shuffle=False,
                                **loaders.loader_options(self.num_workers, 0, self.device))
        for images, _, readable in loader:
            yield engine.embed_batch(self.model, images, self.device, self.amp).cpu(), readable.bool()


def embed_in_parts(todo, folder, embedder, parts, source, signals):
    """Embed the files todo [(relative path, stamp)] in batches, writing every BATCHES_PER_PART batches a part to the
    folder parts: the same batches as one pass over todo makes, so that a start that continues the parts of a stopped
    one embeds each file as one pass would. A stop signal (signals: resume.StopSignals, deferred) writes the batches
    done as a part and raises utils.Stopped."""
    numbers = [int(os.path.basename(path)[len(PART_PREFIX):-len('.pth')]) for path in part_files(parts)]
    number, done, pending = max(numbers, default=0), 0, []
    progress = tqdm(total=len(todo), desc=f'embedding {os.path.basename(folder.rstrip(os.sep)) or folder}',
                    unit='img', file=sys.stderr)
    with progress:
        for features, readable in embedder.batches(folder, [relative for relative, _ in todo]):
            pending.append((features, readable))
            progress.update(len(readable))
            if len(pending) == BATCHES_PER_PART or signals.received:
                number += 1
                done += write_part(parts, number, todo[done:], pending, source)
                pending = []
            if signals.received:
                raise utils.Stopped(f'stopped by {signals.received} with {done} of {len(todo)} files embedded: run '
                                    f'the same command to continue')
        if pending:
            write_part(parts, number + 1, todo[done:], pending, source)


def write_part(parts, number, todo, batches, source):
    """Write the embedded batches [(features, readable)] of the files todo begins with as part number; returns how
    many files it holds."""
    features, readable = torch.cat([f for f, _ in batches]), torch.cat([r for _, r in batches])
    files = [[relative, *stamp] for relative, stamp in todo[:len(readable)]]
    part = {'source': source, 'files': files, 'readable': readable.tolist(), 'features': features[readable].half()}
    run_files.atomic_write(os.path.join(parts, f'{PART_PREFIX}{number:06d}.pth'), run_files.torch_file(part))
    return len(files)


# ----------------------------------------------------------------------------- the index

def gallery(files, known, labels):
    """(items [(relative path, class key)], (N, d) float16 features, file records [[path, size, mtime]], unreadable
    records) of the files, in their order, from known (every file's embedding)."""
    items, features, records, unreadable = [], [], [], []
    for relative, stamp in files.items():
        feature = known[relative][1]
        if feature is None:
            unreadable.append([relative, *stamp])
            continue
        items.append((relative, class_of(relative, labels)))
        features.append(feature)
        records.append([relative, *stamp])
    return items, (torch.stack(features).half() if features else None), records, unreadable


def index_writers(path, folder, index, opened, faiss_index):
    """The files of an index for run_files.save_together: the gallery at path (index: items, features and the
    INDEX_RECORD entries, whose source names the model's fingerprint) and, with faiss_index, the faiss index beside it
    (faiss_search.faiss_path)."""
    settings = dict(opened.embedding, recalls=opened.recalls)
    items, features, record = index
    writers = {path: data_base.database_file({SPLIT: (items, features)}, folder, settings, None, None,
                                             {data_base.INDEX_RECORD: record},
                                             record['source']['model_fingerprint'])}
    if faiss_index is not None:
        writers[faiss_search.faiss_path(path)] = faiss_search.writer(faiss_index)
    return writers


def remove_parts(path):
    shutil.rmtree(parts_folder(path), ignore_errors=True)
