"""The REIR method: one ResNet stem shared by N branch heads, each a member of a randomized ensemble, the loss the
branches train with, and the retrieval embedding.

DREML (Xuan, Souvenir & Pless, "Deep Randomized Ensembles for Metric Learning", ECCV 2018) trains N separate
classifiers, each on its own random grouping of the training classes into meta-classes (utils.create_id), and
retrieves with the concatenation of their L2-normalized outputs. REIR shares the first backbone stages between the
members, so that the ensemble is one network trained jointly.

To try an idea, change it here: a loss is one class and its entry in LOSSES (EnsembleCrossEntropy shows what a
loss is given), its settings the keyword arguments of its constructor, with their defaults, and a loss names the
classifier every branch ends with. Every loss of pytorch-metric-learning trains REIR's embedding through
MetricLearningLoss. Nothing here knows of files, devices or processes.
"""
import copy
import functools
import inspect
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
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
    run's loss names (its classifier(settings)).

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
    training classes, and its settings (keyword arguments with defaults, which --loss NAME:KEY=VALUE sets), and called
    with the logits (B, E, M), every image's meta-class for each branch (B, E) and its training class (B,), returning
    the batch's loss. Its parameters are trained with the model's and its state is saved in the run's checkpoint.
    classifier(settings) names the layer its branches end with, (in_features, meta_class_size) -> module."""

    def __init__(self, ensemble_size, meta_class_size, num_classes):
        super().__init__()

    @classmethod
    def classifier(cls, settings):
        return nn.Linear

    def forward(self, logits, meta_labels, labels):
        return F.cross_entropy(logits.flatten(0, 1), meta_labels.flatten())  # (B * E, M) against (B * E,)


class NormSoftmaxLoss(EnsembleCrossEntropy):
    """Normalized softmax (Zhai & Wu, BMVC 2019; pytorch-metric-learning's NormalizedSoftmaxLoss) for every
    branch: its classifier is a CosineClassifier, trained with the same averaged cross-entropy. The model's logits are
    then those cosines over the temperature, and the embedding is formed from them.
    temperature: the classifier's (0.05, the paper's); the classifier holds it, the loss only names it."""

    def __init__(self, ensemble_size, meta_class_size, num_classes, temperature=0.05):
        super().__init__(ensemble_size, meta_class_size, num_classes)

    @classmethod
    def classifier(cls, settings):
        return functools.partial(CosineClassifier, temperature=settings['temperature'])


class MetricLearningLoss(nn.Module):
    """A loss of pytorch-metric-learning (--loss pml.<ClassName>, Musgrave et al.) on REIR's retrieval embedding,
    embed(logits) (B, E * M), against the images' training classes: the meta-classes are not used, and the branches
    end in nn.Linear. MetricLearningLoss.of(class name) is the loss class for one of the library's losses, its
    settings the library loss's own keyword arguments (margin=0.1, alpha=32 for ProxyAnchorLoss). A loss that holds
    proxies or weights (ProxyAnchorLoss, ArcFaceLoss, ...) is built for that embedding size and the training classes
    (SIZES); its tensors that are neither parameters nor buffers (DynamicSoftMarginLoss's histogram) become buffers,
    so that the run's checkpoint holds all of its state."""
    library_loss = None  # the library's loss class, set by of()
    # the constructor arguments filled in for the run rather than set: (E, M, training classes) -> value
    SIZES = {'num_classes': lambda E, M, C: C, 'embedding_size': lambda E, M, C: E * M,
             'descriptors_dim': lambda E, M, C: E * M,  # P2SGradLoss's name for the embedding size
             'l': lambda E, M, C: E * M}                # ManifoldLoss's
    # constructor arguments that are not settings: objects (a distance, a reducer, regularizers and their weights,
    # another loss) and record keeping
    NOT_SETTINGS = ('distance', 'reducer', 'embedding_regularizer', 'embedding_reg_weight', 'weight_regularizer',
                    'weight_reg_weight', 'weight_init_func', 'mat_based_loss', 'collect_stats')

    def __init__(self, ensemble_size, meta_class_size, num_classes, **settings):
        super().__init__()
        accepted = constructor_arguments(self.library_loss)
        sizes = {name: size(ensemble_size, meta_class_size, num_classes) for name, size in self.SIZES.items()
                 if name in accepted}
        self.loss = self.library_loss(**sizes, **settings)
        for module in self.loss.modules():
            for name, value in list(vars(module).items()):
                if isinstance(value, torch.Tensor):  # a plain attribute (parameters and buffers are not in vars):
                    delattr(module, name)             # it would be left out of the state_dict, and of a checkpoint
                    module.register_buffer(name, value)

    @classmethod
    def of(cls, class_name):
        """The loss class of pytorch-metric-learning's loss of that name; ValueError where the library has none (its
        bases and the wrappers of other losses are not losses by themselves)."""
        found = getattr(pml_losses, class_name, None)
        if not (inspect.isclass(found) and issubclass(found, pml_losses.BaseMetricLossFunction)) \
                or found in (pml_losses.BaseMetricLossFunction, pml_losses.GenericPairLoss):
            kind = 'is a base or a wrapper of its losses' if inspect.isclass(found) else 'is not one of its losses'
            raise ValueError(f'pytorch-metric-learning\'s {class_name} {kind}: name one of them, e.g. '
                             f'{PML_PREFIX}ProxyAnchorLoss or {PML_PREFIX}MultiSimilarityLoss')
        return type(f'MetricLearning{class_name}', (cls,), {'library_loss': found})

    @classmethod
    def classifier(cls, settings):
        return nn.Linear

    def forward(self, logits, meta_labels, labels):
        return self.loss(embed(logits), labels)


def constructor_arguments(loss_class):
    """{name: default, or inspect.Parameter.empty where required} of every argument loss_class takes by name: its
    __init__'s, and where that hands **kwargs on, its bases' (as pytorch-metric-learning's losses do)."""
    arguments = {}
    for cls in loss_class.__mro__:
        if '__init__' not in vars(cls):
            continue
        parameters = list(inspect.signature(vars(cls)['__init__']).parameters.values())[1:]  # after self
        for parameter in parameters:
            if parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                arguments.setdefault(parameter.name, parameter.default)
        if not any(parameter.kind is parameter.VAR_KEYWORD for parameter in parameters):
            break
    return arguments


LOSSES = {'ce': EnsembleCrossEntropy, 'normsoftmax': NormSoftmaxLoss}
DEFAULT_LOSS = 'ce'  # the original REIR's
PML_PREFIX = 'pml.'  # --loss pml.<ClassName>: MetricLearningLoss over that loss of pytorch-metric-learning
