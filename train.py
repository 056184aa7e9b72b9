"""Train REIR, evaluating retrieval after every epoch.

    python train.py --data_name cub --crop_type cropped
    python train.py --data_name demo --no_pretrained --lr 1e-3 --image_size 64 --share_type layer4 \
        --ensemble_size 12 --batch_size 32 --num_epochs 8
    torchrun --nproc_per_node=4 train.py --data_name sop --batch_size 40

Writes results/<prefix>_results.csv (a row per epoch), <prefix>_model.pth and <prefix>_data_base.pth
(at the best Recall@K for the first K of --recalls: on the test split as the original REIR, or with
--val_classes N on N training classes held out of training), <prefix>_checkpoint.pth (every epoch and every
--checkpoint_every steps, for --resume), <prefix>_curves.png and the meta-class ids; <prefix> names the run's
settings (utils.RunName). SIGTERM or SIGUSR1 stops a run after its current step (or evaluation batch) with a
checkpoint, and before training starts at once (exit code utils.STOPPED_EXIT_CODE); under torchrun --max-restarts a
restarted run continues from its checkpoint. Nothing is written, and --overwrite removes nothing, before every check
that can refuse the command has passed.
"""
import argparse
import contextlib
import functools
import math
import os
import re
import sys
import time
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

import engine
import utils
from model import BACKBONES, BRANCH_IMPLS, SHARE_TYPES

LR_MILESTONES = (0.5, 0.7)  # fractions of the epochs where the learning rate drops
LR_GAMMA = 0.1
CHECKPOINT_MINUTES = 10  # without --checkpoint_every, a checkpoint inside an epoch every this many minutes
# flags that may differ between a run and its --resume without changing what the run computes (the
# branch engines compute the same function and share one checkpoint layout)
RESUME_FREE_FLAGS = ('resume', 'overwrite', 'num_workers', 'gpu_ids', 'load_ids', 'data_path', 'results_dir',
                     'branch_impl', 'checkpoint_every')
# flags added after runs were started: what a checkpoint without them was trained with
LATER_FLAG_DEFAULTS = {'val_classes': 0}


# ----------------------------------------------------------------------------- arguments

def get_args_parser():
    parser = argparse.ArgumentParser(description='Train a REIR randomized ensemble for image retrieval')
    parser.add_argument('--data_path', default=utils.EMBEDDING_DEFAULTS['data_path'],
                        help='folder of prepared datasets (data_utils.py)')
    parser.add_argument('--data_name', default='car', type=utils.dataset_name,
                        help='car, cub, sop, isc, demo, or any dataset prepared under --data_path')
    parser.add_argument('--crop_type', default='uncropped', choices=utils.CROP_TYPES,
                        help='cropped: bounding-box crops (car and cub only)')
    parser.add_argument('--label_type', default='fixed', choices=utils.LABEL_TYPES,
                        help='fixed: balanced meta-classes with a distinct code per class; random: the same '
                             'without the distinct-code check (the original\'s create_random_id)')
    parser.add_argument('--recalls', default=utils.EMBEDDING_DEFAULTS['recalls'], type=utils.recall_list,
                        help='K of Recall@K, comma-separated; the first K selects the best model')
    parser.add_argument('--val_classes', default=0, type=utils.int_in_range(0),
                        help='hold N training classes out of training and select the best epoch by their Recall@K '
                             '(zero-shot validation); 0: select on the test split, as the original REIR')
    parser.add_argument('--model_type', default='resnet18', choices=list(BACKBONES))
    parser.add_argument('--share_type', default='layer1', choices=SHARE_TYPES,
                        help='last backbone stage shared by all branches (none: separate networks)')
    parser.add_argument('--with_random', action='store_true',
                        help='scale the shared feature per branch by softmax(rand(E)) in training')
    parser.add_argument('--load_ids', action='store_true',
                        help='reuse the meta-class ids saved under results/ instead of drawing new ones')
    parser.add_argument('--batch_size', default=10, type=utils.positive_int,
                        help='images per step (all GPUs together)')
    parser.add_argument('--num_epochs', default=20, type=utils.positive_int)
    parser.add_argument('--lr', default=1e-4, type=utils.positive_float,
                        help='Adam learning rate (the original 1e-4 suits ImageNet weights; from scratch try 1e-3)')
    parser.add_argument('--ensemble_size', default=48, type=utils.positive_int, help='branches E')
    parser.add_argument('--meta_class_size', default=12, type=utils.int_in_range(2),
                        help='meta-classes M per branch (at least 2: a single one leaves nothing to learn)')
    parser.add_argument('--gpu_ids', default=None,
                        help=f'comma-separated GPU ids (default {engine.DEFAULT_GPU_IDS}: those of them present), '
                             f'DataParallel over several; "cpu" for the CPU')
    parser.add_argument('--image_size', default=utils.EMBEDDING_DEFAULTS['image_size'], type=utils.positive_int,
                        help='side of the network input')
    parser.add_argument('--seed', default=1, type=utils.int_in_range(0, 2 ** 32 - 1),
                        help='seeds ids, sampling, shuffling, augmentation')
    parser.add_argument('--num_workers', default=min(8, os.cpu_count() or 1), type=int,
                        help='DataLoader worker processes')
    parser.add_argument('--no_pretrained', action='store_true', help='start from random weights, not ImageNet')
    parser.add_argument('--exact_pipeline', action='store_true',
                        help='decode JPEGs whole and resize then crop, as the original REIR does (slower); by '
                             'default large JPEGs are decoded at reduced scale and only the kept region resized')
    parser.add_argument('--amp', action='store_true',
                        help='mixed precision on CUDA (bf16, or fp16 with loss scaling where bf16 is unsupported)')
    parser.add_argument('--branch_impl', default='auto', choices=BRANCH_IMPLS,
                        help='run the branches one by one (loop) or as grouped convolutions (grouped); auto: '
                             'on CUDA the faster in a timed trial before training, on the CPU the loop. Same '
                             'parameters and checkpoints either way')
    parser.add_argument('--resume', action='store_true',
                        help='continue the run with these flags from its checkpoint')
    parser.add_argument('--checkpoint_every', default=None, type=utils.int_in_range(0),
                        help=f'also write the checkpoint every N training steps, so that a run killed inside an epoch '
                             f'loses at most N steps (default: every {CHECKPOINT_MINUTES} minutes of training; 0: after '
                             f'every epoch only). The checkpoint holds the model and the optimizer: keep N large '
                             f'enough that writing it costs little against N steps')
    parser.add_argument('--overwrite', action='store_true',
                        help='start over a run whose files exist: they are removed at the start')
    parser.add_argument('--results_dir', default=utils.RESULTS_DIR, help='where the run writes its files')
    return parser


