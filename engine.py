"""Running a REIR model: this process's place in a run (devices, torch.distributed and torchrun), mixed precision,
building and placing the model (its branch engine, torch.compile, DataParallel or DistributedDataParallel), the
training step, embedding and retrieval evaluation. train.py, evaluate.py and benchmark.py all run models through
these functions, so that each is written once."""
import argparse
import copy
import importlib.util
import itertools
import os
import shutil
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

import branch_engines
import original
import utils
from loss_choice import LossChoice
from model import Model, PretrainedWeightsUnavailable, embed

DEFAULT_GPU_IDS = '0,1'
# images per batch when embedding (evaluation, databases): sized for throughput; an image's embedding depends on it
# by float rounding only
EVAL_BATCH_SIZE = 128


# ----------------------------------------------------------------------------- devices

def add_embedding_flags(parser):
    """The flags of a script that embeds images with a trained run (evaluate.py, index.py): the settings that change
    an embedding, when the run's files do not say them, and how it runs."""
    parser.add_argument('--image_size', default=None, type=utils.positive_int,
                        help='network input side (default: the run\'s)')
    parser.add_argument('--exact_pipeline', action=argparse.BooleanOptionalAction, default=None,
                        help='decode and resize as the original REIR does, or not (default: as the run did)')
    parser.add_argument('--batch_size', default=EVAL_BATCH_SIZE, type=utils.positive_int,
                        help='images per embedding batch')
    parser.add_argument('--gpu_ids', default=None, help='as in train.py; the model embeds on the first of them')
    parser.add_argument('--num_workers', default=min(8, os.cpu_count() or 1), type=int)
    parser.add_argument('--amp', action='store_true', help='mixed precision on CUDA')


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


@dataclass(frozen=True)
class Process:
    """This process's place in a run: its rank among world processes, the device it trains on, the GPUs of
    DataParallel (none on the CPU), and the torchrun job it belongs to (elastic_job)."""
    rank: int
    world: int
    device: torch.device
    gpu_ids: list
    job: str = ''

    @property
    def main(self):
        return self.rank == 0


def start_process(args):
    """The Process of a run with train.py's flags args: joins torchrun's process group (init_distributed), refuses a
    --batch_size the processes cannot share, takes its devices, refuses --compile where it cannot build its kernels,
    and says where --amp cannot act; before the run claims its files."""
    rank, world, local_rank = init_distributed()
    if args.batch_size % world:
        raise utils.UsageError(f'--batch_size {args.batch_size} is the batch over all {world} processes: '
                               f'make it a multiple of {world}')
    device, gpu_ids = select_process_devices(args.gpu_ids, local_rank, world)
    problem = compiler_problem(device) if args.compile else None
    if problem:
        raise utils.UsageError(f'--compile: {problem}, which torch.compile needs to build its kernels; install it or '
                               f'leave out --compile')
    if args.amp and device.type != 'cuda':
        utils.warn('--amp only acts on CUDA: running in float32')
    return Process(rank, world, device, gpu_ids, elastic_job())


def end_process():
    """Leave torchrun's process group once every process has finished."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


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
    """Reassemble a tensor whose rows rank, rank + G, ... were computed by process rank (loaders.ShardSampler)."""
    if not dist.is_initialized():
        return local
    world = dist.get_world_size()
    size = -(-total // world)
    padded = torch.zeros((size,) + tuple(local.shape[1:]), dtype=local.dtype, device=device)
    padded[:len(local)] = local.to(device)
    shards = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(shards, padded)
    return torch.stack(shards, dim=1).flatten(0, 1)[:total]   # (size, G, ...) -> rows in dataset order


def use_main_buffers(model):
    """Give every process the main process's buffers (batch-norm running statistics): DistributedDataParallel sends
    them only at the start of a training step, so after the last one each process holds its own, and an evaluation
    that every process embeds a shard of would mix as many networks as processes."""
    if dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


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


# ----------------------------------------------------------------------------- the model

def build_model(run, pretrained):
    """The Model a RunName describes, its branches ending in the classifier of the run's loss and its settings."""
    try:
        classifier = LossChoice.parse(run.loss).classifier()
    except ValueError as e:
        raise utils.UsageError(f'{run.prefix}: {e}') from None
    try:
        return Model(run.meta_class_size, run.ensemble_size, run.share_type, run.model_type, run.with_random,
                     pretrained=pretrained, classifier=classifier)
    except PretrainedWeightsUnavailable as e:
        raise utils.ReirError(str(e)) from None


