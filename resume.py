"""Continuing a run: the checkpoint a --resume starts from and the flags it may change, the state it restores and
the position inside an epoch it continues from, the checkpoints written inside an epoch, the stop signals that end
a run with one, the random states they hold, and torchrun's restarts, which continue a run by themselves."""
import argparse
import contextlib
import os
import signal
import time

import torch
import torch.distributed as dist

import engine
import figures
import run_files
import utils

CHECKPOINT_MINUTES = 10  # without --checkpoint_every, a checkpoint inside an epoch every this many minutes
# flags that may differ between a run and its --resume without changing what the run computes (the
# branch engines, compiled or not, compute the same function and share one checkpoint layout; an embedding does not
# depend on the batch it is computed in, but for float rounding)
RESUME_FREE_FLAGS = ('resume', 'overwrite', 'num_workers', 'gpu_ids', 'load_ids', 'data_path', 'results_dir',
                     'branch_impl', 'checkpoint_every', 'eval_batch_size', 'compile')
# flags added after runs were started: what a checkpoint without them was trained with
LATER_FLAG_DEFAULTS = {'val_classes': 0}
EPOCH_START = (0, [0.0, 0, 0, 0])  # (steps done, running sums: loss, correct labels, images, skipped images)
# under torch.distributed, the processes agree on a stop or a timed checkpoint (a collective) every this many steps
# or evaluation batches
STOP_AGREEMENT_EVERY = 10


# ----------------------------------------------------------------------------- the checkpoint a run continues from

def checkpoint_to_resume(path, args):
    """The checkpoint a --resume continues from, refused when it is missing or damaged, or when args differ from its
    flags where that changes what the run computes."""
    if not os.path.isfile(path):
        raise utils.ReirError(f'--resume: no checkpoint {path}; run once without --resume')
    checkpoint = run_files.load_checkpoint(path)
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


def check_data_dicts(checkpoint, data_dicts, args):
    """Refuse to continue a run on data dicts other than those it started on (its checkpoint's fingerprint)."""
    started_on = checkpoint['data_fingerprint'] if checkpoint is not None else ''
    if started_on and started_on != utils.data_fingerprint(data_dicts):
        raise utils.ReirError(f'--resume: {utils.data_dicts_path(args.data_path, args.data_name, args.crop_type)} '
                              f'is not the data the run started on (the dataset was prepared again, or --data_path '
                              f'names another copy); resume on that data, or start over with --overwrite')


def run_lists(checkpoint, path, args, train_dict):
    """The meta-class ids, training list and held-out classes of the run a checkpoint (at path) holds, as
    train.run_lists gives them, refused where they no longer fit the dataset's training classes or the flags."""
    missing = [key for key in checkpoint['held_out'] if key not in train_dict]
    if missing:
        raise utils.ReirError(f'--resume: held-out class {missing[0]} of the run is no longer in the dataset\'s '
                              f'training split; prepare the dataset as it was, or start over with --overwrite')
    held_out = {key: train_dict[key] for key in checkpoint['held_out']}
    num_class = len(train_dict) - len(held_out)
    utils.check_ids(checkpoint['ids'], path, args.ensemble_size, num_class, args.meta_class_size)
    items = [tuple(item) for item in checkpoint['train_items']]
    if not items or any(not 0 <= index < num_class for _, index in items):
        raise utils.ReirError(f'{path}: its training list does not index the {num_class} training classes')
    return checkpoint['ids'].long(), items, held_out


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


def epoch_position(checkpoint, rank, world):
    """Where this process continues the checkpoint's epoch: (steps done, its running sums) as train_one_epoch takes
    them, and the random states to restore (None at an epoch's start). Each process takes its own. On another number
    of processes than wrote the checkpoint the epoch still continues from the same sample (engine.SeededSampler),
    with the sums of all in rank 0 and rank 0's random states in every process, though not as either number of
    processes would have run it."""
    if checkpoint is None or not checkpoint['step']:
        return EPOCH_START, None
    running = checkpoint['running']
    if len(running) == world:
        return (checkpoint['step'], running[rank]['sums']), running[rank]['rng']
    utils.warn(f'the checkpoint was written by {len(running)} processes, inside epoch {checkpoint["epoch"]}: its '
               f'rest runs on {world}, so the run will not repeat one on either number exactly')
    sums = [sum(values) for values in zip(*(process['sums'] for process in running))]
    return (checkpoint['step'], sums if rank == 0 else EPOCH_START[1]), running[0]['rng']


