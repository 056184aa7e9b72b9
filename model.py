"""The REIR network: one ResNet stem shared by N branch heads, each a member of a randomized ensemble.

DREML (Xuan, Souvenir & Pless, "Deep Randomized Ensembles for Metric Learning", ECCV 2018) trains N
separate classifiers, each on its own random grouping of the training classes into meta-classes, and
retrieves with the concatenation of their L2-normalized outputs. REIR shares the first backbone stages
between the members, so that the ensemble is one network trained jointly.
"""
import contextlib
import copy
import math
import time
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models
from torchvision.models.resnet import BasicBlock, Bottleneck

# backbone name -> (torchvision constructor, ImageNet weights enum); the original REIR used IMAGENET1K_V1
BACKBONES = {
    'resnet18': (models.resnet18, models.ResNet18_Weights),
    'resnet34': (models.resnet34, models.ResNet34_Weights),
    'resnet50': (models.resnet50, models.ResNet50_Weights),
    'resnext50_32x4d': (models.resnext50_32x4d, models.ResNeXt50_32X4D_Weights),
}
STAGES = ('conv1', 'bn1', 'relu', 'maxpool', 'layer1', 'layer2', 'layer3', 'layer4')
SHARE_TYPES = ('none',) + STAGES[3:]  # the last shared stage; 'none' shares nothing
BRANCH_IMPLS = ('auto', 'loop', 'grouped')


class PretrainedWeightsUnavailable(RuntimeError):
    pass


def build_backbone(model_type, pretrained):
    """A torchvision ResNet, with ImageNet weights when pretrained; never silently without them."""
    constructor, weights_enum = BACKBONES[model_type]
    if not pretrained:
        return constructor(weights=None)
    weights = weights_enum.IMAGENET1K_V1
    try:
        return constructor(weights=weights)
    except (OSError, RuntimeError, ValueError) as e:  # URLError is an OSError
        file_name = weights.url.rsplit('/', 1)[-1]
        where = f'{torch.hub.get_dir()}/checkpoints/{file_name}'
        raise PretrainedWeightsUnavailable(
            f'ImageNet weights for {model_type} could not be loaded ({type(e).__name__}): download '
            f'{weights.url} to {where} (or set TORCH_HOME), or pass --no_pretrained') from None


class Branch(nn.Module):
    """One ensemble member: its own copy of the backbone stages after the shared stem, global average
    pooling and a linear classifier over the member's meta-classes."""

    def __init__(self, stages, feature_dim, meta_class_size):
        super().__init__()
        self.features = stages
        self.fc = nn.Linear(feature_dim, meta_class_size)

    def forward(self, x):
        x = self.features(x)                      # (B, feature_dim, h, w)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # (B, feature_dim)
        return self.fc(x)                         # (B, meta_class_size)


def grouped_branches(branches, x):
    """Every branch's stages, pooling and classifier as one grouped computation (Packed-Ensembles, Laurent
    et al., ICLR 2023): each convolution becomes one convolution with E times its groups over the branches'
    weights concatenated, each batch norm one batch norm over the concatenated channels, and the E
    classifiers one batched matmul. Channel block e then computes exactly what branch e computes.

    x (B, E*C, H, W) holds branch e's input in channel block e; returns (B, E, M) logits. It is a pure
    function of the branches' tensors: weights are concatenated anew at every call and nothing is stored
    between calls, so concurrent calls (threads, DataParallel replicas) cannot see each other's tensors.
    In training it writes the updated batch-norm running statistics into the branches, as their own
    BatchNorm2d modules would."""
    E = len(branches)
    features = _grouped([branch.features for branch in branches], x)          # (B, E*F, h, w)
    pooled = torch.flatten(F.adaptive_avg_pool2d(features, 1), 1)           # (B, E*F)
    pooled = pooled.view(pooled.shape[0], E, -1)                             # (B, E, F)
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
    raise TypeError(f'the grouped branch engine cannot run {type(first).__name__}; use branch_impl="loop"')


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


