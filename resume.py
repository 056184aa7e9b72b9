"""Keeping and continuing a run: the Checkpointer that writes its checkpoints and epoch files in the background and
stops it on a stop signal once its state is saved, the checkpoint a --resume starts from and the flags it may change,
what it restores (the trainable states; the rest is a run_files.RunState) and the position inside an epoch it
continues from, the stop signals and the random states, and torchrun's restarts, which continue a run by themselves."""
import argparse
import collections
import contextlib
import math
import os
import signal
import time

import torch
import torch.distributed as dist

import data_base
import engine
import figures
import loaders
import run_files
import utils
from model import DEFAULT_LOSS

CHECKPOINT_MINUTES = 10  # without --checkpoint_every, a checkpoint inside an epoch every this many minutes
# flags that may differ between a run and its --resume without changing what the run computes (the
# branch engines, compiled or not, compute the same function and share one checkpoint layout; an embedding does not
# depend on the batch it is computed in, but for float rounding)
RESUME_FREE_FLAGS = ('resume', 'overwrite', 'num_workers', 'gpu_ids', 'load_ids', 'data_path', 'results_dir',
                     'branch_impl', 'checkpoint_every', 'eval_batch_size', 'compile')
# flags added after runs were started: what a checkpoint without them was trained with
LATER_FLAG_DEFAULTS = {'val_classes': 0, 'loss': DEFAULT_LOSS, 'm_per_class': 0}
# what a checkpoint's learning-rate schedule must hold as the run's flags make it (the milestones and gamma of
# train.lr_milestones and LR_GAMMA, the base rate of --lr)
SCHEDULE_KEYS = ('milestones', 'gamma', 'base_lrs')
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


def restore(checkpoint, trainable, data, paths, state, args, process):
    """Continue a run from its checkpoint: load its states into the trainable objects (model, loss, optimizer,
    scheduler, scaler by name; the optimizer's kernel then chosen for this device, as a state names the kernel of the
    device that saved it), refused in one line where its steps contradict its running sums (steps_problem) or its
    schedule the run's (schedule_problem), and write again what the checkpoint can give back where it is missing or
    damaged: the results CSV and curves, args.json beside a model (lost_files), and the files of the best epoch where
    its model is lost and the checkpoint holds that epoch (refused where it does not: best_files_lost). data:
    loaders.RunData."""
    path = paths['checkpoint.pth']
    schedule = schedule_of(trainable['scheduler'])  # the run's, as its flags built it
    problem = steps_problem(state, data.train, process) or load_states(checkpoint, trainable) \
        or schedule_problem(trainable, schedule, state.epoch)
    if problem:
        raise utils.ReirError(f'{path}: {problem}; delete it and start again without --resume')
    engine.use_adam_kernel(trainable['optimizer'], process.device)
    rewrite_best = engine.broadcast_from_main(best_files_lost(paths, state) if process.main else None)
    utils.log(f'resumed from {path} at {position_note(state.epoch, state.step)}')
    files = lost_files(paths, state.results, data.settings) if process.main else {}
    if rewrite_best:
        _, features = engine.evaluate_epoch(trainable['model'], data, args, process.device)
        files.update(data_base.best_files(paths, trainable['model'], data, features, state.epoch - 1))
    if process.main:
        run_files.save_together(files)


def load_states(checkpoint, trainable):
    """Load a checkpoint's states into the trainable objects, by name; what does not fit, or None."""
    for name, obj in trainable.items():
        try:
            obj.load_state_dict(checkpoint[name] if name != 'scheduler' else repaired_schedule(checkpoint[name]))
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
            return f'its {name} state does not fit this run ({str(e).splitlines()[0]})'
    return None


def steps_problem(state, loader, process):
    """What makes the steps a RunState has done of its epoch contradict its running sums or the epoch's loader, or
    None: beyond the epoch's steps, running sums at the start of an epoch, or sums of another number of images than
    its steps give (each full but an epoch's last; checked where as many processes resume as wrote them)."""
    steps, step = len(loader), state.step
    if step > steps:
        return f'its "step" {step} is beyond the {steps} steps of an epoch'
    if not step and state.running:
        return f'its "step" is 0 with the running sums of {state.running[0]["sums"][2]} images'
    if not step or len(state.running) != process.world:
        return None
    _, correct, seen, skipped = state.running[process.rank]['sums']
    if seen != images_in_steps(loader, step):
        return f'its "step" {step} contradicts its running sums, of {seen} images where {step} steps take ' \
               f'{images_in_steps(loader, step)}'
    if not 0 <= correct <= seen * state.ids.shape[0] or not 0 <= skipped <= seen:
        return f'its "running" sums count {correct} correct labels and {skipped} skipped images of {seen} images'
    return None


