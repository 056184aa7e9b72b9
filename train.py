"""Train REIR, evaluating retrieval after every epoch.

    python train.py --data_name cub --crop_type cropped
    python train.py --data_name demo --no_pretrained --image_size 64 --ensemble_size 4 --num_epochs 3

Writes results/<prefix>_results.csv (a row per epoch), <prefix>_model.pth and <prefix>_data_base.pth
(at the best test Recall@K for the first K of --recalls), <prefix>_checkpoint.pth (every epoch, for
--resume) and the meta-class ids; <prefix> names the run's settings (utils.run_prefix).
"""
import argparse
import os
import sys

import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

import utils
from model import BACKBONES, SHARE_TYPES, Model, PretrainedWeightsUnavailable, embed

LR_MILESTONES = (0.5, 0.7)  # fractions of the epochs where the learning rate drops
LR_GAMMA = 0.1
DEFAULT_GPU_IDS = '0,1'
# flags that may differ between a run and its --resume without changing what the run computes
RESUME_FREE_FLAGS = ('resume', 'num_workers', 'gpu_ids', 'load_ids')


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
    parser.add_argument('--lr', default=1e-4, type=float,
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
    parser.add_argument('--amp', action='store_true',
                        help='mixed precision on CUDA (bf16, or fp16 with loss scaling where bf16 is unsupported)')
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
    print(f'warning: {message}', file=sys.stderr)


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
    if args.data_name == 'demo' and not os.path.isfile(path):
        import data_utils
        for line in data_utils.prepare(args.data_path, 'demo', max(1, args.num_workers)):
            print(line)
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
    batches and augmentations do not depend on the number of workers, or on a resume."""

    def __init__(self, num_samples, seed):
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.num_samples

    def __iter__(self):
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(self.num_samples, generator=generator)
        seeds = torch.randint(2 ** 62, (self.num_samples,), generator=generator)
        return iter(zip(order.tolist(), seeds.tolist()))


class TrainReader(utils.ImageReader):
    """Training images with their (E,) meta-class labels. An image that cannot be read is replaced by
    the next readable one (with a warning naming it) and counted, so one bad file never stops an epoch."""

    def __getitem__(self, item):
        index, seed = item
        failures = 0
        for offset in range(len(self)):
            path = self.paths[(index + offset) % len(self)]
            try:
                image = utils.load_rgb(path)
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
            image = utils.load_rgb(self.paths[index])
        except (OSError, SyntaxError, ValueError):
            return self.transform(Image.new('RGB', (1, 1))), self.targets[index], False
        return self.transform(image), self.targets[index], True


def loader_options(args, device):
    workers = max(0, args.num_workers)
    return dict(num_workers=workers, pin_memory=device.type == 'cuda', persistent_workers=workers > 0)


# ----------------------------------------------------------------------------- one epoch

def train_one_epoch(model, loader, optimizer, scaler, device, amp, description):
    """One pass over the training list; returns mean loss, accuracy in percent and skipped images."""
    model.train()
    total_loss, correct, seen, skipped = 0.0, 0, 0, 0
    progress = tqdm(loader, desc=description, dynamic_ncols=True, file=sys.stderr)
    for images, labels, failures in progress:
        images = images.to(device, non_blocking=True)
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
    ensemble_size = unwrap(model).ensemble_size
    return {'loss': total_loss / seen, 'accuracy': 100 * correct / (seen * ensemble_size), 'skipped': skipped}


@torch.inference_mode()
def extract_features(model, loader, device, amp):
    """(N, E * M) float32 CPU embeddings of a loader's images in the loader's order, and an (N,) bool
    tensor of which images could be read (unreadable ones get a blank image's embedding)."""
    model.eval()
    base = unwrap(model)
    features = torch.empty(len(loader.dataset), base.ensemble_size * base.meta_class_size)
    readable = torch.empty(len(loader.dataset), dtype=torch.bool)
    start = 0
    for images, _, batch_readable in loader:
        with autocast(device, amp):
            logits = model(images.to(device, non_blocking=True))
        batch = embed(logits.float()).cpu()
        features[start:start + batch.shape[0]] = batch
        readable[start:start + batch.shape[0]] = batch_readable
        start += batch.shape[0]
    return features, readable


def evaluate(model, loaders, labels, recalls, device, amp):
    """Embeds the evaluation splits and scores retrieval; returns (metrics in percent, features by split)."""
    features = {}
    for split, loader in loaders.items():
        features[split], readable = extract_features(model, loader, device, amp)
        if not readable.all():
            path = loader.dataset.paths[int((~readable).nonzero()[0])]
            raise utils.ReirError(f'evaluation image {path} is unreadable; run data_utils.py again to exclude it')
    if 'test' in features:
        queries, query_labels, gallery, gallery_labels = features['test'], labels['test'], None, None
    else:
        queries, query_labels = features['query'], labels['query']
        gallery, gallery_labels = features['gallery'], labels['gallery']
    recall_values, map_r, r_precision = utils.retrieval_metrics(queries, query_labels, recalls, gallery,
                                                                gallery_labels)
    metrics = {f'recall@{k}': 100 * v for k, v in zip(recalls, recall_values)}
    metrics.update({'map@r': 100 * map_r, 'r_precision': 100 * r_precision})
    return metrics, features


def embed_train_split(model, data_dicts, dataset_root, transform, batch_size, options, device, amp):
    """Every training image (not only the sampled list) and its embedding, for the database;
    unreadable images are left out with a warning."""
    items = utils.flatten_split(data_dicts['train'])
    loader = DataLoader(EvalReader(dataset_root, items, [0] * len(items), transform), batch_size=batch_size,
                        **options)
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
    utils.atomic_torch_save(ids, path)
    return ids


def main(args):
    device, gpu_ids = select_devices(args.gpu_ids)
    if args.amp and device.type != 'cuda':
        warn('--amp only acts on CUDA: running in float32')
    os.makedirs(args.results_dir, exist_ok=True)
    checkpoint_path = output_path(args, 'checkpoint.pth')
    checkpoint = None
    if args.resume:
        if not os.path.isfile(checkpoint_path):
            raise utils.ReirError(f'--resume: no checkpoint {checkpoint_path}; run once without --resume')
        checkpoint = utils.safe_load(checkpoint_path, 'checkpoint')
        check_resume_flags(checkpoint['args'], args)

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
    train_set = TrainReader(dataset_root, train_items, [ids[:, c] for _, c in train_items],
                            utils.get_transform(args.crop_type, True, args.image_size, mean, std))
    sampler = SeededSampler(len(train_set), args.seed)
    options = loader_options(args, device)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, **options)

    test_transform = utils.get_transform(args.crop_type, False, args.image_size, mean, std)
    eval_items = {split: utils.flatten_split(data_dicts[split]) for split in utils.eval_splits(data_dicts)}
    class_index = {key: i for i, key in enumerate(sorted({k for items in eval_items.values() for _, k in items}))}
    eval_labels = {split: [class_index[k] for _, k in items] for split, items in eval_items.items()}
    eval_loaders = {split: DataLoader(EvalReader(dataset_root, items, eval_labels[split], test_transform),
                                      batch_size=args.batch_size, **options)
                    for split, items in eval_items.items()}
    print(f'{args.data_name}: {len(train_classes)} training classes, {len(train_items)} training images, '
          + ', '.join(f'{len(items)} {split} images' for split, items in eval_items.items()))

    # ------------------------------------------------------------------ model
    try:
        model = Model(args.meta_class_size, args.ensemble_size, args.share_type, args.model_type,
                      args.with_random, pretrained=not args.no_pretrained)
    except PretrainedWeightsUnavailable as e:
        raise utils.ReirError(str(e)) from None
    model = model.to(device)
    if len(gpu_ids) > 1:
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
        print(f'resumed from {checkpoint_path} at epoch {start_epoch}')

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
        print(f'Epoch {epoch}/{args.num_epochs} | loss: {train_stats["loss"]:.4f} | '
              f'accuracy: {train_stats["accuracy"]:.2f}% | {format_metrics(metrics, args.recalls)}{skipped}')
        results.append({'epoch': epoch, 'train_loss': train_stats['loss'], 'train_accuracy': train_stats['accuracy'],
                        **{f'test_{name}': value for name, value in metrics.items()}})
        write_results_csv(results, output_path(args, 'results.csv'))

        if metrics[selection_key] > best_recall:
            best_recall = metrics[selection_key]
            utils.atomic_torch_save(unwrap(model).state_dict(), output_path(args, 'model.pth'))
            database_items = dict(eval_items)
            if 'test' in eval_items:
                database_items['train'], features['train'] = embed_train_split(
                    model, data_dicts, dataset_root, test_transform, args.batch_size, options, device, args.amp)
            save_database(output_path(args, 'data_base.pth'), database_items, features, dataset_root)

        utils.atomic_torch_save({
            'model': unwrap(model).state_dict(), 'optimizer': optimizer.state_dict(),
            'scheduler': scheduler.state_dict(), 'scaler': scaler.state_dict(), 'epoch': epoch + 1,
            'best_recall': best_recall, 'results': results, 'args': vars(args), 'ids': ids,
            'train_items': train_items,
        }, checkpoint_path)
    print(f'best {selection_key}: {best_recall:.2f}% -> {output_path(args, "model.pth")}')


if __name__ == '__main__':
    arguments = get_args_parser().parse_args()
    try:
        main(arguments)
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
