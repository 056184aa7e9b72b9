"""The REIR network: one ResNet stem shared by N branch heads, each a member of a randomized ensemble.

DREML (Xuan, Souvenir & Pless, "Deep Randomized Ensembles for Metric Learning", ECCV 2018) trains N
separate classifiers, each on its own random grouping of the training classes into meta-classes, and
retrieves with the concatenation of their L2-normalized outputs. REIR shares the first backbone stages
between the members, so that the ensemble is one network trained jointly.
"""
import copy
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torchvision import models

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


def grouped_like(stages, ensemble_size):
    """A weightless (meta device) copy of the branch stages whose convolutions and batch norms span all
    branches: Conv2d(E*in, E*out, groups=E*groups) and BatchNorm2d(E*C). Channel block e of every layer
    then computes exactly what branch e computes (Packed-Ensembles, Laurent et al., ICLR 2023)."""
    def widen(module):
        for name, child in module.named_children():
            if isinstance(child, nn.Conv2d):
                child = nn.Conv2d(child.in_channels * ensemble_size, child.out_channels * ensemble_size,
                                  child.kernel_size, child.stride, child.padding, child.dilation,
                                  child.groups * ensemble_size, child.bias is not None, child.padding_mode,
                                  device='meta')
            elif isinstance(child, nn.BatchNorm2d):
                child = nn.BatchNorm2d(child.num_features * ensemble_size, child.eps, child.momentum, child.affine,
                                       child.track_running_stats, device='meta')
            else:
                widen(child)
            setattr(module, name, child)
    template = copy.deepcopy(stages).to('meta')
    widen(template)
    return template


class GroupedBranches:
    """Runs all branches' stages as one grouped computation. It owns no weights: the branches keep theirs
    (so state_dict and optimizer state are the loop's), concatenated along the channel axis at every call;
    batch-norm running statistics computed on the concatenation are copied back into the branches.
    Kept outside the module tree on purpose: a weightless helper, not a submodule."""

    def __init__(self, branches):
        self.template = grouped_like(branches[0].features, len(branches))
        self.parameter_names = [name for name, _ in self.template.named_parameters()]
        self.buffer_names = [name for name, _ in self.template.named_buffers()]

    def __call__(self, branches, x):
        """x (B, E*C, H, W): branch e's input in channel block e -> (B, E, M) logits."""
        E = len(branches)
        parameters = [dict(b.features.named_parameters()) for b in branches]  # one walk per branch
        tensors = {name: torch.cat([p[name] for p in parameters]) for name in self.parameter_names}
        buffers = {}
        branch_buffers = [dict(b.features.named_buffers()) for b in branches]
        for name in self.buffer_names:
            per_branch = [b[name] for b in branch_buffers]
            buffers[name] = per_branch[0].clone() if per_branch[0].dim() == 0 else torch.cat(per_branch)
        training = branches[0].training
        self.template.train(training)  # batch statistics or running statistics, as the branches would use
        features = functional_call(self.template, {**tensors, **buffers}, (x,))  # (B, E*F, h, w)
        if training and buffers:
            self.copy_back(branch_buffers, buffers)
        pooled = torch.flatten(F.adaptive_avg_pool2d(features, 1), 1)             # (B, E*F)
        pooled = pooled.view(pooled.shape[0], E, -1)                               # (B, E, F)
        weight = torch.stack([b.fc.weight for b in branches])                      # (E, M, F)
        bias = torch.stack([b.fc.bias for b in branches])                          # (E, M)
        return torch.einsum('bef,emf->bem', pooled, weight) + bias                 # (B, E, M)

    @staticmethod
    def copy_back(branch_buffers, buffers):
        """Write the running statistics updated on the concatenation back into every branch."""
        targets, sources = [], []
        for name, value in buffers.items():
            targets += [b[name] for b in branch_buffers]
            sources += [value] * len(branch_buffers) if value.dim() == 0 else value.chunk(len(branch_buffers))
        with torch.no_grad():
            torch._foreach_copy_(targets, sources)


class Model(nn.Module):
    """Shared stem + ensemble_size branches; forward returns (batch, ensemble_size, meta_class_size) logits.

    with_random: in training the shared feature given to branch e is scaled by w_e, with
    w = softmax(rand(ensemble_size)) drawn every forward pass; in evaluation w_e = 1 / ensemble_size,
    its expectation, so that embeddings are deterministic.

    branch_impl: 'loop' runs the branches one after the other; 'grouped' runs them as one grouped
    computation (GroupedBranches), the same function within float rounding; 'auto' takes 'grouped' on
    CUDA, where it replaces thousands of small kernel launches, and 'loop' elsewhere, where oneDNN's grouped
    convolutions measured slower (benchmark.py branches). The parameters and state_dict are the same.
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
        self.grouped = GroupedBranches(self.branches)

    def branch_weights(self, device):
        """(ensemble_size,) scales of the shared feature per branch, or None without with_random."""
        if not self.with_random:
            return None
        if self.training:
            return torch.softmax(torch.rand(self.ensemble_size, device=device), dim=0)
        return torch.full((self.ensemble_size,), 1.0 / self.ensemble_size, device=device)

    def engine(self, device):
        if self.branch_impl == 'auto':
            return 'grouped' if device.type == 'cuda' else 'loop'
        return self.branch_impl

    def forward(self, x):
        shared = self.shared(x)                   # (B, C, H, W)
        weights = self.branch_weights(x.device)
        if self.engine(x.device) == 'loop':
            logits = [branch(shared if weights is None else shared * weights[e])
                      for e, branch in enumerate(self.branches)]
            return torch.stack(logits, dim=1)     # (B, ensemble_size, meta_class_size)
        inputs = shared.unsqueeze(1).expand(-1, self.ensemble_size, -1, -1, -1)  # (B, E, C, H, W)
        if weights is not None:
            inputs = inputs * weights.view(1, -1, 1, 1, 1)
        return self.grouped(self.branches, inputs.flatten(1, 2))  # (B, E*C, H, W) -> (B, E, M)


def embed(logits):
    """Retrieval embedding: every branch's logits L2-normalized, then concatenated.
    (B, E, M) -> (B, E * M)."""
    return F.normalize(logits, dim=-1).flatten(1)
