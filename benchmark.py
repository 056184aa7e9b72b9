"""Benchmarks of REIR against a baseline measured in the same run.

    python benchmark.py eval [--quick]       # exact retrieval metrics at SOP scale vs faiss-cpu IndexFlatIP
    python benchmark.py branches [--quick]   # grouped branch engine vs the per-branch loop
    python benchmark.py data [--quick]       # the training input pipeline vs PIL + the original transforms
    python benchmark.py checkpoint [--quick] # train.py's checkpoint write (atomic, fsynced) vs a plain torch.save
    python benchmark.py step [--quick]       # a step's time by phase, the log's cost, an epoch's beyond compute
    python benchmark.py index [--quick]      # index.py vs evaluate.py's pipeline; faiss IVF, HNSW vs exact at 1M

Each case runs in a fresh worker process, so that its peak memory (Linux VmHWM, reset once the inputs
exist) is its own. Results go to results/benchmark_<name>.csv and a summary is printed.
"""
import argparse
import itertools
import multiprocessing
import os
import platform
from queue import Empty
import sys
import time

import numpy as np
import pandas as pd
import torch
from PIL import Image

import branch_engines
import engine
import faiss_search
import loaders
import resume
import run_files
import tensorboard_log
import trained
import utils
from branch_engines import BRANCH_IMPLS
from model import EnsembleCrossEntropy, Model

SOP_TEST_IMAGES, SOP_TEST_CLASSES = 60_502, 11_316
EVAL_RANKS = (1, 10, 100, 1000)
FP16_MIN_DIM = 8192  # from this dimension on, features may be stored as float16 (train.py does not; evaluation may)


# ----------------------------------------------------------------------------- memory of this process

def _status_kib(field):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    return 0


