"""Shared test helpers: tiny datasets in the real on-disk formats, tiny training runs (one session-wide run
that the tests of its outputs share), scripts run in-process as their command line runs them, and
DataParallel-style replicas."""
import contextlib
import hashlib
import importlib
import inspect
import io
import os
import runpy
import shutil
import signal
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
from tensorboard.plugins.hparams import metadata as hparams_metadata

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import data_utils  # noqa: E402  (the repository's modules, found through REPO)
import engine  # noqa: E402
import run_files  # noqa: E402
import tensorboard_log  # noqa: E402
import train  # noqa: E402
import utils  # noqa: E402

# The CUDA tier (python -m pytest -m cuda): skipped, with the reason, where CUDA is absent
CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')]
DEVICES = ['cpu', pytest.param('cuda', marks=CUDA)]


@pytest.fixture(autouse=True)
def no_fsync(monkeypatch):
    """Files are still written to a temporary name and renamed (what the tests check), but not flushed to the
    disk: a flush guards against power loss, which no test can simulate, and costs about a second for each
    tiny run's 360 MB of checkpoints."""
    monkeypatch.setattr(os, 'fsync', lambda fd: None)


@pytest.fixture(autouse=True)
def stop_signal_handlers():
    """A run stopped by a signal keeps its handlers until its process ends (resume.StopSignals); in this process the
    next test gets the earlier ones back."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


@pytest.fixture(autouse=True)
def exact_float32():
    """float32 on CUDA as on the CPU: no TF32, which keeps 10 bits of mantissa in convolutions and matmuls."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def write_image(path, size=(48, 40), seed=0):
    """A small JPEG of smooth random colour, different for every seed."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    corners = rng.uniform(0, 255, (2, 2, 3))
    small = Image.fromarray(corners.astype(np.uint8))
    small.resize(size, Image.BILINEAR).save(path, quality=95)


def run_script(script, *args, cwd=REPO):
    """Run one of the repository's scripts in a new process, as a user would; returns the CompletedProcess."""
    env = dict(os.environ, PYTHONWARNINGS='ignore')
    return subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=600)


def run_as_command(script, *args, cwd=REPO):
    """Run a script file as `python script args` runs it (its `if __name__ == '__main__'` block), in this
    process; returns its exit code, stdout and stderr like a CompletedProcess."""
    stdout, stderr = io.StringIO(), io.StringIO()
    returncode = 0
    argv, directory = sys.argv, os.getcwd()
    sys.argv = [script, *map(str, args)]
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            runpy.run_path(os.path.join(REPO, script), run_name='__main__')
    except SystemExit as exit_:
        returncode = exit_.code
    finally:
        sys.argv = argv
        os.chdir(directory)
    return SimpleNamespace(returncode=returncode, stdout=stdout.getvalue(), stderr=stderr.getvalue())


def run_main(script, *args):
    """Run a script in this process as its command line does (argument parsing, then main through
    utils.run_cli); returns its exit code, stdout and stderr like a CompletedProcess."""
    module = importlib.import_module(script)
    stdout, stderr = io.StringIO(), io.StringIO()
    returncode = 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            arguments = module.get_args_parser().parse_args([str(a) for a in args])
            utils.run_cli(module.main, arguments)
        except SystemExit as exit_:
            returncode = exit_.code
    return SimpleNamespace(returncode=returncode, stdout=stdout.getvalue(), stderr=stderr.getvalue())


