"""Preemptible, elastic training: a run killed or stopped by a signal inside an epoch continues from its last
checkpoint to the results of an uninterrupted run; torchrun restarts a killed worker, which resumes by itself; two
torchrun agents train as two nodes."""
import argparse
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pandas as pd
import psutil
import pytest
import torch

import engine
import loaders
import resume
import run_files
import utils
from conftest import (DEVICES, NO_LOG, REPO, TINY, TORCHRUN_ENV, one_thread, prefix, run_train, scalar_points,
                      signal_during_call, torchrun_command)

FLAGS = [*TINY, '--num_workers', '1']  # a loader worker, which a signal to the process group reaches too
STEPS = 4  # of an epoch of the tiny dataset: 16 images, 4 a step
# (epoch, steps done) of the checkpoints written inside the two epochs with --checkpoint_every 1
INSIDE = [(epoch, step) for epoch in (1, 2) for step in range(1, STEPS)]


@pytest.fixture(scope='module')
def references(prepared, tmp_path_factory):
    """{with_random: (results CSV, TensorBoard log's scalar points)} of uninterrupted runs with FLAGS, without
    --checkpoint_every."""
    references = {}
    for with_random in (False, True):
        results = tmp_path_factory.mktemp('reference')
        with one_thread():
            result = run_train(prepared, *FLAGS, *(['--with_random'] if with_random else []), results=results)
        assert result.returncode == 0, result.stderr
        name = prefix(with_random=with_random)
        references[with_random] = ((results / f'{name}_results.csv').read_text(),
                                   scalar_points(results / f'{name}_{run_files.RUN_LOG}'))
    return references


def saved_position(checkpoint):
    """(epoch, steps of it done) where the run a checkpoint holds continues: (3, 0) at the end of epoch 2; None
    while there is no checkpoint."""
    saved = run_files.peek_checkpoint(str(checkpoint))
    return None if saved is None else (saved['epoch'], saved.get('step', 0))


@pytest.fixture
def background():
    """start(command, folder, env): a process in a session of its own (so that a signal can reach all of it, as
    torchrun and Slurm send theirs), its output in folder/stdout and folder/stderr. What is left of the processes
    and their descendants when the test ends is killed."""
    started = []

    def start(command, folder, env):
        folder.mkdir(exist_ok=True)
        with open(folder / 'stdout', 'w') as stdout, open(folder / 'stderr', 'w') as stderr:
            started.append(subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env, start_new_session=True))
        return started[-1]
    yield start
    for process in started:
        if process.poll() is None:
            family = psutil.Process(process.pid).children(recursive=True) + [psutil.Process(process.pid)]
            for member in family:
                with contextlib.suppress(psutil.NoSuchProcess):
                    member.kill()
            process.wait()


