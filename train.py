"""Train REIR, evaluating retrieval after every epoch.

    python train.py --data_name cub --crop_type cropped
    python train.py --data_name demo --no_pretrained --lr 1e-3 --image_size 64 --share_type layer4 \
        --ensemble_size 12 --batch_size 32 --num_epochs 8
    torchrun --nproc_per_node=4 train.py --data_name sop --batch_size 40

Writes results/<prefix>_results.csv (a row per epoch), <prefix>_model.pth and <prefix>_data_base.pth
(at the best test Recall@K for the first K of --recalls), <prefix>_checkpoint.pth (every epoch, for
--resume) and the meta-class ids; <prefix> names the run's settings (utils.run_prefix).
"""
import argparse
import os
import sys

import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

import utils
from model import (BACKBONES, BRANCH_IMPLS, SHARE_TYPES, Model, PretrainedWeightsUnavailable, embed,
                   time_branch_impls)

LR_MILESTONES = (0.5, 0.7)  # fractions of the epochs where the learning rate drops
LR_GAMMA = 0.1
DEFAULT_GPU_IDS = '0,1'
# flags that may differ between a run and its --resume without changing what the run computes (the
# branch engines compute the same function and share one checkpoint layout)
RESUME_FREE_FLAGS = ('resume', 'num_workers', 'gpu_ids', 'load_ids', 'data_path', 'results_dir', 'branch_impl')
CHECKPOINT_KEYS = ('model', 'optimizer', 'scheduler', 'scaler', 'epoch', 'best_recall', 'results', 'args', 'ids',
                   'train_items')


class UsageError(utils.ReirError):
    """A flag, or a combination of flags, that cannot work: exit code 2, as for argparse errors."""


# ----------------------------------------------------------------------------- arguments

def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not an integer') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'{value} is below 1')
    return value


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f'{value} is not above 0')
    return value


def recall_list(text):
    try:
        values = [int(k) for k in text.split(',')]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f'{text!r} is not a comma-separated list of positive integers')
    return values


def get_args_parser():
    parser = argparse.ArgumentParser(description='Train a REIR randomized ensemble for image retrieval')
    parser.add_argument('--data_path', default='data', help='folder of prepared datasets (data_utils.py)')
    parser.add_argument('--data_name', default='car',
                        help='car, cub, sop, isc, demo, or any dataset prepared under --data_path')
    parser.add_argument('--crop_type', default='uncropped', choices=utils.CROP_TYPES,
                        help='cropped: bounding-box crops (car and cub only)')
    parser.add_argument('--label_type', default='fixed', choices=utils.LABEL_TYPES,
                        help='fixed: balanced meta-classes with a distinct code per class; random: uniform')
    parser.add_argument('--recalls', default='1,2,4,8', type=recall_list,
                        help='K of Recall@K, comma-separated; the first K selects the best model')
    parser.add_argument('--model_type', default='resnet18', choices=list(BACKBONES))
    parser.add_argument('--share_type', default='layer1', choices=SHARE_TYPES,
                        help='last backbone stage shared by all branches (none: separate networks)')
    parser.add_argument('--with_random', action='store_true',
                        help='scale the shared feature per branch by softmax(rand(E)) in training')
    parser.add_argument('--load_ids', action='store_true',
                        help='reuse the meta-class ids saved under results/ instead of drawing new ones')
    parser.add_argument('--batch_size', default=10, type=positive_int, help='images per step (all GPUs together)')
    parser.add_argument('--num_epochs', default=20, type=positive_int)
    parser.add_argument('--lr', default=1e-4, type=positive_float,
                        help='Adam learning rate (the original 1e-4 suits ImageNet weights; from scratch try 1e-3)')
    parser.add_argument('--ensemble_size', default=48, type=positive_int, help='branches E')
    parser.add_argument('--meta_class_size', default=12, type=positive_int, help='meta-classes M per branch')
    parser.add_argument('--gpu_ids', default=None,
                        help=f'comma-separated GPU ids (default {DEFAULT_GPU_IDS}: those of them present), '
                             f'DataParallel over several; "cpu" for the CPU')
    parser.add_argument('--image_size', default=256, type=positive_int, help='side of the network input')
    parser.add_argument('--seed', default=1, type=int, help='seeds ids, sampling, shuffling, augmentation')
    parser.add_argument('--num_workers', default=min(8, os.cpu_count() or 1), type=int,
                        help='DataLoader worker processes')
    parser.add_argument('--no_pretrained', action='store_true', help='start from random weights, not ImageNet')
    parser.add_argument('--exact_pipeline', action='store_true',
                        help='decode JPEGs whole and resize then crop, as the original REIR does (slower); by '
                             'default large JPEGs are decoded at reduced scale and only the kept region resized')
    parser.add_argument('--amp', action='store_true',
                        help='mixed precision on CUDA (bf16, or fp16 with loss scaling where bf16 is unsupported)')
    parser.add_argument('--branch_impl', default='auto', choices=BRANCH_IMPLS,
                        help='run the branches one by one (loop) or as grouped convolutions (grouped); auto: '
                             'on CUDA the faster in a timed trial before training, on the CPU the loop. Same '
                             'parameters and checkpoints either way')
    parser.add_argument('--resume', action='store_true',
                        help='continue the run with these flags from its last completed epoch')
    parser.add_argument('--results_dir', default=utils.RESULTS_DIR, help='where the run writes its files')
    return parser


