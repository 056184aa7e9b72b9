"""The REIR method: one ResNet stem shared by N branch heads, each a member of a randomized ensemble, the loss the
branches train with, and the retrieval embedding.

DREML (Xuan, Souvenir & Pless, "Deep Randomized Ensembles for Metric Learning", ECCV 2018) trains N separate
classifiers, each on its own random grouping of the training classes into meta-classes (utils.create_id), and
retrieves with the concatenation of their L2-normalized outputs. REIR shares the first backbone stages between the
members, so that the ensemble is one network trained jointly.

To try an idea, change it here: a loss is one class and its entry in LOSSES (EnsembleCrossEntropy shows what a
loss is given), and a loss names the classifier every branch ends with. Nothing here knows of files, devices or
processes.
"""
import copy
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
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


# ----------------------------------------------------------------------------- the network

class CosineClassifier(nn.Module):
    """The classifier of normalized softmax (Zhai & Wu, "Classification is a Strong Baseline for Deep Metric
    Learning", BMVC 2019): logits are the cosines between the L2-normalized feature and every class's L2-normalized
    weight, divided by a temperature. Its weight starts as nn.Linear's does."""

    def __init__(self, in_features, out_features, temperature=0.05):
        super().__init__()
        self.in_features, self.out_features, self.temperature = in_features, out_features, temperature
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        bound = 1 / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x):
        # (B, in_features) -> (B, out_features), each in [-1 / temperature, 1 / temperature]
        return F.linear(F.normalize(x, dim=-1), F.normalize(self.weight, dim=-1)) / self.temperature


class Branch(nn.Module):
    """One ensemble member: its own copy of the backbone stages after the shared stem, global average
    pooling and a classifier over the member's meta-classes (nn.Linear, or the classifier its loss names)."""

    def __init__(self, stages, feature_dim, meta_class_size, classifier=nn.Linear):
        super().__init__()
        self.features = stages
        self.fc = classifier(feature_dim, meta_class_size)

    def forward(self, x):
        x = self.features(x)                                  # (B, feature_dim, h, w)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)     # (B, feature_dim)
        return self.fc(x)                                     # (B, meta_class_size)


class Model(nn.Module):
    """Shared stem + ensemble_size branches; forward returns (batch, ensemble_size, meta_class_size) logits.

    with_random: in training the shared feature given to branch e is scaled by w_e, with
    w = softmax(rand(ensemble_size)) drawn every forward pass; in evaluation w_e = 1 / ensemble_size,
    its expectation, so that embeddings are deterministic.

    classifier: the layer every branch ends with, given (in_features, meta_class_size): nn.Linear, or the one the
    run's loss names (a loss's classifier attribute).

    branch_engine: None runs the branches one after the other; a function (branches, shared feature, weights or
    None) -> (B, E, M) that computes the same faster may replace the loop (branch_engines.py, which checks that it
    does on this model before it is used). The parameters and state_dict do not depend on it.
    """

    def __init__(self, meta_class_size, ensemble_size, share_type='layer1', model_type='resnet18',
                 with_random=False, pretrained=True, classifier=nn.Linear):
        super().__init__()
        if model_type not in BACKBONES:
            raise ValueError(f'model_type must be one of {", ".join(BACKBONES)}, got {model_type!r}')
        if share_type not in SHARE_TYPES:
            raise ValueError(f'share_type must be one of {", ".join(SHARE_TYPES)}, got {share_type!r}')
        self.ensemble_size = ensemble_size
        self.meta_class_size = meta_class_size
        self.with_random = with_random
        self.branch_engine = None

        backbone = build_backbone(model_type, pretrained)
        split = 0 if share_type == 'none' else STAGES.index(share_type) + 1
        self.shared = nn.Sequential(OrderedDict((name, getattr(backbone, name)) for name in STAGES[:split]))
        branch_stages = nn.Sequential(OrderedDict((name, getattr(backbone, name)) for name in STAGES[split:]))
        # every branch starts from the same (pretrained) weights
        self.branches = nn.ModuleList(
            Branch(copy.deepcopy(branch_stages), backbone.fc.in_features, meta_class_size, classifier)
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
        weights = self.branch_weights(x.device)   # (E,) or None
        if self.branch_engine is not None:
            return self.branch_engine(self.branches, shared, weights)
        logits = [branch(shared if weights is None else shared * weights[e])
                  for e, branch in enumerate(self.branches)]
        return torch.stack(logits, dim=1)         # (B, ensemble_size, meta_class_size)

    def embedding(self, x):
        """The retrieval embedding of images x (B, 3, S, S): (B, E * M), see embed."""
        return embed(self(x))


def embed(logits):
    """Retrieval embedding: every branch's logits L2-normalized, then concatenated.
    (B, E, M) -> (B, E * M)."""
    return F.normalize(logits, dim=-1).flatten(1)


# ----------------------------------------------------------------------------- losses

class EnsembleCrossEntropy(nn.Module):
    """The original REIR's loss: cross-entropy of every branch's logits against its own meta-class labels, averaged
    over the branches, every branch ending in nn.Linear.

    What every loss is: an nn.Module built with (ensemble_size, meta_class_size, num_classes), the number of
    training classes, and called with the logits (B, E, M), every image's meta-class for each branch (B, E) and its
    training class (B,), returning the batch's loss. Its parameters are trained with the model's and its state is
    saved in the run's checkpoint. `classifier` is the layer its branches end with."""
    classifier = nn.Linear

    def __init__(self, ensemble_size, meta_class_size, num_classes):
        super().__init__()

    def forward(self, logits, meta_labels, labels):
        return F.cross_entropy(logits.flatten(0, 1), meta_labels.flatten())  # (B * E, M) against (B * E,)


class NormSoftmaxLoss(EnsembleCrossEntropy):
    """Normalized softmax (Zhai & Wu, BMVC 2019; pytorch-metric-learning's NormalizedSoftmaxLoss) for every
    branch: its classifier is a CosineClassifier (temperature 0.05), trained with the same averaged cross-entropy.
    The model's logits are then those cosines over the temperature, and the embedding is formed from them."""
    classifier = CosineClassifier


LOSSES = {'ce': EnsembleCrossEntropy, 'normsoftmax': NormSoftmaxLoss}
DEFAULT_LOSS = 'ce'  # the original REIR's
