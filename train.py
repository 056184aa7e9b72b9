"""Train REIR, evaluating retrieval after every epoch.

    python train.py --data_name cub --crop_type cropped
    python train.py --data_name demo --no_pretrained --lr 1e-3 --image_size 64 --share_type layer4 \
        --ensemble_size 12 --batch_size 32 --num_epochs 8
    torchrun --nproc_per_node=4 train.py --data_name sop --batch_size 40

A run's story, in train(): the data, the model, its loss (--loss, loss_choice.py), the optimizer, what a --resume
continues, the epochs (train_one_epoch, evaluation, the epoch's files), and the embedding database of the selected
model. Everything a run writes starts with its prefix (run_files.RunName): <prefix>_results.csv (a row per epoch),
_model.pth, _args.json and _data_base.pth (at the best Recall@K for the first K of --recalls: on the test split as
the original REIR, or with --val_classes N on N training classes held out of training), _checkpoint.pth (every
epoch and every --checkpoint_every steps, for --resume: the trainable states and a run_files.RunState), _curves.png,
the TensorBoard log _tensorboard/ (tensorboard_log.py) and the meta-class ids (REFERENCE.md describes each file).
SIGTERM or SIGUSR1 stops a run after its current step (or evaluation batch) with a checkpoint (exit code
utils.STOPPED_EXIT_CODE); under torchrun --max-restarts a restarted run continues from its checkpoint. Nothing is
written, and --overwrite removes nothing, before every check that can refuse the command has passed.
"""
import signal

if __name__ == '__main__':
    # a stop signal that arrives while the modules below load (seconds) waits until the run can say that it stopped
    # (resume.StopSignals unblocks loaders.STOP_SIGNALS); the default action would end the process without a word
    signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGTERM, signal.SIGUSR1))

import argparse
import contextlib
import os
import re
import sys
import time
import warnings

import torch
import torch.distributed as dist
from tqdm import tqdm

import data_base
import engine
import loaders
import loss_choice
import resume
import run_files
import tensorboard_log
import utils
from branch_engines import BRANCH_IMPLS
from model import BACKBONES, DEFAULT_LOSS, SHARE_TYPES

LR_MILESTONES = (0.5, 0.7)  # fractions of the epochs where the learning rate drops
LR_GAMMA = 0.1
SYNC_SECONDS = 1.0  # how often the progress bar reads the running loss and accuracy from the device


# ----------------------------------------------------------------------------- arguments

def get_args_parser():
    parser = argparse.ArgumentParser(description='Train a REIR randomized ensemble for image retrieval')
    add_data_flags(parser.add_argument_group('data'))
    add_method_flags(parser.add_argument_group('the method (model.py)'))
    add_training_flags(parser.add_argument_group('training'))
    add_run_flags(parser.add_argument_group('the run\'s files'))
    return parser


def add_data_flags(group):
    group.add_argument('--data_path', default=run_files.EMBEDDING_DEFAULTS['data_path'],
                       help='folder of prepared datasets (data_utils.py)')
    group.add_argument('--data_name', default='car', type=utils.dataset_name,
                       help='car, cub, sop, isc, demo, or any dataset prepared under --data_path')
    group.add_argument('--crop_type', default='uncropped', choices=utils.CROP_TYPES,
                       help='cropped: bounding-box crops (car and cub only)')
    group.add_argument('--image_size', default=run_files.EMBEDDING_DEFAULTS['image_size'], type=utils.int_in_range(1),
                       help='side of the network input')
    group.add_argument('--exact_pipeline', action='store_true',
                       help='decode JPEGs whole and resize then crop, as the original REIR does (slower); by '
                            'default large JPEGs are decoded at reduced scale and only the kept region resized')
    group.add_argument('--recalls', default=run_files.EMBEDDING_DEFAULTS['recalls'], type=utils.recall_list,
                       help='K of Recall@K, comma-separated; the first K selects the best model')
    group.add_argument('--val_classes', default=0, type=utils.int_in_range(0),
                       help='hold N training classes out of training and select the best epoch by their Recall@K '
                            '(zero-shot validation); 0: select on the test split, as the original REIR')
    group.add_argument('--num_workers', default=min(8, os.cpu_count() or 1), type=int,
                       help='DataLoader worker processes')
    group.add_argument('--eval_batch_size', default=engine.EVAL_BATCH_SIZE, type=utils.int_in_range(1),
                       help='images per embedding batch in evaluation and for the database (each process); the '
                            'embeddings depend on it only by float rounding')


