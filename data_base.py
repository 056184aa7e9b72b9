"""A run's embedding database, <prefix>_data_base.pth: the files of a best epoch it is written with, completing it
with the training images after the last epoch, its format, and reading it (this repository's and the original
REIR's), for evaluate.py, inference.py and ablation.py."""
import os

import torch

import engine
import original
import run_files
import utils


# ----------------------------------------------------------------------------- written by a run

def best_files(paths, model, data, features, epoch):
    """The files of a best epoch, as writers for run_files.save_together: the (unwrapped) model, its embedding
    database and the run's recorded settings (data.settings: loaders.RunData), which say how to embed. The database
    holds the evaluation splits' features and the held-out classes' as 'val'; those of the training classes join it
    once, from the selected model, at the end of the run (complete_database)."""
    database = {split: (items, features[split]) for split, items in data.items.items()}
    weights = run_files.host_copy(model.state_dict())
    return {paths['model.pth']: run_files.torch_file(weights),
            paths['data_base.pth']: database_file(database, data.root, data.settings, epoch, weights),
            paths['args.json']: run_files.json_file(data.settings)}


def complete_database(model, data, paths, results, args, device, stop_requested):
    """Write the run's embedding database whole: the images of every training class (not only the sampled list, of
    query/gallery datasets too, as the original's) embedded once, by the selected model read back from model.pth,
    beside the evaluation splits of its best epoch (embedded again where the database is missing or of another
    epoch: a run stopped while writing it, or the file deleted). Every process takes part (each embeds its shard);
    unreadable training images are left out. data: loaders.RunData; stop_requested: see engine.extract_features."""
    selected = run_files.selected_row(results)['epoch']
    todo = engine.broadcast_from_main(database_to_complete(
        paths['data_base.pth'], selected, data.items, paths['model.pth']) if utils.is_main_process() else None)
    if todo is None:
        return
    if todo == 'lost':
        raise utils.ReirError(f'{paths["model.pth"]}, the model of the selected epoch {selected}, is missing: the '
                              f'embedding database cannot be completed; put it back and run again with --resume')
    utils.log(f'embedding the database of the selected epoch {selected}'
              + (' with the training images' if todo == 'train' else ''))
    engine.load_state_from_main(model, paths['model.pth'])  # the training is over: its weights may go
    if todo == 'all':
        _, features = engine.evaluate_epoch(model, data, args, device, stop_requested)
    else:
        stored = utils.safe_load(paths['data_base.pth'], 'embedding database') if utils.is_main_process() else {}
        features = {split: stored.get(f'{split}_features') for split in data.items}
    train_features, readable = engine.extract_features(model, data.database, device, args.amp, stop_requested)
    if not readable.all():
        utils.warn(f'{int((~readable).sum())} unreadable training images left out of the embedding database')
    if utils.is_main_process():
        database = {split: (items, features[split]) for split, items in data.items.items()}
        database['train'] = ([item for item, ok in zip(data.database.dataset.items, readable.tolist()) if ok],
                             train_features[readable])
        weights = engine.unwrap(model).state_dict()
        run_files.atomic_write(paths['data_base.pth'], database_file(database, data.root, data.settings, selected,
                                                                     weights))


# ----------------------------------------------------------------------------- its format

INDEX_KIND = 'index.pth'  # index.py's gallery of a folder: <prefix>_<name>_index.pth
INDEX_RECORD = 'index'    # its record of the folder, files and model (index_record)
INDEX_LABELS = ('none', 'folders')