def assert_one_line_error(result, code, *fragments):
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert 'Traceback' not in result.stderr, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert len(error_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in error_lines[0], error_lines[0]


@pytest.fixture
def car_root(tmp_path):
    """Cars196 layout: cars_annos.mat (fields deliberately not in the official order) and car_ims/."""
    root = tmp_path / 'data' / 'car'
    classes = [1, 97, 98, 99, 100, 196]
    rows = []
    for i, label in enumerate(c for c in classes for _ in range(2)):
        relpath = f'car_ims/{i + 1:06d}.jpg'
        write_image(str(root / relpath), size=(60, 50), seed=i)
        x1, y1 = 3 + i % 4, 5
        rows.append((np.array([[label]], np.uint8), np.array([relpath]), np.array([[x1]], np.uint8),
                     np.array([[y1]], np.uint8), np.array([[x1 + 30 + i]], np.uint8), np.array([[40]], np.uint8),
                     np.array([[i % 2]], np.uint8)))
    dtype = [('class', 'O'), ('relative_im_path', 'O'), ('bbox_x1', 'O'), ('bbox_y1', 'O'), ('bbox_x2', 'O'),
             ('bbox_y2', 'O'), ('test', 'O')]
    annotations = np.empty((1, len(rows)), dtype=dtype)
    for i, row in enumerate(rows):
        annotations[0, i] = row
    savemat(str(root / 'cars_annos.mat'), {'annotations': annotations,
                                           'class_names': np.array(['a'] * 196, dtype=object)})
    return root


@pytest.fixture
def cub_root(tmp_path):
    root = tmp_path / 'data' / 'cub'
    classes = [1, 2, 100, 101, 150, 200]
    images, labels, boxes = [], [], []
    for i, label in enumerate(c for c in classes for _ in range(2)):
        relpath = f'{label:03d}.Bird_{label}/Bird_{label}_{i}.jpg'
        write_image(str(root / 'images' / relpath), size=(64, 48), seed=100 + i)
        images.append(f'{i + 1} {relpath}')
        labels.append(f'{i + 1} {label}')
        boxes.append(f'{i + 1} {2.5 + i} 4.0 {30.7 + i} 35.2')
    for name, lines in (('images.txt', images), ('image_class_labels.txt', labels), ('bounding_boxes.txt', boxes)):
        (root / name).write_text('\n'.join(lines) + '\n')
    return root


@pytest.fixture
def sop_root(tmp_path):
    root = tmp_path / 'data' / 'sop'
    header = 'image_id class_id super_class_id path\n'
    for name, classes, start in (('Ebay_train.txt', [1, 2, 3], 0), ('Ebay_test.txt', [11319, 11320], 100)):
        lines = []
        for i, label in enumerate(c for c in classes for _ in range(3)):
            relpath = f'bicycle_final/{label}_{i}.JPG'
            write_image(str(root / relpath), seed=start + i)
            lines.append(f'{start + i + 1} {label} 1 {relpath}')
        (root / name).write_text(header + '\n'.join(lines) + '\n')
    return root


@pytest.fixture
def isc_root(tmp_path):
    root = tmp_path / 'data' / 'isc'
    rows = []
    for i, (item, status) in enumerate([('id_00000001', 'train')] * 3 + [('id_00000002', 'train')] * 2
                                       + [('id_00000003', 'query'), ('id_00000003', 'gallery'),
                                          ('id_00000003', 'gallery'), ('id_00000004', 'query'),
                                          ('id_00000004', 'gallery')]):
        relpath = f'img/WOMEN/Dresses/{item}/{i:02d}_1_front.jpg'
        write_image(str(root / relpath), seed=200 + i)
        rows.append(f'{relpath} {item} {status}')
    (root / 'Eval').mkdir(parents=True)
    (root / 'Eval' / 'list_eval_partition.txt').write_text(
        f'{len(rows)}\nimage_name item_id evaluation_status\n' + '\n'.join(rows) + '\n')
    return root


def make_folder_dataset(root, splits, images_per_class=4, size=(40, 36), class_offset=0):
    """A folder dataset whose classes are told apart by colour, so that a tiny model can learn them."""
    for split, num_classes in splits.items():
        for c in range(num_classes):
            for i in range(images_per_class):
                hue = (c * 37 + class_offset) % 256
                path = os.path.join(root, split, f'class_{c:02d}', f'{i}.jpg')
                os.makedirs(os.path.dirname(path), exist_ok=True)
                base = np.array([hue, 255 - hue, (hue * 3) % 256], np.float64)
                noise = np.random.default_rng([c, i, len(split)]).normal(0, 20, (size[1], size[0], 3))
                Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(path, quality=95)
    return root


@pytest.fixture
def folder_root(tmp_path):
    return make_folder_dataset(str(tmp_path / 'data' / 'tiny'), {'train': 4, 'test': 3})


# ----------------------------------------------------------------------------- tiny training runs

NO_LOG = tensorboard_log.RunLog(None, 1, main=False)  # the log of a process that writes none (not the main one)

# the whole backbone shared (half the parameters of the default layer1, half of every checkpoint to write), where a
# test does not need branches of their own
TINY = ['--no_pretrained', '--image_size', '32', '--ensemble_size', '2', '--meta_class_size', '2', '--share_type',
        'layer4', '--batch_size', '4', '--num_epochs', '2', '--num_workers', '0']
SHOP_RECALLS = ['--recalls', '1,8']


def run_train(root, *extra, name='tiny', results=None):
    """train.py on root/data/<name> with the TINY flags, writing to results (default root/results)."""
    return run_main('train', '--data_path', root / 'data', '--data_name', name, '--results_dir',
                    results or root / 'results', *TINY, *extra)


def loss_becomes(monkeypatch, value, at_step=2):
    """Make engine.train_step's loss value (nan, inf) at the at_step-th step a run takes: a run that diverges there."""
    step = engine.train_step
    calls = []

    def diverging(*args):
        loss, correct = step(*args)
        calls.append(1)
        return (torch.tensor(value) if len(calls) == at_step else loss), correct
    monkeypatch.setattr(engine, 'train_step', diverging)


def signal_during_call(monkeypatch, module, name, call, signum):
    """Make module.name send this process signum during its call-th call (a stop signal that arrives while it runs);
    returns the function it replaces, to put back."""
    function, calls = getattr(module, name), []

    def signalled(*args):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signum)
        return function(*args)
    monkeypatch.setattr(module, name, signalled)
    return function


