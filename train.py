"""Train REIR, evaluating retrieval after every epoch.

    python train.py --data_name cub --crop_type cropped
    python train.py --data_name demo --no_pretrained --lr 1e-3 --image_size 64 --share_type layer4 \
        --ensemble_size 12 --batch_size 32 --num_epochs 8
    torchrun --nproc_per_node=4 train.py --data_name sop --batch_size 40

Writes results/<prefix>_results.csv (a row per epoch), <prefix>_model.pth and <prefix>_data_base.pth
(at the best Recall@K for the first K of --recalls: on the test split as the original REIR, or with
--val_classes N on N training classes held out of training; the database's training images are embedded once, by
the selected model, after the last epoch), <prefix>_checkpoint.pth (every epoch and every --checkpoint_every steps,
for --resume; written in the background), <prefix>_curves.png and the meta-class ids; <prefix> names the run's
settings (run_files.RunName). SIGTERM or SIGUSR1 stops a run after its current step (or evaluation batch; under
torchrun within resume.STOP_AGREEMENT_EVERY of them) with a checkpoint, and before training starts at once (exit
code utils.STOPPED_EXIT_CODE); under torchrun --max-restarts a restarted run continues from its checkpoint. Nothing
is written, and --overwrite removes nothing, before every check that can refuse the command has passed.
"""
import argparse
import contextlib
import functools
import os
import re
import sys
import time
import warnings

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

import engine
import figures
import resume
import run_files
import utils
from model import BACKBONES, BRANCH_IMPLS, SHARE_TYPES


LR_MILESTONES = (0.5, 0.7)  # fractions of the epochs where the learning rate drops
LR_GAMMA = 0.1
HOLD_OUT_DRAW = -1  # the held-out classes are drawn as "epoch -1", the training list as "epoch 0"
SYNC_SECONDS = 1.0  # how often the progress bar reads the running loss and accuracy from the device


# ----------------------------------------------------------------------------- arguments