# ----------------------------------------------------------------------------- data

def load_data_dicts(args, checkpoint):
    """The dataset's data dicts; the demo is drawn first when it is missing (by the main process). A resumed run
    refuses data dicts other than those it started on."""
    if args.data_name == 'demo' and utils.is_main_process():
        import data_utils
        for line in data_utils.prepare_demo_if_missing(args.data_path, args.crop_type, max(1, args.num_workers)):
            print(line)
    if dist.is_initialized():
        dist.barrier()  # the others wait for the main process to prepare the demo
    data_dicts = utils.load_data_dicts(args.data_path, args.data_name, args.crop_type)
    started_on = checkpoint['data_fingerprint'] if checkpoint is not None else ''
    if started_on and started_on != utils.data_fingerprint(data_dicts):
        raise utils.ReirError(f'--resume: {utils.data_dicts_path(args.data_path, args.data_name, args.crop_type)} '
                              f'is not the data the run started on (the dataset was prepared again, or --data_path '
                              f'names another copy); resume on that data, or start over with --overwrite')
    return data_dicts


def epoch_seed(seed, epoch):
    """A distinct seed for every (seed, epoch): an epoch's randomness depends on nothing else, so a resumed
    run repeats exactly what the uninterrupted run would have done."""
    return seed * 1_000_003 + epoch


HOLD_OUT_DRAW = -1  # the held-out classes are drawn as "epoch -1", the training list as "epoch 0"


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
                                  torch.Generator().manual_seed(epoch_seed(args.seed, HOLD_OUT_DRAW)))


