"""Run a grid of train.py configurations over several seeds and summarize it: mean, standard deviation and
95% confidence interval of the test metrics at each run's selected epoch.

    python study.py --name ensemble --vary ensemble_size=1,4,12,48 --seeds 1,2,3 -- --data_name cub --val_classes 20 \
        --label_type random
    python study.py --name m --vary meta_class_size=2,4,12 --vary share_type=layer1,layer3 --seeds 1,2,3 -- ...
    python study.py --name original --recipes all --seeds 1

--recipes runs whole configurations, the original REIR's recipes (recipes.py), for the datasets prepared under
--data_path (the others are skipped with a line each), beside the grid of --vary; the summary then gives the
original's published Recall@K beside each row. The flags after `--` go to every run (after a recipe's, so that
they override it). Every run is an ordinary `python train.py` process writing into its own
folder, results/study_<name>/<flag>=<value>_..._seed=<seed>/; the runs go through submitit, as local processes
(--slots at a time, one GPU each where there are GPUs) or as a Slurm job array (--cluster slurm). A run whose
results and model are complete is skipped, whatever happened to its checkpoint, and one that was interrupted is
resumed, so a study can be stopped (Ctrl-C, kill) and started again with the same command; more seeds or values can
be added the same way. A run whose files can neither be summarized nor continued is named and left as it is, unless
--retrain_damaged. Writes results/study_<name>.csv (a row per configuration) and results/study_<name>.png (the first
metric against the first varied flag). Each row says how its runs selected their epoch (selected_by: val_recall@K,
on held-out training classes, or test_recall@K, on the test split, whose numbers are optimistic), and a study
without --val_classes says so.
"""
import argparse
import itertools
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pandas as pd
import psutil
import submitit
import torch
from scipy import stats
from tqdm import tqdm

import data_utils
import figures
import recipes
import resume
import run_files
import train
import utils

REPOSITORY = os.path.dirname(os.path.abspath(__file__))
STUDY_FLAGS = ('seed', 'results_dir', 'resume', 'overwrite')  # set by the study for every run
SWITCH_VALUES = {'true': True, '1': True, 'yes': True, 'on': True, 'false': False, '0': False, 'no': False,
                 'off': False}
POLL_SECONDS = 1.0
STOP_SECONDS = 60  # how long a stopped run may take to end (a step and a checkpoint write) before it is killed


def get_args_parser():
    parser = argparse.ArgumentParser(
        description='Run train.py over a grid of flags and seeds and summarize it',
        usage='python study.py --name NAME [--recipes NAMES] [--vary FLAG=V1,V2,... ...] --seeds 1,2,3 [options] -- '
              '<train.py flags>')
    parser.add_argument('--name', required=True, type=study_name, help='the study: results/study_<name>')
    parser.add_argument('--vary', default=[], action='append', type=varied_flag, metavar='FLAG=V1,V2,...',
                        help='a train.py flag and its values (repeat for a grid); switches take true/false')
    parser.add_argument('--recipes', default=None, type=recipe_list, metavar='NAMES',
                        help=f'the original REIR\'s configurations to run, comma-separated, or all: '
                             f'{", ".join(recipes.RECIPES)}; those whose dataset is not prepared are skipped')
    parser.add_argument('--seeds', required=True, type=seed_list, help='comma-separated --seed values')
    parser.add_argument('--results_dir', default=run_files.RESULTS_DIR, help='where results/study_<name> goes')
    parser.add_argument('--cluster', default='local', choices=('local', 'slurm'),
                        help='local: processes on this machine; slurm: a job array through sbatch')
    parser.add_argument('--slots', default=None, type=utils.positive_int,
                        help='runs at a time (default: local, one per GPU, or 1 without GPUs; slurm, no limit)')
    parser.add_argument('--gpus_per_run', default=None, type=utils.int_in_range(0),
                        help='GPUs each run gets (default: 1; locally 0 where CUDA is absent)')
    parser.add_argument('--cpus_per_run', default=None, type=utils.positive_int, help='Slurm: CPUs for each run')
    parser.add_argument('--partition', default=None, help='Slurm partition')
    parser.add_argument('--timeout_min', default=3 * 24 * 60, type=utils.positive_int,
                        help='minutes a run may take before it is stopped (submitit\'s timeout)')
    parser.add_argument('--retrain_damaged', action='store_true',
                        help='train again from the start (train.py --overwrite) the runs whose files are damaged and '
                             'cannot be continued; without it they are named and left as they are')
    return parser