def get_args_parser():
    parser = argparse.ArgumentParser(description='Train a REIR randomized ensemble for image retrieval')
    parser.add_argument('--data_path', default=run_files.EMBEDDING_DEFAULTS['data_path'],
                        help='folder of prepared datasets (data_utils.py)')
    parser.add_argument('--data_name', default='car', type=utils.dataset_name,
                        help='car, cub, sop, isc, demo, or any dataset prepared under --data_path')
    parser.add_argument('--crop_type', default='uncropped', choices=utils.CROP_TYPES,
                        help='cropped: bounding-box crops (car and cub only)')
    parser.add_argument('--label_type', default='fixed', choices=utils.LABEL_TYPES,
                        help='fixed: balanced meta-classes with a distinct code per class; random: the same '
                             'without the distinct-code check (the original\'s create_random_id)')
    parser.add_argument('--recalls', default=run_files.EMBEDDING_DEFAULTS['recalls'], type=utils.recall_list,
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
    parser.add_argument('--eval_batch_size', default=engine.EVAL_BATCH_SIZE, type=utils.positive_int,
                        help='images per embedding batch in evaluation and for the database (each process); the '
                             'embeddings depend on it only by float rounding')
    parser.add_argument('--num_epochs', default=20, type=utils.positive_int)
    parser.add_argument('--lr', default=1e-4, type=utils.positive_float,
                        help='Adam learning rate (the original 1e-4 suits ImageNet weights; from scratch try 1e-3)')
    parser.add_argument('--ensemble_size', default=48, type=utils.positive_int, help='branches E')
    parser.add_argument('--meta_class_size', default=12, type=utils.int_in_range(2),
                        help='meta-classes M per branch (at least 2: a single one leaves nothing to learn)')
    parser.add_argument('--gpu_ids', default=None,
                        help=f'comma-separated GPU ids (default {engine.DEFAULT_GPU_IDS}: those of them present), '
                             f'DataParallel over several; "cpu" for the CPU')
    parser.add_argument('--image_size', default=run_files.EMBEDDING_DEFAULTS['image_size'], type=utils.positive_int,
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
    parser.add_argument('--compile', action='store_true',
                        help='compile the model with torch.compile (its first steps take minutes; then fewer, fused '
                             'kernels; outputs equal within float tolerance)')
    parser.add_argument('--branch_impl', default='auto', choices=BRANCH_IMPLS,
                        help='run the branches one by one (loop) or as grouped convolutions (grouped); auto: '
                             'on CUDA the faster in a timed trial before training, on the CPU the loop. Same '
                             'parameters and checkpoints either way')
    parser.add_argument('--resume', action='store_true',
                        help='continue the run with these flags from its checkpoint')
    parser.add_argument('--checkpoint_every', default=None, type=utils.int_in_range(0),
                        help=f'also write the checkpoint every N training steps, so that a run killed inside an epoch '
                             f'loses at most N steps (default: every {resume.CHECKPOINT_MINUTES} minutes of training; '
                             f'0: after every epoch only). The checkpoint holds the model and the optimizer: keep N '
                             f'large enough that writing it costs little against N steps')
    parser.add_argument('--overwrite', action='store_true',
                        help='start over a run whose files exist: they are removed at the start')
    parser.add_argument('--results_dir', default=run_files.RESULTS_DIR, help='where the run writes its files')
    return parser


# ----------------------------------------------------------------------------- data

def load_data_dicts(args, checkpoint):
    """The dataset's data dicts; the demo is drawn first when it is missing (by the main process). A resumed run
    refuses data dicts other than those it started on (resume.check_data_dicts)."""
    if args.data_name == 'demo' and utils.is_main_process():
        import data_utils
        for line in data_utils.prepare_demo_if_missing(args.data_path, args.crop_type, max(1, args.num_workers)):
            print(line)
    if dist.is_initialized():
        dist.barrier()  # the others wait for the main process to prepare the demo
    data_dicts = utils.load_data_dicts(args.data_path, args.data_name, args.crop_type)
    resume.check_data_dicts(checkpoint, data_dicts, args)
    return data_dicts


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
                                  torch.Generator().manual_seed(engine.epoch_seed(args.seed, HOLD_OUT_DRAW)))


def run_lists(args, run, paths, train_dict, checkpoint):
    """The run's meta-class ids (E, C), its sampled training list [(path, class index)] and its held-out classes
    {class: [paths]}: the checkpoint's on --resume (resume.run_lists), else drawn from --seed, each from a generator
    of its own, so that a --load_ids run trains on the list of the run that drew the ids (the list is drawn as
    "epoch 0"). The ids and the list cover the training classes that are not held out."""
    if checkpoint is not None:
        return resume.run_lists(checkpoint, paths['checkpoint.pth'], args, train_dict)
    train_dict, held_out = split_validation(args, train_dict)
    ids = run_files.draw_or_load_ids(args, run, paths, len(train_dict), torch.Generator().manual_seed(args.seed))
    sampling = torch.Generator().manual_seed(engine.epoch_seed(args.seed, 0))
    return ids, utils.sample_train_images(train_dict, sampling), held_out


def train_loader(args, data_dicts, ids, train_items, batch_size, options, rank, world, replicas):
    """The sampled training list with its meta-class labels, shuffled and augmented from (--seed, epoch)."""
    transform, min_side = utils.input_pipeline(args.crop_type, True, args.image_size, data_dicts['mean'],
                                               data_dicts['std'], args.exact_pipeline)
    dataset = utils.TrainReader(os.path.join(args.data_path, args.data_name), train_items,
                                [ids[:, c] for _, c in train_items], transform, min_side)
    sampler = engine.SeededSampler(len(dataset), args.seed, rank, world)
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


def database_loader(train_dict, dataset_root, transform, min_side, batch_size, options):
    """Every image of the training classes (not only the sampled list), to embed for the database."""
    items = utils.flatten_split(train_dict)
    reader = utils.EvalReader(dataset_root, items, [0] * len(items), transform, min_side)
    return engine.eval_loader(reader, batch_size, options)


# ----------------------------------------------------------------------------- one epoch

def train_one_epoch(model, loader, optimizer, scaler, device, amp, description, start, after_step):
    """One pass over the training list, or what is left of it after start = (steps done, this process's running
    sums of them: loss, correct labels, images, skipped images); returns mean loss, accuracy in percent and skipped
    images, and the epoch's steps with this process's sums at its end (where a stop before the epoch's files
    continues). after_step(step, steps, sums) runs after every step (resume.StepCheckpoints.after_step), sums() giving
    the running sums. The sums stay on the device, read (a host sync) only for the progress bar every SYNC_SECONDS,
    for a checkpoint and at the end, each time checking that every loss so far was finite (engine.Diverged names the
    first step whose loss was not)."""
    model.train()
    done, (loss_sum, correct, seen, skipped) = start
    steps = done + len(loader)
    progress = tqdm(engine.batches(loader), desc=description, initial=done, total=steps, dynamic_ncols=True,
                    file=sys.stderr, disable=not utils.is_main_process())
    # loss times images and correct labels, in float64 as the sums of Python floats they replace
    device_sums = torch.tensor([loss_sum, correct], dtype=torch.float64, device=device)
    diverged = torch.zeros(2, dtype=torch.float64, device=device)  # (step, loss) of the first non-finite loss

    def host_sums():
        (loss_sum, correct), (step, loss) = torch.stack([device_sums, diverged]).tolist()
        if step:
            raise engine.Diverged(f'the loss is {loss} at step {int(step)} of {steps}')
        return [loss_sum, int(correct), seen, int(skipped)]

    last_read = time.monotonic()
    for step, (images, labels, failures) in enumerate(progress, start=done + 1):
        images = images.to(device, non_blocking=True, memory_format=engine.memory_format(device, amp))
        labels = labels.to(device, non_blocking=True)                                      # (B, E)
        loss, logits = engine.train_step(model, images, labels, optimizer, scaler, amp)   # logits (B, E, M)
        loss = loss.detach().double()
        first = diverged[0].eq(0) & ~torch.isfinite(loss)
        diverged = torch.where(first, torch.stack([torch.full_like(loss, step), loss]), diverged)
        device_sums += torch.stack([loss * images.shape[0], (logits.argmax(-1) == labels).sum().double()])
        seen += images.shape[0]
        skipped += failures.sum()  # the loader's CPU tensor: adding it waits for nothing
        if time.monotonic() - last_read >= SYNC_SECONDS:
            loss_sum, correct, *_ = host_sums()
            progress.set_postfix(loss=f'{loss_sum / seen:.4f}', acc=f'{100 * correct / (seen * labels.shape[1]):.2f}%')
            last_read = time.monotonic()
        after_step(step, steps, host_sums)
    sums = host_sums()
    total_loss, correct, seen, skipped = engine.all_reduce_sum(sums, device)
    ensemble_size = engine.unwrap(model).ensemble_size
    return {'loss': total_loss / seen, 'accuracy': 100 * correct / (seen * ensemble_size), 'skipped': int(skipped),
            'steps': steps, 'sums': sums}


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


# ----------------------------------------------------------------------------- an epoch's files

def best_files(model, settings, paths, database_items, features, dataset_root, epoch):
    """The files of a best epoch, as writers for run_files.save_together: the model, its embedding database and
    the run's run_files.recorded_settings, which say how to embed. The database holds the evaluation splits'
    features and the held-out classes' as 'val'; those of the training classes join it once, from the selected
    model, at the end of the run (complete_database)."""
    database = {split: (items, features[split]) for split, items in database_items.items()}
    return {paths['model.pth']: run_files.torch_file(run_files.host_copy(engine.unwrap(model).state_dict())),
            paths['data_base.pth']: run_files.database_file(database, dataset_root, settings, epoch),
            paths['args.json']: run_files.json_file(settings)}


def complete_database(model, paths, results, settings, eval_data, train_images, dataset_root, args, device,
                      stop_requested):
    """Write the run's embedding database whole: the images of every training class (not only the sampled list, of
    query/gallery datasets too, as the original's) embedded once, by the selected model read back from model.pth,
    beside the evaluation splits of its best epoch (embedded again where the database is missing or of another
    epoch: a run stopped while writing it, or the file deleted). Every process takes part (each embeds its shard);
    unreadable training images are left out. eval_data: (test_data, val_data, database_items) of train()."""
    test_data, val_data, database_items = eval_data
    selected = run_files.selected_row(results)['epoch']
    todo = engine.broadcast_from_main(run_files.database_to_complete(
        paths['data_base.pth'], selected, database_items, paths['model.pth']) if utils.is_main_process() else None)
    if todo is None:
        return
    if todo == 'lost':
        raise utils.ReirError(f'{paths["model.pth"]}, the model of the selected epoch {selected}, is missing: the '
                              f'embedding database cannot be completed; put it back and run again with --resume')
    utils.log(f'embedding the database of the selected epoch {selected}'
              + (' with the training images' if todo == 'train' else ''))
    engine.load_state_from_main(model, paths['model.pth'])  # the training is over: its weights may go
    if todo == 'all':
        _, _, features = evaluate_epoch(model, test_data, val_data, args, device, stop_requested)
    else:
        stored = utils.safe_load(paths['data_base.pth'], 'embedding database') if utils.is_main_process() else {}
        features = {split: stored.get(f'{split}_features') for split in database_items}
    train_features, readable = engine.extract_features(model, train_images, device, args.amp, stop_requested)
    if not readable.all():
        utils.warn(f'{int((~readable).sum())} unreadable training images left out of the embedding database')
    if utils.is_main_process():
        database = {split: (items, features[split]) for split, items in database_items.items()}
        database['train'] = ([item for item, ok in zip(train_images.dataset.items, readable.tolist()) if ok],
                             train_features[readable])
        write = run_files.database_file(database, dataset_root, settings, selected)
        run_files.atomic_write(paths['data_base.pth'], write)


def save_epoch(writes, paths, results, trainable, progress, best):
    """The epoch's files, written together in the background (writes: run_files.BackgroundWrites) so that a failed
    save keeps the previous epoch's complete set: the results CSV, the curves, at a best epoch the files of
    best_files, and the checkpoint, renamed last so that a kill between the renames leaves the previous checkpoint,
    from which --resume redoes this epoch."""
    results = list(results)  # the next epoch adds its row while these are written
    writes.submit({paths['results.csv']: run_files.csv_file(results),
                   paths['curves.png']: figures.curves_file(results),
                   **(best or {}),
                   paths['checkpoint.pth']: run_files.checkpoint_file(trainable, progress)})


def selection_note(results, recalls, paths):
    """The run's last line: the selected epoch, what selected it, and its test metrics."""
    row = run_files.selected_row(results)
    column = run_files.selection_column(list(row))
    test = {name.removeprefix('test_'): value for name, value in row.items() if name.startswith('test_')}
    return (f'selected epoch {row["epoch"]} by {column.replace("_", " ")} ({row[column]:.2f}%): test '
            f'{engine.format_metrics(test, recalls)} -> {paths["model.pth"]}')


# ----------------------------------------------------------------------------- the run

def main(args):
    if args.resume and args.overwrite:
        raise utils.UsageError('--resume continues the run\'s files and --overwrite removes them: pass one')
    run = run_files.RunName.from_args(args)
    paths = run_files.run_paths(args.results_dir, run)
    # until the epochs begin a stop signal ends the process at once: nothing is being trained that a checkpoint
    # could keep
    with resume.StopSignals() as signals:
        try:
            rank, world, local_rank = engine.init_distributed()
            if args.batch_size % world:
                raise utils.UsageError(f'--batch_size {args.batch_size} is the batch over all {world} processes: '
                                       f'make it a multiple of {world}')
            device, gpu_ids = engine.select_process_devices(args.gpu_ids, local_rank, world)
            if args.amp and device.type != 'cuda':
                utils.warn('--amp only acts on CUDA: running in float32')
            args = resume.after_elastic_restart(args, paths['checkpoint.pth'])
            with run_files.claim_run(args, run, paths) if utils.is_main_process() else contextlib.nullcontext():
                train(args, run, paths, device, gpu_ids, rank, world, signals)
        except utils.StopRequested:
            raise utils.Stopped(f'stopped by {signals.received} before training: '
                                f'{resume.saved_note(paths["checkpoint.pth"])}; run the same command again') from None
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def train(args, run, paths, device, gpu_ids, rank, world, signals):
    checkpoint = resume.checkpoint_to_resume(paths['checkpoint.pth'], args) if args.resume else None

    # ------------------------------------------------------------------ data, checked before anything is written
    data_dicts = load_data_dicts(args, checkpoint)
    dataset_root = os.path.join(args.data_path, args.data_name)
    engine.check_recalls(args.recalls, {split: sum(map(len, data_dicts[split].values()))
                                        for split in utils.eval_splits(data_dicts, args.data_name)})
    ids, train_items, held_out = run_lists(args, run, paths, data_dicts['train'], checkpoint)
    engine.check_recalls(args.recalls, {'test': sum(map(len, held_out.values()))} if held_out else {},
                         'validation ')
    settings = run_files.recorded_settings(args, data_dicts, held_out)
    options = engine.loader_options(args.num_workers, args.seed, device)
    batch_size = args.batch_size // world  # per process
    loader = train_loader(args, data_dicts, ids, train_items, batch_size, options, rank, world, max(1, len(gpu_ids)))
    transform, min_side = utils.input_pipeline(args.crop_type, False, args.image_size, data_dicts['mean'],
                                               data_dicts['std'], args.exact_pipeline)
    test_data = engine.build_eval_data(data_dicts, dataset_root, transform, min_side, args.eval_batch_size, options)
    # the held-out classes are scored as a self-retrieval split, as a test split is
    val_data = engine.build_eval_data({'test': held_out}, dataset_root, transform, min_side, args.eval_batch_size,
                                      options) if held_out else None
    database_items = {**test_data[0], **({'val': val_data[0]['test']} if held_out else {})}
    training_classes = {key: images for key, images in data_dicts['train'].items() if key not in held_out}
    train_images = database_loader(training_classes, dataset_root, transform, min_side, args.eval_batch_size, options)
    utils.log(f'{args.data_name}: {len(training_classes)} training classes, {len(train_items)} training images, '
              + ', '.join(f'{len(items)} {split} images' for split, items in test_data[0].items())
              + (f', {len(held_out)} held-out validation classes of {len(database_items["val"])} images'
                 if held_out else '')
              + (f'; {world} processes of {batch_size} images a step' if world > 1 else ''))

    # ------------------------------------------------------------------ model, optimizer, resume
    utils.set_seed(args.seed)  # the same initial weights in every process
    model = engine.build_model(run, pretrained=not args.no_pretrained, branch_impl=args.branch_impl)
    model = engine.place_model(model, device, gpu_ids, args.branch_impl, batch_size, args.image_size, args.amp,
                               compile=args.compile)
    optimizer = engine.adam(model.parameters(), args.lr, device)
    milestones = [int(args.num_epochs * fraction) for fraction in LR_MILESTONES]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=LR_GAMMA)
    trainable = dict(model=engine.unwrap(model), optimizer=optimizer, scheduler=scheduler,
                     scaler=engine.grad_scaler(device, args.amp))
    start_epoch, best_recall, results = resume.restore(checkpoint, trainable, paths['checkpoint.pth'])
    engine.use_adam_kernel(optimizer, device)  # a checkpoint's optimizer state names the kernel of its device
    start, rng = resume.epoch_position(checkpoint, rank, world)
    rewrite_best = checkpoint is not None and engine.broadcast_from_main(
        resume.best_files_lost(paths, checkpoint) if utils.is_main_process() else None)

    # ------------------------------------------------------------------ the run starts: every check has passed
    if utils.is_main_process():
        run_files.start_run(args, paths, ids)
    if checkpoint is not None:
        utils.log(f'resumed from {paths["checkpoint.pth"]} at {resume.position_note(checkpoint)}')
        files = resume.lost_files(paths, results, settings) if utils.is_main_process() else {}
        if rewrite_best:
            _, _, features = evaluate_epoch(model, test_data, val_data, args, device)
            files.update(best_files(model, settings, paths, database_items, features, dataset_root, start_epoch - 1))
        if utils.is_main_process():
            run_files.save_together(files)

    # ------------------------------------------------------------------ epochs
    selection_key = f'recall@{args.recalls[0]}'
    # what a checkpoint holds besides the trainable states and the position in the epoch
    progress = dict(best_recall=best_recall, results=results, args=vars(args), ids=ids, train_items=train_items,
                    held_out=sorted(held_out), elastic_job=engine.elastic_job(),
                    data_fingerprint=utils.data_fingerprint(data_dicts))
    # from here a stop signal stops the run once its state is saved, and files are written while training goes on
    with run_files.BackgroundWrites() as writes, signals.deferred():
        checkpoints = resume.StepCheckpoints(args.checkpoint_every, paths['checkpoint.pth'], trainable, signals,
                                             device, gpu_ids, writes)
        stop_requested = checkpoints.stop_requested
        for epoch in range(start_epoch, args.num_epochs + 1):
            utils.set_seed(engine.epoch_seed(args.seed, epoch))
            if rng is not None:  # inside an epoch, the random states where its checkpoint was written
                resume.set_rng_states(rng, gpu_ids)
            loader.sampler.set_epoch(epoch, skip=start[0] * args.batch_size)
            # where a stop before this epoch's files are written continues: after its training steps
            before_evaluation = {**progress, 'epoch': epoch, 'results': list(results)}
            try:
                stats = train_one_epoch(model, loader, optimizer, trainable['scaler'], device, args.amp,
                                        f'Epoch {epoch}/{args.num_epochs}', start,
                                        functools.partial(checkpoints.after_step, {**progress, 'epoch': epoch}))
                metrics, val_metrics, features = evaluate_epoch(model, test_data, val_data, args, device,
                                                                stop_requested)
                start, rng = resume.EPOCH_START, None
                record_epoch(results, epoch, stats, metrics, val_metrics, args)
                best = None
                selected = (val_metrics or metrics)[selection_key]  # on the held-out classes when there are some
                if selected > progress['best_recall']:
                    progress['best_recall'] = selected
                    best = best_files(model, settings, paths, database_items, features, dataset_root, epoch)
            except engine.Diverged as e:
                writes.wait()
                raise utils.ReirError(f'epoch {epoch}: {e}: training diverged (a lower --lr may help); '
                                      f'{resume.saved_note(paths["checkpoint.pth"])}') from None
            except utils.StopRequested:
                checkpoints.save(before_evaluation, stats['steps'], stats['sums'])
                checkpoints.stop(f'in the evaluation of epoch {epoch}')
            with warnings.catch_warnings():
                # an epoch continued after its last step has run no optimizer step in this process, which the
                # scheduler takes for a misuse; its state (restored) still gives the right learning rate
                warnings.filterwarnings('ignore', re.escape('Detected call of `lr_scheduler.step()` before'))
                scheduler.step()
            if utils.is_main_process():
                save_epoch(writes, paths, results, trainable,
                           {**progress, 'epoch': epoch + 1, 'step': 0, 'running': []}, best)
            checkpoints.saved()
            if epoch < args.num_epochs and stop_requested():
                checkpoints.stop(f'after epoch {epoch}')

        # ------------------------------------------------------------------ the database of the selected model
        writes.wait()
        try:
            complete_database(model, paths, results, settings, (test_data, val_data, database_items), train_images,
                              dataset_root, args, device, stop_requested)
        except utils.StopRequested:
            checkpoints.stop('while the embedding database was written, after the last epoch')
    utils.log(selection_note(results, args.recalls, paths))


if __name__ == '__main__':
    arguments = get_args_parser().parse_args()
    utils.run_cli(main, arguments, interrupted=lambda: resume.interrupted_note(arguments))