class SeededSampler(Sampler):
    """Shuffles from (seed, epoch) and gives every sample its own augmentation seed, so that an epoch's
    batches and augmentations do not depend on the number of workers, or on a resume. Under
    torch.distributed each of num_replicas processes takes every num_replicas-th sample of the shuffled
    order (padded by its first samples to a multiple of num_replicas), as DistributedSampler does: a step of
    B images over all processes takes the next B of that order, whatever the number of processes, so that
    an epoch continued after k steps skips its first k * B samples."""

    def __init__(self, num_samples, seed, rank=0, num_replicas=1):
        self.num_samples, self.seed, self.epoch, self.skip = num_samples, seed, 0, 0
        self.rank, self.num_replicas = rank, num_replicas

    def set_epoch(self, epoch, skip=0):
        """Sample epoch, leaving out the first skip samples of its order (a multiple of num_replicas)."""
        self.epoch, self.skip = epoch, skip

    def __len__(self):
        return max(0, -(-self.num_samples // self.num_replicas) - self.skip // self.num_replicas)

    def __iter__(self):
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(self.num_samples, generator=generator)
        seeds = torch.randint(2 ** 62, (self.num_samples,), generator=generator)
        padding = -self.num_samples % self.num_replicas
        order, seeds = torch.cat([order, order[:padding]]), torch.cat([seeds, seeds[:padding]])
        mine = slice(self.skip + self.rank, None, self.num_replicas)
        return iter(zip(order[mine].tolist(), seeds[mine].tolist()))


def check_ids(ids, path, ensemble_size, num_class, meta_class_size):
    """Refuse meta-class ids (from a file or a checkpoint) that do not map num_class classes for every member."""
    expected = (ensemble_size, num_class)
    if tuple(ids.shape) != expected:
        raise utils.ReirError(f'{path}: ids of shape {tuple(ids.shape)} do not fit --ensemble_size {ensemble_size} '
                              f'and {num_class} training classes (expected {expected})')
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool \
            or int(ids.min()) < 0 or int(ids.max()) >= meta_class_size:
        raise utils.ReirError(f'{path}: ids must be integers from 0 to {meta_class_size - 1} '
                              f'(--meta_class_size {meta_class_size})')


def draw_or_load_ids(args, run, num_class, generator):
    """The run's meta-class ids (E, C): those saved under --results_dir with --load_ids, else drawn. Writes nothing
    (start_run writes drawn ids); refuses to draw ids other than the saved ones, unless --overwrite replaces them,
    which it may only where no other run's files use them (runs that differ in share type, backbone or
    --with_random share one ids file)."""
    path = os.path.join(args.results_dir, run.ids_name)
    if args.load_ids:
        ids = utils.safe_load(path, 'meta-class ids')
        if not isinstance(ids, torch.Tensor):
            raise utils.ReirError(f'{path}: holds a {type(ids).__name__}, not a tensor of meta-class ids')
        check_ids(ids, path, args.ensemble_size, num_class, args.meta_class_size)
        return ids.long()
    try:
        ids = utils.create_id(args.meta_class_size, num_class, args.ensemble_size, args.label_type, generator)
    except ValueError as e:
        raise utils.UsageError(str(e)) from None
    if utils.is_main_process() and os.path.isfile(path):
        saved = utils.safe_load(path, 'meta-class ids')
        if not (isinstance(saved, torch.Tensor) and saved.shape == ids.shape and torch.equal(saved.long(), ids)):
            sharing = runs_sharing_ids(args.results_dir, run)
            if not args.overwrite:
                raise utils.UsageError(f'{path} holds other ids than --seed {args.seed} draws: reuse them with '
                                       f'--load_ids, or pass --overwrite to replace them')
            if sharing:
                raise utils.UsageError(f'{path} holds other ids than --seed {args.seed} draws, and the run '
                                       f'{sharing[0]} uses them: reuse them with --load_ids, or train in another '
                                       f'--results_dir')
    return ids


def runs_sharing_ids(results_dir, run):
    """The prefixes of the other runs in results_dir whose files name the same meta-class ids file as run's."""
    prefixes = set()
    for name in os.listdir(results_dir) if os.path.isdir(results_dir) else []:
        for kind in utils.RUN_OUTPUTS:
            other = utils.RunName.parse(name[:-len(kind) - 1]) if name.endswith(f'_{kind}') else None
            if other is not None and other != run and other.ids_name == run.ids_name:
                prefixes.add(other.prefix)
    return sorted(prefixes)


def run_lists(args, run, train_dict, checkpoint):
    """The run's meta-class ids (E, C), its sampled training list [(path, class index)] and its held-out classes
    {class: [paths]}: the checkpoint's on --resume, else drawn from --seed, each from a generator of its own, so
    that a --load_ids run trains on the list of the run that drew the ids (the list is drawn as "epoch 0"). The
    ids and the list cover the training classes that are not held out."""
    if checkpoint is not None:
        path = os.path.join(args.results_dir, f'{run.prefix}_checkpoint.pth')
        missing = [key for key in checkpoint['held_out'] if key not in train_dict]
        if missing:
            raise utils.ReirError(f'--resume: held-out class {missing[0]} of the run is no longer in the dataset\'s '
                                  f'training split; prepare the dataset as it was, or start over with --overwrite')
        held_out = {key: train_dict[key] for key in checkpoint['held_out']}
        num_class = len(train_dict) - len(held_out)
        check_ids(checkpoint['ids'], path, args.ensemble_size, num_class, args.meta_class_size)
        items = [tuple(item) for item in checkpoint['train_items']]
        if not items or any(not 0 <= index < num_class for _, index in items):
            raise utils.ReirError(f'{path}: its training list does not index the {num_class} training classes')
        return checkpoint['ids'].long(), items, held_out
    train_dict, held_out = split_validation(args, train_dict)
    ids = draw_or_load_ids(args, run, len(train_dict), torch.Generator().manual_seed(args.seed))
    sampling = torch.Generator().manual_seed(epoch_seed(args.seed, 0))
    return ids, utils.sample_train_images(train_dict, sampling), held_out


def train_loader(args, data_dicts, ids, train_items, batch_size, options, rank, world, replicas):
    """The sampled training list with its meta-class labels, shuffled and augmented from (--seed, epoch)."""
    transform, min_side = utils.input_pipeline(args.crop_type, True, args.image_size, data_dicts['mean'],
                                               data_dicts['std'], args.exact_pipeline)
    dataset = utils.TrainReader(os.path.join(args.data_path, args.data_name), train_items,
                                [ids[:, c] for _, c in train_items], transform, min_side)
    sampler = SeededSampler(len(dataset), args.seed, rank, world)
    drop_last = drop_last_batch(args, batch_size, len(sampler), replicas)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, **options)


def drop_last_batch(args, batch_size, num_samples, replicas):
    """Whether to leave out the epoch's last, short batch. Batch norm cannot train on one value per channel,
    which a device gets from a single image when the last feature map is 1 x 1 (--image_size 32 or less);
    DataParallel splits a batch over replicas devices as torch.chunk does."""
    if engine.last_feature_side(args.image_size) > 1:
        return False
    def gives_a_device_one_image(batch):
        return min(len(chunk) for chunk in torch.arange(batch).chunk(replicas)) < 2
    if gives_a_device_one_image(batch_size):
        raise utils.UsageError(f'--batch_size {args.batch_size} gives a device single images, which batch norm '
                               f'cannot train on at --image_size {args.image_size} (a 1 x 1 last feature map): '
                               f'use a larger --batch_size or an --image_size above 32')
    last = num_samples % batch_size
    if last and gives_a_device_one_image(last):
        utils.warn(f'the last batch of every epoch ({last} images) is left out: batch norm cannot train on single '
                   f'images at --image_size {args.image_size}')
        return True
    return False


# ----------------------------------------------------------------------------- one epoch

def train_one_epoch(model, loader, optimizer, scaler, device, amp, description, start, after_step):
    """One pass over the training list, or what is left of it after start = (steps done, this process's running
    sums of them: loss, correct labels, images, skipped images); returns mean loss, accuracy in percent and skipped
    images, and the epoch's steps with this process's sums at its end (where a stop before the epoch's files
    continues). after_step(step, steps, sums) runs after every step (StepCheckpoints.after_step). Stops at the first
    non-finite loss (engine.Diverged)."""
    model.train()
    done, (total_loss, correct, seen, skipped) = start
    steps = done + len(loader)
    progress = tqdm(loader, desc=description, initial=done, total=steps, dynamic_ncols=True, file=sys.stderr,
                    disable=not utils.is_main_process())
    for step, (images, labels, failures) in enumerate(progress, start=done + 1):
        images = images.to(device, non_blocking=True, memory_format=engine.memory_format(device, amp))
        labels = labels.to(device, non_blocking=True)                                      # (B, E)
        loss, logits = engine.train_step(model, images, labels, optimizer, scaler, amp)   # logits (B, E, M)
        if not math.isfinite(loss.item()):
            raise engine.Diverged(f'the loss is {loss.item()} at step {step} of {steps}')
        total_loss += loss.item() * images.shape[0]
        correct += (logits.argmax(-1) == labels).sum().item()
        seen += images.shape[0]
        skipped += int(failures.sum())
        progress.set_postfix(loss=f'{total_loss / seen:.4f}', acc=f'{100 * correct / (seen * labels.shape[1]):.2f}%')
        after_step(step, steps, [total_loss, correct, seen, skipped])
    sums = [total_loss, correct, seen, skipped]
    total_loss, correct, seen, skipped = engine.all_reduce_sum(sums, device)
    ensemble_size = engine.unwrap(model).ensemble_size
    return {'loss': total_loss / seen, 'accuracy': 100 * correct / (seen * ensemble_size), 'skipped': int(skipped),
            'steps': steps, 'sums': sums}


# ----------------------------------------------------------------------------- outputs

def database_loader(train_dict, dataset_root, transform, min_side, batch_size, options):
    """Every image of the training classes (not only the sampled list), to embed for the database."""
    items = utils.flatten_split(train_dict)
    reader = utils.EvalReader(dataset_root, items, [0] * len(items), transform, min_side)
    return engine.eval_loader(reader, batch_size, options)


def recorded_settings(args, data_dicts, held_out):
    """What <prefix>_args.json and the database record of the run: its flags, the normalization it used (a
    folder dataset prepared again with more images gets another mean and std) and the training classes it held
    out for validation."""
    return dict(vars(args), mean=list(data_dicts['mean']), std=list(data_dicts['std']),
                held_out_classes=sorted(held_out))


def best_files(model, settings, output, database_items, features, train_images, dataset_root, device, amp,
               stop_requested=None):
    """The files of a best epoch, as writers for utils.save_together: the model, its embedding database (the
    evaluation splits' features, with the held-out classes as 'val', and for self-retrieval datasets those of
    every image of the training classes, each process embedding its shard; unreadable images are left out) and
    the run's recorded_settings, which say how to embed. stop_requested: see engine.extract_features."""
    database = {split: (items, features[split]) for split, items in database_items.items()}
    if train_images is not None:
        train_features, readable = engine.extract_features(model, train_images, device, amp, stop_requested)
        if not readable.all():
            utils.warn(f'{int((~readable).sum())} unreadable training images left out of the embedding database')
        items = [item for item, ok in zip(train_images.dataset.items, readable.tolist()) if ok]
        database['train'] = (items, train_features[readable])
    return {output['model.pth']: utils.torch_file(engine.unwrap(model).state_dict()),
            output['data_base.pth']: utils.database_file(database, dataset_root, settings),
            output['args.json']: utils.json_file(settings)}


def evaluate_epoch(model, test_data, val_data, args, device, stop_requested=None):
    """(test metrics, validation metrics or None, features by database split: 'test' or 'query' and 'gallery',
    and 'val' for the held-out classes); test_data and val_data as engine.build_eval_data returns them.
    stop_requested: see engine.extract_features."""
    _, labels, loaders = test_data
    metrics, features = engine.evaluate(model, loaders, labels, args.recalls, device, args.amp, stop_requested)
    if val_data is None:
        return metrics, None, features
    _, labels, loaders = val_data
    try:
        val_metrics, val_features = engine.evaluate(model, loaders, labels, args.recalls, device, args.amp,
                                                    stop_requested)
    except engine.Diverged:
        raise engine.Diverged('the validation embeddings hold NaN or infinite values') from None
    return metrics, val_metrics, {**features, 'val': val_features['test']}


def record_epoch(results, epoch, stats, metrics, val_metrics, args):
    """Print the epoch's line and add its row to the results: the test metrics, then the validation ones
    (--val_classes), so that the columns of the original keep their places."""
    skipped = f' | {stats["skipped"]} unreadable images skipped' if stats['skipped'] else ''
    val = f' | val {engine.format_metrics(val_metrics, args.recalls)}' if val_metrics else ''
    utils.log(f'Epoch {epoch}/{args.num_epochs} | loss: {stats["loss"]:.4f} | accuracy: {stats["accuracy"]:.2f}% | '
              f'{engine.format_metrics(metrics, args.recalls)}{val}{skipped}')
    results.append({'epoch': epoch, 'train_loss': stats['loss'], 'train_accuracy': stats['accuracy'],
                    **{f'test_{name}': value for name, value in metrics.items()},
                    **{f'val_{name}': value for name, value in (val_metrics or {}).items()}})


def selection_note(results, recalls, output):
    """The run's last line: the selected epoch, what selected it, and its test metrics."""
    row = utils.selected_row(results)
    column = utils.selection_column(list(row))
    test = {name.removeprefix('test_'): value for name, value in row.items() if name.startswith('test_')}
    return (f'selected epoch {row["epoch"]} by {column.replace("_", " ")} ({row[column]:.2f}%): test '
            f'{engine.format_metrics(test, recalls)} -> {output["model.pth"]}')


def save_epoch(output, results, trainable, progress, best):
    """The epoch's files, written together so that a failed save keeps the previous epoch's complete set:
    the results CSV, the curves, at a best epoch the files of best_files, and the checkpoint, renamed last so
    that a kill between the renames leaves the previous checkpoint, from which --resume redoes this epoch."""
    utils.save_together({output['results.csv']: utils.csv_file(results),
                         output['curves.png']: utils.curves_file(results),
                         **(best or {}),
                         output['checkpoint.pth']: utils.checkpoint_file(trainable, progress)})


# ----------------------------------------------------------------------------- checkpoints

def lock_run(args, run, output):
    """Lock the run's prefix (utils.RunLock) and refuse a start that would replace an earlier run with this prefix
    unasked: its files need --resume (continue it) or --overwrite (start_run removes them once the run is certain to
    start). Returns the lock."""
    lock = utils.RunLock(args.results_dir, run.prefix)
    utils.remove_stale_temporaries(args.results_dir, run.prefix)
    existing = [path for path in output.values() if os.path.exists(path)]
    if existing and not args.resume and not args.overwrite:
        lock.release()
        raise utils.UsageError(f'{args.results_dir}/ holds the files of a run with these settings '
                               f'({", ".join(os.path.basename(p) for p in existing)}): continue it with '
                               f'--resume, or pass --overwrite to start over')
    return lock


def start_run(args, run, output, ids):
    """What the main process writes once every check that could refuse the run has passed: with --overwrite the
    earlier run's files go, and a run that drew its meta-class ids saves them (draw_or_load_ids checked that no
    other run's ids are replaced)."""
    if args.overwrite:
        for path in output.values():
            if os.path.exists(path):
                os.remove(path)
    if not (args.resume or args.load_ids):
        utils.atomic_torch_save(ids, os.path.join(args.results_dir, run.ids_name))


def load_checkpoint(path, args):
    if not os.path.isfile(path):
        raise utils.ReirError(f'--resume: no checkpoint {path}; run once without --resume')
    checkpoint = utils.load_checkpoint(path)
    differing = differing_flags(checkpoint['args'], args)
    if differing:
        raise utils.UsageError(f'--resume with flags that differ from the checkpoint\'s: {"; ".join(differing)}')
    return checkpoint


def differing_flags(saved, args):
    """The flags of args that change what a run computes and differ from those a checkpoint saved, as
    '--flag saved -> new'."""
    saved = {**LATER_FLAG_DEFAULTS, **saved}
    return [f'--{name} {saved.get(name)!r} -> {value!r}' for name, value in sorted(vars(args).items())
            if name not in RESUME_FREE_FLAGS and saved.get(name) != value]


def best_files_lost(output, checkpoint):
    """Whether --resume must write the best epoch's model and database again: it can when the checkpoint holds the
    best epoch's model, and refuses when that model is lost."""
    missing = [output[kind] for kind in ('model.pth', 'data_base.pth') if not os.path.isfile(output[kind])]
    if not checkpoint['results'] or not missing:
        return False  # inside the first epoch there is no best epoch yet
    best = utils.selected_row(checkpoint['results'])['epoch']
    if checkpoint['step'] or best != checkpoint['epoch'] - 1:
        raise utils.ReirError(f'{" and ".join(missing)} missing: the model of the best epoch, {best}, is lost (the '
                              f'checkpoint holds {position_note(checkpoint)}); put the files back, or start over '
                              f'with --overwrite')
    utils.warn(f'{" and ".join(missing)} missing: writing them again from the checkpoint, which holds the best '
               f'epoch ({best})')
    return True


def lost_files(output, results, settings):
    """The files of a resumed run, as writers for utils.save_together, that the checkpoint can give back where they
    are missing or damaged: the results CSV and curves of its results (a finished run keeps them nowhere else), and
    args.json beside a model (a run from before args.json was written)."""
    files = {}
    try:
        intact = len(utils.read_results(output['results.csv'])) == len(results)
    except utils.ReirError:
        intact = False
    if results and not (intact and os.path.isfile(output['curves.png'])):
        utils.warn(f'{output["results.csv"]} or its curves missing or damaged: writing them again from the checkpoint')
        files.update({output['results.csv']: utils.csv_file(results), output['curves.png']: utils.curves_file(results)})
    if os.path.isfile(output['model.pth']) and not os.path.isfile(output['args.json']):
        files[output['args.json']] = utils.json_file(settings)
    return files


def restore(checkpoint, trainable, path):
    """(first epoch, best recall, results so far), with the trainable objects' states loaded on --resume."""
    if checkpoint is None:
        return 1, -1.0, []
    for name, obj in trainable.items():
        try:
            obj.load_state_dict(checkpoint[name])
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
            raise utils.ReirError(f'{path}: its {name} state does not fit this run ({str(e).splitlines()[0]}); '
                                  f'delete it and start again without --resume') from None
    return checkpoint['epoch'], checkpoint['best_recall'], checkpoint['results']


EPOCH_START = (0, [0.0, 0, 0, 0])  # (steps done, running sums: loss, correct labels, images, skipped images)


def epoch_position(checkpoint, rank, world):
    """Where this process continues the checkpoint's epoch: (steps done, its running sums) as train_one_epoch takes
    them, and the random states to restore (None at an epoch's start). Each process takes its own. On another number
    of processes than wrote the checkpoint the epoch still continues from the same sample (SeededSampler), with the
    sums of all in rank 0 and rank 0's random states in every process, though not as either number of processes
    would have run it."""
    if checkpoint is None or not checkpoint['step']:
        return EPOCH_START, None
    running = checkpoint['running']
    if len(running) == world:
        return (checkpoint['step'], running[rank]['sums']), running[rank]['rng']
    utils.warn(f'the checkpoint was written by {len(running)} processes, inside epoch {checkpoint["epoch"]}: its '
               f'rest runs on {world}, so the run will not repeat one on either number exactly')
    sums = [sum(values) for values in zip(*(process['sums'] for process in running))]
    return (checkpoint['step'], sums if rank == 0 else EPOCH_START[1]), running[0]['rng']


def position_note(checkpoint):
    """Where the run a checkpoint holds stands: 'step 30 of epoch 3' or 'the end of epoch 2'."""
    step = checkpoint.get('step', 0)
    return f'step {step} of epoch {checkpoint["epoch"]}' if step else f'the end of epoch {checkpoint["epoch"] - 1}'


def saved_note(path):
    """What a run that stops leaves to --resume."""
    checkpoint = utils.peek_checkpoint(path)
    if checkpoint is None:
        return 'no checkpoint was written, so there is nothing to resume'
    return f'{path} holds the run at {position_note(checkpoint)}'


class StepCheckpoints:
    """The checkpoints written inside an epoch: every `every` steps (None: every CHECKPOINT_MINUTES minutes; 0:
    never), and at once, followed by a stop (utils.Stopped), when a stop signal has arrived (engine.StopSignals).
    A checkpoint holds the running sums and random states of every process, which the main process writes: every
    process asks after each step, and they agree (engine.any_process)."""

    def __init__(self, every, path, trainable, signals, device, gpu_ids):
        self.every, self.path, self.trainable, self.signals = every, path, trainable, signals
        self.device, self.gpu_ids = device, gpu_ids
        self.saved()

    def saved(self):
        self.last_save = time.monotonic()

    def due(self, step, steps):
        if step == steps or self.every == 0:
            return False  # the epoch's own checkpoint follows
        if self.every is None:
            return time.monotonic() - self.last_save >= 60 * CHECKPOINT_MINUTES
        return step % self.every == 0

    def stop_requested(self):
        return engine.any_process([self.signals.received is not None], self.device)[0]

    def save(self, progress, step, sums):
        """Write the checkpoint of the epoch in progress after its first `step` steps, with this process's running
        sums (every process calls it; the main process writes what each holds). progress: the checkpoint's keys other
        than the trainable states, step and running (utils.CHECKPOINT_FORMAT), for the epoch in progress."""
        running = engine.gather_objects({'sums': sums, 'rng': engine.rng_states(self.gpu_ids)})
        if utils.is_main_process():
            utils.save_together({self.path: utils.checkpoint_file(
                self.trainable, {**progress, 'step': step, 'running': running})})
        self.saved()

    def after_step(self, progress, step, steps, sums):
        save, stop = engine.any_process([self.due(step, steps), self.signals.received is not None], self.device)
        if not (save or stop):
            return
        self.save(progress, step, sums)
        if stop or self.stop_requested():  # a signal may have come while the checkpoint was written
            self.stop(f'at step {step} of {steps} of epoch {progress["epoch"]}')

    def stop(self, where):
        if dist.is_initialized():
            dist.barrier()  # no process ends before the checkpoint is written
        raise utils.Stopped(f'stopped by {self.signals.received or "a stop signal to another process"} {where}: '
                            f'{self.path} holds the run; continue it with the same command and --resume')


# ----------------------------------------------------------------------------- the run

def select_run_devices(args, local_rank, world):
    """Under torchrun one device per process (cuda:LOCAL_RANK, else the CPU); otherwise --gpu_ids."""
    if world == 1:
        return engine.select_devices(args.gpu_ids)
    if args.gpu_ids is not None:
        utils.warn('--gpu_ids is ignored under torchrun: each process uses the GPU of its LOCAL_RANK')
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device(f'cuda:{local_rank}'), [local_rank]
    return torch.device('cpu'), []


def build_run_model(args, run, device, gpu_ids, world, batch_size):
    """The model on its device(s), seeded alike in every process, with its branch engine chosen."""
    utils.set_seed(args.seed)
    model = engine.build_model(run, pretrained=not args.no_pretrained, branch_impl=args.branch_impl)
    model = model.to(device, memory_format=engine.memory_format(device, args.amp))
    replica_batch = -(-batch_size // max(1, len(gpu_ids)))  # DataParallel splits the batch over its GPUs
    choice = engine.choose_branch_impl(model, args.branch_impl, device, replica_batch, args.image_size, args.amp)
    model.branch_impl = engine.broadcast_from_main(model.branch_impl)  # every process runs rank 0's choice
    utils.log(choice)
    if world > 1:
        return nn.parallel.DistributedDataParallel(model, device_ids=gpu_ids or None)
    return nn.DataParallel(model, device_ids=gpu_ids) if len(gpu_ids) > 1 else model


def main(args):
    if args.resume and args.overwrite:
        raise utils.UsageError('--resume continues the run\'s files and --overwrite removes them: pass one')
    run = utils.RunName.from_args(args)
    output = {kind: os.path.join(args.results_dir, f'{run.prefix}_{kind}') for kind in utils.RUN_OUTPUTS}
    # until the epochs begin a stop signal ends the process at once: nothing is being trained that a checkpoint
    # could keep
    with engine.StopSignals() as signals:
        try:
            rank, world, local_rank = engine.init_distributed()
            if args.batch_size % world:
                raise utils.UsageError(f'--batch_size {args.batch_size} is the batch over all {world} processes: '
                                       f'make it a multiple of {world}')
            device, gpu_ids = select_run_devices(args, local_rank, world)
            if args.amp and device.type != 'cuda':
                utils.warn('--amp only acts on CUDA: running in float32')
            args = after_elastic_restart(args, output['checkpoint.pth'])
            with lock_run(args, run, output) if utils.is_main_process() else contextlib.nullcontext():
                train(args, run, output, device, gpu_ids, rank, world, signals)
        except utils.StopRequested:
            raise utils.Stopped(f'stopped by {signals.received} before training: {saved_note(output["checkpoint.pth"])}'
                                f'; run the same command again') from None
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def after_elastic_restart(args, checkpoint_path):
    """The flags of a process that torchrun --max-restarts started again: --resume, without --overwrite, when its
    torchrun job has written the run's checkpoint, which it continues; else those of the first start (a first start
    refused for another run's files is refused again)."""
    restart = engine.elastic_restart_count()
    if not restart:
        return args
    checkpoint = utils.peek_checkpoint(checkpoint_path) if utils.is_main_process() else None
    own = checkpoint is not None and checkpoint.get('elastic_job') == engine.elastic_job()
    if not engine.broadcast_from_main(own):
        return args
    utils.log(f'torchrun restart {restart}: continuing the run from its checkpoint')
    return argparse.Namespace(**{**vars(args), 'resume': True, 'overwrite': False})


def train(args, run, output, device, gpu_ids, rank, world, signals):
    checkpoint = load_checkpoint(output['checkpoint.pth'], args) if args.resume else None

    # ------------------------------------------------------------------ data, checked before anything is written
    data_dicts = load_data_dicts(args, checkpoint)
    dataset_root = os.path.join(args.data_path, args.data_name)
    engine.check_recalls(args.recalls, {split: sum(map(len, data_dicts[split].values()))
                                        for split in utils.eval_splits(data_dicts, args.data_name)})
    ids, train_items, held_out = run_lists(args, run, data_dicts['train'], checkpoint)
    engine.check_recalls(args.recalls, {'test': sum(map(len, held_out.values()))} if held_out else {},
                         'validation ')
    settings = recorded_settings(args, data_dicts, held_out)
    options = engine.loader_options(args.num_workers, args.seed, device)
    batch_size = args.batch_size // world  # per process
    loader = train_loader(args, data_dicts, ids, train_items, batch_size, options, rank, world, max(1, len(gpu_ids)))
    transform, min_side = utils.input_pipeline(args.crop_type, False, args.image_size, data_dicts['mean'],
                                               data_dicts['std'], args.exact_pipeline)
    test_data = engine.build_eval_data(data_dicts, dataset_root, transform, min_side, batch_size, options)
    # the held-out classes are scored as a self-retrieval split, as a test split is
    val_data = engine.build_eval_data({'test': held_out}, dataset_root, transform, min_side, batch_size, options) \
        if held_out else None
    database_items = {**test_data[0], **({'val': val_data[0]['test']} if held_out else {})}
    training_classes = {key: paths for key, paths in data_dicts['train'].items() if key not in held_out}
    train_images = database_loader(training_classes, dataset_root, transform, min_side, batch_size, options) \
        if 'test' in test_data[0] else None
    utils.log(f'{args.data_name}: {len(training_classes)} training classes, {len(train_items)} training images, '
              + ', '.join(f'{len(items)} {split} images' for split, items in test_data[0].items())
              + (f', {len(held_out)} held-out validation classes of {len(database_items["val"])} images'
                 if held_out else '')
              + (f'; {world} processes of {batch_size} images a step' if world > 1 else ''))

    # ------------------------------------------------------------------ model, optimizer, resume
    model = build_run_model(args, run, device, gpu_ids, world, batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    milestones = [int(args.num_epochs * fraction) for fraction in LR_MILESTONES]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=LR_GAMMA)
    trainable = dict(model=engine.unwrap(model), optimizer=optimizer, scheduler=scheduler,
                     scaler=engine.grad_scaler(device, args.amp))
    start_epoch, best_recall, results = restore(checkpoint, trainable, output['checkpoint.pth'])
    start, rng = epoch_position(checkpoint, rank, world)
    rewrite_best = checkpoint is not None and engine.broadcast_from_main(
        best_files_lost(output, checkpoint) if utils.is_main_process() else None)

    # ------------------------------------------------------------------ the run starts: every check has passed
    if utils.is_main_process():
        start_run(args, run, output, ids)
    if checkpoint is not None:
        utils.log(f'resumed from {output["checkpoint.pth"]} at {position_note(checkpoint)}')
        files = lost_files(output, results, settings) if utils.is_main_process() else {}
        if rewrite_best:
            _, _, features = evaluate_epoch(model, test_data, val_data, args, device)
            files.update(best_files(model, settings, output, database_items, features, train_images, dataset_root,
                                    device, args.amp))
        if utils.is_main_process():
            utils.save_together(files)

    # ------------------------------------------------------------------ epochs
    checkpoints = StepCheckpoints(args.checkpoint_every, output['checkpoint.pth'], trainable, signals, device, gpu_ids)
    stop_requested = checkpoints.stop_requested
    selection_key = f'recall@{args.recalls[0]}'
    # what a checkpoint holds besides the trainable states and the position in the epoch
    progress = dict(best_recall=best_recall, results=results, args=vars(args), ids=ids, train_items=train_items,
                    held_out=sorted(held_out), elastic_job=engine.elastic_job(),
                    data_fingerprint=utils.data_fingerprint(data_dicts))
    with signals.deferred():  # from here a stop signal stops the run once its state is saved
        for epoch in range(start_epoch, args.num_epochs + 1):
            utils.set_seed(epoch_seed(args.seed, epoch))
            if rng is not None:  # inside an epoch, the random states where its checkpoint was written
                engine.set_rng_states(rng, gpu_ids)
            loader.sampler.set_epoch(epoch, skip=start[0] * args.batch_size)
            # where a stop before this epoch's files are written continues: after its training steps
            before_evaluation = {**progress, 'epoch': epoch, 'results': list(results)}
            try:
                stats = train_one_epoch(model, loader, optimizer, trainable['scaler'], device, args.amp,
                                        f'Epoch {epoch}/{args.num_epochs}', start,
                                        functools.partial(checkpoints.after_step, {**progress, 'epoch': epoch}))
                metrics, val_metrics, features = evaluate_epoch(model, test_data, val_data, args, device,
                                                                stop_requested)
                start, rng = EPOCH_START, None
                record_epoch(results, epoch, stats, metrics, val_metrics, args)
                best = None
                selected = (val_metrics or metrics)[selection_key]  # on the held-out classes when there are some
                if selected > progress['best_recall']:
                    progress['best_recall'] = selected
                    best = best_files(model, settings, output, database_items, features, train_images, dataset_root,
                                      device, args.amp, stop_requested)
            except engine.Diverged as e:
                raise utils.ReirError(f'epoch {epoch}: {e}: training diverged (a lower --lr may help); '
                                      f'{saved_note(output["checkpoint.pth"])}') from None
            except utils.StopRequested:
                checkpoints.save(before_evaluation, stats['steps'], stats['sums'])
                checkpoints.stop(f'in the evaluation of epoch {epoch}')
            with warnings.catch_warnings():
                # an epoch continued after its last step has run no optimizer step in this process, which the
                # scheduler takes for a misuse; its state (restored) still gives the right learning rate
                warnings.filterwarnings('ignore', re.escape('Detected call of `lr_scheduler.step()` before'))
                scheduler.step()
            if utils.is_main_process():
                save_epoch(output, results, trainable, {**progress, 'epoch': epoch + 1, 'step': 0, 'running': []},
                           best)
            checkpoints.saved()
            if epoch < args.num_epochs and stop_requested():
                checkpoints.stop(f'after epoch {epoch}')
        utils.log(selection_note(results, args.recalls, output))


def interrupted_note(args):
    """What a Ctrl-C leaves of the run: its checkpoint, or nothing to resume."""
    path = os.path.join(args.results_dir, f'{utils.RunName.from_args(args).prefix}_checkpoint.pth')
    if utils.peek_checkpoint(path) is None:
        return 'interrupted before the first checkpoint: there is nothing to resume'
    return f'interrupted: {saved_note(path)}; continue with --resume'


if __name__ == '__main__':
    arguments = get_args_parser().parse_args()
    utils.run_cli(main, arguments, interrupted=lambda: interrupted_note(arguments))