def study_name(text):
    if not text or not all(c.isalnum() or c in '-_.' for c in text):
        raise argparse.ArgumentTypeError(f'{text!r}: use letters, digits, "-", "_" and "."')
    return text


def seed_list(text):
    seed = utils.int_in_range(0, 2 ** 32 - 1)
    seeds = [seed(part) for part in text.split(',')]
    if len(set(seeds)) < len(seeds):
        raise argparse.ArgumentTypeError(f'{text!r} names a seed twice')
    return seeds


def recipe_list(text):
    names = list(recipes.RECIPES) if text == 'all' else [name.strip() for name in text.split(',') if name.strip()]
    unknown = [name for name in names if name not in recipes.RECIPES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f'{text!r}: the recipes are {", ".join(recipes.RECIPES)} (or all)')
    if len(set(names)) < len(names):
        raise argparse.ArgumentTypeError(f'{text!r} names a recipe twice')
    return names


def varied_flag(text):
    """FLAG=V1,V2,... as (flag, [values]). A loss's settings are separated by commas too: in loss=V1,V2,... a KEY=VALUE
    after a value is one more of its settings (loss=ce,pml.ProxyAnchorLoss:margin=0.2,alpha=16 is two losses)."""
    flag, _, values = text.partition('=')
    flag = flag.strip().removeprefix('--')
    values = [v.strip() for v in values.split(',') if v.strip()]
    if flag == 'loss':
        values = loss_values(values)
    if not flag or not values:
        raise argparse.ArgumentTypeError(f'{text!r} is not FLAG=V1,V2,...')
    return flag, values


def loss_values(pieces):
    """The --loss values of the comma-separated pieces of loss=V1,V2,...: a KEY=VALUE after a value with settings is
    one more of them."""
    values = []
    for piece in pieces:
        if values and ':' in values[-1] and '=' in piece and ':' not in piece:
            values[-1] += f',{piece}'
        else:
            values.append(piece)
    return values


# ----------------------------------------------------------------------------- the grid

@dataclass
class Run:
    config: tuple      # ((flag, value), ...) of the varied flags
    seed: int
    folder: str        # the run's --results_dir
    flags: list        # its train.py command-line flags
    args: argparse.Namespace

    @property
    def paths(self):
        return run_files.RunName.from_args(self.args).paths(self.folder)


def split_command_line(argv):
    """(study.py's flags, the train.py flags after --)."""
    if '--' not in argv:
        return argv, []
    index = argv.index('--')
    return argv[:index], argv[index + 1:]


def study_axes(args):
    """The study's axes, (name, values): 'recipe' and the recipes' names first, then the varied flags."""
    if not args.recipes and not args.vary:
        raise utils.UsageError('give the study something to run: --vary FLAG=V1,V2,... or --recipes NAMES')
    return ([('recipe', args.recipes)] if args.recipes else []) + args.vary


def check_varied_flags(varied, train_flags):
    """Refuse a flag train.py does not have, one the study sets itself, one varied twice or also passed after
    --, and a switch given a value other than true/false."""
    defaults = vars(train.get_args_parser().parse_args([]))
    flags = [flag for flag, _ in varied]
    given = named_flags(train_flags)
    for flag, values in varied:
        if flag not in defaults:
            raise utils.UsageError(f'--vary {flag}: train.py has no flag --{flag}')
        if flag in STUDY_FLAGS:
            raise utils.UsageError(f'--vary {flag}: the study sets --{flag} itself (use --seeds for seeds)')
        if flags.count(flag) > 1 or flag in given:
            raise utils.UsageError(f'--{flag} is given more than once (--vary and after --): give it once')
        if isinstance(defaults[flag], bool) and not all(v.lower() in SWITCH_VALUES for v in values):
            raise utils.UsageError(f'--vary {flag}: a switch takes true or false, not {", ".join(values)}')
        check_distinct(flag, values, defaults)
    for flag in STUDY_FLAGS:
        if flag in given:
            raise utils.UsageError(f'--{flag} after --: the study sets it for every run')
    return defaults