def prefix_of(args):
    return utils.run_prefix(args.data_name, args.crop_type, args.label_type, args.with_random, args.share_type,
                            args.model_type, args.ensemble_size, args.meta_class_size)


def output_path(args, kind):
    return os.path.join(args.results_dir, f'{prefix_of(args)}_{kind}')


# ----------------------------------------------------------------------------- devices

def select_devices(gpu_ids):
    """(device, GPU ids for DataParallel). gpu_ids None is the default: the GPUs among 0,1 that exist."""
    if gpu_ids is not None and gpu_ids.strip().lower() == 'cpu':
        return torch.device('cpu'), []
    try:
        requested = [int(i) for i in (gpu_ids or DEFAULT_GPU_IDS).split(',')]
    except ValueError:
        raise UsageError(f'--gpu_ids {gpu_ids!r} is not a comma-separated list of GPU ids or "cpu"') from None
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = [i for i in requested if not 0 <= i < available]
    if gpu_ids is not None and missing:
        raise utils.ReirError(f'--gpu_ids {gpu_ids}: GPU {",".join(map(str, missing))} is not there '
                              f'({available} CUDA devices visible); name existing GPUs or pass --gpu_ids cpu')
    present = [i for i in requested if i not in missing]
    if not present:
        warn('CUDA is not available: training on the CPU, which is slow for full datasets')
        return torch.device('cpu'), []
    if missing:
        warn(f'GPU {",".join(map(str, missing))} of the default --gpu_ids {DEFAULT_GPU_IDS} is not there: '
             f'using {",".join(map(str, present))}')
    return torch.device(f'cuda:{present[0]}'), present


def warn(message):
    if is_main_process():
        print(f'warning: {message}', file=sys.stderr)


def log(message):
    if is_main_process():
        print(message, flush=True)


# ----------------------------------------------------------------------------- torch.distributed

def init_distributed():
    """(rank, world size, local rank): joins the process group when started by torchrun with several
    processes (NCCL on CUDA, gloo on the CPU), else (0, 1, 0)."""
    if int(os.environ.get('WORLD_SIZE', 1)) <= 1:
        return 0, 1, 0
    dist.init_process_group('nccl' if torch.cuda.is_available() else 'gloo')
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get('LOCAL_RANK', 0))


def is_main_process():
    return not dist.is_initialized() or dist.get_rank() == 0


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
    return torch.stack(shards, dim=1).flatten(0, 1)[:total].cpu()   # (size, G, ...) -> rows in dataset order


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


def memory_format(device, amp):
    """channels_last lets mixed-precision convolutions use tensor cores without layout conversions."""
    return torch.channels_last if amp and device.type == 'cuda' else torch.preserve_format