def best_files_lost(paths, checkpoint):
    """Whether --resume must write the best epoch's model again: it can when the checkpoint holds the best epoch's
    model, and refuses when that model is lost. (A missing database is embedded again from the model at the end of
    the run: train.complete_database.)"""
    if not checkpoint['results'] or os.path.isfile(paths['model.pth']):
        return False  # inside the first epoch there is no best epoch yet
    best = run_files.selected_row(checkpoint['results'])['epoch']
    if checkpoint['step'] or best != checkpoint['epoch'] - 1:
        raise utils.ReirError(f'{paths["model.pth"]} missing: the model of the best epoch, {best}, is lost (the '
                              f'checkpoint holds {position_note(checkpoint)}); put the file back, or start over '
                              f'with --overwrite')
    utils.warn(f'{paths["model.pth"]} missing: writing it again from the checkpoint, which holds the best '
               f'epoch ({best})')
    return True


def lost_files(paths, results, settings):
    """The files of a resumed run, as writers for run_files.save_together, that the checkpoint can give back where they
    are missing or damaged: the results CSV and curves of its results (a finished run keeps them nowhere else), and
    args.json beside a model (a run from before args.json was written)."""
    files = {}
    try:
        intact = len(run_files.read_results(paths['results.csv'])) == len(results)
    except utils.ReirError:
        intact = False
    if results and not (intact and os.path.isfile(paths['curves.png'])):
        utils.warn(f'{paths["results.csv"]} or its curves missing or damaged: writing them again from the checkpoint')
        files.update({paths['results.csv']: run_files.csv_file(results),
                      paths['curves.png']: figures.curves_file(results)})
    if os.path.isfile(paths['model.pth']) and not os.path.isfile(paths['args.json']):
        files[paths['args.json']] = run_files.json_file(settings)
    return files


def position_note(checkpoint):
    """Where the run a checkpoint holds stands: 'step 30 of epoch 3' or 'the end of epoch 2'."""
    step = checkpoint.get('step', 0)
    return f'step {step} of epoch {checkpoint["epoch"]}' if step else f'the end of epoch {checkpoint["epoch"] - 1}'


def saved_note(path):
    """What a run that stops leaves to --resume."""
    checkpoint = run_files.peek_checkpoint(path)
    if checkpoint is None:
        return 'no checkpoint was written, so there is nothing to resume'
    return f'{path} holds the run at {position_note(checkpoint)}'


# ----------------------------------------------------------------------------- stop signals, checkpoints in an epoch

class StopSignals:
    """While entered, a stop signal ends the work in progress at once (utils.StopRequested), except inside
    deferred(), where it only records that the run should stop once it has saved its state (received names the
    first signal, None until one arrives). A signal that comes after the first is recorded, never raised: the run
    is stopping already, and the saving of its state must not be cut short. Once a signal has arrived, leaving the
    block ignores the stop signals for the rest of the process: Python puts back the default action (end the
    process) of a signal it handles when it shuts down, so that another signal, as schedulers repeat them, would end
    the process with -15 after its checkpoint was written instead of exiting with utils.STOPPED_EXIT_CODE."""

    def __enter__(self):
        self.received, self.deferring = None, False
        self.previous = {signum: signal.signal(signum, self.record) for signum in engine.STOP_SIGNALS}
        return self

    def record(self, signum, frame):
        first = self.received is None
        self.received = self.received or signal.Signals(signum).name
        if first and not self.deferring:
            raise utils.StopRequested(self.received)

    @contextlib.contextmanager
    def deferred(self):
        deferring, self.deferring = self.deferring, True
        try:
            yield
        finally:
            self.deferring = deferring

    def __exit__(self, *exc_info):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler if self.received is None else signal.SIG_IGN)


def rng_states(gpu_ids):
    """The random states a training step draws from (the --with_random weights): torch's CPU generator and those of
    the GPUs the process uses. The augmentations need none: each image has its seed (engine.SeededSampler)."""
    return {'cpu': torch.get_rng_state(), 'cuda': [torch.cuda.get_rng_state(i) for i in gpu_ids]}


def set_rng_states(states, gpu_ids):
    """Restore rng_states; the GPUs' only onto as many GPUs as saved them (their order pairs them)."""
    torch.set_rng_state(states['cpu'])
    if len(states['cuda']) == len(gpu_ids):
        for gpu, state in zip(gpu_ids, states['cuda']):
            torch.cuda.set_rng_state(state, gpu)


