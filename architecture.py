"""Draw the REIR network as the model code builds it: the shared stem, the branches and the embedding.

    python architecture.py                                   # the default model -> results/architecture.png
    python architecture.py --share_type layer3 --ensemble_size 12 --output my_model.png

The stage names and tensor shapes are read from a Model built on the meta device (shapes, no memory), so
the figure is always that of the code.
"""
import argparse
import os
import textwrap

import torch
from matplotlib import patches
from matplotlib import pyplot as plt

import loss_choice
import run_files
import utils
from model import BACKBONES, DEFAULT_LOSS, SHARE_TYPES, MetricLearningLoss, Model

STEM, BRANCH, OUTPUT = '#dbe8f6', '#fbe3c8', '#d9efd9'
SHOWN_BRANCHES = 3  # branches drawn before the ellipsis and the last one


def describe(args):
    """Stage names and output shapes of the stem and of one branch, and its classifier, from the Model of the flags
    on the meta device."""
    with torch.device('meta'):
        model = Model(args.meta_class_size, args.ensemble_size, args.share_type, args.model_type, pretrained=False,
                      classifier=loss_choice.LossChoice.parse(args.loss).classifier())
        shared = model.shared(torch.empty(1, 3, args.image_size, args.image_size))      # (1, C, H, W)
        features = model.branches[0].features(shared)                                   # (1, F, h, w)
    classifier = model.branches[0].fc
    return dict(stem=list(model.shared._modules), branch=list(model.branches[0].features._modules),
                shared_shape=tuple(shared.shape[1:]), feature_shape=tuple(features.shape[1:]),
                classifier='fc' if type(classifier) is torch.nn.Linear else type(classifier).__name__)


def what_trains(loss):
    """What the loss of --loss trains, in words."""
    cls = loss_choice.loss_class(loss_choice.LossChoice.parse(loss).name)
    if issubclass(cls, MetricLearningLoss):
        return f'the embedding learns the classes by pytorch-metric-learning\'s {cls.library_loss.__name__}'
    return f'branch e is a classifier of ids[e, class] ({cls.__name__}, model.py)'


def box(axis, x, y, width, height, text, colour):
    axis.add_patch(patches.FancyBboxPatch((x, y), width, height, boxstyle='round,pad=0.02', facecolor=colour,
                                          edgecolor='#444444'))
    axis.text(x + width / 2, y + height / 2, text, ha='center', va='center', fontsize=8)


def arrow(axis, start, end):
    axis.annotate('', xy=end, xytext=start, arrowprops=dict(arrowstyle='->', color='#444444'))


def shape_text(shape):
    return ' × '.join(map(str, shape))


def main(args):
    parts = describe(args)
    E, M = args.ensemble_size, args.meta_class_size
    shown = list(range(min(E, SHOWN_BRANCHES))) + ([E - 1] if E > SHOWN_BRANCHES else [])
    figure, axis = plt.subplots(figsize=(11, 1.1 * len(shown) + 0.8))
    height = len(shown) + 0.2
    axis.set_xlim(0, 11)
    axis.set_ylim(-0.5, height)
    axis.axis('off')

    middle = height / 2 - 0.3
    box(axis, 0.1, middle, 1.3, 0.6, f'image\n3 × {args.image_size} × {args.image_size}', 'white')
    stem = textwrap.fill(' → '.join(parts['stem']), 30) or '(nothing shared)'
    box(axis, 1.8, middle - 0.15, 2.2, 0.9, f'shared stem\n{stem}\n{shape_text(parts["shared_shape"])}', STEM)
    arrow(axis, (1.45, middle + 0.3), (1.75, middle + 0.3))
    for row, e in enumerate(shown):
        y = height - 0.8 - row
        if E > SHOWN_BRANCHES and row == SHOWN_BRANCHES:
            axis.text(6.0, y + 0.75, '⋮', ha='center', fontsize=14)
        scale = f'× w{e + 1}  ' if args.with_random else ''
        head = f'{shape_text(parts["feature_shape"])} → avgpool → {parts["classifier"]} → {M} logits'
        box(axis, 4.6, y, 3.2, 0.6, f'branch {e + 1}: {scale}{" → ".join(parts["branch"])}\n{head}', BRANCH)
        arrow(axis, (4.05, middle + 0.3), (4.55, y + 0.3))
        box(axis, 8.2, y, 1.1, 0.6, 'L2 normalize', BRANCH)
        arrow(axis, (7.85, y + 0.3), (8.15, y + 0.3))
        arrow(axis, (9.35, y + 0.3), (9.65, middle + 0.3))
    box(axis, 9.7, middle, 1.2, 0.6, f'embedding\n{E} × {M} = {E * M}', OUTPUT)
    axis.text(0.1, -0.4, f'{args.model_type}, share_type {args.share_type}, {E} branches of {M} meta-classes. In '
                         f'training {what_trains(args.loss)}'
                         + ('; w = softmax(rand(E)) in training, 1/E in evaluation' if args.with_random else ''),
              fontsize=7.5, color='#333333')
    figure.tight_layout()
    try:
        run_files.atomic_write(args.output, lambda tmp: figure.savefig(tmp, format='png', dpi=110))
    finally:
        plt.close(figure)
    print(f'-> {args.output}')


def get_args_parser():
    parser = argparse.ArgumentParser(description='Draw the REIR network as model.py builds it')
    parser.add_argument('--model_type', default='resnet18', choices=list(BACKBONES))
    parser.add_argument('--share_type', default='layer1', choices=SHARE_TYPES)
    parser.add_argument('--ensemble_size', default=48, type=utils.positive_int)
    parser.add_argument('--meta_class_size', default=12, type=utils.positive_int)
    parser.add_argument('--image_size', default=256, type=utils.positive_int)
    parser.add_argument('--with_random', action='store_true')
    parser.add_argument('--loss', default=DEFAULT_LOSS, type=loss_choice.loss_flag)
    parser.add_argument('--output', default=os.path.join(run_files.RESULTS_DIR, 'architecture.png'))
    return parser


if __name__ == '__main__':
    utils.run_cli(main, get_args_parser().parse_args())
