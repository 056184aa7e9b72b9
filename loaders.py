"""How a run reads its images: the run's data (RunData: the training list's loader, the evaluation splits, the
database's images), the samplers that make an epoch depend on (--seed, epoch) alone, the loaders' settings, and
their worker processes, which ignore the stop signals that the main process acts on."""
import atexit
import multiprocessing
import multiprocessing.util  # its exit function registered before end_loader_workers, which then runs first
import os
import signal

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler

import run_files
import utils


# ----------------------------------------------------------------------------- the run's data

class RunData:
    """What a run reads, built and checked before anything is written, from its flags (args), data dicts, RunState
    (its training list and held-out classes) and engine.Process:

    train: the sampled training list, each image with its class index, shuffled and augmented from (--seed, epoch);
    test, val: (items, labels, loaders) of the evaluation splits (test, or query and gallery; build_eval_data) and of
    the held-out classes, scored as a test split is (None without --val_classes);
    items: the items of every split the embedding database holds, by split ('val' for the held-out classes);
    database: every image of the training classes (not only the sampled list), embedded for the database;
    root: the dataset's folder, which every item's path is relative to; num_classes and held_out: the
    numbers of training and held-out classes;
    settings: what <prefix>_args.json and the database record of the run (run_files.recorded_settings)."""

    def __init__(self, args, data_dicts, state, process):
        self.root = os.path.join(args.data_path, args.data_name)
        held_out = {key: data_dicts['train'][key] for key in state.held_out}
        classes = {key: images for key, images in data_dicts['train'].items() if key not in held_out}
        check_recalls(args.recalls, {split: sum(map(len, data_dicts[split].values()))
                                     for split in utils.eval_splits(data_dicts, args.data_name)})
        check_recalls(args.recalls, {'test': sum(map(len, held_out.values()))} if held_out else {}, 'validation ')
        options = loader_options(args.num_workers, args.seed, process.device)
        self.train = train_loader(args, data_dicts, state.train_items, options, process)
        transform, min_side = utils.input_pipeline(args.crop_type, False, args.image_size, data_dicts['mean'],
                                                   data_dicts['std'], args.exact_pipeline)
        pipeline = (transform, min_side, args.eval_batch_size, options)
        self.test = build_eval_data(data_dicts, self.root, *pipeline)
        self.val = build_eval_data({'test': held_out}, self.root, *pipeline) if held_out else None
        self.items = {**self.test[0], **({'val': self.val[0]['test']} if held_out else {})}
        database_items = utils.flatten_split(classes)
        self.database = eval_loader(utils.EvalReader(self.root, database_items, [0] * len(database_items), transform,
                                                     min_side), args.eval_batch_size, options)
        self.num_classes, self.held_out = len(classes), len(held_out)
        self.settings = run_files.recorded_settings(args, data_dicts, held_out)

    def describe(self, data_name, process):
        """The line that says what the run reads."""
        return (f'{data_name}: {self.num_classes} training classes, {len(self.train.dataset)} training images, '
                + ', '.join(f'{len(items)} {split} images' for split, items in self.test[0].items())
                + (f', {self.held_out} held-out validation classes of {len(self.items["val"])} images'
                   if self.held_out else '')
                + (f'; {process.world} processes of {self.train.batch_size} images a step' if process.world > 1
                   else ''))