def images_in_steps(loader, steps):
    """How many images the first `steps` batches of an epoch of a training loader hold: full batches, but for the
    last of an epoch whose images do not fill it (unless the loader drops it)."""
    epoch_images = len(loader) * loader.batch_size if loader.drop_last else len(loader.sampler)
    return min(steps * loader.batch_size, epoch_images)


def repaired_schedule(state):
    """A scheduler's state without the (milestone, count) pairs that checkpoints written before 2026-12 added to its
    milestones (a Counter) at every save, the learning rate unchanged: a run started then resumes."""
    milestones = state.get('milestones')
    if not isinstance(milestones, collections.Counter):
        return state
    return {**state, 'milestones': collections.Counter({key: count for key, count in milestones.items()
                                                        if not isinstance(key, tuple)})}


def schedule_of(scheduler):
    """What of a scheduler's state the run's flags set (SCHEDULE_KEYS)."""
    state = scheduler.state_dict()
    return {key: state[key] for key in SCHEDULE_KEYS}


def schedule_problem(trainable, schedule, epoch):
    """What makes a restored learning-rate schedule contradict the run's (schedule: the state of the scheduler its
    flags build, SCHEDULE_KEYS) or the epoch the run stands at, or the optimizer's learning rate contradict the
    schedule, or None."""
    scheduler, optimizer = trainable['scheduler'], trainable['optimizer']
    restored = schedule_of(scheduler)
    differing = next((key for key in SCHEDULE_KEYS if restored[key] != schedule[key]), None)
    if differing:
        return f'its "scheduler" {differing} is {restored[differing]!r}, the run\'s {schedule[differing]!r}'
    if scheduler.last_epoch != epoch - 1:
        return f'its "scheduler" last_epoch is {scheduler.last_epoch}, where at epoch {epoch} it is {epoch - 1}'
    drops = sum(count for milestone, count in scheduler.milestones.items() if milestone <= scheduler.last_epoch)
    expected = [rate * scheduler.gamma ** drops for rate in scheduler.base_lrs]  # MultiStepLR's closed form
    rates = [group['lr'] for group in optimizer.param_groups]
    if len(rates) != len(expected) or any(not math.isclose(r, e, rel_tol=1e-9) for r, e in zip(rates, expected)):
        return f'its "optimizer" learning rate {rates[0]:g} is not the schedule\'s {expected[0]:g} at epoch {epoch}'
    return None


def epoch_position(state, process):
    """Where this process continues the epoch of a RunState: (steps done, its running sums) and the random states to
    restore (None at an epoch's start). Each process takes its own. On another number of processes than wrote the
    checkpoint the epoch still continues from the same sample (loaders.SeededSampler), with the sums of all in rank 0
    and rank 0's random states in every process, though not as either number of processes would have run it."""
    if not state.step:
        return EPOCH_START, None
    if len(state.running) == process.world:
        mine = state.running[process.rank]
        return (state.step, mine['sums']), mine['rng']
    utils.warn(f'the checkpoint was written by {len(state.running)} processes, inside epoch {state.epoch}: its '
               f'rest runs on {process.world}, so the run will not repeat one on either number exactly')
    sums = [sum(values) for values in zip(*(running['sums'] for running in state.running))]
    return (state.step, sums if process.rank == 0 else EPOCH_START[1]), state.running[0]['rng']


def best_files_lost(paths, state):
    """Whether --resume must write the best epoch's model again (its file missing or not whole): it can when the
    checkpoint (its RunState) holds the best epoch's model, and refuses when that model is lost. (A missing database
    is embedded again from the model at the end of the run: data_base.complete_database.)"""
    if not state.results:
        return False  # inside the first epoch there is no best epoch yet
    problem = run_files.model_problem(paths['model.pth'])
    if problem is None:
        return False
    best = run_files.selected_row(state.results)['epoch']
    if not best_model_in_checkpoint(state.results, state.epoch, state.step):
        raise utils.ReirError(f'{problem}: the model of the best epoch, {best}, is lost (the checkpoint holds '
                              f'{position_note(state.epoch, state.step)}); put the file back, or start over with '
                              f'--overwrite')
    utils.warn(f'{problem}: writing it again from the checkpoint, which holds the best epoch ({best})')
    return True


def best_model_in_checkpoint(results, epoch, step):
    """Whether a checkpoint at (epoch, step) holds the model of the best epoch of results: it was written at that
    epoch's end."""
    return not step and run_files.selected_row(results)['epoch'] == epoch - 1


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


