"""One call from a trained run's files to a model that embeds images: runs of this repository and models the
original REIR saved alike.

    import trained
    model, transform = trained.load_run('results/cub_uncropped_fixed_unrandom_layer1_resnet18_48_12_model.pth')
    with torch.no_grad():
        embedding = model.embedding(transform('bird.jpg')[None])    # (1, E*M)

hubconf.py offers the same call to torch.hub.load.
"""
import os
from types import SimpleNamespace

import engine
import run_files
import utils


class Preprocess:
    """A run's evaluation transform, from an image path or a PIL image to a (3, S, S) tensor. A path is decoded as
    the run decoded its images (utils.load_rgb: reduced-scale JPEG decoding and EXIF orientation, unless the run
    used --exact_pipeline)."""

    def __init__(self, transform, min_side):
        self.transform, self.min_side = transform, min_side

    def __call__(self, image):
        if isinstance(image, (str, os.PathLike)):
            image = utils.load_rgb(image, self.min_side)
        else:
            image = utils.to_rgb(image)
        return self.transform(image)

    def __repr__(self):
        return f'Preprocess(min_side={self.min_side}, {self.transform})'


def model_file(run):
    """The model file of a run given as that file or as its path without the kind (results/<prefix>); refused where
    neither is there."""
    run = os.fspath(run)
    if os.path.isdir(run):
        raise utils.UsageError(f'{run} is a folder: pass a run\'s <prefix>_model.pth, or results/<prefix>')
    candidates = (run,) if run.endswith('_model.pth') else (run, f'{run}_model.pth')
    found = [path for path in candidates if os.path.isfile(path)]
    if not found:
        raise utils.ReirError(f'{run}: model not found' + (f' (nor {os.path.basename(candidates[-1])} beside it)'
                                                           if len(candidates) > 1 else ''))
    return found[0]


def run_normalization(run, settings, data_path):
    """(mean, std) the run normalized its images with: recorded with the run (its args.json, checkpoint or database),
    else those of the dataset prepared under data_path where the call names it, else the known statistics of its
    dataset (those the original REIR used): never those of a dataset that the caller's folder happens to hold."""
    if settings.mean is not None:
        return settings.mean, settings.std
    if data_path is not None:
        data_dicts = utils.load_data_dicts(data_path, run.data_name, run.crop_type)
        return data_dicts['mean'], data_dicts['std']
    if run.data_name in utils.KNOWN_STATS:
        return utils.KNOWN_STATS[run.data_name]
    raise utils.ReirError(f'the normalization of {run.prefix} is recorded nowhere (its args.json, checkpoint and '
                          f'database are gone): pass data_path=, the folder of the prepared dataset it trained on')


def load_run(run, prefix=None, image_size=None, exact_pipeline=None, data_path=None, device='cpu'):
    """(model, transform) of a trained run: the Model in evaluation mode on device, and the Preprocess that gives
    it images as the run's evaluation did.

    run: its <prefix>_model.pth, this repository's or the original REIR's (epochs/<prefix>_model.pth), or
    results/<prefix>. The settings come from the prefix (or prefix, for a file named otherwise) and the run's
    <prefix>_args.json, checkpoint or database beside the model; a model the original saved embeds as the original did
    (256 pixels, whole images decoded). image_size and exact_pipeline override them; a run whose files no longer
    say them needs them, and data_path (the prepared datasets) gives the normalization of one whose files no longer
    record it."""
    opened = open_run(run, prefix, image_size, exact_pipeline, data_path, device)
    return opened.model, opened.preprocess


def open_run(run, prefix=None, image_size=None, exact_pipeline=None, data_path=None, device='cpu'):
    """load_run's model and Preprocess with what they came from, as a namespace: name (the RunName), path (the model
    file), model, preprocess, embedding (the settings that make its embeddings: image_size, exact_pipeline, mean,
    std, as plain values) and recalls (the run's K of Recall@K)."""
    if image_size is not None and not (utils.is_int(image_size) and image_size > 0):
        raise utils.UsageError(f'image_size {image_size!r}: the side of the network input is a positive integer')
    path = model_file(run)
    name, paths, _ = run_files.run_of_file(path, kinds=('model.pth',), prefix=prefix, prefix_option='prefix=')
    model = engine.load_model(path, name).to(device)  # first: a model of another prefix is the error
    overrides = dict(image_size=image_size, exact_pipeline=exact_pipeline, data_path=data_path)
    settings = run_files.embedding_settings(paths, overrides, model_needed=True)
    mean, std = run_normalization(name, settings, data_path)
    transform, min_side = utils.input_pipeline(name.crop_type, False, settings.image_size, mean, std,
                                               settings.exact_pipeline)
    embedding = dict(image_size=settings.image_size, exact_pipeline=settings.exact_pipeline, mean=list(mean),
                     std=list(std))
    return SimpleNamespace(name=name, path=path, model=model, preprocess=Preprocess(transform, min_side),
                           embedding=embedding, recalls=settings.recalls)