def training_model(run, args, process):
    """(the model as it trains, the model itself): the Model of the run, with the same initial weights in every process
    (drawn from --seed), on the process's devices and wrapped for several (place_model), its branch engine chosen for
    the batch each process trains on."""
    utils.set_seed(args.seed)
    model = build_model(run, pretrained=not args.no_pretrained)
    wrapped = place_model(model, process, (args.batch_size // process.world, args.image_size), args.amp,
                          args.branch_impl, compile=args.compile)
    return wrapped, model


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


def choose_branch_engine(model, flag, device, batch, amp, training=True):
    """Set the model's branch engine from --branch_impl (branch_engines.choose, on a random batch of shape batch =
    (images, image side) on the device) and return the line that says which engine runs and why."""
    images = torch.randn((batch[0], 3, batch[1], batch[1]), generator=torch.Generator().manual_seed(0))
    images = images.to(device).contiguous(memory_format=memory_format(device, amp))
    try:
        return branch_engines.choose(model, flag, images, training, lambda: autocast(device, amp), amp)
    except branch_engines.EngineRefused as e:
        raise utils.UsageError(str(e)) from None


def place_model(model, process, batch, amp, branch_impl='auto', training=True, compile=False):
    """The model on the process's device in the memory format of --amp, with its branch engine chosen for the batch
    (images a step, image side) each device gets (choose_branch_engine; under torch.distributed every process runs
    rank 0's choice), compiled with torch.compile when asked, wrapped for several devices: DistributedDataParallel
    under torch.distributed, DataParallel over several GPUs. On CUDA cuDNN times its convolution algorithms for each
    input shape (a run's shapes are fixed) before the engines are timed."""
    device, gpu_ids = process.device, process.gpu_ids
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    model = model.to(device, memory_format=memory_format(device, amp))
    replica_batch = -(-batch[0] // max(1, len(gpu_ids)))  # DataParallel splits the batch over its GPUs
    choice = choose_branch_engine(model, branch_impl, device, (replica_batch, batch[1]), amp, training)
    model.branch_engine = branch_engines.ENGINES[broadcast_from_main(branch_engines.engine_name(model))]
    utils.log(choice)
    if compile:  # start_process checked that the compiler is there
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


def training_loss(args, num_classes, loader, device):
    """The loss of --loss (loss_choice.LossChoice) that a run on num_classes training classes trains with, on the
    device, once it has computed a loss and its gradient on the classes of every process's first batch of the training
    loader: a loss that cannot (a library loss that needs several images of a class in a batch, or inputs other than
    labelled embeddings) is refused with one line before anything is written, and one that gives no gradient there
    (a loss of pairs of a class, on a batch without two images of one) is warned of."""
    try:
        criterion = LossChoice.parse(args.loss).build(args.ensemble_size, args.meta_class_size, num_classes)
    except Exception as e:  # a library loss's constructor checks its settings with its own exceptions
        raise utils.UsageError(f'--loss {args.loss}: {type(e).__name__}: {first_line(e)}') from None
    criterion = criterion.to(device)
    labels = [loader.dataset.targets[index] for index, _ in itertools.islice(loader.sampler, loader.batch_size)]
    problems = [p for p in gather_objects(loss_problem(criterion, labels, args, device)) if p]
    if problems and problems[0].startswith('no gradient'):
        utils.warn(f'--loss {args.loss} gives {problems[0]}: losses that compare images of a class need several of '
                   f'one in a batch (--m_per_class)')
    elif problems:
        pairs = [index // 2 for index in range(len(labels))]  # a batch of groups of 2 images of a class
        grouped = not args.m_per_class and loss_problem(criterion, pairs, args, device) is None
        raise utils.UsageError(f'--loss {args.loss} cannot train on this run\'s batches ({problems[0]})'
                               + ('; it trains on batches of groups of images of a class: pass --m_per_class'
                                  if grouped else ''))
    return criterion


def loss_problem(criterion, labels, args, device):
    """Why the loss cannot train on a batch of these class indices, or None: it fails on random logits, or gives
    them no gradient. Tried on a copy, with the random streams forked: the run's loss and draws are untouched."""
    generator = torch.Generator().manual_seed(0)
    shape = (len(labels), args.ensemble_size, args.meta_class_size)
    logits = torch.randn(shape, generator=generator).to(device).requires_grad_()
    meta_labels = torch.randint(args.meta_class_size, shape[:2], generator=generator).to(device)
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        try:
            copy.deepcopy(criterion)(logits, meta_labels, torch.tensor(labels, device=device)).backward()
        except Exception as e:  # whatever a library loss raises on inputs it cannot take
            return f'{type(e).__name__}: {first_line(e)}'
    if logits.grad is None or not logits.grad.any():
        return f'no gradient on the first batch of {len(labels)} images of {len(set(labels))} classes'
    return None


def first_line(error):
    lines = str(error).strip().splitlines()
    return lines[0] if lines else 'no message'


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


class EpochSums:
    """The running sums of an epoch's training steps in this process, kept on the device so that a step waits for
    nothing: the loss times the images and the correct meta-class labels (in float64, as the sums of Python floats
    they replace), the step and value of the first non-finite loss; with the images seen and skipped. start: (steps
    done, [loss sum, correct labels, images, skipped images]) where the epoch continues; steps: the epoch's; every
    image has ensemble_size labels. read() brings the sums to the host (a sync), raising Diverged once a loss was not
    finite."""

    def __init__(self, start, steps, ensemble_size, device):
        done, (loss_sum, correct, self.seen, self.skipped) = start
        self.steps, self.ensemble_size, self.device = steps, ensemble_size, device
        self.sums = torch.tensor([loss_sum, correct], dtype=torch.float64, device=device)
        self.diverged = torch.zeros(2, dtype=torch.float64, device=device)  # (step, loss) of the first non-finite loss

    def add(self, step, loss, correct, images, failures):
        """Step `step`'s loss and correct labels (device tensors) over `images` images, failures the loader's (CPU)
        count of unreadable images replaced."""
        loss = loss.detach().double()
        first = self.diverged[0].eq(0) & ~torch.isfinite(loss)
        self.diverged = torch.where(first, torch.stack([torch.full_like(loss, step), loss]), self.diverged)
        self.sums += torch.stack([loss * images, correct.double()])
        self.seen += images
        self.skipped += failures.sum()  # a CPU tensor: adding it waits for nothing

    def read(self):
        """[loss sum, correct labels, images, skipped images] of this process so far."""
        (loss_sum, correct), (step, loss) = torch.stack([self.sums, self.diverged]).tolist()
        if step:
            raise Diverged(f'the loss is {loss} at step {int(step)} of {self.steps}')
        return [loss_sum, int(correct), self.seen, int(self.skipped)]

    def means(self):
        """The mean loss and accuracy so far, for a progress bar."""
        loss_sum, correct, seen, _ = self.read()
        loss, accuracy = self.mean_of(loss_sum, correct, seen)
        return {'loss': f'{loss:.4f}', 'acc': f'{accuracy:.2f}%'}

    def mean_of(self, loss_sum, correct, seen):
        """(mean loss, accuracy in percent) of running sums."""
        return loss_sum / seen, 100 * correct / (seen * self.ensemble_size)

    def snapshot(self):
        """The running sums after the latest step, kept on the device (a copy), for a log that reads those of many
        steps at once (means_of)."""
        return self.sums.clone(), self.seen

    def means_of(self, snapshots):
        """[(mean loss, accuracy in percent)] of snapshots, read in one host sync."""
        sums = torch.stack([sums for sums, _ in snapshots]).tolist()
        return [self.mean_of(loss_sum, correct, seen) for (loss_sum, correct), (_, seen) in zip(sums, snapshots)]

    def epoch_stats(self):
        """The epoch's mean loss, accuracy in percent and skipped images over every process, and this process's
        steps and sums (where a stop before the epoch's files continues)."""
        sums = self.read()
        total_loss, correct, seen, skipped = all_reduce_sum(sums, self.device)
        return {'loss': total_loss / seen, 'accuracy': 100 * correct / (seen * self.ensemble_size),
                'skipped': int(skipped), 'steps': self.steps, 'sums': sums}


def train_step(model, trainable, batch, codes, amp):
    """One optimizer step of the run's loss (trainable: its loss, optimizer and gradient scaler) on a batch of images
    (B, 3, S, S) and their class indices (B,), every branch trained on the image's class's meta-class: codes (C, E),
    the meta-class ids transposed, on the model's device. Returns the loss and the number of correct meta-class
    predictions, on the device (nothing is read back)."""
    images, labels = batch
    device = codes.device
    images = images.to(device, non_blocking=True, memory_format=memory_format(device, amp))
    labels = labels.to(device, non_blocking=True)                                  # (B,)
    meta_labels = codes[labels]                                                    # (B, E)
    loss, logits = forward_backward(model, trainable['loss'], (images, labels, meta_labels), trainable['optimizer'],
                                    trainable['scaler'], amp)                      # logits (B, E, M)
    optimizer_step(trainable['optimizer'], trainable['scaler'])
    return loss, (logits.argmax(-1) == meta_labels).sum()


def forward_backward(model, criterion, batch, optimizer, scaler, amp):
    """The gradients of the loss criterion(logits, meta_labels, labels) of a batch (images, labels, meta_labels) on the
    model's device (the optimizer's from before are cleared); returns the loss and the float32 logits.
    Under torch.distributed the loss's own parameters get the gradients averaged over the processes, as
    DistributedDataParallel averages the model's."""
    images, labels, meta_labels = batch
    with autocast(images.device, amp):
        logits = model(images)
    logits = logits.float()
    loss = criterion(logits, meta_labels, labels)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if dist.is_initialized():
        for parameter in criterion.parameters():
            if parameter.grad is not None:
                dist.all_reduce(parameter.grad)
                parameter.grad /= dist.get_world_size()
    return loss, logits


def optimizer_step(optimizer, scaler):
    scaler.step(optimizer)
    scaler.update()


def batches_of_every_shard(loader):
    """How many batches every process's shard of an evaluation loader has (loaders.ShardSampler's shards differ in
    length by at most one image, so the last batch of a longer shard may have no counterpart)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    return -(-(len(loader.dataset) // world) // loader.batch_size)


def extract_features(model, loader, device, amp, stop_requested=None):
    """(N, E * M) float32 CPU embeddings of a loader's images in the dataset's order, and an (N,) bool
    tensor of which images could be read (unreadable ones get a blank image's embedding). The unwrapped model embeds
    (DataParallel would copy every weight to its other GPUs for every batch) and the embeddings stay on the device
    until one copy at the end. Under torch.distributed every process embeds its shard, with the main process's
    buffers, and all receive the whole.
    stop_requested(batch index) is asked after every batch that every process has (it agrees across processes:
    resume.Checkpointer.stop_requested); when it is true the embedding stops (utils.StopRequested)."""
    model = unwrap(model)
    model.eval()
    use_main_buffers(model)  # the embeddings of every shard come from the model rank 0 saves
    features = torch.empty(len(loader.sampler), model.ensemble_size * model.meta_class_size, device=device)
    readable = torch.empty(len(loader.sampler), dtype=torch.uint8)
    checked = batches_of_every_shard(loader) if stop_requested else 0
    start = 0
    for batch_index, (images, _, batch_readable) in enumerate(loader):
        features[start:start + images.shape[0]] = embed_batch(model, images, device, amp)
        readable[start:start + images.shape[0]] = batch_readable
        start += images.shape[0]
        if batch_index < checked and stop_requested(batch_index + 1):
            raise utils.StopRequested('a stop signal')
    total = len(loader.dataset)  # gathered outside inference mode, whose tensors gloo cannot receive into (torch 2.4)
    return gather_shards(features, total, device).cpu(), gather_shards(readable, total, device).cpu().bool()


def embed_batch(model, images, device, amp):
    """(B, E * M) float32 embeddings, on device, of a batch of images by an unwrapped model in evaluation mode."""
    with torch.inference_mode(), autocast(device, amp):
        logits = model(images.to(device, non_blocking=True, memory_format=memory_format(device, amp)))
        return embed(logits.float())


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


def evaluate(model, split_loaders, labels, recalls, device, amp, stop_requested=None):
    """Embeds the evaluation splits and scores retrieval; returns (metrics in percent, features by split).
    stop_requested: see extract_features."""
    features = {}
    for split, loader in split_loaders.items():
        features[split], readable = extract_features(model, loader, device, amp, stop_requested)
        if not readable.all():
            path = loader.dataset.paths[int((~readable).nonzero()[0])]
            raise utils.ReirError(f'evaluation image {path} is unreadable; run data_utils.py again to exclude it')
        if not utils.all_finite(features[split]):
            raise Diverged(f'the {split} embeddings hold NaN or infinite values')
    metrics = retrieval_scores(features, labels, recalls) if utils.is_main_process() else None
    return broadcast_from_main(metrics), features


def evaluate_epoch(model, data, args, device, stop_requested=None):
    """A run's evaluation of its model: ({'test': metrics, and 'val': metrics of the held-out classes where the run
    has some}, features by database split: 'test' or 'query' and 'gallery', and 'val'); data: loaders.RunData.
    stop_requested: see extract_features."""
    _, labels, split_loaders = data.test
    metrics, features = evaluate(model, split_loaders, labels, args.recalls, device, args.amp, stop_requested)
    if data.val is None:
        return {'test': metrics}, features
    _, labels, split_loaders = data.val
    try:
        val_metrics, val_features = evaluate(model, split_loaders, labels, args.recalls, device, args.amp,
                                             stop_requested)
    except Diverged:
        raise Diverged('the validation embeddings hold NaN or infinite values') from None
    return {'test': metrics, 'val': val_metrics}, {**features, 'val': val_features['test']}