class StepCheckpoints:
    """The checkpoints written inside an epoch: every `every` steps (None: every CHECKPOINT_MINUTES minutes; 0:
    never), and at once, followed by a stop (utils.Stopped), when a stop signal has arrived (StopSignals).
    A checkpoint holds the running sums and random states of every process, which the main process writes in the
    background (writes: a run_files.BackgroundWrites). Under torch.distributed the processes must decide alike
    whether to save or stop, and agreeing is a collective: they agree every STOP_AGREEMENT_EVERY steps (or
    evaluation batches), not at every one."""

    def __init__(self, every, path, trainable, signals, device, gpu_ids, writes):
        self.every, self.path, self.trainable, self.signals = every, path, trainable, signals
        self.device, self.gpu_ids, self.writes = device, gpu_ids, writes
        self.saved()

    def saved(self):
        self.last_save = time.monotonic()

    def time_is_up(self):
        """Whether a checkpoint by time (no --checkpoint_every) is due in this process."""
        return self.every is None and time.monotonic() - self.last_save >= 60 * CHECKPOINT_MINUTES

    def due(self, step, steps, time_is_up):
        if step == steps or self.every == 0:
            return False  # the epoch's own checkpoint follows
        return time_is_up if self.every is None else step % self.every == 0

    def stop_requested(self, index=0):
        """Whether a stop signal has arrived: in this process, or under torch.distributed in any of them, which they
        agree on at index 0 and every STOP_AGREEMENT_EVERY-th index (every process asks with the same indices)."""
        if not dist.is_initialized():
            return self.signals.received is not None
        if index % STOP_AGREEMENT_EVERY:
            return False
        return engine.any_process([self.signals.received is not None], self.device)[0]

    def save(self, progress, step, sums):
        """Write the checkpoint of the epoch in progress after its first `step` steps, with this process's running
        sums (every process calls it; the main process writes what each holds, in the background).
        progress: the checkpoint's keys other than the trainable states, step and running (run_files.
        CHECKPOINT_FORMAT), for the epoch in progress."""
        running = engine.gather_objects({'sums': sums, 'rng': rng_states(self.gpu_ids)})
        if utils.is_main_process():
            self.writes.submit({self.path: run_files.checkpoint_file(
                self.trainable, {**progress, 'step': step, 'running': running})})
        self.saved()

    def after_step(self, progress, step, steps, sums):
        """Save (and stop) when due after a step; sums() gives this process's running sums (a host sync, made only
        then)."""
        time_is_up, stop = self.time_is_up(), self.signals.received is not None
        if dist.is_initialized():
            time_is_up, stop = engine.any_process([time_is_up, stop], self.device) \
                if step % STOP_AGREEMENT_EVERY == 0 else (False, False)
        if not (stop or self.due(step, steps, time_is_up)):
            return
        self.save(progress, step, sums())
        if stop or not dist.is_initialized() and self.signals.received is not None:  # or one came meanwhile
            self.stop(f'at step {step} of {steps} of epoch {progress["epoch"]}')

    def stop(self, where):
        self.writes.wait()
        if dist.is_initialized():
            dist.barrier()  # no process ends before the checkpoint is written
        raise utils.Stopped(f'stopped by {self.signals.received or "a stop signal to another process"} {where}: '
                            f'{self.path} holds the run; continue it with the same command and --resume')


def interrupted_note(args):
    """What a Ctrl-C leaves of the run: its checkpoint, or nothing to resume."""
    path = run_files.run_paths(args.results_dir, run_files.RunName.from_args(args))['checkpoint.pth']
    if run_files.peek_checkpoint(path) is None:
        return 'interrupted before the first checkpoint: there is nothing to resume'
    return f'interrupted: {saved_note(path)}; continue with --resume'


# ----------------------------------------------------------------------------- torchrun restarts

def after_elastic_restart(args, checkpoint_path):
    """The flags of a process that torchrun --max-restarts started again: --resume, without --overwrite, when its
    torchrun job has written the run's checkpoint, which it continues; else those of the first start (a first start
    refused for another run's files is refused again)."""
    restart = engine.elastic_restart_count()
    if not restart:
        return args
    checkpoint = run_files.peek_checkpoint(checkpoint_path) if utils.is_main_process() else None
    own = checkpoint is not None and checkpoint.get('elastic_job') == engine.elastic_job()
    if not engine.broadcast_from_main(own):
        return args
    utils.log(f'torchrun restart {restart}: continuing the run from its checkpoint')
    return argparse.Namespace(**{**vars(args), 'resume': True, 'overwrite': False})