def position_note(epoch, step):
    """Where a run whose checkpoint holds (epoch, step) stands: 'step 30 of epoch 3' or 'the end of epoch 2'."""
    return f'step {step} of epoch {epoch}' if step else f'the end of epoch {epoch - 1}'


def saved_note(path):
    """What a run that stops leaves to --resume."""
    checkpoint = run_files.peek_checkpoint(path)
    if checkpoint is None:
        return 'no checkpoint was written, so there is nothing to resume'
    return f'{path} holds the run at {position_note(checkpoint["epoch"], checkpoint["step"])}'


# ----------------------------------------------------------------------------- stop signals and random states

class StopSignals:
    """While entered, a stop signal ends the work in progress at once (utils.StopRequested, which leaving the block
    turns into utils.Stopped, saying what the checkpoint at path holds), except inside deferred(), where it only
    records that the run should stop once it has saved its state (received names the first signal, None until one
    arrives). A signal that comes after the first is recorded, never raised: the run is stopping already, and the
    saving of its state must not be cut short. Once a signal has arrived, leaving the block ignores the stop signals
    for the rest of the process: Python puts back the default action (end the process) of a signal it handles when it
    shuts down, so that another signal, as schedulers repeat them, would end the process with -15 after its
    checkpoint was written instead of exiting with utils.STOPPED_EXIT_CODE."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        self.received, self.deferring = None, False
        self.previous = {signum: signal.signal(signum, self.record) for signum in loaders.STOP_SIGNALS}
        try:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, loaders.STOP_SIGNALS)  # one held back as train.py started comes
        except utils.StopRequested as stop:
            self.__exit__(type(stop), stop, None)  # the block has not begun: stopped before anything was written
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

    def __exit__(self, kind, error, traceback):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler if self.received is None else signal.SIG_IGN)
        if isinstance(error, utils.StopRequested):
            raise utils.Stopped(f'stopped by {self.received} before training: {saved_note(self.path)}; run the same '
                                f'command again') from None


def rng_states(gpu_ids):
    """The random states a training step draws from (the --with_random weights): torch's CPU generator and those of
    the GPUs the process uses. The augmentations need none: each image has its seed (loaders.SeededSampler)."""
    return {'cpu': torch.get_rng_state(), 'cuda': [torch.cuda.get_rng_state(i) for i in gpu_ids]}


def set_rng_states(states, gpu_ids):
    """Restore rng_states; the GPUs' only onto as many GPUs as saved them (their order pairs them)."""
    torch.set_rng_state(states['cpu'])
    if len(states['cuda']) == len(gpu_ids):
        for gpu, state in zip(gpu_ids, states['cuda']):
            torch.cuda.set_rng_state(state, gpu)


# ----------------------------------------------------------------------------- the checkpoints of a run