def add_method_flags(group):
    group.add_argument('--model_type', default='resnet18', choices=list(BACKBONES))
    group.add_argument('--share_type', default='layer1', choices=SHARE_TYPES,
                       help='last backbone stage shared by all branches (none: separate networks)')
    group.add_argument('--ensemble_size', default=48, type=utils.int_in_range(1), help='branches E')
    group.add_argument('--meta_class_size', default=12, type=utils.int_in_range(2),
                       help='meta-classes M per branch (at least 2: a single one leaves nothing to learn)')
    group.add_argument('--label_type', default='fixed', choices=utils.LABEL_TYPES,
                       help='fixed: balanced meta-classes with a distinct code per class; random: the same '
                            'without the distinct-code check (the original\'s create_random_id)')
    group.add_argument('--with_random', action='store_true',
                       help='scale the shared feature per branch by softmax(rand(E)) in training')
    group.add_argument('--loss', default=DEFAULT_LOSS, type=loss_choice.loss_flag, metavar='NAME[:KEY=VALUE,...]',
                       help='ce: cross-entropy of every branch, the original\'s; normsoftmax: every branch a '
                            'normalized-softmax classifier (settings: temperature=0.05); pml.<ClassName>: that loss of '
                            'pytorch-metric-learning on the embedding, against the classes (pml.ProxyAnchorLoss:'
                            'margin=0.1,alpha=32). A run of another loss than ce, or of other settings than its '
                            'defaults, ends its prefix with them (_normsoftmax-temperature=0.1)')
    group.add_argument('--load_ids', action='store_true',
                       help='reuse the meta-class ids saved under results/ instead of drawing new ones')
    group.add_argument('--no_pretrained', action='store_true', help='start from random weights, not ImageNet')


def add_training_flags(group):
    group.add_argument('--batch_size', default=10, type=utils.int_in_range(1),
                       help='images per step (all GPUs together)')
    group.add_argument('--m_per_class', default=0, type=utils.int_in_range(0),
                       help='draw every batch as groups of N images of a class, as losses that compare images of a '
                            'class need (pml.MultiSimilarityLoss, ...); 0: images drawn uniformly, as the original')
    group.add_argument('--num_epochs', default=20, type=utils.int_in_range(1))
    group.add_argument('--lr', default=1e-4, type=utils.positive_float,
                       help='Adam learning rate (the original 1e-4 suits ImageNet weights; from scratch try 1e-3)')
    group.add_argument('--seed', default=1, type=utils.int_in_range(0, 2 ** 32 - 1),
                       help='seeds ids, sampling, shuffling, augmentation')
    group.add_argument('--gpu_ids', default=None,
                       help=f'comma-separated GPU ids (default {engine.DEFAULT_GPU_IDS}: those of them present), '
                            f'DataParallel over several; "cpu" for the CPU')
    group.add_argument('--amp', action='store_true',
                       help='mixed precision on CUDA (bf16, or fp16 with loss scaling where bf16 is unsupported)')
    group.add_argument('--compile', action='store_true',
                       help='compile the model with torch.compile (its first steps take minutes; then fewer, fused '
                            'kernels; outputs equal within float tolerance)')
    group.add_argument('--branch_impl', default='auto', choices=BRANCH_IMPLS,
                       help='run the branches one by one (loop) or as grouped convolutions (grouped), which runs only '
                            'where it computes what the loop computes on the model; auto: on CUDA the faster in a '
                            'timed trial before training, on the CPU the loop. Same parameters and checkpoints')


def add_run_flags(group):
    continuing = group.add_mutually_exclusive_group()
    continuing.add_argument('--resume', action='store_true',
                            help='continue the run with these flags from its checkpoint')
    continuing.add_argument('--overwrite', action='store_true',
                            help='start over a run whose files exist: they are removed at the start')
    group.add_argument('--checkpoint_every', default=None, type=utils.int_in_range(0),
                       help=f'also write the checkpoint every N training steps, so that a run killed inside an epoch '
                            f'loses at most N steps (default: every {resume.CHECKPOINT_MINUTES} minutes of training; '
                            f'0: after every epoch only). The checkpoint holds the model and the optimizer: keep N '
                            f'large enough that writing it costs little against N steps')
    group.add_argument('--results_dir', default=run_files.RESULTS_DIR, help='where the run writes its files')


# ----------------------------------------------------------------------------- the run

def main(args):
    run = run_files.RunName.from_args(args)
    paths = run.paths(args.results_dir)
    # until the epochs begin a stop signal ends the process at once: nothing is being trained that a checkpoint
    # could keep
    with resume.StopSignals(paths['checkpoint.pth']) as signals:
        process = engine.start_process(args)
        args = resume.after_elastic_restart(args, paths['checkpoint.pth'])
        with run_files.claim_run(args, run, paths) if process.main else contextlib.nullcontext():
            train(args, run, paths, process, signals)
    engine.end_process()


