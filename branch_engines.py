"""Engines that compute REIR's branches faster than Model.forward's loop, and the checks that let one run.

The grouped engine (grouped_branches) runs the E branches as one grouped computation, as Packed-Ensembles (Laurent
et al., ICLR 2023) do. It knows torchvision's stages and Branch's pooling, so a Branch changed in model.py would
train as the old one under it: choose() lets it run only where it computes what the loop computes on the run's
model, outputs and gradients in training and outputs in evaluation (engine_difference), and then only on the CUDA
devices where it is faster (time_engines).
"""
import contextlib
import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

BRANCH_IMPLS = ('auto', 'loop', 'grouped')
# where --branch_impl auto times the engines; elsewhere it runs the loop (on the CPU grouped convolutions measured
# about twice as slow: benchmark.py branches)
TIMED_DEVICES = ('cuda',)
# how far the grouped engine's outputs and gradients may be from the loop's, relative to their norms: float rounding
# in other summation orders (cuDNN's TF32 convolutions by default), or bfloat16's 8 bits under autocast
TOLERANCE = {'float32': 1e-2, 'autocast': 5e-2}
# the batch the engines are compared on, (images, side): batch norm over fewer values (a run's last batch of 2 images
# of 1 x 1 features) amplifies float rounding itself, in either engine
CHECK_BATCH = (8, 64)


# ----------------------------------------------------------------------------- the grouped engine

def grouped_branches(branches, shared, weights):
    """Every branch's stages, pooling and classifier as one grouped computation: each convolution becomes one
    convolution with E times its groups over the branches' weights concatenated, each batch norm one batch norm over
    the concatenated channels, E linear classifiers one batched matmul (other classifiers run on their branch's
    features). Channel block e then computes exactly what branch e computes.

    shared (B, C, H, W), weights (E,) or None as in Model.forward; returns (B, E, M) logits. It is a pure function of
    the branches' tensors: weights are concatenated anew at every call and nothing is stored between calls, so
    concurrent calls (threads, DataParallel replicas) cannot see each other's tensors. In training it writes the
    updated batch-norm running statistics into the branches, as their own BatchNorm2d modules would."""
    E = len(branches)
    inputs = shared.unsqueeze(1).expand(-1, E, -1, -1, -1)                   # (B, E, C, H, W)
    if weights is not None:
        inputs = inputs * weights.view(1, -1, 1, 1, 1)
    features = _grouped([branch.features for branch in branches], inputs.flatten(1, 2))  # (B, E*F, h, w)
    pooled = torch.flatten(F.adaptive_avg_pool2d(features, 1), 1)           # (B, E*F)
    pooled = pooled.view(pooled.shape[0], E, -1)                             # (B, E, F)
    if any(type(branch.fc) is not nn.Linear for branch in branches):
        return torch.stack([branch.fc(pooled[:, e]) for e, branch in enumerate(branches)], dim=1)  # (B, E, M)
    weight = torch.stack([branch.fc.weight for branch in branches])          # (E, M, F)
    bias = torch.stack([branch.fc.bias for branch in branches])              # (E, M)
    return torch.einsum('bef,emf->bem', pooled, weight) + bias               # (B, E, M)


def _grouped(modules, x):
    """The same module of every branch, applied to x (B, E*C, H, W) as one computation."""
    first = modules[0]
    if isinstance(first, nn.Sequential):
        for children in zip(*modules):
            x = _grouped(children, x)
        return x
    if isinstance(first, (BasicBlock, Bottleneck)):
        return _grouped_residual_block(modules, x)
    if isinstance(first, nn.Conv2d) and first.padding_mode == 'zeros':
        return _grouped_conv(modules, x)
    if isinstance(first, nn.BatchNorm2d):
        return _grouped_batch_norm(modules, x)
    if isinstance(first, (nn.ReLU, nn.MaxPool2d)):  # no weights: the same function on the concatenation
        return first(x)
    raise TypeError(f'the grouped branch engine cannot run {type(first).__name__}')


def _grouped_residual_block(blocks, x):
    """torchvision's BasicBlock (two conv-bn pairs) and Bottleneck (three), shortcut added before the last relu."""
    first = blocks[0]
    depth = 3 if isinstance(first, Bottleneck) else 2
    out = x
    for i in range(1, depth + 1):
        out = _grouped_conv([getattr(block, f'conv{i}') for block in blocks], out)
        out = _grouped_batch_norm([getattr(block, f'bn{i}') for block in blocks], out)
        if i < depth:
            out = first.relu(out)
    shortcut = x if first.downsample is None else _grouped([block.downsample for block in blocks], x)
    return first.relu(out + shortcut)