def train_loader(args, data_dicts, train_items, options, process):
    """The sampled training list [(path, class index)], each image with its class index (a class's meta-classes
    are its column of the ids), shuffled and augmented from (--seed, epoch) (SeededSampler), or drawn as groups of
    --m_per_class images of a class (ClassGroupSampler); under torch.distributed each process reads its share,
    --batch_size / world images a step."""
    transform, min_side = utils.input_pipeline(args.crop_type, True, args.image_size, data_dicts['mean'],
                                               data_dicts['std'], args.exact_pipeline)
    labels = [index for _, index in train_items]
    dataset = utils.TrainReader(os.path.join(args.data_path, args.data_name), train_items, labels, transform, min_side)
    batch_size = args.batch_size // process.world
    if args.m_per_class:
        check_class_groups(args, len(set(labels)), process.world)
        sampler = ClassGroupSampler(labels, args.m_per_class, args.batch_size, args.seed, process.rank, process.world)
    else:
        sampler = SeededSampler(len(dataset), args.seed, process.rank, process.world)
    drop_last = drop_last_batch(args, batch_size, len(sampler), max(1, len(process.gpu_ids)))
    return Loader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, **options)


def last_feature_side(image_size):
    """Side of a ResNet's last feature map for an image_size input: conv1, the max pool and layer2-4 each
    halve it, rounding up."""
    for _ in range(5):
        image_size = -(-image_size // 2)
    return image_size


def drop_last_batch(args, batch_size, num_samples, replicas):
    """Whether to leave out the epoch's last, short batch. Batch norm cannot train on one value per channel,
    which a device gets from a single image when the last feature map is 1 x 1 (--image_size 32 or less);
    DataParallel splits a batch over replicas devices as torch.chunk does."""
    if last_feature_side(args.image_size) > 1:
        return False

    def gives_a_device_one_image(batch):
        return min(len(chunk) for chunk in torch.arange(batch).chunk(replicas)) < 2
    if gives_a_device_one_image(batch_size):
        raise utils.UsageError(f'--batch_size {args.batch_size} gives a device single images, which batch norm '
                               f'cannot train on at --image_size {args.image_size} (a 1 x 1 last feature map): '
                               f'use a larger --batch_size or an --image_size above 32')
    last = num_samples % batch_size
    if last and gives_a_device_one_image(last):
        utils.warn(f'the last batch of every epoch ({last} images) is left out: batch norm cannot train on single '
                   f'images at --image_size {args.image_size}')
        return True
    return False


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


# ----------------------------------------------------------------------------- loaders, samplers and workers

# what schedulers send before they end a job: Slurm SIGTERM (and SIGUSR1 where a job asks for it with --signal),
# torchrun SIGTERM to every process of a worker group it stops
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def ignore_stop_signals(worker_id):
    """A DataLoader worker_init_fn. A stop signal sent to the whole process group (torchrun, Slurm) would end the
    loader's workers, and the run with them, before it saved its state: the main process ends them instead. The
    worker starts with the signals blocked (Loader), so that none ends it before it ignores them."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class Loader(DataLoader):
    """A DataLoader whose worker processes start with the stop signals blocked: they inherit the mask, and a signal to
    the process group in the instant before a new worker ignores them (ignore_stop_signals) would end it. The main
    process receives a signal blocked meanwhile once they are started."""

    def __iter__(self):
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return super().__iter__()
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
        generator = torch.Generator().manual_seed(utils.epoch_seed(self.seed, self.epoch))
        order = torch.randperm(self.num_samples, generator=generator)
        seeds = torch.randint(2 ** 62, (self.num_samples,), generator=generator)
        padding = -self.num_samples % self.num_replicas
        order, seeds = torch.cat([order, order[:padding]]), torch.cat([seeds, seeds[:padding]])
        mine = slice(self.skip + self.rank, None, self.num_replicas)
        return iter(zip(order[mine].tolist(), seeds[mine].tolist()))


def check_class_groups(args, num_classes, world):
    """Refuse, before any work, an --m_per_class that cannot form the batches of a run on num_classes training classes
    over world processes: each process's share of a batch must be whole groups, of distinct classes."""
    m, per_process = args.m_per_class, args.batch_size // world
    if per_process % m:
        share = f'each of the {world} processes\' {per_process} images' if world > 1 else f'--batch_size {per_process}'
        raise utils.UsageError(f'--m_per_class {m}: {share} cannot be groups of {m} images of a class; make '
                               f'--batch_size a multiple of {m * world}')
    if args.batch_size // m > num_classes:
        raise utils.UsageError(f'--m_per_class {m}: a batch of {args.batch_size} images would need '
                               f'{args.batch_size // m} classes, and the run trains on {num_classes}; lower '
                               f'--batch_size or raise --m_per_class')


class ClassGroupSampler(Sampler):
    """Batches of batch_size images as groups of m images of a class, batch_size / m distinct classes each, for the
    losses that compare images of a class: every batch's classes drawn at random, and m images of each, without
    replacement where the class has m or more (as pytorch-metric-learning's MPerClassSampler draws them, which cannot
    serve here: it draws from numpy's global random state, which neither (seed, epoch) nor a checkpoint gives back).
    An epoch has as many batches as the uniform draw (ceil(images / batch_size)), drawn from (seed, epoch) alone, with
    an augmentation seed per sample, as SeededSampler; under torch.distributed each of num_replicas processes takes its
    contiguous part of every batch (whole groups: check_class_groups), so that skipping k steps skips k batches."""

    def __init__(self, labels, m, batch_size, seed, rank=0, num_replicas=1):
        self.m, self.batch_size, self.seed, self.epoch, self.skip = m, batch_size, seed, 0, 0
        self.rank, self.num_replicas = rank, num_replicas
        by_class = {}
        for index, label in enumerate(labels):
            by_class.setdefault(label, []).append(index)
        self.members = [torch.tensor(by_class[label]) for label in sorted(by_class)]  # each class's sample indices
        self.batches = -(-len(labels) // batch_size)

    def set_epoch(self, epoch, skip=0):
        """Sample epoch, leaving out the first skip samples of its order (whole batches)."""
        self.epoch, self.skip = epoch, skip

    def __len__(self):
        return (self.batches - self.skip // self.batch_size) * (self.batch_size // self.num_replicas)

    def __iter__(self):
        generator = torch.Generator().manual_seed(utils.epoch_seed(self.seed, self.epoch))
        groups = []
        for _ in range(self.batches):
            for c in torch.randperm(len(self.members), generator=generator)[:self.batch_size // self.m].tolist():
                own = self.members[c]
                pick = (torch.randperm(len(own), generator=generator)[:self.m] if len(own) >= self.m
                        else torch.randint(len(own), (self.m,), generator=generator))
                groups.append(own[pick])
        order = torch.cat(groups).view(self.batches, self.num_replicas, -1)   # (batches, processes, images of each)
        seeds = torch.randint(2 ** 62, order.shape, generator=generator)
        mine = (slice(self.skip // self.batch_size, None), self.rank)
        return iter(zip(order[mine].flatten().tolist(), seeds[mine].flatten().tolist()))


class ShardSampler(Sampler):
    """Evaluation indices rank, rank + num_replicas, ... of a dataset (engine.gather_shards puts them back in order)."""

    def __init__(self, num_samples, rank=0, num_replicas=1):
        self.indices = range(rank, num_samples, num_replicas)

    def __len__(self):
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)


def eval_loader(dataset, batch_size, options):
    """In order; under torch.distributed each process reads its shard (ShardSampler)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return Loader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), rank, world), **options)


def build_eval_data(data_dicts, dataset_root, transform, min_side, batch_size, options):
    """Items, integer labels (one numbering for query and gallery) and loaders of the evaluation splits."""
    splits = utils.eval_splits(data_dicts, dataset_root)
    eval_items = {split: utils.flatten_split(data_dicts[split]) for split in splits}
    eval_labels = utils.class_indices({split: [key for _, key in items] for split, items in eval_items.items()})
    eval_loaders = {split: eval_loader(utils.EvalReader(dataset_root, items, eval_labels[split], transform, min_side),
                                       batch_size, options)
                    for split, items in eval_items.items()}
    return eval_items, eval_labels, eval_loaders