def copy_of_run(trained, tmp_path, name='tiny'):
    """A results folder holding a copy of one of the session's runs (see trained)."""
    top = str(trained / 'results')
    shutil.copytree(top, tmp_path / 'results',
                    ignore=lambda folder, names: [n for n in names if folder == top and not n.startswith(f'{name}_')])
    return tmp_path / 'results'


def interrupt_in_epoch(flags, epoch=2):
    """train.py with flags, in this process, stopped by a Ctrl-C as epoch `epoch` begins (its checkpoint holds the
    epochs before)."""
    train_one_epoch = train.train_one_epoch

    def interrupt(*args):
        if args[3].epoch == epoch:  # the RunState
            raise KeyboardInterrupt
        return train_one_epoch(*args)
    train.train_one_epoch = interrupt
    try:
        with pytest.raises(KeyboardInterrupt):
            train.main(train.get_args_parser().parse_args([str(flag) for flag in flags]))
    finally:
        train.train_one_epoch = train_one_epoch


class CodeOnLoad:
    """A pickle that calls function(*args) when it is loaded: what a tampered file could hold."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def written_files(results):
    """{path under results: bytes} of the files a results folder holds, in its folders too (a run's TensorBoard log),
    its hidden lock files left out."""
    return {str(path.relative_to(results)): path.read_bytes() for path in sorted(results.rglob('*'))
            if path.is_file() and not path.name.startswith('.')}


def file_digests(results):
    """{name: sha256} of the files a results folder holds, its hidden lock files left out: what written_files says,
    in a form whose difference an assertion can print."""
    return {name: hashlib.sha256(content).hexdigest() for name, content in written_files(results).items()}


def log_events(folder):
    """Every event with a summary in the log's event files, as TensorBoard reads them (its loader of the files'
    events as written, without the merging of steps that its views do)."""
    return [event for name in sorted(os.listdir(folder)) if 'tfevents' in name
            for event in LegacyEventFileLoader(str(folder / name)).Load() if event.HasField('summary')]


def scalar_points(folder):
    """[(tag, step, value)] of every scalar the log holds, sorted: a point logged twice is there twice."""
    return sorted((value.tag, event.step, value.simple_value) for event in log_events(folder)
                  for value in event.summary.value if value.HasField('simple_value'))


def session_start(folder):
    """The HParams plugin's session start info of the log: the run's flags as TensorBoard's HParams tab reads them."""
    infos = [hparams_metadata.parse_session_start_info_plugin_data(value.metadata.plugin_data.content)
             for event in log_events(folder) for value in event.summary.value
             if value.tag == hparams_metadata.SESSION_START_INFO_TAG]
    assert len(infos) == 1
    return infos[0]


def prefix(name='tiny', E=2, M=2, share='layer4', with_random=False):
    return run_files.RunName(name, 'uncropped', 'fixed', with_random, share, 'resnet18', E, M).prefix


