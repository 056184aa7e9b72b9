"""Running a REIR model over data: devices, torch.distributed and torchrun, mixed precision, data loaders and
their samplers, placing the model and choosing its branch engine, the training step, embedding and retrieval
evaluation. train.py, evaluate.py and benchmark.py all run models through these functions, so that each is
written once."""
import atexit
import importlib.util
import multiprocessing
import multiprocessing.util  # its exit function registered before end_loader_workers, which then runs first
import os
import shutil
import signal
import socket

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler

import original
import utils
from model import Model, PretrainedWeightsUnavailable, embed, time_branch_impls

DEFAULT_GPU_IDS = '0,1'
# images per batch when embedding (evaluation, databases): sized for throughput; an image's embedding depends on it
# by float rounding only
EVAL_BATCH_SIZE = 128


# ----------------------------------------------------------------------------- devices

def select_devices(gpu_ids):
    """(device, GPU ids for DataParallel). gpu_ids None is the default: the GPUs among 0,1 that exist."""
    if gpu_ids is not None and gpu_ids.strip().lower() == 'cpu':
        return torch.device('cpu'), []
    try:
        requested = [int(i) for i in (DEFAULT_GPU_IDS if gpu_ids is None else gpu_ids).split(',')]
    except ValueError:
        raise utils.UsageError(f'--gpu_ids {gpu_ids!r} is not a comma-separated list of GPU ids or "cpu"') from None
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = [i for i in requested if not 0 <= i < available]
    if gpu_ids is not None and missing:
        raise utils.ReirError(f'--gpu_ids {gpu_ids}: GPU {",".join(map(str, missing))} is not there '
                              f'({available} CUDA devices visible); name existing GPUs or pass --gpu_ids cpu')
    present = [i for i in requested if i not in missing]
    if not present:
        utils.warn('CUDA is not available: running on the CPU, which is slow for full datasets')
        return torch.device('cpu'), []
    if missing:
        utils.warn(f'GPU {",".join(map(str, missing))} of the default --gpu_ids {DEFAULT_GPU_IDS} is not there: '
                   f'using {",".join(map(str, present))}')
    return torch.device(f'cuda:{present[0]}'), present


def select_process_devices(gpu_ids, local_rank, world):
    """Under torchrun one device per process (cuda:LOCAL_RANK, else the CPU); otherwise those of --gpu_ids
    (select_devices)."""
    if world == 1:
        return select_devices(gpu_ids)
    if gpu_ids is not None:
        utils.warn('--gpu_ids is ignored under torchrun: each process uses the GPU of its LOCAL_RANK')
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device(f'cuda:{local_rank}'), [local_rank]
    return torch.device('cpu'), []


def memory_format(device, amp):
    """channels_last lets mixed-precision convolutions use tensor cores without layout conversions."""
    return torch.channels_last if amp and device.type == 'cuda' else torch.preserve_format


def autocast(device, enabled):
    if not enabled or device.type != 'cuda':
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast('cuda', dtype=dtype)


def grad_scaler(device, amp):
    """Loss scaling, which float16 needs and bfloat16 does not."""
    fp16 = amp and device.type == 'cuda' and not torch.cuda.is_bf16_supported()
    return torch.amp.GradScaler(device.type, enabled=fp16)


def unwrap(model):
    return model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model


# ----------------------------------------------------------------------------- torch.distributed and torchrun

def init_distributed():
    """(rank, world size, local rank): joins the process group when started by torchrun with several
    processes (NCCL on CUDA, gloo on the CPU), else (0, 1, 0)."""
    if int(os.environ.get('WORLD_SIZE', 1)) <= 1:
        return 0, 1, 0
    store, rank, world = next(dist.rendezvous('env://'))
    if os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == str(True):
        # torchrun keeps one store for every restart of a worker group: the addresses that a killed group left there
        # would send the restarted one to dead processes (pytorch/pytorch#135712), so each restart keeps its own keys
        store = dist.PrefixStore(f'restart_{elastic_restart_count()}', store)
    dist.init_process_group('nccl' if torch.cuda.is_available() else 'gloo', store=store, rank=rank, world_size=world)
    return rank, world, int(os.environ.get('LOCAL_RANK', 0))