def database_file(splits, dataset_root, settings, epoch, weights, extra=None, fingerprint=None):
    """The embedding database that evaluate.py and inference.py read: for every split, from
    splits[split] = ([(path relative to dataset_root, class key)], (N, E*M) features), the image paths from
    the working folder, the class keys and the features in float16; with the folder those paths start from,
    the run's settings (plain values), the epoch of the model that embedded them and the fingerprint of its weights
    (the state_dict weights; hashed as the file is written, in the background during training), so that the file
    describes itself; and the entries of extra (an index's record of its folder, INDEX_RECORD). fingerprint: the
    weights' fingerprint where the caller has it already (index.py hashed them for its parts), not hashed again."""
    database = {'working_dir': os.getcwd(), 'settings': settings, 'epoch': epoch, **(extra or {})}
    for split, (items, features) in splits.items():
        database[f'{split}_images'] = [os.path.join(dataset_root, p) for p, _ in items]
        database[f'{split}_labels'] = [key for _, key in items]
        database[f'{split}_features'] = features.half()

    def write(tmp):
        database['model_fingerprint'] = fingerprint or utils.weights_fingerprint(weights)
        run_files.torch_file(database)(tmp)
    return write


def database_to_complete(path, selected, database_items, model_path):
    """What a run's embedding database at path lacks, which train.py embeds after the last epoch: None when it is
    whole and of the selected epoch (its database_items {split: items} all there), else 'train' (the images of the
    training classes) or, when it is missing, of another epoch or of another model than the selected one at
    model_path, 'all'; 'lost' when that model is missing."""
    if not os.path.isfile(model_path):
        return 'lost'
    stored = utils.safe_load(path, 'embedding database') if os.path.isfile(path) else None
    if not isinstance(stored, dict) or stored.get('epoch') != selected or any(
            len(stored.get(f'{split}_images', ())) != len(items) for split, items in database_items.items()):
        return 'all'
    if stored.get('model_fingerprint') != utils.weights_fingerprint(utils.safe_load(model_path, 'model')):
        return 'all'
    return None if 'train_features' in stored else 'train'


def run_of(path, kinds=('data_base.pth',), prefix=None):
    """run_files.run_of_file for the files that hold embeddings: a run's (of kinds) and index.py's
    <prefix>_<name>_index.pth, whose run is the prefix it records (its name cannot say where the prefix ends: a name
    and a loss may both hold underscores); an index's scores go to <prefix>_<name>_index_eval.csv, not the run's."""
    if not os.path.basename(path).endswith(f'_{INDEX_KIND}'):
        return run_files.run_of_file(path, kinds, prefix)
    recorded = index_record(path)['prefix']
    if not os.path.basename(path).startswith(f'{prefix or recorded}_'):
        raise utils.ReirError(f'{path}: the index of {recorded} is named for another run; give it its name again, '
                              f'<prefix>_<name>_{INDEX_KIND}')
    run, paths, kind = run_files.run_of_file(path, (INDEX_KIND,), prefix or recorded)
    return run, {**paths, 'eval.csv': path.removesuffix('.pth') + '_eval.csv'}, kind


def index_record(path, stored=None):
    """The record an index.py gallery at path keeps of its folder (INDEX_RECORD: prefix, name, labels, source, files,
    unreadable, faiss), read from stored where it is loaded; refused, naming the file, where it has none whole."""
    if stored is None:
        stored = utils.safe_load(path, 'index', verify=False, mmap=True)
    record = stored.get(INDEX_RECORD) if isinstance(stored, dict) else None
    whole = isinstance(record, dict) and isinstance(record.get('prefix'), str) and isinstance(record.get('name'), str) \
        and record.get('labels') in INDEX_LABELS and isinstance(record.get('source'), dict) \
        and all(isinstance(record.get(key), list) for key in ('files', 'unreadable'))
    if not whole:
        raise utils.ReirError(f'{path}: not an index that index.py wrote (no whole "{INDEX_RECORD}" record); write it '
                              f'again with index.py --overwrite')
    return record