class Checkpointer:
    """A run's checkpoints and the files written with them, while its epochs run (a context manager): each epoch's
    files (end_epoch), checkpoints inside an epoch every `every` steps (after_step; None: every CHECKPOINT_MINUTES
    minutes; 0: never), and where a stop signal (StopSignals, deferred while entered) stops the run: after the step
    in progress, or within the evaluation or the embedding of the database, with a checkpoint of the run after its
    last step, followed by utils.Stopped. A divergence (engine.Diverged) ends the run with its one line. A checkpoint
    holds the trainable states, the RunState, every process's running sums and random states and the files of the
    TensorBoard log (log: tensorboard_log.RunLog) once they hold every step before it; the main process writes it,
    and the epoch's files, in a thread (run_files.BackgroundWrites) from host copies. Under torch.distributed the
    processes must decide alike whether to save or stop, and agreeing is a collective: they agree every
    STOP_AGREEMENT_EVERY steps (or evaluation batches), not at every one."""

    def __init__(self, every, paths, trainable, data, signals, process, log):
        self.every, self.paths, self.trainable, self.data, self.log = every, paths, trainable, data, log
        self.signals, self.process = signals, process
        self.state = self.position = None  # the RunState, and (step, running sums) after its epoch's last step

    def __enter__(self):
        self.writes = run_files.BackgroundWrites()
        self.deferred = self.signals.deferred()
        self.deferred.__enter__()
        self.saved()
        return self

    def __exit__(self, kind, error, traceback):
        try:
            if isinstance(error, utils.StopRequested):
                self.stop_within_work()
            if isinstance(error, engine.Diverged):
                self.writes.wait()
                raise utils.ReirError(f'epoch {self.state.epoch}: {error}: training diverged (a lower --lr may help); '
                                      f'{saved_note(self.paths["checkpoint.pth"])}') from None
        finally:
            self.deferred.__exit__(None, None, None)
            if kind is None:
                self.writes.wait()
            else:
                self.writes.__exit__(kind, error, traceback)

    def wait(self):
        """Wait until the files submitted so far are written (a failed write is raised here)."""
        self.writes.wait()

    def enter_epoch(self, state, epoch):
        """Set the random state that epoch draws from (utils.epoch_seed) and return where this process continues it:
        (steps done, its running sums), from the start or, in the epoch that a resumed run's checkpoint was written in,
        from there, with the random states of that step (epoch_position). The RunState then stands at the epoch."""
        position, rng = epoch_position(state, self.process) if epoch == state.epoch else (EPOCH_START, None)
        utils.set_seed(utils.epoch_seed(state.args['seed'], epoch))
        if rng is not None:
            set_rng_states(rng, self.process.gpu_ids)
        state.epoch, state.step, state.running = epoch, 0, []
        self.state, self.position = state, (position[0], lambda: list(position[1]))
        return position

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
        return engine.any_process([self.signals.received is not None], self.process.device)[0]

    def save(self, step, sums):
        """Write the checkpoint of the RunState's epoch after its first `step` steps, with this process's running
        sums (every process calls it; the main process writes what each holds, in the background)."""
        running = engine.gather_objects({'sums': sums, 'rng': rng_states(self.process.gpu_ids)})
        if self.process.main:
            self.writes.submit({self.paths['checkpoint.pth']: self.state.checkpoint_file(
                self.trainable, step=step, running=running, log=self.log.position())})
        self.saved()

    def after_step(self, step, sums):
        """Save (and stop) when due after a step of the RunState's epoch; sums: its engine.EpochSums, read (a host
        sync) only then."""
        self.position = step, sums.read
        time_is_up, stop = self.time_is_up(), self.signals.received is not None
        if dist.is_initialized():
            time_is_up, stop = engine.any_process([time_is_up, stop], self.process.device) \
                if step % STOP_AGREEMENT_EVERY == 0 else (False, False)
        if not (stop or self.due(step, sums.steps, time_is_up)):
            return
        self.save(step, sums.read())
        if stop or not dist.is_initialized() and self.signals.received is not None:  # or one came meanwhile
            self.stop(f'at step {step} of {sums.steps} of epoch {self.state.epoch}')

    def end_epoch(self, state, best_features):
        """Write the epoch's files together in the background, so that a failed save keeps the previous epoch's
        complete set: the results CSV, the curves (and the epoch's results into the TensorBoard log), at a best epoch
        (best_features: its features by database split, else None) the files of data_base.best_files, and the
        checkpoint of the next epoch's start, renamed last so that a kill between the renames leaves the previous
        checkpoint, from which --resume redoes this epoch. Then stop if a stop signal has come."""
        if self.process.main:
            results = list(state.results)  # the next epoch adds its row while these are written
            best = {} if best_features is None else data_base.best_files(
                self.paths, self.trainable['model'], self.data, best_features, state.epoch)
            self.log.epoch_results(results[-1])
            self.writes.submit({self.paths['results.csv']: run_files.csv_file(results),
                                self.paths['curves.png']: figures.curves_file(results), **best,
                                self.paths['checkpoint.pth']: state.checkpoint_file(
                                    self.trainable, epoch=state.epoch + 1, step=0, running=[],
                                    log=self.log.position())})
        self.saved()
        self.position = None
        if state.epoch < state.args['num_epochs'] and self.stop_requested():
            self.stop(f'after epoch {state.epoch}')

    def stop_within_work(self):
        """Stop a run whose evaluation, or the embedding of its database, a stop signal ended (utils.StopRequested):
        inside an epoch with a checkpoint of the run after the epoch's last step."""
        if self.position is None:
            self.stop('while the embedding database was written, after the last epoch')
        step, sums = self.position
        self.save(step, sums())
        self.stop(f'in the evaluation of epoch {self.state.epoch}')

    def stop(self, where):
        self.writes.wait()
        if dist.is_initialized():
            dist.barrier()  # no process ends before the checkpoint is written
        raise utils.Stopped(f'stopped by {self.signals.received or "a stop signal to another process"} {where}: '
                            f'{self.paths["checkpoint.pth"]} holds the run; continue it with the same command and '
                            f'--resume')


def interrupted_note(args):
    """What a Ctrl-C leaves of the run: its checkpoint, or nothing to resume."""
    path = run_files.RunName.from_args(args).paths(args.results_dir)['checkpoint.pth']
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