def elastic_restart_count():
    """How many times torchrun has restarted this process's worker group: 0 at its first start, and outside
    torchrun."""
    return int(os.environ.get('TORCHELASTIC_RESTART_COUNT', 0))


def elastic_job():
    """The torchrun job this process belongs to ('' outside torchrun): its rendezvous id, or, for torchrun's default
    id 'none', that and the host and agent process that started this process, which restarts it in place."""
    run_id = os.environ.get('TORCHELASTIC_RUN_ID')
    if run_id is None:
        return ''
    return run_id if run_id != 'none' else f'none@{socket.gethostname()}:{os.getppid()}'


def gather_shards(local, total, device):
    """Reassemble a tensor whose rows rank, rank + G, ... were computed by process rank (ShardSampler)."""
    if not dist.is_initialized():
        return local
    world = dist.get_world_size()
    size = -(-total // world)
    padded = torch.zeros((size,) + tuple(local.shape[1:]), dtype=local.dtype, device=device)
    padded[:len(local)] = local.to(device)
    shards = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(shards, padded)
    return torch.stack(shards, dim=1).flatten(0, 1)[:total]   # (size, G, ...) -> rows in dataset order


def all_reduce_sum(values, device):
    if not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast_from_main(obj):
    if not dist.is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_objects(obj):
    """[the obj of rank 0, of rank 1, ...] in every process; [obj] without torch.distributed."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def any_process(flags, device):
    """A list of bools, each true when it is true in any process, so that every process acts alike."""
    if not dist.is_initialized():
        return flags
    tensor = torch.tensor(flags, dtype=torch.int32, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(flag) for flag in tensor.tolist()]


# ----------------------------------------------------------------------------- data loaders

# what schedulers send before they end a job: Slurm SIGTERM (and SIGUSR1 where a job asks for it with --signal),
# torchrun SIGTERM to every process of a worker group it stops
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def ignore_stop_signals(worker_id):
    """A DataLoader worker_init_fn. A stop signal sent to the whole process group (torchrun, Slurm) would end the
    loader's workers, and the run with them, before it saved its state: the main process ends them instead. The
    worker starts with the signals blocked (batches), so that none ends it before it ignores them."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def batches(loader):
    """iter(loader), its worker processes started with the stop signals blocked: they inherit the mask, and a signal
    to the process group in the instant before a new worker ignores them (ignore_stop_signals) would end it. The
    main process receives a signal blocked meanwhile once they are started."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def end_loader_workers():
    """At the process's exit, kill its daemonic children still alive: the DataLoader workers (an atexit function).
    multiprocessing ends daemonic children at exit with SIGTERM, which the workers ignore (ignore_stop_signals), and
    then waits for them: a worker whose loader was never shut down (its iterator still held by the traceback of a stop
    or an error) would keep the process waiting for ever. SIGKILL ends them as multiprocessing means to; they only
    read images."""
    children = [child for child in multiprocessing.active_children() if child.daemon]
    if children:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the loader's handler would take the kill for a crash
    for child in children:
        child.kill()


def loader_options(num_workers, seed, device):
    """DataLoader settings. The loader gets its own generator for the workers' base seed, which otherwise
    comes from the global RNG: a resumed run (whose workers start anew) would then draw different
    --with_random weights than the uninterrupted one. With workers, end_loader_workers runs at exit, before
    multiprocessing's own exit function (registered when multiprocessing was imported: atexit runs the last first)."""
    workers = max(0, num_workers)
    if workers:
        atexit.unregister(end_loader_workers)  # registered once
        atexit.register(end_loader_workers)
    options = dict(num_workers=workers, pin_memory=device.type == 'cuda', persistent_workers=workers > 0,
                   generator=torch.Generator().manual_seed(seed), worker_init_fn=ignore_stop_signals)
    if workers:
        options['prefetch_factor'] = 4  # batches each worker keeps ready
    return options


def epoch_seed(seed, epoch):
    """A distinct seed for every (seed, epoch): an epoch's randomness depends on nothing else, so a resumed
    run repeats exactly what the uninterrupted run would have done."""
    return seed * 1_000_003 + epoch


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


class ShardSampler(Sampler):
    """Evaluation indices rank, rank + num_replicas, ... of a dataset (gather_shards puts them back in order)."""

    def __init__(self, num_samples, rank=0, num_replicas=1):
        self.indices = range(rank, num_samples, num_replicas)

    def __len__(self):
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)