def resolve_database(name):
    """An embedding database given as a path or as a file name under results/."""
    if os.path.isfile(name):
        return name
    candidate = os.path.join(run_files.RESULTS_DIR, name)
    if os.path.isfile(candidate):
        return candidate
    raise utils.ReirError(f'embedding database {name} not found (as a path or under {run_files.RESULTS_DIR}/); '
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
        if not utils.all_finite(features):
            return f'{name}_features holds NaN or infinite values'
        widths.add(features.shape[1])
    if len(widths) > 1:
        return f'its splits have features of different widths ({", ".join(map(str, sorted(widths)))})'
    return None


def embedding_model(path):
    """The fingerprint of the weights that embedded the database at path (utils.weights_fingerprint), or None for the
    original REIR's, which names none (model_named)."""
    return model_named(utils.safe_load(path, 'embedding database', verify=False, mmap=True), path)


def model_named(database, path):
    """The fingerprint of the model a loaded database (read from path) names, None where it is the original's (its
    own shape: original.is_original_database); refused where a database of this repository names none, or not in
    the form utils.weights_fingerprint writes (another run's model would embed queries against it unchecked)."""
    if original.is_original_database(database):
        return None
    fingerprint = database.get('model_fingerprint') if isinstance(database, dict) else None
    if not utils.is_weights_fingerprint(fingerprint):
        raise utils.ReirError(f'{path}: names no model that embedded it (its model_fingerprint is {fingerprint!r}); '
                              f'write it again with train.py --resume and the run\'s flags')
    return fingerprint


def check_embedded_by(database_path, model_path, weights):
    """Refuse a model (at model_path, its state_dict weights) that is not the one that embedded the database at
    database_path, where the database names it: a query or a score would mix two networks."""
    stored = embedding_model(database_path)
    if stored is not None and stored != utils.weights_fingerprint(weights):
        raise utils.ReirError(f'{database_path} was embedded by another model than {model_path} (their weights '
                              f'differ): use the model and database one run wrote together')


def load_run_database(path):
    """load_database, refused where the model of the database's run beside it did not embed it: a database scored or
    compared alone must still be that model's; and an index of unlabelled images, which has no classes."""
    database = load_database(path)
    check_model_beside(path)
    if os.path.basename(path).endswith(f'_{INDEX_KIND}') and index_record(path)['labels'] == 'none':
        raise utils.ReirError(f'{path} has no classes to score or compare by: index the folder with --labels folders '
                              f'(each image\'s class its first folder)')
    return database


def check_model_beside(database_path):
    """check_embedded_by for the model of the database's run beside it, where there is one; a model the original REIR
    saved (an index.py gallery it embedded) by its weights under this Model's names, which the gallery names."""
    try:
        run, paths, _ = run_of(database_path)
    except utils.UsageError:
        return  # a file name without a run's prefix: no model beside it to check
    model_path = paths['model.pth']
    if os.path.isfile(model_path) and embedding_model(database_path) is not None:  # (the original's names none)
        weights = utils.safe_load(model_path, 'model', mmap=True)
        if original.is_original_state(weights):
            weights = engine.load_model(model_path, run).state_dict()
        if run_files.is_model_state(weights):
            check_embedded_by(database_path, model_path, weights)


def load_database(path):
    """{split: (image paths, class keys, (N, E*M) features)} of an embedding database, this repository's or the
    original REIR's (original.database_from_original), refused (naming the file) unless each split is whole
    (database_problem). Relative image paths are read from the folder the run
    worked in when they are not found from this one."""
    stored = utils.safe_load(path, 'embedding database')
    database = original.database_from_original(stored) if original.is_original_database(stored) else stored
    names = [key[:-len('_features')] for key in database if key.endswith('_features')] \
        if isinstance(database, dict) else []
    if not names or any(f'{name}_{kind}' not in database for name in names for kind in ('images', 'labels')):
        raise utils.ReirError(f'{path}: not an embedding database (<split>_images, _labels and _features)')
    model_named(stored, path)
    splits = {name: (database[f'{name}_images'], database[f'{name}_labels'], database[f'{name}_features'])
              for name in names}
    problem = database_problem(splits)
    if problem:
        raise utils.ReirError(f'{path}: {problem}; write it again (evaluate.py or train.py --resume)')
    origin = database.get('working_dir')
    first = next((images[0] for images, _, _ in splits.values() if images), None)
    if isinstance(origin, str) and first is not None and not os.path.exists(first) \
            and os.path.exists(os.path.join(origin, first)):
        splits = {name: ([os.path.join(origin, p) for p in images], labels, features)
                  for name, (images, labels, features) in splits.items()}
    return splits