def autocast(device, enabled):
    if not enabled or device.type != 'cuda':
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast('cuda', dtype=dtype)


# ----------------------------------------------------------------------------- data

def load_data_dicts(args):
    path = utils.data_dicts_path(args.data_path, args.data_name, args.crop_type)
    if args.crop_type == 'cropped' and args.data_name not in ('car', 'cub') and not os.path.isfile(path):
        raise UsageError(f'--crop_type cropped needs bounding boxes, which only car and cub have; '
                         f'use --crop_type uncropped for {args.data_name}')
    if args.data_name == 'demo' and not os.path.isfile(path) and is_main_process():
        import data_utils
        for line in data_utils.prepare(args.data_path, 'demo', max(1, args.num_workers)):
            print(line)
    if dist.is_initialized():
        dist.barrier()  # the others wait for the main process to prepare the demo
    if not os.path.isfile(path):
        raise utils.ReirError(f'{path} not found: download {args.data_name} into '
                              f'{os.path.join(args.data_path, args.data_name)}/ and run '
                              f'python data_utils.py --data_path {args.data_path} --data_name {args.data_name}')
    return utils.safe_load(path, 'data dicts')


def epoch_seed(seed, epoch):
    """A distinct seed for every (seed, epoch): an epoch's randomness depends on nothing else, so a resumed
    run repeats exactly what the uninterrupted run would have done."""
    return seed * 1_000_003 + epoch


class SeededSampler(Sampler):
    """Shuffles from (seed, epoch) and gives every sample its own augmentation seed, so that an epoch's
    batches and augmentations do not depend on the number of workers, or on a resume. Under
    torch.distributed each of num_replicas processes takes every num_replicas-th sample of the shuffled
    order (padded by its first samples to a multiple of num_replicas), as DistributedSampler does."""

    def __init__(self, num_samples, seed, rank=0, num_replicas=1):
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0
        self.rank, self.num_replicas = rank, num_replicas

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return -(-self.num_samples // self.num_replicas)

    def __iter__(self):
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(self.num_samples, generator=generator)
        seeds = torch.randint(2 ** 62, (self.num_samples,), generator=generator)
        padding = len(self) * self.num_replicas - self.num_samples
        order, seeds = torch.cat([order, order[:padding]]), torch.cat([seeds, seeds[:padding]])
        return iter(zip(order[self.rank::self.num_replicas].tolist(), seeds[self.rank::self.num_replicas].tolist()))


class ShardSampler(Sampler):
    """Evaluation indices rank, rank + num_replicas, ... of a dataset (gather_shards puts them back in order)."""

    def __init__(self, num_samples, rank=0, num_replicas=1):
        self.indices = range(rank, num_samples, num_replicas)

    def __len__(self):
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)


class TrainReader(utils.ImageReader):
    """Training images with their (E,) meta-class labels. An image that cannot be read is replaced by
    the next readable one (with a warning naming it) and counted, so one bad file never stops an epoch."""

    def __getitem__(self, item):
        index, seed = item
        failures = 0
        for offset in range(len(self)):
            path = self.paths[(index + offset) % len(self)]
            try:
                image = utils.load_rgb(path, self.min_side)
            except (OSError, SyntaxError, ValueError) as e:
                warn(f'skipping unreadable training image {path} ({type(e).__name__})')
                failures += 1
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                image = self.transform(image)
            return image, self.targets[(index + offset) % len(self)], failures
        raise utils.ReirError('no training image is readable')


class EvalReader(utils.ImageReader):
    """Evaluation images with their class index and whether they could be read (the main process
    names an unreadable one; an exception raised in a worker would arrive as a traceback)."""

    def __getitem__(self, index):
        try:
            image = utils.load_rgb(self.paths[index], self.min_side)
        except (OSError, SyntaxError, ValueError):
            return self.transform(Image.new('RGB', (1, 1))), self.targets[index], False
        return self.transform(image), self.targets[index], True