def train(args, run, paths, process, signals):
    checkpoint = resume.checkpoint_to_resume(paths['checkpoint.pth'], args) if args.resume else None

    # ------------------------------------------------------------------ data, checked before anything is written
    data_dicts = load_data_dicts(args, process)
    state = run_files.RunState.begin(args, run, paths, data_dicts, checkpoint, process.job)
    data = loaders.RunData(args, data_dicts, state, process)
    utils.log(data.describe(args.data_name, process))

    # ------------------------------------------------------------------ model, loss, optimizer
    model, module = engine.training_model(run, args, process)
    criterion = engine.training_loss(args, data.num_classes, data.train, process.device)
    optimizer = engine.adam([*model.parameters(), *criterion.parameters()], args.lr, process.device)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=lr_milestones(args.num_epochs),
                                                     gamma=LR_GAMMA)
    trainable = dict(model=module, loss=criterion, optimizer=optimizer, scheduler=scheduler,
                     scaler=engine.grad_scaler(process.device, args.amp))

    # ------------------------------------------------------------------ the run starts, or resumes
    if process.main:
        run_files.start_run(args, run, paths, state.ids)  # every check that can refuse a new run has passed
    if checkpoint is not None:
        resume.restore(checkpoint, trainable, data, paths, state, args, process)

    # ------------------------------------------------------------------ epochs
    # from here a stop signal stops the run once its state is saved, and files are written while training goes on
    resumed = checkpoint is not None
    with tensorboard_log.RunLog.open(paths, state, len(data.train), process.main, resumed) as log, \
            resume.Checkpointer(args.checkpoint_every, paths, trainable, data, signals, process, log) as checkpointer:
        for epoch in range(state.epoch, args.num_epochs + 1):
            start = checkpointer.enter_epoch(state, epoch)
            data.train.sampler.set_epoch(epoch, skip=start[0] * args.batch_size)
            stats = train_one_epoch(model, trainable, data.train, state, start, checkpointer, args)
            metrics, features = engine.evaluate_epoch(model, data, args, process.device, checkpointer.stop_requested)
            line, best = state.record(stats, metrics)
            utils.log(line)
            step_scheduler(scheduler)
            checkpointer.end_epoch(state, features if best else None)

        # ------------------------------------------------------------------ the database of the selected model
        checkpointer.wait()  # its model is read back from its file
        data_base.complete_database(model, data, paths, state.results, args, process.device,
                                   checkpointer.stop_requested)
        log.finish(paths['data_base.pth'], state.results, state.args)  # HParams and the Projector
    utils.log(state.selection_note(paths['model.pth']))


def load_data_dicts(args, process):
    """The dataset's data dicts; the demo is drawn first when it is missing (by the main process)."""
    if args.data_name == 'demo' and process.main:
        import data_utils
        for line in data_utils.prepare_demo_if_missing(args.data_path, args.crop_type, max(1, args.num_workers)):
            print(line)
    if dist.is_initialized():
        dist.barrier()  # the others wait for the main process to prepare the demo
    return utils.load_data_dicts(args.data_path, args.data_name, args.crop_type)


# ----------------------------------------------------------------------------- one epoch

def train_one_epoch(model, trainable, loader, state, start, checkpointer, args):
    """One pass over the training list, or what is left of it after start = (steps done, this process's running
    sums of them: loss, correct labels, images, skipped images); returns mean loss, accuracy in percent and skipped
    images, and the epoch's steps with this process's sums at its end (engine.EpochSums.epoch_stats). Every branch
    learns each image's meta-class: its class's column of the run's ids. The checkpointer may save (and stop) after
    every step (resume.Checkpointer.after_step). The sums stay on the device, read (a host sync) only for the progress
    bar (and the TensorBoard log, checkpointer.log, which keeps every step's) every SYNC_SECONDS, for a checkpoint and
    at the end, each time checking that every loss so far was finite."""
    model.train()
    process = checkpointer.process
    codes = state.ids.t().to(process.device)  # (C, E): every class's meta-class in every branch
    sums = engine.EpochSums(start, start[0] + len(loader), codes.shape[1], process.device)
    progress = tqdm(loader, desc=f'Epoch {state.epoch}/{args.num_epochs}', initial=start[0], total=sums.steps,
                    dynamic_ncols=True, file=sys.stderr, disable=not process.main)
    last_read = time.monotonic()
    for step, (images, labels, failures) in enumerate(progress, start=start[0] + 1):
        loss, correct = engine.train_step(model, trainable, (images, labels), codes, args.amp)
        sums.add(step, loss, correct, images.shape[0], failures)
        checkpointer.log.add_step(state.epoch, step, sums, trainable['optimizer'].param_groups[0]['lr'])
        if time.monotonic() - last_read >= SYNC_SECONDS:
            progress.set_postfix(sums.means())
            checkpointer.log.write_steps()
            last_read = time.monotonic()
        checkpointer.after_step(step, sums)
    return sums.epoch_stats()


def lr_milestones(num_epochs):
    """The epochs after which the learning rate drops: 50% and 70% of the run, as the original. A milestone at epoch 0
    (a run of one epoch) is left out: it would lower the rate before the first step."""
    return [epoch for epoch in (int(num_epochs * fraction) for fraction in LR_MILESTONES) if epoch > 0]


def step_scheduler(scheduler):
    with warnings.catch_warnings():
        # an epoch continued after its last step has run no optimizer step in this process, which the scheduler
        # takes for a misuse; its state (restored) still gives the right learning rate
        warnings.filterwarnings('ignore', re.escape('Detected call of `lr_scheduler.step()` before'))
        scheduler.step()


if __name__ == '__main__':
    arguments = get_args_parser().parse_args()
    utils.run_cli(main, arguments, interrupted=lambda: resume.interrupted_note(arguments))