def file_identity(path):
    """(inode, modification time) of path, which a file renamed into place changes; None while there is none."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def wait_for_position(process, checkpoint, position):
    """Poll the checkpoint until it holds position (epoch, step) or a later one; fails if the run ends first. It is
    read only when it has been written again (a new file, renamed into place), which leaves the run the CPU."""
    deadline, read = time.time() + 300, None
    while time.time() < deadline:
        written = file_identity(checkpoint)
        if written != read:
            read, saved = written, saved_position(checkpoint)
            if saved is not None and saved >= position:
                return
        assert process.poll() is None, f'the run ended (exit code {process.returncode}) before {position}'
        time.sleep(0.01)
    raise AssertionError(f'no checkpoint at {position} within 300 s')


def train_command(tiny, results, flags):
    return [sys.executable, os.path.join(REPO, 'train.py'), '--data_path', str(tiny / 'data'), '--data_name', 'tiny',
            '--results_dir', str(results), *flags]


def signal_inside_an_epoch(start, tiny, folder, flags, position, signum, until_exit=False):
    """Run train.py with flags and --checkpoint_every 1 (start: the background fixture), and send signum to its
    process group once its checkpoint holds position (until_exit: again every few milliseconds until the run ends,
    as an impatient scheduler may). Returns (exit code, stderr, the checkpoint's position then)."""
    checkpoint = folder / f'{prefix(with_random="--with_random" in flags)}_checkpoint.pth'
    process = start(train_command(tiny, folder, [*flags, '--checkpoint_every', '1']), folder,
                    dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1'))
    wait_for_position(process, checkpoint, position)
    os.killpg(process.pid, signum)
    while until_exit and process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)
        time.sleep(0.002)
    process.wait(timeout=300)
    return process.returncode, (folder / 'stderr').read_text(), saved_position(checkpoint)


def no_process_left(group):
    """Whether every process of a process group (the run and its loader workers) has ended, within a few seconds."""
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def resume_and_compare(tiny, folder, flags, position, expected):
    """--resume the run in folder (without --checkpoint_every: the default), and check that it continued from
    position and wrote the results CSV and the TensorBoard log expected (references): each step and epoch once, with
    the values of the run never stopped."""
    with one_thread():
        resumed = run_train(tiny, *flags, '--resume', results=folder)
    assert resumed.returncode == 0, resumed.stderr
    epoch, step = position
    where = f'step {step} of epoch {epoch}' if step else f'the end of epoch {epoch - 1}'
    assert f'resumed from {folder / prefix(with_random="--with_random" in flags)}_checkpoint.pth at {where}' \
        in resumed.stdout
    name = prefix(with_random="--with_random" in flags)
    assert (folder / f'{name}_results.csv').read_text() == expected[0]
    assert scalar_points(folder / f'{name}_{run_files.RUN_LOG}') == expected[1]
    assert not [name for name in os.listdir(folder) if name.endswith('.tmp')]


# ----------------------------------------------------------------------------- killed or stopped inside an epoch

@pytest.mark.parametrize('with_random', [False, True], ids=['fixed_weights', 'with_random'])
@pytest.mark.slow
def test_killed_inside_an_epoch_resumes_to_the_same_results(tiny, references, background, tmp_path, with_random):
    """SIGKILL (to the run and its loader worker) at a random step inside an epoch; --resume continues from the
    step of the last checkpoint, and the results CSV equals that of a run never stopped, to the byte."""
    flags = [*FLAGS, *(['--with_random'] if with_random else [])]
    target = random.choice(INSIDE)
    returncode, _, position = signal_inside_an_epoch(background, tiny, tmp_path / 'killed', flags, target,
                                                     signal.SIGKILL)
    assert returncode == -signal.SIGKILL
    assert position[1] > 0, f'killed once the checkpoint held {target}, it holds {position}: not inside an epoch'
    resume_and_compare(tiny, tmp_path / 'killed', flags, position, references[with_random])


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGUSR1], ids=['SIGTERM', 'SIGUSR1'])
@pytest.mark.slow
def test_a_stop_signal_saves_the_step_and_exits_to_be_resumed(tiny, references, background, tmp_path, signum):
    """Stop signals to the whole process group (as torchrun and Slurm send them), from a random step on until the run
    has ended: the run ends the step, writes the checkpoint, prints one line saying how to continue, exits with
    utils.STOPPED_EXIT_CODE (a later signal once killed it, -15, after its checkpoint was written), its loader worker
    with it; --resume then gives the CSV of a run never stopped."""
    target = random.choice(INSIDE[:-1])  # a signal after step 3 of epoch 2 may come when the run has finished
    folder = tmp_path / 'stopped'
    returncode, stderr, position = signal_inside_an_epoch(background, tiny, folder, FLAGS, target, signum,
                                                          until_exit=True)
    assert returncode == utils.STOPPED_EXIT_CODE, stderr
    assert 'Traceback' not in stderr
    checkpoint = folder / f'{prefix()}_checkpoint.pth'
    epoch, step = position
    where = [f'at step {step} of {STEPS} of epoch {epoch}' if step else f'after epoch {epoch - 1}']
    if step == STEPS:  # the signal came after the epoch's last step: it stopped the evaluation that follows
        where.append(f'in the evaluation of epoch {epoch}')
    assert stderr.splitlines()[-1] in [f'stopped by {signum.name} {place}: {checkpoint} holds the run; continue it '
                                       f'with the same command and --resume' for place in where]
    assert position >= target
    resume_and_compare(tiny, folder, FLAGS, position, references[False])


