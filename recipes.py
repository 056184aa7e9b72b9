"""The original REIR's recipes: the configuration it trained each dataset with, and the Recall@K it published for
each backbone (leftthomas/NormSoftmax, README at commit 2c88830: Adam at 1e-4, batch 10 on two GPUs, images resized
to 256, E = 48; each number the best test Recall@K over the epochs, that is selected on the test split).

study.py --recipes runs them; README.md lists them as commands beside the published numbers.
"""
from dataclasses import dataclass

SOURCE = 'leftthomas/NormSoftmax README (commit 2c88830)'


@dataclass(frozen=True)
class Recipe:
    title: str
    flags: tuple       # train.py flags; the others keep their defaults, which are the original's
    published: dict    # backbone -> the published Recall@K (percent), one for each K of the flags' --recalls

    @property
    def recalls(self):
        return [int(k) for k in self.flags[self.flags.index('--recalls') + 1].split(',')]


def recipe(data_name, crop_type, meta_class_size, num_epochs, recalls, title, published):
    flags = ('--data_name', data_name, '--crop_type', crop_type, '--ensemble_size', '48', '--meta_class_size',
             str(meta_class_size), '--num_epochs', str(num_epochs), '--recalls', recalls)
    return Recipe(title, flags, published)


RECIPES = {
    'car': recipe('car', 'uncropped', 12, 20, '1,2,4,8', 'Cars196', {
        'resnet18': (93.4, 96.6, 98.1, 99.0), 'resnet34': (93.5, 96.2, 97.7, 98.8),
        'resnet50': (93.3, 96.2, 97.7, 98.5), 'resnext50_32x4d': (93.9, 96.5, 97.8, 98.7)}),
    'car_cropped': recipe('car', 'cropped', 12, 20, '1,2,4,8', 'Cars196, cropped', {
        'resnet18': (96.7, 98.3, 99.0, 99.5), 'resnet34': (96.7, 98.3, 99.0, 99.4),
        'resnet50': (96.6, 98.1, 98.7, 99.2), 'resnext50_32x4d': (96.8, 98.2, 98.9, 99.3)}),
    'cub': recipe('cub', 'uncropped', 12, 20, '1,2,4,8', 'CUB-200-2011', {
        'resnet18': (82.0, 88.9, 92.6, 95.6), 'resnet34': (77.5, 85.0, 90.4, 94.3),
        'resnet50': (77.8, 84.9, 89.9, 93.7), 'resnext50_32x4d': (80.1, 86.8, 91.5, 94.8)}),
    'cub_cropped': recipe('cub', 'cropped', 12, 20, '1,2,4,8', 'CUB-200-2011, cropped', {
        'resnet18': (89.0, 93.1, 95.9, 97.5), 'resnet34': (86.0, 91.2, 94.7, 96.8),
        'resnet50': (85.9, 91.4, 94.5, 96.4), 'resnext50_32x4d': (86.3, 91.3, 94.5, 96.6)}),
    'sop': recipe('sop', 'uncropped', 512, 40, '1,10,100,1000', 'Stanford Online Products', {
        'resnet18': (89.5, 95.1, 97.6, 99.1), 'resnet34': (90.2, 95.3, 97.4, 98.9),
        'resnet50': (85.3, 90.7, 93.9, 96.8), 'resnext50_32x4d': (87.8, 93.2, 96.0, 98.1)}),
    'isc': recipe('isc', 'uncropped', 192, 40, '1,10,20,30,40,50', 'In-shop Clothes', {
        'resnet18': (76.5, 92.0, 94.2, 95.2, 95.8, 96.3), 'resnet34': (83.1, 95.0, 96.5, 97.1, 97.4, 97.7),
        'resnet50': (78.7, 93.2, 95.2, 96.1, 96.7, 97.0), 'resnext50_32x4d': (87.7, 96.7, 97.7, 98.1, 98.4, 98.6)}),
}


# the flags that make a run the configuration the original published its numbers for (with the backbone)
PUBLISHED_FOR = ('data_name', 'crop_type', 'ensemble_size', 'meta_class_size')


def departures(name, args):
    """The flags of PUBLISHED_FOR on which a run of args (train.py's namespace) departs from the recipe name, as
    '--flag value' of the run."""
    flags = RECIPES[name].flags
    return [f'--{flag} {getattr(args, flag)}' for flag in PUBLISHED_FOR
            if str(getattr(args, flag)) != flags[flags.index(f'--{flag}') + 1]]


def published_metrics(name, args):
    """{'published_recall@K': percent} the original published for the configuration of recipe name that a run of args
    trained, for each K of the run's --recalls it published; empty where the run departs from the recipe's
    configuration (departures) or its backbone has no published numbers."""
    chosen = RECIPES[name]
    if departures(name, args):
        return {}
    numbers = dict(zip(chosen.recalls, chosen.published.get(args.model_type, ())))
    return {f'published_recall@{k}': numbers[k] for k in args.recalls if k in numbers}