def named_flags(train_flags):
    """The names of the train.py flags after -- (--seed=5 names seed), refused where one is unknown or abbreviated
    (argparse would take --overw for --overwrite): the study checks them by name."""
    parse_train_flags(train_flags)
    parser = train.get_args_parser()
    parser.allow_abbrev = False
    _, abbreviated = parser.parse_known_args(train_flags)
    if abbreviated:
        raise utils.UsageError(f'{abbreviated[0]} after --: give train.py\'s flags whole (the study checks them by '
                               f'name)')
    return [token.split('=', 1)[0][2:] for token in train_flags if token.startswith('--')]


def check_distinct(flag, values, defaults):
    """Refuse a value given twice (as 3,3 or 0.1,1e-1): its runs would be trained and counted twice."""
    if isinstance(defaults[flag], bool):
        parsed = [SWITCH_VALUES[value.lower()] for value in values]
    else:
        parsed = [getattr(parse_train_flags([f'--{flag}', value]), flag) for value in values]
    for i, value in enumerate(parsed):
        if value in parsed[:i]:
            first = values[parsed.index(value)]
            same = f'{first} is given twice' if first == values[i] else f'{first} and {values[i]} are the same value'
            raise utils.UsageError(f'--vary {flag}: {same}; give each value once')


def run_flags(config, seed, folder, train_flags, defaults):
    """A run's train.py flags: its recipe's, then those after --, then its varied flags (the last of a flag given
    twice counts), then the study's own."""
    recipe = dict(config).get('recipe')
    flags = list(recipes.RECIPES[recipe].flags if recipe else ()) + list(train_flags)
    for flag, value in config:
        if flag == 'recipe':
            continue
        if isinstance(defaults[flag], bool):
            flags += [f'--{flag}'] if SWITCH_VALUES[value.lower()] else []
        else:
            flags += [f'--{flag}', value]
    return flags + ['--seed', str(seed), '--results_dir', folder]


def parse_train_flags(flags):
    """train.py's namespace for these flags, checked as train.py checks them."""
    parser = train.get_args_parser()
    parser.exit_on_error = False
    try:
        args, unknown = parser.parse_known_args(flags)
    except argparse.ArgumentError as e:
        raise utils.UsageError(f'train.py flags: {e}') from None
    if unknown:
        raise utils.UsageError(f'train.py flags: unrecognized {" ".join(unknown)}')
    return args


def grid(args, train_flags):
    """Every (configuration, seed) of the study as a Run, configurations in the order of the recipes and the --vary
    values."""
    axes = study_axes(args)
    defaults = check_varied_flags(args.vary, train_flags)
    study_dir = os.path.join(args.results_dir, f'study_{args.name}')
    runs = []
    for values in itertools.product(*(values for _, values in axes)):
        config = tuple(zip((flag for flag, _ in axes), values))
        for seed in args.seeds:
            folder = os.path.join(study_dir, '_'.join(f'{flag}={value}' for flag, value in config) + f'_seed={seed}')
            flags = run_flags(config, seed, folder, train_flags, defaults)
            runs.append(Run(config, seed, folder, flags, parse_train_flags(flags)))
    return study_dir, runs