@pytest.fixture(scope='session')
def prepared(tmp_path_factory):
    """Prepared datasets shared by the session (copy them before changing them): tiny, a 4-class train /
    3-class test folder dataset, and shop, with 3 train classes and query / gallery splits of 2."""
    root = tmp_path_factory.mktemp('prepared')
    make_folder_dataset(str(root / 'data' / 'tiny'), {'train': 4, 'test': 3})
    make_folder_dataset(str(root / 'data' / 'shop'), {'train': 3, 'query': 2, 'gallery': 2})
    for name in ('tiny', 'shop'):
        data_utils.prepare(str(root / 'data'), name, num_workers=1)
    return root


@pytest.fixture(scope='session')
def trained(prepared):
    """One tiny run (TINY flags) and one query/gallery run (shop, --recalls 1,8, one epoch), trained once for
    every test that reads a run's outputs. Their results folder is prepared/results; tests that write must use
    their own."""
    for name, extra in (('tiny', []), ('shop', [*SHOP_RECALLS, '--num_epochs', '1'])):
        result = run_train(prepared, *extra, name=name)
        assert result.returncode == 0, result.stderr
    return prepared


# the flags of the torchrun runs: the TINY flags for three epochs, 2 of the tiny dataset's 4 training classes held out
GLOO = [*TINY, '--num_epochs', '3', '--val_classes', '2', '--recalls', '1,2,4']


def torchrun_command(torchrun_flags, prepared, results, *train_flags):
    """torchrun with torchrun_flags starting train.py with the GLOO flags on the prepared tiny dataset."""
    command = [sys.executable, '-m', 'torch.distributed.run', *torchrun_flags, os.path.join(REPO, 'train.py'),
               '--data_path', prepared / 'data', '--data_name', 'tiny', '--results_dir', results, *GLOO, *train_flags]
    return [str(part) for part in command]


# one thread for each process of a torchrun run on the CPU (gloo), so that runs agree to the bit; no GPU
TORCHRUN_ENV = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')


class BackgroundRun:
    """A command running in the background, its output collected by result() (once, then kept)."""

    def __init__(self, command, results):
        self.results = results
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env=TORCHRUN_ENV)
        self.completed = None

    def result(self):
        if self.completed is None:
            stdout, stderr = self.process.communicate(timeout=600)
            self.completed = subprocess.CompletedProcess(self.process.args, self.process.returncode, stdout, stderr)
        return self.completed


@pytest.fixture(scope='session', autouse=True)
def gloo_run(request, prepared, tmp_path_factory):
    """A two-process torchrun run on the CPU (gloo) with the GLOO flags, started when the session begins (when a
    selected test asks for it), so that its three interpreters start while other tests run: the reference of the
    other torchrun tests. Yields a BackgroundRun."""
    if not any('gloo_run' in inspect.signature(item.function).parameters for item in request.session.items):
        yield None
        return
    results = tmp_path_factory.mktemp('gloo')
    run = BackgroundRun(torchrun_command(['--standalone', '--nproc_per_node=2'], prepared, results), results)
    yield run
    run.process.kill()
    run.process.communicate()


@pytest.fixture
def tiny(prepared, tmp_path):
    """A copy of the prepared tiny dataset under tmp_path/data, and no results yet."""
    shutil.copytree(prepared / 'data' / 'tiny', tmp_path / 'data' / 'tiny')
    return tmp_path


@contextlib.contextmanager
def one_thread():
    """Float sums that do not depend on how threads split them (MKL and OpenMP may change their split between
    runs), so that two runs of the same computation agree to the bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- replicas

def data_parallel_replica(model, scale):
    """A replica as nn.parallel.replicate makes one for another GPU: every module's plain attributes shared
    with the original (Module._replicate_for_data_parallel), its own parameters and buffers, here scaled so
    that the replica's weights differ from the original's as they would after a broadcast to another device
    in the middle of a step."""
    modules = list(model.modules())
    replicas = [module._replicate_for_data_parallel() for module in modules]
    position = {id(module): i for i, module in enumerate(modules)}
    for module, replica in zip(modules, replicas):
        for name, child in module._modules.items():
            replica._modules[name] = None if child is None else replicas[position[id(child)]]
        for name, parameter in module._parameters.items():
            replica._parameters[name] = None if parameter is None else parameter.detach() * scale
        for name, buffer in module._buffers.items():
            replica._buffers[name] = None if buffer is None else buffer.clone()
    return replicas[0]