def eval_loader(dataset, batch_size, options):
    """In order; under torch.distributed each process reads its shard (ShardSampler)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), rank, world), **options)


def build_eval_data(data_dicts, dataset_root, transform, min_side, batch_size, options):
    """Items, integer labels (one numbering for query and gallery) and loaders of the evaluation splits."""
    splits = utils.eval_splits(data_dicts, dataset_root)
    eval_items = {split: utils.flatten_split(data_dicts[split]) for split in splits}
    eval_labels = utils.class_indices({split: [key for _, key in items] for split, items in eval_items.items()})
    eval_loaders = {split: eval_loader(utils.EvalReader(dataset_root, items, eval_labels[split], transform, min_side),
                                       batch_size, options)
                    for split, items in eval_items.items()}
    return eval_items, eval_labels, eval_loaders


# ----------------------------------------------------------------------------- the model

def build_model(run, pretrained, branch_impl='auto'):
    """The Model a RunName describes."""
    try:
        return Model(run.meta_class_size, run.ensemble_size, run.share_type, run.model_type, run.with_random,
                     pretrained=pretrained, branch_impl=branch_impl)
    except PretrainedWeightsUnavailable as e:
        raise utils.ReirError(str(e)) from None


def load_model(path, run):
    """The run's model with the weights of path, a state_dict of this Model or of the original REIR's, on the CPU,
    in evaluation mode."""
    model = build_model(run, pretrained=False)
    state = utils.safe_load(path, 'model')
    try:
        if original.is_original_state(state):
            state = original.state_dict_from_original(state, run.share_type)
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError) as e:
        raise utils.ReirError(f'{path}: does not fit the model {run.prefix} describes ({mismatch(e)})') from None
    return model.eval()


def load_state_from_main(model, path):
    """Load the state_dict at path into the (unwrapped) model: read by the main process and sent to the others, which
    need not see the file (another machine's disk)."""
    model = unwrap(model)
    if utils.is_main_process():
        model.load_state_dict(utils.safe_load(path, 'model'))
    if dist.is_initialized():
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)