def run_state(run):
    """(state, problem) of a run, from what its files verifiably hold: 'finished' (its results CSV holds every epoch
    and its model file is whole: the summary needs no more, whatever happened to its checkpoint; while the checkpoint
    is there, its database holds the training images too), 'interrupted' (not finished, and a checkpoint continues
    it: train.py --resume writes again what it can of the rest), 'new' (no file
    of it yet) or 'damaged' (files, but neither finished nor a checkpoint to continue from); problem says what is not
    finished. A run trained with other flags is refused: its folder belongs to another study of this name."""
    checkpoint = run_files.peek_checkpoint(run.paths['checkpoint.pth'])
    try:
        recorded = checkpoint['args'] if checkpoint else run_files.run_settings(run.paths)
    except utils.ReirError:
        recorded = None  # a damaged args.json: the results and model say whether the run finished
    differing = resume.differing_flags(recorded, run.args) if recorded else []
    if differing:
        raise utils.UsageError(f'{run.folder} holds a run trained with other flags ({"; ".join(differing)}): '
                               f'give this study another --name, or remove that folder')
    problem = unfinished(run)
    if problem is None and checkpoint is not None:
        problem = database_without_training_images(run)  # stopped after its last epoch: train.py --resume embeds them
    if problem is None:
        return 'finished', None
    if checkpoint is not None and best_model_lost(run, checkpoint):
        return 'damaged', f'{problem}, and its checkpoint holds a later epoch than the best'
    if checkpoint is not None:
        return 'interrupted', problem
    if not any(os.path.exists(run.paths[kind]) for kind in run_files.RUN_OUTPUTS):
        return 'new', problem
    return 'damaged', f'{problem}, and no readable checkpoint continues it'


def unfinished(run):
    """What keeps a run from being finished (its results CSV not holding every epoch, its model file not whole), or
    None."""
    path = run.paths['results.csv']
    try:
        epochs = len(run_files.read_results(path))
    except utils.ReirError as e:
        return str(e)
    if epochs != run.args.num_epochs:
        return f'{path} holds {epochs} of {run.args.num_epochs} epochs'
    return run_files.model_problem(run.paths['model.pth'])


def best_model_lost(run, checkpoint):
    """Whether the model of a run's best epoch is lost for good: its file is not whole, and its checkpoint (peeked)
    does not hold that epoch's model, which train.py --resume would write again."""
    return bool(checkpoint['results']) and run_files.model_problem(run.paths['model.pth']) is not None \
        and not resume.best_model_in_checkpoint(checkpoint['results'], checkpoint['epoch'], checkpoint['step'])


def database_without_training_images(run):
    """What is missing from a run's embedding database when it lacks the training images, which train.py embeds
    after the last epoch, or None."""
    path = run.paths['data_base.pth']
    try:
        database = utils.safe_load(path, 'embedding database', verify=False, mmap=True)
    except utils.ReirError as e:
        return str(e)
    if not isinstance(database, dict) or 'train_features' not in database:
        return f'{path} lacks the training images, embedded after the last epoch'
    return None


# ----------------------------------------------------------------------------- running through submitit

def executor_for(args, study_dir, gpus_per_run):
    """A submitit executor whose jobs log under <study>/.submitit/."""
    folder = os.path.join(study_dir, '.submitit')
    if args.cluster == 'slurm':
        executor = submitit.AutoExecutor(folder=folder, cluster='slurm')
        executor.update_parameters(name=f'reir_{args.name}', timeout_min=args.timeout_min, gpus_per_node=gpus_per_run,
                                   cpus_per_task=args.cpus_per_run, slurm_partition=args.partition,
                                   slurm_array_parallelism=args.slots)
        return executor
    return submitit.LocalExecutor(folder=folder)


# what train.py is told for a run in each state that is run: continue it, start it, or (--retrain_damaged) start over
STATE_FLAGS = {'interrupted': ['--resume'], 'new': [], 'damaged': ['--overwrite']}


def job_command(run, state, gpus_per_run):
    """python train.py <the run's flags> and those of its state (STATE_FLAGS). A run given GPUs sees them as
    0..gpus_per_run-1 (CUDA_VISIBLE_DEVICES), so --gpu_ids names those unless the flags name others."""
    command = [sys.executable, os.path.join(REPOSITORY, 'train.py'), *run.flags]
    if run.args.gpu_ids is None:
        command += ['--gpu_ids', ','.join(map(str, range(gpus_per_run))) if gpus_per_run else 'cpu']
    return command + STATE_FLAGS[state]