@pytest.mark.slow
def test_a_stopped_run_leaves_no_loader_worker(tiny, background, tmp_path):
    """The loader workers ignore the signal that reaches their process group and end with the run."""
    folder = tmp_path / 'stopped'
    process = background(train_command(tiny, folder, [*FLAGS, '--num_workers', '2', '--checkpoint_every', '1']),
                         folder, dict(os.environ, OMP_NUM_THREADS='1'))
    wait_for_position(process, folder / f'{prefix()}_checkpoint.pth', (1, 1))
    workers = psutil.Process(process.pid).children()
    assert len(workers) == 2
    os.killpg(process.pid, signal.SIGTERM)
    assert process.wait(timeout=300) == utils.STOPPED_EXIT_CODE
    assert no_process_left(process.pid)


@pytest.mark.slow
def test_a_signal_between_steps_of_one_process_stops_at_the_next_step(tiny, monkeypatch):
    """In this process: a SIGUSR1 during step 2 of epoch 1; the step ends, the checkpoint holds it, the run stops,
    and --resume continues it."""
    step = signal_during_call(monkeypatch, engine, 'train_step', 2, signal.SIGUSR1)
    result = run_train(tiny, '--checkpoint_every', '0')
    assert result.returncode == utils.STOPPED_EXIT_CODE, result.stderr
    assert 'stopped by SIGUSR1 at step 2 of 4 of epoch 1' in result.stderr
    assert saved_position(tiny / 'results' / f'{prefix()}_checkpoint.pth') == (1, 2)
    # a second signal must not end the process (-10) after the checkpoint, before exit code 75
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
    monkeypatch.setattr(engine, 'train_step', step)
    resumed = run_train(tiny, '--resume')  # inside the first epoch: no best model yet, none to write again
    assert resumed.returncode == 0, resumed.stderr
    assert 'at step 2 of epoch 1' in resumed.stdout and (tiny / 'results' / f'{prefix()}_model.pth').exists()


@pytest.mark.slow
def test_a_signal_during_the_evaluation_stops_it_keeping_the_epochs_steps(tiny, references, monkeypatch):
    """A SIGTERM while epoch 2's test split is embedded: the embedding stops after its batch, the checkpoint holds
    every step of epoch 2 (not its evaluation, whose row is not in the CSV yet), and --resume evaluates the epoch and
    writes the CSV of a run never stopped."""
    # epoch 1's test split, then epoch 2's (the database is embedded after the last epoch)
    extract = signal_during_call(monkeypatch, engine, 'extract_features', 2, signal.SIGTERM)
    with one_thread():
        result = run_train(tiny, *FLAGS)
    assert result.returncode == utils.STOPPED_EXIT_CODE, result.stderr
    checkpoint = tiny / 'results' / f'{prefix()}_checkpoint.pth'
    assert result.stderr.splitlines()[-1] == (f'stopped by SIGTERM in the evaluation of epoch 2: {checkpoint} holds '
                                              f'the run; continue it with the same command and --resume')
    assert saved_position(checkpoint) == (2, STEPS)
    assert len(pd.read_csv(tiny / 'results' / f'{prefix()}_results.csv')) == 1
    monkeypatch.setattr(engine, 'extract_features', extract)
    resume_and_compare(tiny, tiny / 'results', FLAGS, (2, STEPS), references[False])


# ----------------------------------------------------------------------------- the pieces