def mismatch(error):
    """The first line of load_state_dict's error that says what differs, shortened."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = lines[1] if len(lines) > 1 and lines[0].startswith('Error(s) in loading') else lines[0]
    return reason if len(reason) <= 160 else reason[:157] + '...'


def choose_branch_impl(model, flag, device, batch_size, image_size, amp, training=True):
    """Set model.branch_impl from --branch_impl and return the line that says which engine runs and why.
    auto: on CUDA the faster engine in a timed trial on this model and a batch of the run's shape
    (time_branch_impls leaves the model's state and the random streams untouched); on the CPU the loop, which
    measured about twice as fast as grouped convolutions there (benchmark.py branches)."""
    if flag != 'auto':
        model.branch_impl = flag
        return f'branch engine: {flag} (--branch_impl {flag})'
    if device.type != 'cuda':
        model.branch_impl = 'loop'
        return 'branch engine: loop (--branch_impl auto on the CPU, where grouped convolutions measured slower)'
    shape = (batch_size, 3, image_size, image_size)
    images = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    images = images.to(device).contiguous(memory_format=memory_format(device, amp))
    seconds = time_branch_impls(model, images, training, lambda: autocast(device, amp))
    model.branch_impl = min(seconds, key=seconds.get)
    timings = ', '.join(f'{impl} {1000 * value:.1f} ms' for impl, value in seconds.items())
    step = 'training step' if training else 'forward pass'
    return (f'branch engine: {model.branch_impl} (--branch_impl auto, timed on {torch.cuda.get_device_name(device)}: '
            f'{timings} per {step} of {batch_size} images)')


def place_model(model, device, gpu_ids, branch_impl, batch_size, image_size, amp, training=True, compile=False):
    """The model on its device in the memory format of --amp, with its branch engine chosen for the batch each
    device gets (choose_branch_impl; under torch.distributed every process runs rank 0's choice), compiled with
    torch.compile when asked, wrapped for several devices: DistributedDataParallel under torch.distributed,
    DataParallel over several gpu_ids. On CUDA cuDNN times its convolution algorithms for each input shape (a run's
    shapes are fixed) before the engines are timed."""
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    model = model.to(device, memory_format=memory_format(device, amp))
    replica_batch = -(-batch_size // max(1, len(gpu_ids)))  # DataParallel splits the batch over its GPUs
    choice = choose_branch_impl(model, branch_impl, device, replica_batch, image_size, amp, training)
    model.branch_impl = broadcast_from_main(model.branch_impl)
    utils.log(choice)
    if compile:
        problem = compiler_problem(device)
        if problem:
            raise utils.UsageError(f'--compile: {problem}, which torch.compile needs to build its kernels; install '
                                   f'it or leave out --compile')
        model.compile()  # in place: the state_dict keeps its keys
    if dist.is_initialized():
        return nn.parallel.DistributedDataParallel(model, device_ids=gpu_ids or None)
    if len(gpu_ids) > 1:
        utils.log(data_parallel_note(model, gpu_ids))
        return nn.DataParallel(model, device_ids=gpu_ids)
    return model


def compiler_problem(device):
    """What torch.compile lacks on this machine, found before its first step would fail with a traceback: a C++
    compiler for the CPU's kernels; on CUDA Triton, and a C compiler for Triton's launcher. None when nothing."""
    if device.type != 'cuda':
        compiler = os.environ.get('CXX', 'g++')  # inductor's default
        return None if shutil.which(compiler) else f'no C++ compiler {compiler} on the PATH (or in $CXX)'
    if importlib.util.find_spec('triton') is None:
        return 'Triton is not installed'
    compilers = [os.environ['CC']] if os.environ.get('CC') else ['cc', 'gcc', 'clang']
    return None if any(shutil.which(c) for c in compilers) else 'no C compiler (cc, gcc, clang or $CC) on the PATH'


def data_parallel_note(model, gpu_ids):
    """What DataParallel costs every step, and when torchrun is faster."""
    gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 30
    return (f'DataParallel over GPUs {",".join(map(str, gpu_ids))}: every step copies the {gib:.1f} GiB of weights '
            f'from GPU {gpu_ids[0]} to the others and sums the gradients back; where that outweighs the step (small '
            f'batches, GPUs without NVLink) torchrun --nproc_per_node={len(gpu_ids)} train.py ... is faster '
            f'(README: Speed)')


def adam(params, lr, device):
    """The run's Adam: fused into a few kernels on CUDA (the same update, within float tolerance:
    tests/test_step_budget.py), the reference implementation on the CPU, where runs are compared to the byte."""
    return torch.optim.Adam(params, lr=lr, fused=device.type == 'cuda' or None)


def use_adam_kernel(optimizer, device):
    """Choose the kernel of adam for this device again after a state was loaded (a state keeps the kernel of the
    device that saved it)."""
    for group in optimizer.param_groups:
        group['fused'] = device.type == 'cuda' or None
        group['foreach'] = None


# ----------------------------------------------------------------------------- training and evaluation

class Diverged(utils.ReirError):
    """A non-finite loss or embedding: the model's weights are no longer numbers worth keeping."""


def last_feature_side(image_size):
    """Side of a ResNet's last feature map for an image_size input: conv1, the max pool and layer2-4 each
    halve it, rounding up."""
    for _ in range(5):
        image_size = -(-image_size // 2)
    return image_size


def train_step(model, images, labels, optimizer, scaler, amp):
    """One optimizer step on a batch already on the model's device: images (B, 3, S, S), labels (B, E).
    Returns the loss and the float32 logits (B, E, M)."""
    loss, logits = forward_backward(model, images, labels, optimizer, scaler, amp)
    optimizer_step(optimizer, scaler)
    return loss, logits


def forward_backward(model, images, labels, optimizer, scaler, amp):
    """The gradients of train_step's loss (the optimizer's from before are cleared); returns the loss and logits."""
    with autocast(images.device, amp):
        logits = model(images)
    logits = logits.float()
    # cross-entropy of every branch against its own meta-class labels, averaged over branches
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    return loss, logits


def optimizer_step(optimizer, scaler):
    scaler.step(optimizer)
    scaler.update()


def batches_of_every_shard(loader):
    """How many batches every process's shard of an evaluation loader has (ShardSampler's shards differ in length by
    at most one image, so the last batch of a longer shard may have no counterpart)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    return -(-(len(loader.dataset) // world) // loader.batch_size)


@torch.inference_mode()
def extract_features(model, loader, device, amp, stop_requested=None):
    """(N, E * M) float32 CPU embeddings of a loader's images in the dataset's order, and an (N,) bool
    tensor of which images could be read (unreadable ones get a blank image's embedding). The unwrapped model embeds
    (DataParallel would copy every weight to its other GPUs for every batch) and the embeddings stay on the device
    until one copy at the end. Under torch.distributed every process embeds its shard and all receive the whole.
    stop_requested(batch index) is asked after every batch that every process has (it agrees across processes:
    StepCheckpoints.stop_requested); when it is true the embedding stops (utils.StopRequested)."""
    model = unwrap(model)
    model.eval()
    features = torch.empty(len(loader.sampler), model.ensemble_size * model.meta_class_size, device=device)
    readable = torch.empty(len(loader.sampler), dtype=torch.uint8)
    checked = batches_of_every_shard(loader) if stop_requested else 0
    start = 0
    for batch_index, (images, _, batch_readable) in enumerate(batches(loader)):
        with autocast(device, amp):
            logits = model(images.to(device, non_blocking=True, memory_format=memory_format(device, amp)))
        features[start:start + images.shape[0]] = embed(logits.float())
        readable[start:start + images.shape[0]] = batch_readable
        start += images.shape[0]
        if batch_index < checked and stop_requested(batch_index + 1):
            raise utils.StopRequested('a stop signal')
    total = len(loader.dataset)
    return gather_shards(features, total, device).cpu(), gather_shards(readable, total, device).cpu().bool()


def check_recalls(recalls, sizes, queries=''):
    """Refuse, before any work, a K of Recall@K above the number of images a query is ranked against; sizes:
    the number of images of each evaluation split (none: nothing to check); queries names them in the
    message ('validation ')."""
    if not sizes:
        return
    gallery = sizes['test'] - 1 if 'test' in sizes else sizes['gallery']
    too_large = [k for k in recalls if k > gallery]
    if too_large:
        raise utils.UsageError(f'--recalls {too_large[0]} is more than the {gallery} images each {queries}query is '
                               f'ranked against')


def retrieval_scores(features, labels, recalls):
    """Recall@K, MAP@R and R-precision in percent, from features and integer labels by split:
    'test' (every image queries the others) or 'query' and 'gallery'."""
    if 'test' in features:
        queries, query_labels, gallery, gallery_labels = features['test'], labels['test'], None, None
    else:
        queries, query_labels = features['query'], labels['query']
        gallery, gallery_labels = features['gallery'], labels['gallery']
    recall_values, map_r, r_precision = utils.retrieval_metrics(queries, query_labels, recalls, gallery,
                                                                gallery_labels)
    metrics = {f'recall@{k}': 100 * v for k, v in zip(recalls, recall_values)}
    metrics.update({'map@r': 100 * map_r, 'r_precision': 100 * r_precision})
    return metrics


def evaluate(model, loaders, labels, recalls, device, amp, stop_requested=None):
    """Embeds the evaluation splits and scores retrieval; returns (metrics in percent, features by split).
    stop_requested: see extract_features."""
    features = {}
    for split, loader in loaders.items():
        features[split], readable = extract_features(model, loader, device, amp, stop_requested)
        if not readable.all():
            path = loader.dataset.paths[int((~readable).nonzero()[0])]
            raise utils.ReirError(f'evaluation image {path} is unreadable; run data_utils.py again to exclude it')
        if not utils.all_finite(features[split]):
            raise Diverged(f'the {split} embeddings hold NaN or infinite values')
    metrics = retrieval_scores(features, labels, recalls) if utils.is_main_process() else None
    return broadcast_from_main(metrics), features


def format_metrics(metrics, recalls):
    parts = [f'R@{k}: {metrics[f"recall@{k}"]:.2f}%' for k in recalls]
    return ' '.join(parts) + f' | MAP@R: {metrics["map@r"]:.2f}% | R-precision: {metrics["r_precision"]:.2f}%'