def submit(executor, run, state, gpus_per_run):
    """One run as a submitit job: a train.py process in this working folder, whose output goes to the job's log
    files."""
    return executor.submit(subprocess.run, job_command(run, state, gpus_per_run), check=True)


def job_error(job):
    """None for a job that completed, else the error line train.py printed, or where its log is."""
    try:
        job.result()
        return None
    except Exception:  # submitit's FailedJobError or UncompletedJobError: the run's log says why
        errors = [line for line in (job.stderr() or '').splitlines() if line.startswith('error:')]
        return errors[-1].removeprefix('error: ') if errors else f'failed; its log is {job.paths.stderr}'


def run_local(runs, states, executor, slots, gpus_per_run, timeout_min, progress):
    """Keep up to slots runs going at a time (submitit starts every local job at once); each slot has its own
    GPUs. Returns {run index: error} of the runs that failed. A Ctrl-C or SIGTERM stops the running jobs
    (stop_local_jobs): each run keeps its last checkpoint, which the next start of the study resumes. The signals are
    only recorded, and acted on between polls, so that none cuts a submission or the stopping short: a second one
    must not leave a run training on, orphaned."""
    free = [list(range(slot * gpus_per_run, (slot + 1) * gpus_per_run)) for slot in range(slots)]
    if not gpus_per_run and slots > 1 and 'OMP_NUM_THREADS' not in os.environ:
        # runs side by side on the CPU share its cores (the jobs inherit this environment): two runs each
        # spinning threads on both cores of a 2-core machine took 6 times as long
        os.environ['OMP_NUM_THREADS'] = str(max(1, (os.cpu_count() or 1) // slots))
    waiting, running, failed = list(runs), {}, {}
    received = []
    previous = {signum: signal.signal(signum, lambda signum, frame: received.append(signum))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        while (waiting or running) and not received:
            while waiting and free:
                index, gpus = waiting.pop(0), free.pop(0)
                executor.update_parameters(timeout_min=timeout_min, gpus_per_node=len(gpus), visible_gpus=tuple(gpus))
                running[index] = submit(executor, runs[index], states[index], len(gpus)), gpus
            time.sleep(POLL_SECONDS)
            for index, (job, gpus) in list(running.items()):
                if job.done():
                    del running[index]
                    free.append(gpus)
                    error = job_error(job)
                    if error:
                        failed[index] = error
                    progress.update()
        if received:
            stop_local_jobs([job for job, _ in running.values()])
            raise KeyboardInterrupt
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return failed


def stop_local_jobs(jobs):
    """End the train.py processes of running local jobs; the next start of the study resumes each from its last
    checkpoint. A Ctrl-C at the terminal has reached them already and they are ending; a SIGTERM to the study has
    not, and neither can submitit's cancel (a SIGINT, which processes started in the background ignore): what is
    left gets SIGTERM, on which a run saves its current step and stops, then SIGKILL after STOP_SECONDS. submitit's
    own processes end with them."""
    processes = []
    for job in jobs:
        try:
            processes += psutil.Process(int(job.job_id)).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=2)
    for signal_name in ('terminate', 'kill'):
        for process in alive:
            try:
                getattr(process, signal_name)()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(alive, timeout=STOP_SECONDS)


def run_slurm(runs, states, executor, gpus_per_run, progress):
    """Submit the runs as one job array, which Slurm schedules (--slots: how many run at a time), and wait for
    them. The jobs do not depend on this process: stopped, it leaves them to run (scancel stops them), and a
    new start of the study skips those that finished."""
    with executor.batch():
        jobs = {index: submit(executor, runs[index], states[index], gpus_per_run) for index in runs}
    progress.write(f'submitted a Slurm job array of {len(jobs)} runs ({jobs[next(iter(jobs))].job_id.split("_")[0]})')
    failed = {}
    while jobs:
        time.sleep(30 * POLL_SECONDS)
        for index, job in list(jobs.items()):
            if job.done():
                del jobs[index]
                error = job_error(job)
                if error:
                    failed[index] = error
                progress.update()
    return failed


# ----------------------------------------------------------------------------- the summary

def selected_metrics(run):
    """(the test metrics of a finished run at its selected epoch, the column that selected it: val_recall@K on
    held-out classes or test_recall@K on the test split; run_files.selected_row)."""
    rows = run_files.read_results(run.paths['results.csv'])
    chosen = run_files.selected_row(rows)
    return {name: value for name, value in chosen.items() if name.startswith('test_')}, \
        run_files.selection_column(list(chosen))


def summary_statistics(values):
    """(mean, sample standard deviation, half-width of the 95% confidence interval of the mean from Student's t);
    the last two are NaN for a single value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, std, stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)


def summarize(runs, metrics, selections):
    """A row per configuration: its flags, the seeds of its finished runs, the column they were selected by,
    <metric>_mean, _std, _ci95 for every test metric and, for a recipe, the original's published_recall@K.
    metrics: {run index: test metrics} of the finished runs; selections: {run index: its selection column}."""
    rows = []
    for config, members in itertools.groupby(range(len(runs)), key=lambda i: runs[i].config):
        done = [i for i in members if i in metrics]
        if not done:
            continue
        row = dict(config)
        row['seeds'] = ','.join(str(runs[i].seed) for i in done)
        row['selected_by'] = ','.join(sorted({selections[i] for i in done}))
        for name in metrics[done[0]]:
            mean, std, ci95 = summary_statistics([metrics[i][name] for i in done])
            row.update({f'{name}_mean': mean, f'{name}_std': std, f'{name}_ci95': ci95})
        if 'recipe' in row:
            row.update(recipes.published_metrics(row['recipe'], runs[done[0]].args))
        rows.append(row)
    return rows


def selection_words(rows):
    """How the summarized runs selected their epochs, in words."""
    columns = {column for row in rows for column in row['selected_by'].split(',')}
    if all(column.startswith('val_') for column in columns):
        return 'selected on held-out classes'
    if all(column.startswith('test_') for column in columns):
        return 'selected on the test split (optimistic)'
    return 'some selected on the test split (optimistic)'


def plot_file(rows, varied, name):
    """The first metric against the first axis of the study (study_axes), with 95% confidence intervals, a line per
    value of the other axes, the original's published number as a star where there is one; the title says how the
    runs were selected."""
    metric = next(column for column in rows[0] if column.endswith('_mean')).removesuffix('_mean')
    x_flag, x_values = varied[0]
    x_values = [value for value in x_values if any(row[x_flag] == value for row in rows)]  # skipped recipes go
    others = [flag for flag, _ in varied[1:]]

    def draw(axis):
        lines = {}
        for row in rows:
            lines.setdefault(tuple(row[flag] for flag in others), []).append(row)
        for key, members in lines.items():
            intervals = [row[f'{metric}_ci95'] for row in members]
            axis.errorbar([x_values.index(row[x_flag]) for row in members], [row[f'{metric}_mean'] for row in members],
                          yerr=[0 if math.isnan(ci) else ci for ci in intervals], marker='o', capsize=4,
                          label=', '.join(f'{flag}={value}' for flag, value in zip(others, key)) or None)
        published = metric.replace('test_', 'published_')
        shown = [row for row in rows if not math.isnan(row.get(published, math.nan))]
        if shown:
            axis.plot([x_values.index(row[x_flag]) for row in shown], [row[published] for row in shown], 'k*',
                      markersize=10, label='published by the original REIR')
        axis.set_xticks(range(len(x_values)), x_values)
        axis.set_xlabel(x_flag)
        axis.set_ylabel(f'{metric.replace("_", " ")} (%)')
        axis.set_title(f'study {name}: mean and 95% CI over seeds, {selection_words(rows)}', fontsize='medium')
        axis.grid(alpha=0.3)
        if others or shown:
            axis.legend(fontsize='small')
    return figures.figure_file(draw, (7, 4.5), dpi=100)


# ----------------------------------------------------------------------------- the study

def default_resources(args):
    """(GPUs per run, runs at a time): locally one GPU per run and one run per GPU where CUDA is available, else
    one run at a time on the CPU; on Slurm one GPU per run, as many at a time as the cluster allows."""
    if args.cluster == 'slurm':  # the machine that submits need not have the GPUs the jobs get
        if shutil.which('sbatch') is None:
            raise utils.ReirError('--cluster slurm: this machine has no sbatch; start the study on a Slurm login node, '
                                  'or with --cluster local')
        return (1 if args.gpus_per_run is None else args.gpus_per_run), args.slots
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpus_per_run = args.gpus_per_run if args.gpus_per_run is not None else min(1, visible)
    if gpus_per_run > visible:
        raise utils.UsageError(f'--gpus_per_run {gpus_per_run}: this machine has {visible} CUDA devices')
    slots = args.slots or (visible // gpus_per_run if gpus_per_run else 1)
    if gpus_per_run and slots * gpus_per_run > visible:
        raise utils.UsageError(f'--slots {slots} of {gpus_per_run} GPUs need {slots * gpus_per_run}; this machine has '
                               f'{visible}')
    return gpus_per_run, slots


def prepared_runs(runs):
    """The runs whose dataset is there to train on: a recipe whose dataset is not prepared under its --data_path is
    left out, with one line (the demo, which is drawn when missing, is always there)."""
    kept, skipped = [], {}
    for run in runs:
        recipe = dict(run.config).get('recipe')
        path = utils.data_dicts_path(run.args.data_path, run.args.data_name, run.args.crop_type)
        if recipe and run.args.data_name != 'demo' and not os.path.isfile(path):
            skipped.setdefault(recipe, (path, run.args))
        else:
            kept.append(run)
    for recipe, (path, args) in skipped.items():
        utils.warn(f'recipe {recipe} ({recipes.RECIPES[recipe].title}) skipped: {path} is not there (download '
                   f'{args.data_name} into {os.path.join(args.data_path, args.data_name)}/ and run python '
                   f'data_utils.py --data_path {args.data_path} --data_name {args.data_name})')
    if not kept:
        raise utils.ReirError(f'no dataset of the recipes is prepared under {runs[0].args.data_path}/: nothing to run')
    return kept


def warn_of_departures(runs):
    """One line for each recipe that runs trained otherwise than the original published it (another dataset, crop, E
    or M): their rows of the summary leave the published numbers out."""
    departed = {}
    for run in runs:
        recipe = dict(run.config).get('recipe')
        flags = recipes.departures(recipe, run.args) if recipe else []
        if flags:
            departed.setdefault(recipe, flags)
    for recipe, flags in departed.items():
        utils.warn(f'recipe {recipe} ({recipes.RECIPES[recipe].title}) runs with {" ".join(flags)}, not as the '
                   f'original published it: the summary leaves its published Recall@K out')


def prepare_data(runs):
    """Check every dataset of the study before any run starts, so that a missing one is one error, not a failed
    run each; the demo is drawn here, once, when it is missing (runs side by side would each draw it)."""
    for data_path, data_name, crop_type in sorted({(run.args.data_path, run.args.data_name, run.args.crop_type)
                                                   for run in runs}):
        if data_name == 'demo':
            for line in data_utils.prepare_demo_if_missing(data_path, crop_type, max(1, runs[0].args.num_workers)):
                print(line)
        utils.load_data_dicts(data_path, data_name, crop_type)


def interrupt(signum, frame):
    raise KeyboardInterrupt


def main(args, train_flags):
    """The study, which a SIGTERM ends as a Ctrl-C does (while runs go, run_local stops them first)."""
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        run_study(args, train_flags)
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_study(args, train_flags):
    study_dir, runs = grid(args, train_flags)
    runs = prepared_runs(runs)
    warn_of_departures(runs)
    gpus_per_run, slots = default_resources(args)
    states = report_states(args, study_dir, runs, slots)
    runnable = ('interrupted', 'new', 'damaged') if args.retrain_damaged else ('interrupted', 'new')
    todo = [i for i, state in enumerate(states) if state in runnable]
    failed = run_jobs(args, study_dir, runs, states, todo, gpus_per_run, slots) if todo else {}
    for index, error in failed.items():
        utils.warn(f'run {os.path.basename(runs[index].folder)}: {error}')
    metrics, selections, missing = {}, {}, []
    for index, run in enumerate(runs):
        state, problem = run_state(run)
        if state == 'finished':
            metrics[index], selections[index] = selected_metrics(run)
        elif index not in failed:
            missing.append(run)
            if index in todo:  # its train.py ended without finishing it
                utils.warn(f'run {os.path.basename(run.folder)} did not finish: {problem}')
    if not metrics:
        raise utils.ReirError(f'no run of study {args.name} finished; their logs are in {study_dir}/.submitit/')
    write_summary(args, runs, metrics, selections)
    if failed or missing:
        hint = ', and --retrain_damaged for the damaged ones' if 'damaged' in states and not args.retrain_damaged \
            else ''
        raise utils.ReirError(f'{len(failed) + len(missing)} of {len(runs)} runs failed or did not finish (above); the '
                              f'summary holds the others. Run the same command again to retry them{hint}')


def report_states(args, study_dir, runs, slots):
    """The state of every run (run_state), said in one line, with a warning for each damaged run."""
    states, problems = zip(*(run_state(run) for run in runs))
    for run, state, problem in zip(runs, states, problems):
        if state == 'damaged':
            utils.warn(f'run {os.path.basename(run.folder)} is damaged: {problem}; '
                       + ('training it again from the start' if args.retrain_damaged else
                          'left as it is (--retrain_damaged trains it again from the start)'))
    damaged = states.count('damaged')
    todo = states.count('interrupted') + states.count('new') + (damaged if args.retrain_damaged else 0)
    utils.log(f'study {args.name}: {len(runs)} runs ({len(runs) // len(args.seeds)} configurations x '
              f'{len(args.seeds)} seeds) in {study_dir}/: {states.count("finished")} finished, '
              f'{states.count("interrupted")} to resume, {states.count("new")} to start'
              + (f', {damaged} damaged' + (' to start over' if args.retrain_damaged else '') if damaged else '')
              + (f'; {slots} at a time on {args.cluster}' if todo and slots else ''))
    return states


def run_jobs(args, study_dir, runs, states, todo, gpus_per_run, slots):
    """Train the runs todo (indices of runs), locally or on Slurm; returns {run index: error} of those that failed."""
    prepare_data([runs[i] for i in todo])
    executor = executor_for(args, study_dir, gpus_per_run)
    with tqdm(total=len(runs), initial=len(runs) - len(todo), desc=f'study {args.name}', unit='run',
              dynamic_ncols=True, file=sys.stderr) as progress:
        if args.cluster == 'slurm':
            return run_slurm({i: runs[i] for i in todo}, states, executor, gpus_per_run, progress)
        return run_local({i: runs[i] for i in todo}, states, executor, slots, gpus_per_run, args.timeout_min,
                         progress)


def write_summary(args, runs, metrics, selections):
    """results/study_<name>.csv and .png of the finished runs, the table printed, and a warning where runs were
    selected on the test split."""
    rows = summarize(runs, metrics, selections)
    csv_path = os.path.join(args.results_dir, f'study_{args.name}.csv')
    png_path = os.path.join(args.results_dir, f'study_{args.name}.png')
    run_files.save_together({csv_path: run_files.csv_file(rows),
                             png_path: plot_file(rows, study_axes(args), args.name)})
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f'{v:.2f}', na_rep=''))
    utils.log(f'-> {csv_path}, {png_path}')
    on_test = sum(selection.startswith('test_') for selection in selections.values())
    if on_test:
        utils.warn(f'{"every run" if on_test == len(selections) else f"{on_test} of {len(selections)} runs"} of '
                   f'study {args.name} selected its epoch on the test split (no --val_classes): those numbers are '
                   f'optimistic, as the original REIR\'s are; --val_classes N selects on N held-out training classes')


if __name__ == '__main__':
    own, passed = split_command_line(sys.argv[1:])
    utils.run_cli(lambda arguments: main(arguments, passed), get_args_parser().parse_args(own),
                  interrupted='interrupted: run the same command again to continue the study')