def build_eval_data(data_dicts, dataset_root, transform, min_side, batch_size, options):
    """Items, integer labels (one numbering for query and gallery) and loaders of the evaluation splits."""
    eval_items = {split: utils.flatten_split(data_dicts[split]) for split in utils.eval_splits(data_dicts)}
    class_index = {key: i for i, key in enumerate(sorted({k for items in eval_items.values() for _, k in items}))}
    eval_labels = {split: [class_index[k] for _, k in items] for split, items in eval_items.items()}
    eval_loaders = {split: eval_loader(EvalReader(dataset_root, items, eval_labels[split], transform, min_side),
                                       batch_size, options)
                    for split, items in eval_items.items()}
    return eval_items, eval_labels, eval_loaders


def eval_loader(dataset, batch_size, options):
    """In order; under torch.distributed each process reads its shard (ShardSampler)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), rank, world), **options)


def loader_options(num_workers, seed, device):
    """DataLoader settings. The loader gets its own generator for the workers' base seed, which otherwise
    comes from the global RNG: a resumed run (whose workers start anew) would then draw different
    --with_random weights than the uninterrupted one."""
    workers = max(0, num_workers)
    options = dict(num_workers=workers, pin_memory=device.type == 'cuda', persistent_workers=workers > 0,
                   generator=torch.Generator().manual_seed(seed))
    if workers:
        options['prefetch_factor'] = 4  # batches each worker keeps ready
    return options


# ----------------------------------------------------------------------------- one epoch

def train_one_epoch(model, loader, optimizer, scaler, device, amp, description):
    """One pass over the training list; returns mean loss, accuracy in percent and skipped images."""
    model.train()
    total_loss, correct, seen, skipped = 0.0, 0, 0, 0
    progress = tqdm(loader, desc=description, dynamic_ncols=True, file=sys.stderr, disable=not is_main_process())
    for images, labels, failures in progress:
        images = images.to(device, non_blocking=True, memory_format=memory_format(device, amp))
        labels = labels.to(device, non_blocking=True)            # (B, E)
        with autocast(device, amp):
            logits = model(images)                                # (B, E, M)
        logits = logits.float()
        # cross-entropy of every branch against its own meta-class labels, averaged over branches
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

        total_loss += loss.item() * images.shape[0]
        correct += (logits.argmax(-1) == labels).sum().item()
        seen += images.shape[0]
        skipped += int(failures.sum())
        progress.set_postfix(loss=f'{total_loss / seen:.4f}', acc=f'{100 * correct / (seen * labels.shape[1]):.2f}%')
    total_loss, correct, seen, skipped = all_reduce_sum([total_loss, correct, seen, skipped], device)
    ensemble_size = unwrap(model).ensemble_size
    return {'loss': total_loss / seen, 'accuracy': 100 * correct / (seen * ensemble_size), 'skipped': int(skipped)}


@torch.inference_mode()
def extract_features(model, loader, device, amp):
    """(N, E * M) float32 CPU embeddings of a loader's images in the dataset's order, and an (N,) bool
    tensor of which images could be read (unreadable ones get a blank image's embedding). Under
    torch.distributed every process embeds its shard and all receive the whole."""
    model.eval()
    base = unwrap(model)
    features = torch.empty(len(loader.sampler), base.ensemble_size * base.meta_class_size)
    readable = torch.empty(len(loader.sampler), dtype=torch.uint8)
    start = 0
    for images, _, batch_readable in loader:
        with autocast(device, amp):
            logits = model(images.to(device, non_blocking=True, memory_format=memory_format(device, amp)))
        batch = embed(logits.float()).cpu()
        features[start:start + batch.shape[0]] = batch
        readable[start:start + batch.shape[0]] = batch_readable
        start += batch.shape[0]
    total = len(loader.dataset)
    return gather_shards(features, total, device), gather_shards(readable, total, device).bool()


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


def evaluate(model, loaders, labels, recalls, device, amp):
    """Embeds the evaluation splits and scores retrieval; returns (metrics in percent, features by split)."""
    features = {}
    for split, loader in loaders.items():
        features[split], readable = extract_features(model, loader, device, amp)
        if not readable.all():
            path = loader.dataset.paths[int((~readable).nonzero()[0])]
            raise utils.ReirError(f'evaluation image {path} is unreadable; run data_utils.py again to exclude it')
    metrics = retrieval_scores(features, labels, recalls) if is_main_process() else None
    return broadcast_from_main(metrics), features


def embed_train_split(model, data_dicts, dataset_root, transform, min_side, batch_size, options, device, amp):
    """Every training image (not only the sampled list) and its embedding, for the database;
    unreadable images are left out with a warning."""
    items = utils.flatten_split(data_dicts['train'])
    loader = eval_loader(EvalReader(dataset_root, items, [0] * len(items), transform, min_side), batch_size, options)
    features, readable = extract_features(model, loader, device, amp)
    if not readable.all():
        warn(f'{int((~readable).sum())} unreadable training images left out of the embedding database')
    return [item for item, ok in zip(items, readable.tolist()) if ok], features[readable]


def unwrap(model):
    return model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model


def format_metrics(metrics, recalls):
    parts = [f'R@{k}: {metrics[f"recall@{k}"]:.2f}%' for k in recalls]
    return ' '.join(parts) + f' | MAP@R: {metrics["map@r"]:.2f}% | R-precision: {metrics["r_precision"]:.2f}%'


def write_results_csv(results, path):
    frame = pd.DataFrame(results)
    utils.atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def save_curves(results, path):
    """results/<prefix>_curves.png: loss, training accuracy and the test metrics over the epochs."""
    import matplotlib
    matplotlib.use('Agg')
    from matplotlib import pyplot as plt
    frame = pd.DataFrame(results)
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = (('train loss', ['train_loss']), ('train accuracy (%)', ['train_accuracy']),
              ('test retrieval (%)', [c for c in frame.columns if c.startswith('test_')]))
    for axis, (title, columns) in zip(axes, panels):
        for column in columns:
            axis.plot(frame['epoch'], frame[column], marker='o', label=column.removeprefix('test_'))
        axis.set_title(title)
        axis.set_xlabel('epoch')
        axis.grid(alpha=0.3)
        if len(columns) > 1:
            axis.legend(fontsize='small')
    figure.tight_layout()
    utils.atomic_write(path, lambda tmp: figure.savefig(tmp, format='png', dpi=80))
    plt.close(figure)


def save_database(path, items_by_split, features_by_split, dataset_root):
    """The embedding database for inference: image paths (from the repository root), class keys and
    float16 features per split."""
    database = {}
    for split, items in items_by_split.items():
        database[f'{split}_images'] = [os.path.join(dataset_root, p) for p, _ in items]
        database[f'{split}_labels'] = [key for _, key in items]
        database[f'{split}_features'] = features_by_split[split].half()
    utils.atomic_torch_save(database, path)


# ----------------------------------------------------------------------------- the run

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


def build_model(args, pretrained):
    try:
        return Model(args.meta_class_size, args.ensemble_size, args.share_type, args.model_type, args.with_random,
                     pretrained=pretrained, branch_impl=getattr(args, 'branch_impl', 'auto'))
    except PretrainedWeightsUnavailable as e:
        raise utils.ReirError(str(e)) from None


def load_checkpoint(path, args):
    if not os.path.isfile(path):
        raise utils.ReirError(f'--resume: no checkpoint {path}; run once without --resume')
    checkpoint = utils.safe_load(path, 'checkpoint')
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise utils.ReirError(f'{path}: not a REIR checkpoint (missing {", ".join(missing)}); delete it and start '
                              f'again without --resume')
    check_resume_flags(checkpoint['args'], args)
    return checkpoint


def check_resume_flags(saved_args, args):
    differing = [f'--{name} {saved_args.get(name)!r} -> {value!r}' for name, value in sorted(vars(args).items())
                 if name not in RESUME_FREE_FLAGS and saved_args.get(name) != value]
    if differing:
        raise UsageError(f'--resume with flags that differ from the checkpoint\'s: {"; ".join(differing)}')


def draw_or_load_ids(args, num_class, generator):
    path = utils.ids_path(args.results_dir, args.data_name, args.crop_type, args.label_type,
                          args.ensemble_size, args.meta_class_size)
    expected = (args.ensemble_size, num_class)
    if args.load_ids:
        ids = utils.safe_load(path, 'meta-class ids')
        if not isinstance(ids, torch.Tensor) or tuple(ids.shape) != expected:
            shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise utils.ReirError(f'{path}: ids of shape {shape} do not fit --ensemble_size {args.ensemble_size} '
                                  f'and {num_class} training classes (expected {expected})')
        return ids.long()
    try:
        ids = utils.create_id(args.meta_class_size, num_class, args.ensemble_size, args.label_type, generator)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if is_main_process():
        utils.atomic_torch_save(ids, path)
    return ids


def select_run_devices(args, local_rank, world):
    """Under torchrun one device per process (cuda:LOCAL_RANK, else the CPU); otherwise --gpu_ids."""
    if world == 1:
        return select_devices(args.gpu_ids)
    if args.gpu_ids is not None:
        warn('--gpu_ids is ignored under torchrun: each process uses the GPU of its LOCAL_RANK')
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device(f'cuda:{local_rank}'), [local_rank]
    return torch.device('cpu'), []


def main(args):
    rank, world, local_rank = init_distributed()
    if args.batch_size % world:
        raise UsageError(f'--batch_size {args.batch_size} is the batch over all {world} processes: make it a '
                         f'multiple of {world}')
    device, gpu_ids = select_run_devices(args, local_rank, world)
    if args.amp and device.type != 'cuda':
        warn('--amp only acts on CUDA: running in float32')
    os.makedirs(args.results_dir, exist_ok=True)
    checkpoint_path = output_path(args, 'checkpoint.pth')
    if is_main_process():
        utils.remove_stale_temporaries(args.results_dir, prefix_of(args))
    checkpoint = load_checkpoint(checkpoint_path, args) if args.resume else None

    # ------------------------------------------------------------------ data
    data_dicts = load_data_dicts(args)
    dataset_root = os.path.join(args.data_path, args.data_name)
    train_classes = sorted(data_dicts['train'])
    generator = torch.Generator().manual_seed(args.seed)
    if checkpoint is not None:
        ids, train_items = checkpoint['ids'], [tuple(item) for item in checkpoint['train_items']]
    else:
        ids = draw_or_load_ids(args, len(train_classes), generator)
        train_items = utils.sample_train_images(data_dicts['train'], generator)
    mean, std = data_dicts['mean'], data_dicts['std']
    train_transform, min_side = utils.input_pipeline(args.crop_type, True, args.image_size, mean, std,
                                                     args.exact_pipeline)
    train_set = TrainReader(dataset_root, train_items, [ids[:, c] for _, c in train_items], train_transform,
                            min_side)
    sampler = SeededSampler(len(train_set), args.seed, rank, world)
    options = loader_options(args.num_workers, args.seed, device)
    batch_size = args.batch_size // world  # per process
    train_loader = DataLoader(train_set, batch_size=batch_size, sampler=sampler, **options)

    test_transform, _ = utils.input_pipeline(args.crop_type, False, args.image_size, mean, std, args.exact_pipeline)
    eval_items, eval_labels, eval_loaders = build_eval_data(data_dicts, dataset_root, test_transform, min_side,
                                                            batch_size, options)
    log(f'{args.data_name}: {len(train_classes)} training classes, {len(train_items)} training images, '
        + ', '.join(f'{len(items)} {split} images' for split, items in eval_items.items())
        + (f'; {world} processes of {batch_size} images a step' if world > 1 else ''))

    # ------------------------------------------------------------------ model
    utils.set_seed(args.seed)  # the heads' initial weights, the same in every process
    model = build_model(args, pretrained=not args.no_pretrained)
    model = model.to(device, memory_format=memory_format(device, args.amp))
    replica_batch = -(-batch_size // max(1, len(gpu_ids)))  # DataParallel splits the batch over its GPUs
    engine = choose_branch_impl(model, args.branch_impl, device, replica_batch, args.image_size, args.amp)
    model.branch_impl = broadcast_from_main(model.branch_impl)  # every process runs rank 0's choice
    log(engine)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=gpu_ids or None)
    elif len(gpu_ids) > 1:
        model = nn.DataParallel(model, device_ids=gpu_ids)

    # ------------------------------------------------------------------ optimizer
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    milestones = [int(args.num_epochs * fraction) for fraction in LR_MILESTONES]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=LR_GAMMA)
    fp16 = args.amp and device.type == 'cuda' and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)

    # ------------------------------------------------------------------ resume
    start_epoch, best_recall, results = 1, -1.0, []
    if checkpoint is not None:
        unwrap(model).load_state_dict(checkpoint['model'])
        optimizer.load_state_dict(checkpoint['optimizer'])
        scheduler.load_state_dict(checkpoint['scheduler'])
        scaler.load_state_dict(checkpoint['scaler'])
        start_epoch, best_recall, results = checkpoint['epoch'], checkpoint['best_recall'], checkpoint['results']
        log(f'resumed from {checkpoint_path} at epoch {start_epoch}')

    # ------------------------------------------------------------------ epochs
    selection_key = f'recall@{args.recalls[0]}'
    for epoch in range(start_epoch, args.num_epochs + 1):
        utils.set_seed(epoch_seed(args.seed, epoch))
        sampler.set_epoch(epoch)
        train_stats = train_one_epoch(model, train_loader, optimizer, scaler, device, args.amp,
                                      f'Epoch {epoch}/{args.num_epochs}')
        scheduler.step()
        metrics, features = evaluate(model, eval_loaders, eval_labels, args.recalls, device, args.amp)

        skipped = f' | {train_stats["skipped"]} unreadable images skipped' if train_stats['skipped'] else ''
        log(f'Epoch {epoch}/{args.num_epochs} | loss: {train_stats["loss"]:.4f} | '
            f'accuracy: {train_stats["accuracy"]:.2f}% | {format_metrics(metrics, args.recalls)}{skipped}')
        results.append({'epoch': epoch, 'train_loss': train_stats['loss'], 'train_accuracy': train_stats['accuracy'],
                        **{f'test_{name}': value for name, value in metrics.items()}})
        if is_main_process():
            write_results_csv(results, output_path(args, 'results.csv'))
            save_curves(results, output_path(args, 'curves.png'))

        if metrics[selection_key] > best_recall:
            best_recall = metrics[selection_key]
            database_items = dict(eval_items)
            if 'test' in eval_items:  # every process embeds its shard of the training images
                database_items['train'], features['train'] = embed_train_split(
                    model, data_dicts, dataset_root, test_transform, min_side, batch_size, options, device,
                    args.amp)
            if is_main_process():
                utils.atomic_torch_save(unwrap(model).state_dict(), output_path(args, 'model.pth'))
                save_database(output_path(args, 'data_base.pth'), database_items, features, dataset_root)

        if is_main_process():
            utils.atomic_torch_save({
                'model': unwrap(model).state_dict(), 'optimizer': optimizer.state_dict(),
                'scheduler': scheduler.state_dict(), 'scaler': scaler.state_dict(), 'epoch': epoch + 1,
                'best_recall': best_recall, 'results': results, 'args': vars(args), 'ids': ids,
                'train_items': train_items,
            }, checkpoint_path)
    log(f'best {selection_key}: {best_recall:.2f}% -> {output_path(args, "model.pth")}')
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_cli(main_function, args):
    """Run a script's main with the project's error convention: one line, exit 2 for flag errors,
    1 for data errors, never a traceback for a problem the user can fix."""
    try:
        main_function(args)
    except UsageError as error:
        print(f'error: {error}', file=sys.stderr)
        sys.exit(2)
    except utils.ReirError as error:
        print(f'error: {error}', file=sys.stderr)
        sys.exit(1)
    except torch.cuda.OutOfMemoryError:
        print('error: CUDA out of memory: lower --batch_size, --ensemble_size or --image_size, or pass --amp',
              file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print('interrupted: the last completed epoch is in the checkpoint; continue with --resume', file=sys.stderr)
        sys.exit(130)


if __name__ == '__main__':
    run_cli(main, get_args_parser().parse_args())