def reset_peak_memory():
    """Make VmHWM (the peak resident memory) restart from the current resident memory (Linux)."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:
        pass


def peak_mib_since_reset(baseline_kib):
    return (_status_kib('VmHWM') - baseline_kib) / 1024


# ----------------------------------------------------------------------------- eval

def clustered_embeddings(n, d, num_classes, seed, dtype):
    """n unit vectors around num_classes random centres (SOP-like: about 5 images a class), written in
    blocks so that generating them never holds more than the result. The noise grows as d**0.25 so that
    the retrieval problem stays about as hard at every dimension (R@1 near 85% at SOP's size)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(num_classes, (n,), generator=generator)
    centres = torch.randn(num_classes, d, generator=generator)
    vectors = torch.empty(n, d, dtype=dtype)
    for start in range(0, n, 4096):
        block = centres[labels[start:start + 4096]]
        block += 2.2 * (d / 576) ** 0.25 * torch.randn(block.shape, generator=generator)
        vectors[start:start + 4096] = torch.nn.functional.normalize(block, dim=1).to(dtype)
    return vectors, labels


def faiss_metrics(vectors, labels, ranks):
    """The usual faiss recipe: exact inner-product top-k search (k = max K + 1 for the query itself),
    then Recall@K from the neighbours' labels and MAP@R from the first R."""
    import faiss
    data = np.ascontiguousarray(vectors.float().numpy())
    index = faiss.IndexFlatIP(data.shape[1])
    index.add(data)
    counts = torch.bincount(labels)[labels] - 1                                 # R per query
    k = min(max(max(ranks), int(counts.max())) + 1, len(data))
    _, neighbours = index.search(data, k)
    neighbours = torch.from_numpy(neighbours)
    own = neighbours == torch.arange(len(data))[:, None]
    keep = torch.where(own.any(1, keepdim=True), ~own, torch.arange(k)[None, :] < k - 1)
    neighbours = neighbours[keep].view(len(data), k - 1)                        # self removed
    relevant = labels[neighbours] == labels[:, None]                            # (n, k-1)
    recalls = [float(relevant[:, :K].any(1).float().mean()) for K in ranks]
    positions = torch.arange(1, k, dtype=torch.float64)
    within = relevant & (positions[None, :] <= counts[:, None])
    precision = within.cumsum(1) / positions
    found = counts > 0
    map_r = float(((precision * within).sum(1)[found] / counts[found]).mean())
    return recalls, map_r


def eval_case(method, n, d, dtype_name, seed, queue):
    dtype = getattr(torch, dtype_name)
    vectors, labels = clustered_embeddings(n, d, max(2, n * SOP_TEST_CLASSES // SOP_TEST_IMAGES), seed, dtype)
    reset_peak_memory()
    baseline = _status_kib('VmRSS')
    start = time.perf_counter()
    if method == 'reir':
        recalls, map_r, _ = utils.retrieval_metrics(vectors, labels, EVAL_RANKS)
    else:
        recalls, map_r = faiss_metrics(vectors, labels, EVAL_RANKS)
    seconds = time.perf_counter() - start
    queue.put(dict(method=method, n=n, d=d, storage=dtype_name, seconds=round(seconds, 2),
                   peak_mem_mb=round(peak_mib_since_reset(baseline), 1),
                   **{f'recall@{k}': round(100 * r, 3) for k, r in zip(EVAL_RANKS, recalls)},
                   **{'map@r': round(100 * map_r, 3)}))


def run_in_worker(target, *args):
    context = multiprocessing.get_context('spawn')
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    while True:
        try:
            result = queue.get(timeout=5)
            break
        except Empty:
            if not process.is_alive():
                raise RuntimeError(f'benchmark worker {target.__name__} died (exit code {process.exitcode})') from None
    process.join()
    return result


def benchmark_eval(args):
    methods = ('reir', 'faiss')
    if not faiss_search.available():  # the baseline is an optional dependency
        print('faiss-cpu is not installed (pip install faiss-cpu): measuring reir alone', file=sys.stderr)
        methods = ('reir',)
    n = 12_000 if args.quick else SOP_TEST_IMAGES
    cases = [(576, 'float32', methods), (2048, 'float32', methods)]
    if not args.quick:
        # faiss needs float32 and as long as reir at large d; from d = 8192 the sweep measures reir alone
        cases += [(8192, 'float32', ('reir',)), (8192, 'float16', ('reir',)), (24576, 'float16', ('reir',))]
    if args.dims:
        cases = [case for case in cases if case[0] in args.dims]
    rows = []
    for d, dtype_name, case_methods in cases:
        for method in case_methods:
            row = run_in_worker(eval_case, method, n, d, dtype_name, args.seed)
            print(f"{method:>5} n={n} d={d:>5} {dtype_name:>7}: {row['seconds']:7.2f} s, "
                  f"peak +{row['peak_mem_mb']:7.1f} MiB, R@1 {row['recall@1']:.2f} R@1000 {row['recall@1000']:.2f} "
                  f"MAP@R {row['map@r']:.2f}", flush=True)
            rows.append(dict(row, machine=machine_name()))
    frame = pd.DataFrame(rows)
    write_csv(frame, 'eval')
    for (d, dtype_name), group in frame.groupby(['d', 'storage']):
        times = dict(zip(group['method'], group['seconds']))
        if 'faiss' in times:
            print(f'd={d} {dtype_name}: reir takes {times["reir"] / times["faiss"]:.2f}x the time of faiss IndexFlatIP')
    fp16 = frame[(frame['method'] == 'reir') & (frame['d'] == 8192)].set_index('storage')
    if len(fp16) == 2:
        change = (fp16.loc['float16', 'recall@1'] - fp16.loc['float32', 'recall@1'])
        print(f'd=8192: float16 storage changes R@1 by {change:+.3f} points')


# ----------------------------------------------------------------------------- branches

BRANCH_COLUMNS = ['impl', 'engine', 'device', 'phase', 'model_type', 'ensemble_size', 'batch_size', 'image_size',
                  'images_per_s', 'peak_mem_mb', 'amp']


def time_steps(model, phase, batch, steps, amp):
    """Seconds per step: train.py's training step (engine.train_step: forward, loss, backward and an Adam step
    through the gradient scaler) for 'train'; a forward for 'eval'. batch: branch_setup's."""
    images, labels, codes = batch
    device = images.device
    trainable = training_objects(model, device, amp)

    def step():
        if phase == 'train':
            engine.train_step(model, trainable, (images, labels), codes, amp)
        else:
            with torch.inference_mode(), engine.autocast(device, amp):
                model(images)

    model.train(phase == 'train')
    step()  # warm-up: allocations, cuDNN algorithm choice
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / max(steps, 1)


def branch_setup(config):
    """A model of config on its device, and a batch for it: images, their class indices among 100 classes, and the
    (100, E) codes of those classes' meta-classes (the ids transposed, as train.py's step takes them)."""
    torch.manual_seed(0)
    device = torch.device(config['device'])
    layout = engine.memory_format(device, config['amp'])
    model = Model(12, config['ensemble_size'], config['share_type'], config['model_type'], pretrained=False)
    model = model.to(device, memory_format=layout)
    images = torch.randn(config['batch_size'], 3, config['image_size'], config['image_size'], device=device)
    labels = torch.randint(100, (config['batch_size'],), device=device)
    codes = torch.randint(12, (100, config['ensemble_size']), device=device)
    return model, (images.contiguous(memory_format=layout), labels, codes)


def training_objects(model, device, amp):
    """What train.py's step trains with besides the model: the original's loss, Adam as train.py makes it, and the
    gradient scaler."""
    optimizer = engine.adam(model.parameters(), 1e-4, device)
    return dict(loss=EnsembleCrossEntropy(model.ensemble_size, model.meta_class_size, 100), optimizer=optimizer,
                scaler=engine.grad_scaler(device, amp))


def branches_speed(config, queue):
    """Seconds per step of every engine and phase, in one process, interleaved over rounds (best round
    kept), so that the loop and the engines compared with it see the same machine state."""
    model, batch = branch_setup(config)
    device = batch[0].device
    print(engine.choose_branch_engine(model, 'auto', device, (config['batch_size'], config['image_size']),
                                      config['amp']), flush=True)
    engines = {'loop': 'loop', 'grouped': 'grouped', 'auto': branch_engines.engine_name(model)}  # auto: train.py's
    best = {}
    for phase in ('train', 'eval'):
        for _ in range(config['rounds']):
            for impl, name in engines.items():
                model.branch_engine = branch_engines.ENGINES[name]
                seconds = time_steps(model, phase, batch, config['steps'], config['amp'])
                best[phase, impl] = min(best.get((phase, impl), float('inf')), seconds)
    queue.put((best, engines['auto']))


def branches_memory(config, impl, phase, queue):
    """Peak memory (MiB) of one step beyond the model and its input, in a fresh process."""
    model, batch = branch_setup(config)
    model.branch_engine = branch_engines.ENGINES[impl]
    device = batch[0].device
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        time_steps(model, phase, batch, 0, config['amp'])
        queue.put((torch.cuda.max_memory_allocated(device) - base) / 2 ** 20)
    else:
        reset_peak_memory()
        base = _status_kib('VmRSS')
        time_steps(model, phase, batch, 0, config['amp'])
        queue.put(peak_mib_since_reset(base))


def benchmark_branches(args):
    if args.device == 'cuda' and not torch.cuda.is_available():
        print('error: --device cuda, but CUDA is not available', file=sys.stderr)
        sys.exit(1)
    base = dict(device=args.device, share_type='layer1', batch_size=10, amp=False)
    if args.quick and args.device == 'cuda':  # the default run's model, a few steps
        configs = [dict(base, model_type='resnet18', ensemble_size=48, image_size=256, steps=5, rounds=2, amp=amp)
                   for amp in (False, True)]
    elif args.quick:
        configs = [dict(base, model_type='resnet18', ensemble_size=8, image_size=64, steps=3, rounds=3)]
    elif args.device == 'cpu':
        configs = [dict(base, model_type='resnet18', ensemble_size=e, image_size=64, steps=3, rounds=2)
                   for e in (8, 48)]
    else:  # the README configuration and ResNet-50, with and without --amp
        configs = [dict(base, model_type=m, ensemble_size=48, image_size=256, steps=10, rounds=3, amp=amp)
                   for m in ('resnet18', 'resnet50') for amp in (False, True)]
    rows = []
    for config in configs:
        seconds, auto_engine = run_in_worker(branches_speed, config)
        engines = {'loop': 'loop', 'grouped': 'grouped', 'auto': auto_engine}
        for phase in ('train', 'eval'):
            for impl, branch_impl in engines.items():
                row = dict(impl=impl, engine=branch_impl, device=config['device'], phase=phase,
                           model_type=config['model_type'], ensemble_size=config['ensemble_size'],
                           batch_size=config['batch_size'], image_size=config['image_size'],
                           images_per_s=round(config['batch_size'] / seconds[phase, impl], 2),
                           peak_mem_mb=round(run_in_worker(branches_memory, config, branch_impl, phase), 1),
                           amp=config['amp'])
                rows.append(row)
                print(f"{row['device']} {row['model_type']} E={row['ensemble_size']} B={row['batch_size']} "
                      f"{row['image_size']}px amp={row['amp']} {phase:>5} {impl:>7}: {row['images_per_s']:8.2f} "
                      f"images/s ({seconds[phase, 'loop'] / seconds[phase, impl]:.2f}x loop), "
                      f"peak +{row['peak_mem_mb']:.0f} MiB", flush=True)
    frame = pd.DataFrame(rows, columns=BRANCH_COLUMNS)
    frame['machine'] = machine_name() if args.device == 'cpu' else torch.cuda.get_device_name()
    write_csv(frame, 'branches')


# ----------------------------------------------------------------------------- data

class BaselineReader(torch.utils.data.Dataset):
    """The original input pipeline: PIL decodes the whole JPEG, then Resize, RandomCrop, flip, ToTensor,
    Normalize."""

    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        with Image.open(self.paths[index]) as image:
            return self.transform(image.convert('RGB')), 0


def photo(path, width, height, rng):
    """A photo-like JPEG of the given size (smooth colour waves, edges, sensor noise), drawn from rng."""
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    waves = 0.5 + 0.5 * np.sin(rng.uniform(3, 9) * x + rng.uniform(3, 9) * y + np.array([0, 2, 4], np.float32))
    edges = (np.sin(rng.uniform(20, 60) * x * y) > 0.6) * 0.3
    pixels = 255 * np.clip(0.8 * waves + edges, 0, 1) + rng.normal(0, 8, (height, width, 3))
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
    return path


def write_photos(folder, count, seed):
    """Cars/SOP-sized photo-like JPEGs, about 1000 x 700, in ten class folders."""
    rng = np.random.default_rng(seed)
    return [photo(os.path.join(folder, 'train', f'class_{i % 10}', f'{i:04d}.jpg'), int(rng.integers(900, 1100)),
                  int(rng.integers(620, 780)), rng) for i in range(count)]


def loader_images_per_s(dataset, batch_size, passes):
    """Images per second of one DataLoader worker over the dataset (best of passes, workers kept)."""
    from torch.utils.data import DataLoader
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=1, persistent_workers=True, prefetch_factor=4)
    best = float('inf')
    for _ in range(passes):
        start = time.perf_counter()
        for _ in loader:
            pass
        best = min(best, time.perf_counter() - start)
    return len(dataset) / best


def benchmark_data(args):
    import tempfile
    import data_utils  # to prepare the short-side copies, its own job
    count, size = (60, 256) if args.quick else (300, 256)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        root = os.path.join(folder, 'photos')
        paths = write_photos(root, count, args.seed)
        os.makedirs(os.path.join(root, 'test', 'class_0'))
        os.link(paths[0], os.path.join(root, 'test', 'class_0', 'x.jpg'))
        data_utils.prepare(folder, 'photos', num_workers=os.cpu_count() or 1, short_side=size)
        dicts = torch.load(utils.data_dicts_path(folder, 'photos', 'uncropped'), weights_only=True)
        short = [p for p, _ in utils.flatten_split(dicts['train'])]
        items = [(p, 0) for p in paths]
        targets = [torch.zeros(1, dtype=torch.long)] * count
        fast = utils.get_transform('uncropped', True, size, mean, std)
        pipelines = {
            'baseline': BaselineReader(paths, utils.get_transform('uncropped', True, size, mean, std, exact=True)),
            'reir': SeededItems(utils.TrainReader('', items, targets, fast, min_side=size)),
            'reir_short_side': SeededItems(utils.TrainReader(root, [(p, 0) for p in short], targets, fast,
                                                             min_side=size)),
        }
        speeds = {name: loader_images_per_s(dataset, 10, 2 if args.quick else 3) for name, dataset in pipelines.items()}
    for name, speed in speeds.items():
        rows.append(dict(pipeline=name, image_size_src='~1000x700', images_per_s=round(speed, 1),
                         machine=machine_name()))
        print(f'{name:>16}: {speed:7.1f} images/s, {speed / speeds["baseline"]:.2f}x baseline', flush=True)
    write_csv(pd.DataFrame(rows), 'data')


class SeededItems(torch.utils.data.Dataset):
    """utils.TrainReader takes (index, augmentation seed) items from train.py's sampler; a plain index here."""

    def __init__(self, reader):
        self.reader = reader

    def __len__(self):
        return len(self.reader)

    def __getitem__(self, index):
        return self.reader[(index, index)][:2]


# ----------------------------------------------------------------------------- checkpoint

def checkpoint_case(config, folder, queue):
    """The checkpoint of a run after two training steps (Adam's moments exist), with CUB-sized ids and training list:
    its size on disk, the best of config['rounds'] writes as train.py writes it (run_files.save_together: a temporary
    file written through Python's file object, which keeps the operating system's error, fsync, rename) and of a plain
    torch.save of the same dict to the path (the baseline), and the seconds of the second step."""
    model, (images, labels, codes) = branch_setup(config)
    trainable = training_objects(model, images.device, False)
    model.train()
    engine.train_step(model, trainable, (images, labels), codes, False)  # warm-up: allocations
    start = time.perf_counter()
    engine.train_step(model, trainable, (images, labels), codes, False)
    step_seconds = time.perf_counter() - start
    trainable.update(model=model, scheduler=torch.optim.lr_scheduler.MultiStepLR(trainable['optimizer'], [10, 14]))
    state = state_in_first_epoch(config['ensemble_size'], 100, 5_864)
    path = os.path.join(folder, 'checkpoint.pth')
    atomic, plain = float('inf'), float('inf')
    for _ in range(config['rounds']):
        start = time.perf_counter()
        run_files.save_together({path: state.checkpoint_file(trainable)})
        atomic = min(atomic, time.perf_counter() - start)
        size = os.path.getsize(path)
        os.remove(path)
        start = time.perf_counter()
        torch.save(state.checkpoint(trainable), path)  # straight to the file, in torch's own writer
        plain = min(plain, time.perf_counter() - start)
        os.remove(path)
    queue.put(dict(size_mib=size / 2 ** 20, atomic_s=atomic, plain_s=plain, step_s=step_seconds))


def state_in_first_epoch(ensemble_size, classes, images):
    """The RunState of a run of E branches on `classes` training classes of `images` images (CUB's by default), as its
    checkpoint after the first step of its first epoch holds it."""
    return run_files.RunState(
        args={}, ids=torch.randint(12, (ensemble_size, classes)), data_fingerprint='0' * 16, step=1,
        train_items=[(f'images/{i % classes:03d}/{i:06d}.jpg', i % classes) for i in range(images)],
        running=[{'sums': [0.0, 0, 0, 0], 'rng': resume.rng_states([])}])


def benchmark_checkpoint(args):
    config = dict(device='cpu', share_type='layer1', batch_size=10, amp=False, model_type='resnet18',
                  ensemble_size=8 if args.quick else 48, image_size=64, rounds=2 if args.quick else 3)
    os.makedirs(args.folder, exist_ok=True)
    row = run_in_worker(checkpoint_case, config, args.folder)
    print(f"ResNet-18, E={config['ensemble_size']}, M=12, layer1 shared: checkpoint {row['size_mib']:,.0f} MiB on "
          f"disk; written as train.py writes it in {row['atomic_s']:.2f} s ({row['atomic_s'] / row['plain_s']:.2f}x "
          f"a plain torch.save, {row['plain_s']:.2f} s), {row['atomic_s'] / row['step_s']:.2f} training steps of batch "
          f"10 at 64 px on the CPU ({row['step_s']:.2f} s)", flush=True)
    write_csv(pd.DataFrame([dict(config, **{key: round(value, 3) for key, value in row.items()},
                                 folder=args.folder, machine=machine_name())]), 'checkpoint')


# ----------------------------------------------------------------------------- step profile

PROFILE_CLASSES = 100  # the training classes of the profile's generated images
# the datasets an epoch's shares are reckoned for: (training list, test images), the database being the training list
EPOCH_SIZES = {'cub': (5_864, 5_924), 'car': (8_054, 8_131)}
STEP_COLUMNS = ['device', 'model_type', 'share_type', 'ensemble_size', 'meta_class_size', 'image_size', 'batch_size',
                'eval_batch_size', 'amp', 'compile', 'branch_impl', 'num_workers', 'steps', 'step_ms',
                'data_wait_ms', 'forward_backward_ms', 'optimizer_ms', 'ops_per_step', 'kernels_per_step',
                'gpu_idle_pct', 'checkpoint_mib', 'checkpoint_write_s', 'checkpoint_copy_s', 'step_ms_during_write',
                'embed_images_per_s_train_batch', 'embed_images_per_s_eval_batch', 'step_ms_without_log',
                'step_ms_with_log', 'log_overhead_pct']
LOG_ROUNDS = 5  # of steps without and with the TensorBoard log, alternated


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def profile_loaders(config, folder):
    """A training loader (train.py's reader, sampler and loader settings) over generated photo-like JPEGs of
    PROFILE_CLASSES classes, enough for the profile's steps, and an evaluation loader of the same images."""
    size = config['image_size']
    count = config['batch_size'] * (config['steps'] + 2)
    rng = np.random.default_rng(0)
    paths = [photo(os.path.join(folder, f'{i:05d}.jpg'), int(rng.integers(2 * size, 3 * size)),
                   int(rng.integers(int(1.5 * size), 2 * size)), rng) for i in range(count)]
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    device = torch.device(config['device'])
    options = loaders.loader_options(config['num_workers'], 0, device)
    items = [(path, i % PROFILE_CLASSES) for i, path in enumerate(paths)]
    transform, min_side = utils.input_pipeline('uncropped', True, size, mean, std, False)
    reader = utils.TrainReader('', items, [index for _, index in items], transform, min_side)
    train_loader = loaders.Loader(reader, batch_size=config['batch_size'], drop_last=True,
                                  sampler=loaders.SeededSampler(len(reader), 0), **options)
    transform, min_side = utils.input_pipeline('uncropped', False, size, mean, std, False)
    eval_reader = utils.EvalReader('', items, [0] * len(items), transform, min_side)
    return train_loader, lambda batch: loaders.eval_loader(eval_reader, batch, options)


def profiled_steps(model, trainable, codes, batches, config):
    """Per step, as train.py's loop runs it: milliseconds waiting for data, in forward and backward, in the
    optimizer (the device synchronized between them, so that each phase is timed alone), and with no
    synchronization (the step as it runs)."""
    device, amp = torch.device(config['device']), config['amp']
    layout = engine.memory_format(device, amp)
    wait = forward_backward = step = 0.0
    start = time.perf_counter()
    for _ in range(config['steps']):
        images, labels, _ = next(batches)
        loaded = time.perf_counter()
        images = images.to(device, non_blocking=True, memory_format=layout)
        labels = labels.to(device, non_blocking=True)
        engine.forward_backward(model, trainable['loss'], (images, labels, codes[labels]), trainable['optimizer'],
                                trainable['scaler'], amp)
        synchronize(device)
        backward = time.perf_counter()
        engine.optimizer_step(trainable['optimizer'], trainable['scaler'])
        synchronize(device)
        wait, forward_backward, step = (wait + loaded - start, forward_backward + backward - loaded,
                                        step + time.perf_counter() - backward)
        start = time.perf_counter()
    return {name: round(1000 * value / config['steps'], 2)
            for name, value in (('data_wait_ms', wait), ('forward_backward_ms', forward_backward),
                                ('optimizer_ms', step))}


def run_steps(model, trainable, codes, batches, config, steps):
    """Milliseconds per step of steps training steps as train.py runs them (engine.train_step, nothing read back)."""
    device = torch.device(config['device'])
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        images, labels, _ = next(batches)
        engine.train_step(model, trainable, (images, labels), codes, config['amp'])
    synchronize(device)
    return 1000 * (time.perf_counter() - start) / steps


def steps_with_sums(model, trainable, codes, batches, config, log):
    """Milliseconds per step of config['steps'] steps as train_one_epoch runs them: engine.train_step, the epoch's
    running sums kept (engine.EpochSums) and, with a log (tensorboard_log.RunLog), each step kept for it; the log's
    steps written at the end, as train.py writes them once a second (a block takes about that long here) and before
    a checkpoint."""
    device, steps = torch.device(config['device']), config['steps']
    sums = engine.EpochSums((0, [0.0, 0, 0, 0]), steps, config['ensemble_size'], device)
    lr = trainable['optimizer'].param_groups[0]['lr']
    synchronize(device)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        images, labels, failures = next(batches)
        loss, correct = engine.train_step(model, trainable, (images, labels), codes, config['amp'])
        sums.add(step, loss, correct, images.shape[0], failures)
        if log is not None:
            log.add_step(1, step, sums, lr)
    sums.read()
    if log is not None:
        log.position()  # the steps written and the file flushed
    synchronize(device)
    return 1000 * (time.perf_counter() - start) / steps


def log_overhead(model, trainable, codes, batches, config, folder):
    """A step's milliseconds without and with the TensorBoard log (steps_with_sums), the median of LOG_ROUNDS rounds
    that alternate the two, in the same process on the same batches stream."""
    times = {False: [], True: []}
    with tensorboard_log.RunLog(os.path.join(folder, 'tensorboard'), config['steps'], main=True) as log:
        for _ in range(LOG_ROUNDS):
            for logged in (False, True):
                times[logged].append(steps_with_sums(model, trainable, codes, batches, config,
                                                     log if logged else None))
    without, with_log = (float(np.median(times[logged])) for logged in (False, True))
    return dict(step_ms_without_log=round(without, 2), step_ms_with_log=round(with_log, 2),
                log_overhead_pct=round(100 * (with_log / without - 1), 2))


def operations_per_step(model, trainable, codes, batches, config):
    """(operators dispatched, CUDA kernel launches, percent of the time the GPU was idle) of one profiled training
    step; the last two None on the CPU."""
    from torch.profiler import ProfilerActivity, profile
    device = torch.device(config['device'])
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    synchronize(device)
    with profile(activities=activities) as profiler:
        start = time.perf_counter()
        run_steps(model, trainable, codes, batches, config, 1)
        wall = time.perf_counter() - start
    events = profiler.events()
    # the operators called from Python or autograd, not those they call in turn
    operations = sum(1 for event in events if event.name.startswith('aten::')
                     and not (event.cpu_parent is not None and event.cpu_parent.name.startswith('aten::')))
    if device.type != 'cuda':
        return operations, None, None
    launches = sum(1 for event in events if event.name.startswith('cudaLaunchKernel'))
    busy = sum(event.self_device_time_total for event in profiler.key_averages()) / 1e6
    return operations, launches, round(100 * max(0.0, 1 - busy / wall), 1)


def checkpoint_in_flight(model, trainable, codes, batches, config, folder):
    """The run's checkpoint: its size, the seconds of a write as train.py wrote it before (in the loop), the seconds
    the loop now spends on it (the host copy; the write goes on in the background), and the step time while that
    write is in flight."""
    saved = dict(trainable, model=model,
                 scheduler=torch.optim.lr_scheduler.MultiStepLR(trainable['optimizer'], milestones=[10, 14]))
    state = state_in_first_epoch(config['ensemble_size'], PROFILE_CLASSES, 1)
    path = os.path.join(folder, 'checkpoint.pth')
    start = time.perf_counter()
    run_files.save_together({path: state.checkpoint_file(saved)})
    write = time.perf_counter() - start
    size = os.path.getsize(path) / 2 ** 20
    with run_files.BackgroundWrites() as writes:
        start = time.perf_counter()
        writer = state.checkpoint_file(saved)
        copy = time.perf_counter() - start
        writes.submit({path: writer})
        steps, start = 0, time.perf_counter()
        while writes.thread.is_alive() and steps < config['steps']:
            run_steps(model, trainable, codes, batches, config, 1)
            steps += 1
        during = 1000 * (time.perf_counter() - start) / max(steps, 1)
    return dict(checkpoint_mib=round(size, 1), checkpoint_write_s=round(write, 3), checkpoint_copy_s=round(copy, 3),
                step_ms_during_write=round(during, 2))


def embedding_speed(model, eval_loader, config, batch_size):
    """Images per second of engine.extract_features at a batch size (the best of two passes)."""
    device = torch.device(config['device'])
    loader = eval_loader(batch_size)
    best = float('inf')
    for _ in range(2):
        synchronize(device)
        start = time.perf_counter()
        engine.extract_features(model, loader, device, config['amp'])
        best = min(best, time.perf_counter() - start)
    return round(len(loader.dataset) / best, 2)


def step_profile(config, folder, queue):
    device = torch.device(config['device'])
    torch.manual_seed(0)
    model = Model(config['meta_class_size'], config['ensemble_size'], config['share_type'], config['model_type'],
                  pretrained=False)
    process = engine.Process(0, 1, device, [device.index or 0] if device.type == 'cuda' else [])
    model = engine.place_model(model, process, (config['batch_size'], config['image_size']), config['amp'],
                               config['branch_impl'], compile=config['compile'])
    trainable = training_objects(model, device, config['amp'])
    codes = torch.randint(config['meta_class_size'], (PROFILE_CLASSES, config['ensemble_size']), device=device)
    train_loader, eval_loader = profile_loaders(config, folder)

    def batches():
        while True:
            yield from train_loader
    stream = batches()
    model.train()
    run_steps(model, trainable, codes, stream, config, 2)  # warm-up: workers, allocations, cuDNN's choices
    row = dict(step_ms=round(run_steps(model, trainable, codes, stream, config, config['steps']), 2))
    row.update(log_overhead(model, trainable, codes, stream, config, folder))
    row.update(profiled_steps(model, trainable, codes, stream, config))
    row['ops_per_step'], row['kernels_per_step'], row['gpu_idle_pct'] = operations_per_step(
        model, trainable, codes, stream, config)
    row.update(checkpoint_in_flight(model, trainable, codes, stream, config, folder))
    row['embed_images_per_s_train_batch'] = embedding_speed(model, eval_loader, config, config['batch_size'])
    row['embed_images_per_s_eval_batch'] = embedding_speed(model, eval_loader, config, config['eval_batch_size'])
    queue.put(row)


def epoch_budget(row, config, dataset):
    """Seconds of an epoch of dataset, reckoned from the profile: before this profile's changes (evaluation in
    training batches, the database embedded at every best epoch, the checkpoint written in the loop), and now (the
    database once per run, the checkpoint's host copy only)."""
    train_images, test_images = EPOCH_SIZES[dataset]
    steps = train_images // config['batch_size']
    training = steps * row['step_ms'] / 1000
    before = {'training': training, 'evaluation': test_images / row['embed_images_per_s_train_batch'],
              'database': train_images / row['embed_images_per_s_train_batch'],
              'checkpoint': row['checkpoint_write_s']}
    now = {'training': training, 'evaluation': test_images / row['embed_images_per_s_eval_batch'], 'database': 0.0,
           'checkpoint': row['checkpoint_copy_s']}
    return before, now


def benchmark_step(args):
    if args.device == 'cuda' and not torch.cuda.is_available():
        print('error: --device cuda, but CUDA is not available', file=sys.stderr)
        sys.exit(1)
    if args.quick:  # the README demo's model
        config = dict(model_type='resnet18', share_type='layer4', ensemble_size=12, meta_class_size=12,
                      image_size=64, batch_size=32, steps=6)
    else:  # the default run's
        config = dict(model_type='resnet18', share_type='layer1', ensemble_size=48, meta_class_size=12,
                      image_size=256, batch_size=10, steps=20)
    config.update({key: value for key, value in vars(args).items() if key in config and value is not None})
    config.update(device=args.device, amp=args.amp, compile=args.compile, branch_impl=args.branch_impl,
                  eval_batch_size=args.eval_batch_size, num_workers=args.num_workers)
    import tempfile
    os.makedirs(args.folder, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        row = run_in_worker(step_profile, config, folder)
    row = {**config, **row}
    print(f"{config['device']} {config['model_type']} {config['share_type']} E={config['ensemble_size']} "
          f"M={config['meta_class_size']} {config['image_size']} px, batch {config['batch_size']}, evaluation batch "
          f"{config['eval_batch_size']}, amp={config['amp']}, compile={config['compile']}:")
    print(f"  step {row['step_ms']:.1f} ms as train.py runs it; timed alone: data wait {row['data_wait_ms']:.1f} ms, "
          f"forward+backward {row['forward_backward_ms']:.1f} ms, optimizer {row['optimizer_ms']:.1f} ms")
    print(f"  TensorBoard log: {row['step_ms_without_log']:.1f} ms a step without it, {row['step_ms_with_log']:.1f} "
          f"ms with it ({row['log_overhead_pct']:+.2f}%; medians of {LOG_ROUNDS} alternating rounds)")
    launches = '' if row['kernels_per_step'] is None else \
        f", {row['kernels_per_step']} CUDA kernel launches, the GPU idle {row['gpu_idle_pct']}% of the step"
    print(f"  {row['ops_per_step']} operations per step{launches}")
    print(f"  checkpoint {row['checkpoint_mib']:,.0f} MiB: written in the loop {row['checkpoint_write_s']:.2f} s; now "
          f"{row['checkpoint_copy_s']:.2f} s of host copy, then steps of {row['step_ms_during_write']:.1f} ms while it "
          f"is written ({row['step_ms_during_write'] / row['step_ms']:.2f}x)")
    print(f"  embedding: {row['embed_images_per_s_train_batch']:.1f} images/s in batches of {config['batch_size']}, "
          f"{row['embed_images_per_s_eval_batch']:.1f} in batches of {config['eval_batch_size']}")
    for dataset in EPOCH_SIZES:
        before, now = epoch_budget(row, config, dataset)
        shares = '; '.join(f'{name} {before[name]:.1f} -> {now[name]:.1f} s' for name in before)
        total_before, total_now = sum(before.values()), sum(now.values())
        print(f"  a {dataset} epoch: {total_before:.1f} s before, {total_now:.1f} s now "
              f"({total_now / total_before:.2f}x; "
              f"beyond training {total_before - before['training']:.1f} -> {total_now - now['training']:.1f} s): "
              f"{shares}")
    frame = pd.DataFrame([row], columns=STEP_COLUMNS)
    frame['machine'] = machine_name() if args.device == 'cpu' else torch.cuda.get_device_name()
    write_csv(frame, 'step')


# ----------------------------------------------------------------------------- index

INDEX_WIDTH = 48 * 12  # the default run's embedding: E = 48 members of M = 12 meta-classes
FAISS_K = 10


def demo_run(folder, config):
    """A run's files as index.py reads them: the model (random weights: speed does not depend on them) and the
    args.json that says how it embeds; returns the model's path."""
    run = run_files.RunName('bench', 'uncropped', 'fixed', False, config['share_type'], 'resnet18',
                            config['ensemble_size'], config['meta_class_size'])
    paths = run.paths(folder)
    torch.manual_seed(0)
    model = Model(config['meta_class_size'], config['ensemble_size'], config['share_type'], pretrained=False)
    run_files.save_together({paths['model.pth']: run_files.torch_file(model.state_dict()), paths['args.json']:
                             run_files.json_file(dict(image_size=config['image_size'], exact_pipeline=False,
                                                      mean=[0.5] * 3, std=[0.25] * 3))})
    return paths['model.pth']


def evaluation_pipeline_seconds(model_path, root, config):
    """Seconds of evaluate.py's pipeline over the folder's images: its loader (loaders.build_eval_data) and
    engine.extract_features, with the model index.py embeds with."""
    opened = trained.open_run(model_path)
    classes = {}
    for relative in sorted(os.listdir(root)):
        classes[relative] = [f'{relative}/{name}' for name in sorted(os.listdir(os.path.join(root, relative)))]
    device = torch.device('cpu')
    start = time.perf_counter()
    _, _, split_loaders = loaders.build_eval_data({'test': classes}, root, opened.preprocess.transform,
                                                  opened.preprocess.min_side, config['batch_size'],
                                                  loaders.loader_options(config['num_workers'], 0, device))
    engine.extract_features(opened.model, split_loaders['test'], device, False)
    return time.perf_counter() - start


def index_seconds(model_path, root, config, results):
    """Seconds of index.py over the folder, from its command line to the written index (--overwrite: anew)."""
    import index  # to run index.py's own job
    args = index.get_args_parser().parse_args([model_path, '--images', root, '--results_dir', results, '--overwrite',
                                               '--batch_size', str(config['batch_size']), '--gpu_ids', 'cpu',
                                               '--num_workers', str(config['num_workers'])])
    start = time.perf_counter()
    index.main(args)
    return time.perf_counter() - start


def benchmark_index_speed(args):
    """index.py's images/s against evaluate.py's pipeline on one folder of photo-like JPEGs, alternated, the best of
    each."""
    import tempfile
    config = dict(share_type='layer4', ensemble_size=12, meta_class_size=12, image_size=64, batch_size=128,
                  num_workers=min(2, os.cpu_count() or 1))  # the README demo's model
    count = 120 if args.quick else 600
    best = {'evaluate': float('inf'), 'index': float('inf')}
    with tempfile.TemporaryDirectory() as folder:
        root = os.path.join(folder, 'photos')
        write_photos(root, count, args.seed)
        root = os.path.join(root, 'train')
        model_path = demo_run(os.path.join(folder, 'run'), config)
        for _ in range(2 if args.quick else 3):
            best['evaluate'] = min(best['evaluate'], evaluation_pipeline_seconds(model_path, root, config))
            best['index'] = min(best['index'], index_seconds(model_path, root, config, os.path.join(folder, 'out')))
    return [dict(case='embedding', method=method, images=count, image_size_src='~1000x700',
                 images_per_s=round(count / seconds, 1), **config) for method, seconds in best.items()]


LOW_RANK, LOW_RANK_NOISE = 32, 0.7  # exact R@1 about 83% at SOP's size, as clustered_embeddings' 86%


def low_rank_embeddings(n, d, num_classes, seed):
    """n unit vectors of width d that vary in LOW_RANK dimensions only, as a trained network's embeddings do (their
    intrinsic dimension is far below their width): class centres plus each image's noise in R^LOW_RANK, mapped into
    R^d by one random orthonormal basis, normalized."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(num_classes, (n,), generator=generator)
    centres = torch.randn(num_classes, LOW_RANK, generator=generator)
    basis = torch.linalg.qr(torch.randn(d, LOW_RANK, generator=generator))[0]   # (d, LOW_RANK)
    vectors = torch.empty(n, d)
    for start in range(0, n, 65536):
        block = centres[labels[start:start + 65536]]
        block += LOW_RANK_NOISE * torch.randn(block.shape, generator=generator)
        vectors[start:start + 65536] = torch.nn.functional.normalize(block @ basis.t(), dim=1)
    return vectors, labels


SYNTHETIC = {'low_rank': low_rank_embeddings,  # as learned embeddings: what an approximate index is made for
             'clustered': lambda n, d, classes, seed: clustered_embeddings(n, d, classes, seed, torch.float32)}
SEARCH_EFFORTS = {'ivf': (faiss_search.IVF_PROBES, 128, 512), 'hnsw': (faiss_search.HNSW_EF_SEARCH, 512, 2048)}


def set_effort(index, kind, effort):
    """IVF's lists visited (nprobe) or HNSW's candidates kept (efSearch): what a search spends for its recall."""
    if kind == 'ivf':
        index.nprobe = effort
    else:
        index.hnsw.efSearch = effort


def faiss_case(kind, n, seed, vectors_kind, queue):
    """Build and query times of a faiss index of kind over n unit vectors of INDEX_WIDTH (SYNTHETIC[vectors_kind], in
    SOP-like classes of about 5), and its Recall@1 and @FAISS_K against the exact search
    (faiss_search.recall_against_exact) at each search effort of SEARCH_EFFORTS, the first the one index.py writes;
    kind 'exact' is the exact search itself (faiss.knn), the baseline of the query time."""
    vectors, _ = SYNTHETIC[vectors_kind](n, INDEX_WIDTH, max(2, n * SOP_TEST_CLASSES // SOP_TEST_IMAGES), seed)
    vectors = vectors.numpy()
    queries = vectors[np.random.default_rng(seed).permutation(n)[:faiss_search.RECALL_QUERIES]]
    start = time.perf_counter()
    index = None if kind == 'exact' else faiss_search.build(vectors, kind, seed=seed)
    build = time.perf_counter() - start
    rows = []
    for effort in SEARCH_EFFORTS.get(kind, (None,)):
        if index is not None:
            set_effort(index, kind, effort)
        start = time.perf_counter()
        if index is None:
            faiss_search.exact_neighbours(vectors, queries, FAISS_K + 1)
        else:
            faiss_search.search(index, queries, FAISS_K + 1)
        query = time.perf_counter() - start
        recalls = {k: 1.0 for k in (1, FAISS_K)} if index is None else \
            faiss_search.recall_against_exact(index, vectors, (1, FAISS_K), seed=seed)[0]
        rows.append(dict(case='faiss', vectors=vectors_kind, method=kind, n=n, d=INDEX_WIDTH, search_effort=effort,
                         build_s=round(build, 2),
                         query_ms=round(1000 * query / len(queries), 3),
                         **{f'recall@{k}': round(100 * r, 2) for k, r in recalls.items()}))
    queue.put(rows)


def benchmark_index(args):
    rows = benchmark_index_speed(args)
    speeds = {row['method']: row['images_per_s'] for row in rows}
    print(f"embedding {rows[0]['images']} photos: index.py {speeds['index']:.1f} images/s, evaluate.py's pipeline "
          f"{speeds['evaluate']:.1f} ({speeds['index'] / speeds['evaluate']:.2f}x)", flush=True)
    n = args.faiss_vectors if args.faiss_vectors is not None else 100_000 if args.quick else 1_000_000
    if not faiss_search.available():
        print(f'faiss is not installed ({faiss_search.INSTALL}): no faiss measurements', file=sys.stderr)
    elif n:
        for vectors_kind, kind in itertools.product(args.vectors, ('exact', 'ivf', 'hnsw')):
            for row in run_in_worker(faiss_case, kind, n, args.seed, vectors_kind):
                effort = '' if row['search_effort'] is None else \
                    f" ({'nprobe' if kind == 'ivf' else 'efSearch'} {row['search_effort']})"
                print(f"faiss {vectors_kind} {kind:>5}{effort} n={n:,} d={INDEX_WIDTH}: build {row['build_s']:.1f} s, "
                      f"query {row['query_ms']:.3f} ms, Recall@1 {row['recall@1']:.2f}%, Recall@{FAISS_K} "
                      f"{row[f'recall@{FAISS_K}']:.2f}%", flush=True)
                rows.append(row)
    write_csv(pd.DataFrame([dict(row, machine=machine_name()) for row in rows]), 'index')


# ----------------------------------------------------------------------------- common

def machine_name():
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    return f'{cpu}, {os.cpu_count()} cores'


def write_csv(frame, name):
    path = os.path.join(run_files.RESULTS_DIR, f'benchmark_{name}.csv')
    run_files.atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))
    print(f'-> {path}')


def get_args_parser():
    parser = argparse.ArgumentParser(description='REIR benchmarks, each against a baseline in the same run')
    commands = parser.add_subparsers(dest='command', required=True)
    evaluation = commands.add_parser('eval', help='exact retrieval metrics at SOP scale vs faiss IndexFlatIP')
    evaluation.add_argument('--quick', action='store_true', help='12,000 embeddings, d 576 and 2048 only')
    evaluation.add_argument('--seed', type=int, default=0)
    evaluation.add_argument('--dims', type=int, nargs='*', help='only these embedding dimensions')
    evaluation.set_defaults(run=benchmark_eval)
    branches = commands.add_parser('branches', help='grouped branch engine vs the per-branch loop')
    branches.add_argument('--quick', action='store_true',
                          help='CPU: ResNet-18, E=8, 64 px, a few minutes; CUDA: ResNet-18, E=48, 256 px, fewer steps')
    branches.add_argument('--device', default='cpu', choices=('cpu', 'cuda'))
    branches.set_defaults(run=benchmark_branches)
    data = commands.add_parser('data', help='the training input pipeline vs PIL + the original transforms')
    data.add_argument('--quick', action='store_true', help='60 photos instead of 300')
    data.add_argument('--seed', type=int, default=0)
    data.set_defaults(run=benchmark_data)
    checkpoint = commands.add_parser('checkpoint', help='train.py\'s checkpoint write vs a plain torch.save')
    checkpoint.add_argument('--quick', action='store_true', help='E=8 instead of the default run\'s 48 branches')
    checkpoint.add_argument('--folder', default=run_files.RESULTS_DIR,
                            help='where to write (the disk a run writes to: its --results_dir)')
    checkpoint.set_defaults(run=benchmark_checkpoint)
    step = commands.add_parser('step', help='where a training step\'s time goes, and an epoch\'s beyond compute')
    step.add_argument('--quick', action='store_true',
                      help='the README demo\'s model (layer4, E=12, 64 px, batch 32), 6 steps; default: the default '
                           'run\'s (layer1, E=48, 256 px, batch 10), 20 steps')
    step.add_argument('--device', default='cpu', choices=('cpu', 'cuda'))
    for flag in ('model_type', 'share_type'):
        step.add_argument(f'--{flag}')
    for flag in ('ensemble_size', 'meta_class_size', 'image_size', 'batch_size', 'steps'):
        step.add_argument(f'--{flag}', type=utils.positive_int)
    step.add_argument('--eval_batch_size', default=engine.EVAL_BATCH_SIZE, type=utils.positive_int)
    step.add_argument('--num_workers', default=min(8, os.cpu_count() or 1), type=int)
    step.add_argument('--branch_impl', default='auto', choices=BRANCH_IMPLS)
    step.add_argument('--amp', action='store_true')
    step.add_argument('--compile', action='store_true')
    step.add_argument('--folder', default=run_files.RESULTS_DIR, help='where the checkpoint is written')
    step.set_defaults(run=benchmark_step)
    index = commands.add_parser('index', help='index.py\'s embedding speed vs evaluate.py\'s pipeline; faiss IVF and '
                                              'HNSW against the exact search at 1,000,000 vectors')
    index.add_argument('--quick', action='store_true', help='120 photos and 100,000 vectors')
    index.add_argument('--faiss_vectors', type=utils.int_in_range(0), default=None,
                       help='vectors of the faiss cases (default 1,000,000; 0: the embedding speed alone)')
    index.add_argument('--vectors', nargs='+', default=list(SYNTHETIC), choices=list(SYNTHETIC),
                       help='the synthetic embeddings: low_rank (32 intrinsic dimensions, as a trained network\'s), '
                            'clustered (noise in every dimension: a worst case)')
    index.add_argument('--seed', type=int, default=0)
    index.set_defaults(run=benchmark_index)
    return parser


if __name__ == '__main__':
    arguments = get_args_parser().parse_args()
    utils.run_cli(arguments.run, arguments)