class Model(nn.Module):
    """Shared stem + ensemble_size branches; forward returns (batch, ensemble_size, meta_class_size) logits.

    with_random: in training the shared feature given to branch e is scaled by w_e, with
    w = softmax(rand(ensemble_size)) drawn every forward pass; in evaluation w_e = 1 / ensemble_size,
    its expectation, so that embeddings are deterministic.

    branch_impl: 'loop' runs the branches one after the other; 'grouped' runs them as one grouped
    computation (grouped_branches), the same function within float rounding. The parameters and state_dict
    are the same for both. 'auto' runs the loop until an engine is chosen by measurement: set
    model.branch_impl to the faster of time_branch_impls(model, a batch like the run's).
    """

    def __init__(self, meta_class_size, ensemble_size, share_type='layer1', model_type='resnet18',
                 with_random=False, pretrained=True, branch_impl='auto'):
        super().__init__()
        if model_type not in BACKBONES:
            raise ValueError(f'model_type must be one of {", ".join(BACKBONES)}, got {model_type!r}')
        if branch_impl not in BRANCH_IMPLS:
            raise ValueError(f'branch_impl must be one of {", ".join(BRANCH_IMPLS)}, got {branch_impl!r}')
        if share_type not in SHARE_TYPES:
            raise ValueError(f'share_type must be one of {", ".join(SHARE_TYPES)}, got {share_type!r}')
        self.ensemble_size = ensemble_size
        self.meta_class_size = meta_class_size
        self.with_random = with_random
        self.branch_impl = branch_impl

        backbone = build_backbone(model_type, pretrained)
        split = 0 if share_type == 'none' else STAGES.index(share_type) + 1
        self.shared = nn.Sequential(OrderedDict((name, getattr(backbone, name)) for name in STAGES[:split]))
        branch_stages = nn.Sequential(OrderedDict((name, getattr(backbone, name)) for name in STAGES[split:]))
        # every branch starts from the same (pretrained) weights
        self.branches = nn.ModuleList(
            Branch(copy.deepcopy(branch_stages), backbone.fc.in_features, meta_class_size)
            for _ in range(ensemble_size))

    def branch_weights(self, device):
        """(ensemble_size,) scales of the shared feature per branch, or None without with_random."""
        if not self.with_random:
            return None
        if self.training:
            return torch.softmax(torch.rand(self.ensemble_size, device=device), dim=0)
        return torch.full((self.ensemble_size,), 1.0 / self.ensemble_size, device=device)

    def forward(self, x):
        shared = self.shared(x)                   # (B, C, H, W)
        weights = self.branch_weights(x.device)
        if self.branch_impl != 'grouped':
            logits = [branch(shared if weights is None else shared * weights[e])
                      for e, branch in enumerate(self.branches)]
            return torch.stack(logits, dim=1)     # (B, ensemble_size, meta_class_size)
        inputs = shared.unsqueeze(1).expand(-1, self.ensemble_size, -1, -1, -1)  # (B, E, C, H, W)
        if weights is not None:
            inputs = inputs * weights.view(1, -1, 1, 1, 1)
        return grouped_branches(self.branches, inputs.flatten(1, 2))  # (B, E*C, H, W) -> (B, E, M)

    def embedding(self, x):
        """The retrieval embedding of images x (B, 3, S, S): (B, E * M), see embed."""
        return embed(self(x))


def embed(logits):
    """Retrieval embedding: every branch's logits L2-normalized, then concatenated.
    (B, E, M) -> (B, E * M)."""
    return F.normalize(logits, dim=-1).flatten(1)


def time_branch_impls(model, images, training=True, autocast=contextlib.nullcontext, rounds=3):
    """Seconds per step of the 'loop' and 'grouped' engines on this model and this batch: forward and
    backward in training, a forward in evaluation. The engines alternate, after a warm-up round, and each
    keeps its best round. An engine that runs out of GPU memory takes infinitely long.

    The model is left as it was found: parameters, gradients, batch-norm statistics, branch_impl, its
    mode, and the random streams that with_random draws from."""
    buffers = [buffer.clone() for buffer in model.buffers()]
    gradients = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    impl, was_training = model.branch_impl, model.training
    cuda = images.device.type == 'cuda'
    seconds = {'loop': math.inf, 'grouped': math.inf}
    try:
        with torch.random.fork_rng(devices=[images.device] if cuda else []):
            model.train(training)
            for round_ in range(rounds + 1):
                for candidate in seconds:
                    model.branch_impl = candidate
                    try:
                        elapsed = _timed_step(model, images, training, autocast, cuda)
                    except torch.cuda.OutOfMemoryError:
                        elapsed = math.inf
                        torch.cuda.empty_cache()
                    if round_:  # round 0 warms up: allocations, kernel selection
                        seconds[candidate] = min(seconds[candidate], elapsed)
    finally:
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), buffers):
                buffer.copy_(saved)
        for parameter, gradient in zip(model.parameters(), gradients):
            parameter.grad = gradient
        model.branch_impl = impl
        model.train(was_training)
    return seconds


def _timed_step(model, images, training, autocast, cuda):
    if cuda:
        torch.cuda.synchronize(images.device)
    start = time.perf_counter()
    with torch.set_grad_enabled(training), autocast():
        logits = model(images)
    if training:
        logits.float().square().mean().backward()
    if cuda:
        torch.cuda.synchronize(images.device)
    return time.perf_counter() - start