def _grouped_conv(convs, x):
    first = convs[0]
    weight = torch.cat([conv.weight for conv in convs])  # (E*out, in/groups, kh, kw)
    bias = None if first.bias is None else torch.cat([conv.bias for conv in convs])
    return F.conv2d(x, weight, bias, first.stride, first.padding, first.dilation, first.groups * len(convs))


def _grouped_batch_norm(norms, x):
    """One batch norm over the concatenated channels, following BatchNorm2d.forward; in training the
    running statistics it updates are copied back into every branch's own buffers."""
    first = norms[0]

    def concatenate(name):
        return torch.cat([getattr(norm, name) for norm in norms])

    momentum = 0.0 if first.momentum is None else first.momentum
    update = first.training and first.track_running_stats
    if update:
        torch._foreach_add_([norm.num_batches_tracked for norm in norms], 1)
        if first.momentum is None:  # cumulative moving average
            momentum = 1.0 / float(first.num_batches_tracked)
    running_mean = concatenate('running_mean') if first.track_running_stats else None
    running_var = concatenate('running_var') if first.track_running_stats else None
    weight, bias = (concatenate('weight'), concatenate('bias')) if first.affine else (None, None)
    out = F.batch_norm(x, running_mean, running_var, weight, bias, first.training or not first.track_running_stats,
                       momentum, first.eps)
    if update:  # F.batch_norm updated the concatenated copies
        with torch.no_grad():
            torch._foreach_copy_([norm.running_mean for norm in norms] + [norm.running_var for norm in norms],
                                 list(running_mean.chunk(len(norms))) + list(running_var.chunk(len(norms))))
    return out


ENGINES = {'loop': None, 'grouped': grouped_branches}  # Model.branch_engine of each --branch_impl


def engine_name(model):
    return next(name for name, engine in ENGINES.items() if engine is model.branch_engine)


# ----------------------------------------------------------------------------- trying an engine on a model

@contextlib.contextmanager
def left_as_found(model, device):
    """Runs the block on the model and leaves it as it was found: parameters, gradients, batch-norm statistics, its
    engine, its mode, and the random streams that with_random draws from."""
    buffers = [buffer.clone() for buffer in model.buffers()]
    gradients = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    engine, was_training = model.branch_engine, model.training
    try:
        with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
            yield
    finally:
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), buffers):
                buffer.copy_(saved)
        for parameter, gradient in zip(model.parameters(), gradients):
            parameter.grad = gradient
        model.branch_engine = engine
        model.train(was_training)


def step(model, images, training, autocast):
    """The logits of a forward pass in float32, after a backward pass of a loss of them in training."""
    with torch.set_grad_enabled(training), autocast():
        logits = model(images)
    logits = logits.float()
    if training:
        (logits.square().mean() + logits[..., 0].mean()).backward()
    return logits.detach()


def time_engines(model, images, training=True, autocast=contextlib.nullcontext, rounds=3):
    """Seconds per step (step) of every engine on this model and this batch. The engines alternate, after a
    warm-up round, and each keeps its best round. An engine that runs out of GPU memory takes infinitely long."""
    cuda = images.device.type == 'cuda'
    seconds = dict.fromkeys(ENGINES, math.inf)
    with left_as_found(model, images.device):
        model.train(training)
        for round_ in range(rounds + 1):
            for name, engine in ENGINES.items():
                model.branch_engine = engine
                try:
                    elapsed = _timed(lambda: step(model, images, training, autocast), images.device, cuda)
                except torch.cuda.OutOfMemoryError:
                    elapsed = math.inf
                    torch.cuda.empty_cache()
                if round_:  # round 0 warms up: allocations, kernel selection
                    seconds[name] = min(seconds[name], elapsed)
    return seconds


def _timed(function, device, cuda):
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    function()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def engine_difference(model, images, autocast=contextlib.nullcontext, amp=False):
    """None when the grouped engine computes what the loop computes on this model and batch, in training (the same
    outputs and the same parameters' gradients) and in evaluation (the same outputs), within TOLERANCE of their norms,
    from the same state and random streams; else what differs, in words, and in which mode."""
    for training in (True, False):
        difference = _mode_difference(model, images, training, autocast, amp)
        if difference is not None:
            return f'{difference} in {"training" if training else "evaluation"}'
    return None