def test_the_sampler_continues_an_epoch_after_its_first_steps():
    """k steps of B images take the first k * B samples of the epoch's order whatever the number of processes:
    skipping them gives each process the rest of what it would have taken."""
    batch, steps_done = 6, 2
    for world in (1, 2, 3):
        for rank in range(world):
            full = list(loaders.SeededSampler(20, seed=5, rank=rank, num_replicas=world))
            sampler = loaders.SeededSampler(20, seed=5, rank=rank, num_replicas=world)
            sampler.set_epoch(0, skip=steps_done * batch)
            assert list(sampler) == full[steps_done * batch // world:]
            assert len(sampler) == len(full) - steps_done * batch // world
    taken = [list(loaders.SeededSampler(18, 5, rank, 2))[:steps_done * batch // 2] for rank in range(2)]
    rest = []
    for rank in range(3):  # the epoch continued on 3 processes (18 samples: no padding on 2 or 3)
        sampler = loaders.SeededSampler(18, 5, rank, 3)
        sampler.set_epoch(0, skip=steps_done * batch)
        rest += list(sampler)
    assert sorted(sum(taken, []) + rest) == sorted(loaders.SeededSampler(18, 5))  # every sample once
    sampler = loaders.SeededSampler(20, 5)
    sampler.set_epoch(0, skip=24)  # stopped after the last, short step
    assert len(sampler) == 0 and list(sampler) == []


def process(rank, world):
    return engine.Process(rank, world, torch.device('cpu'), [])


def test_epoch_position_on_the_same_or_another_number_of_processes():
    running = [{'sums': [1.5, 3, 4, 0], 'rng': 'rank 0'}, {'sums': [2.5, 2, 4, 1], 'rng': 'rank 1'}]
    state = run_files.RunState(args={}, ids=torch.zeros(1, 2).long(), train_items=[], epoch=2, step=3,
                               running=running)
    assert resume.epoch_position(state, process(1, 2)) == ((3, [2.5, 2, 4, 1]), 'rank 1')
    assert resume.epoch_position(state, process(0, 1)) == ((3, [4.0, 5, 8, 1]), 'rank 0')
    assert resume.epoch_position(state, process(2, 3)) == ((3, [0.0, 0, 0, 0]), 'rank 0')
    state.step = 0
    assert resume.epoch_position(state, process(0, 2)) == (resume.EPOCH_START, None)


def test_checkpoints_are_due_every_n_steps_or_by_time(monkeypatch):
    def due(every, step, minutes=0.0):
        monkeypatch.setattr(time, 'monotonic', lambda: 0.0)  # (t + 600) - t is not always 600 in floats
        checkpointer = resume.Checkpointer(every, {}, {}, None, None, process(0, 1), NO_LOG)
        checkpointer.saved()
        monkeypatch.setattr(time, 'monotonic', lambda: 60.0 * minutes)
        return checkpointer.due(step, 10, checkpointer.time_is_up())
    assert [step for step in range(1, 11) if due(3, step)] == [3, 6, 9]
    assert not any(due(0, step) for step in range(1, 11))
    assert not due(None, 5, resume.CHECKPOINT_MINUTES - 0.1) and due(None, 5, resume.CHECKPOINT_MINUTES)
    assert not due(1, 10) and not due(None, 10, 60)  # the last step: the epoch's own checkpoint follows


@pytest.mark.parametrize('device', DEVICES)
def test_random_states_round_trip(device):
    gpu_ids = [0] if device == 'cuda' else []
    states = resume.rng_states(gpu_ids)
    first = torch.rand(3, device=device)
    resume.set_rng_states(states, gpu_ids)
    assert torch.equal(torch.rand(3, device=device), first)


def test_a_torchrun_restart_resumes_only_the_checkpoint_of_its_own_job(tmp_path, monkeypatch):
    args = argparse.Namespace(resume=False, overwrite=True)
    path = tmp_path / 'checkpoint.pth'
    monkeypatch.setenv('TORCHELASTIC_RUN_ID', 'job-a')
    torch.save({'args': {}, 'epoch': 2, 'step': 1, 'elastic_job': 'job-a'}, path)
    assert resume.after_elastic_restart(args, str(path)) is args  # a first start: the flags as given
    monkeypatch.setenv('TORCHELASTIC_RESTART_COUNT', '1')
    restarted = resume.after_elastic_restart(args, str(path))
    assert (restarted.resume, restarted.overwrite) == (True, False)
    monkeypatch.setenv('TORCHELASTIC_RUN_ID', 'job-b')  # another job's checkpoint: the flags as given
    assert resume.after_elastic_restart(args, str(path)) is args
    path.unlink()
    assert resume.after_elastic_restart(args, str(path)) is args
    monkeypatch.setenv('TORCHELASTIC_RUN_ID', 'none')  # torchrun's default id: this agent's job only
    assert engine.elastic_job() == f'none@{socket.gethostname()}:{os.getppid()}'


def test_checkpoint_every_is_checked_and_free_on_resume(tiny):
    result = run_train(tiny, '--checkpoint_every', '-1')
    assert result.returncode == 2 and 'argument --checkpoint_every: -1 is below 0' in result.stderr
    assert 'checkpoint_every' in resume.RESUME_FREE_FLAGS


# ----------------------------------------------------------------------------- torchrun

def rank_0_worker(agent):
    """The train.py process of rank 0 among an agent's workers."""
    for child in psutil.Process(agent.pid).children():
        try:
            if child.environ().get('RANK') == '0':
                return child
        except psutil.NoSuchProcess:
            pass
    return None


@pytest.mark.slow
def test_a_worker_killed_under_torchrun_is_restarted_and_resumes(gloo_run, prepared, background, tmp_path):
    """A 2-process gloo run under torchrun --max-restarts=1: rank 0 SIGKILLed inside epoch 2, torchrun restarts
    both workers, which continue from the checkpoint by themselves; the CSV equals that of the run never stopped."""
    results = tmp_path / 'elastic'
    agent = background(torchrun_command(['--standalone', '--nproc_per_node=2', '--max-restarts=1'], prepared, results,
                                        '--checkpoint_every', '1'), tmp_path, TORCHRUN_ENV)
    checkpoint = results / f'{prefix()}_checkpoint.pth'
    wait_for_position(agent, checkpoint, (2, 1))
    rank_0_worker(agent).kill()
    assert agent.wait(timeout=180) == 0, (tmp_path / 'stderr').read_text()
    stdout = (tmp_path / 'stdout').read_text()
    assert 'torchrun restart 1: continuing the run from its checkpoint' in stdout
    assert f'resumed from {checkpoint} at step 1 of epoch 2' in stdout
    reference = gloo_run.result()
    assert reference.returncode == 0, reference.stderr
    name = f'{prefix()}_results.csv'
    assert (results / name).read_text() == (gloo_run.results / name).read_text()
    log = f'{prefix()}_{run_files.RUN_LOG}'  # rank 0's, cut back to the checkpoint the restart continued
    assert scalar_points(results / log) == scalar_points(gloo_run.results / log)


@pytest.mark.slow
def test_a_torchrun_run_in_class_groups_is_restarted_and_resumes(prepared, background, tmp_path):
    """--m_per_class 2 over 2 gloo processes (each its share of a batch, one group of a class), rank 0 SIGKILLed
    inside epoch 2 under torchrun --max-restarts=1: the restarted workers continue from the checkpoint and write the
    CSV of the same run never stopped."""
    flags = ['--m_per_class', '2']
    reference = background(torchrun_command(['--standalone', '--nproc_per_node=2'], prepared, tmp_path / 'reference',
                                            *flags), tmp_path / 'ran', TORCHRUN_ENV)
    assert reference.wait(timeout=180) == 0, (tmp_path / 'ran' / 'stderr').read_text()
    results = tmp_path / 'elastic'
    agent = background(torchrun_command(['--standalone', '--nproc_per_node=2', '--max-restarts=1'], prepared, results,
                                        *flags, '--checkpoint_every', '1'), tmp_path, TORCHRUN_ENV)
    wait_for_position(agent, results / f'{prefix()}_checkpoint.pth', (2, 1))
    rank_0_worker(agent).kill()
    assert agent.wait(timeout=180) == 0, (tmp_path / 'stderr').read_text()
    assert 'torchrun restart 1: continuing the run from its checkpoint' in (tmp_path / 'stdout').read_text()
    name = f'{prefix()}_results.csv'
    assert (results / name).read_text() == (tmp_path / 'reference' / name).read_text()


def free_port():
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_torchrun_agents_train_as_two_nodes(gloo_run, prepared, background, tmp_path):
    """Two torchrun agents, one process each, meet through a c10d rendezvous on 127.0.0.1 as two nodes would, and
    write the CSV of one agent with two processes."""
    results = tmp_path / 'nodes'
    flags = ['--nnodes=2', '--nproc_per_node=1', '--rdzv_backend=c10d', f'--rdzv_endpoint=127.0.0.1:{free_port()}',
             '--rdzv_id=reir-two-nodes', '--local_addr=127.0.0.1']
    agents = [background(torchrun_command(flags, prepared, results), tmp_path / f'node{node}', TORCHRUN_ENV)
              for node in range(2)]
    for node, agent in enumerate(agents):
        assert agent.wait(timeout=180) == 0, (tmp_path / f'node{node}' / 'stderr').read_text()
    assert sum((tmp_path / f'node{node}' / 'stdout').read_text().count('Epoch 3/3 |') for node in range(2)) == 1
    reference = gloo_run.result()
    assert reference.returncode == 0, reference.stderr
    name = f'{prefix()}_results.csv'
    assert (results / name).read_text() == (gloo_run.results / name).read_text()