def _mode_difference(model, images, training, autocast, amp):
    results = {}
    for name in ENGINES:
        with left_as_found(model, images.device):
            model.train(training)
            model.branch_engine = ENGINES[name]
            model.zero_grad(set_to_none=True)
            torch.manual_seed(0)  # the same --with_random weights for both
            if name == 'loop':  # the model's own function: what fails here fails in training, where it says so
                logits = step(model, images, training, autocast)
            else:
                try:
                    logits = step(model, images, training, autocast)
                except Exception as e:  # a module it cannot run, shapes it does not give, whatever the module raises
                    message = (str(e).strip().splitlines() or ['no message'])[0]
                    return f'it fails on this model ({type(e).__name__}: {message})'
            results[name] = logits, [p.grad for p in model.parameters()]
    tolerance = TOLERANCE['autocast' if amp else 'float32']
    (loop, loop_grads), (grouped, grouped_grads) = results['loop'], results['grouped']
    if loop.shape != grouped.shape:
        return f'its logits have shape {tuple(grouped.shape)}, the loop\'s {tuple(loop.shape)}'
    if not _relative_error([loop], [grouped]) <= tolerance:
        return f'its logits differ from the loop\'s by {_relative_error([loop], [grouped]):.2g} of their norm'
    if [g is None for g in loop_grads] != [g is None for g in grouped_grads]:
        return 'it gives gradients to other parameters than the loop does'
    present = [i for i, g in enumerate(loop_grads) if g is not None]
    error = _relative_error([loop_grads[i] for i in present], [grouped_grads[i] for i in present])
    if not error <= tolerance:
        return f'its gradients differ from the loop\'s by {error:.2g} of their norm'
    return None


def _relative_error(references, values):
    """||values - references|| / ||references|| over lists of tensors (0 for empty lists)."""
    if not references:
        return 0.0
    difference = math.sqrt(sum(float((v.double() - r.double()).square().sum()) for r, v in zip(references, values)))
    norm = math.sqrt(sum(float(r.double().square().sum()) for r in references))
    return difference / max(norm, 1e-30)


# ----------------------------------------------------------------------------- the choice

class EngineRefused(ValueError):
    """--branch_impl grouped on a model whose branches it does not compute."""


def check_images(images):
    """A random batch of CHECK_BATCH's shape on the device and in the memory format of images."""
    count, side = CHECK_BATCH
    layout = torch.channels_last if images.dim() == 4 and not images.is_contiguous() else torch.contiguous_format
    batch = torch.randn((count, images.shape[1], side, side), generator=torch.Generator().manual_seed(0))
    return batch.to(images.device).contiguous(memory_format=layout)


def choose(model, flag, images, training=True, autocast=contextlib.nullcontext, amp=False):
    """Set model.branch_engine for --branch_impl flag and return the line that says which engine runs and why.
    loop: the loop. grouped: the grouped engine, refused (EngineRefused) unless it computes what the loop computes on
    this model, in training and in evaluation (engine_difference, on check_images). auto: on the TIMED_DEVICES, where
    grouped passes that check (otherwise the line says why the loop runs), the faster of the two on images
    (time_engines, a training step where training, else a forward pass); elsewhere the loop. The check comes before
    any timing: an engine is timed only on a model it computes. images: a batch of the run's shape on the model's
    device."""
    device = images.device
    model.branch_engine = None
    if flag == 'loop':
        return 'branch engine: loop (--branch_impl loop)'
    if flag == 'auto' and device.type not in TIMED_DEVICES:
        return f'branch engine: loop (--branch_impl auto on the {device.type.upper()}, where grouped convolutions ' \
               f'measured slower)'
    difference = engine_difference(model, check_images(images), autocast, amp)
    if difference is not None and flag == 'grouped':
        raise EngineRefused(f'--branch_impl grouped does not compute this model\'s branches: {difference}; '
                            f'use --branch_impl loop or auto')
    if difference is not None:
        return f'branch engine: loop (--branch_impl auto; the grouped engine does not compute this model\'s ' \
               f'branches: {difference})'
    timing = ''
    if flag == 'auto':
        seconds = time_engines(model, images, training, autocast)
        step_name = 'training step' if training else 'forward pass'
        timing = (f', timed on {torch.cuda.get_device_name(device) if device.type == "cuda" else device}: '
                  + ', '.join(f'{name} {1000 * value:.1f} ms' for name, value in seconds.items())
                  + f' per {step_name} of {images.shape[0]} images')
        if seconds['loop'] <= seconds['grouped']:
            return f'branch engine: loop (--branch_impl auto{timing})'
    model.branch_engine = grouped_branches
    return f'branch engine: grouped (--branch_impl {flag}{timing}; checked against the loop on this model, in ' \
           f'training and in evaluation)'
