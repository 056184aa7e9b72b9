"""torch.hub entry points: a trained REIR run as a model and its transform, from another project.

    model, transform = torch.hub.load('path/to/REIR', 'reir', 'results/<prefix>_model.pth', source='local')
    embedding = model.embedding(transform('image.jpg')[None])     # (1, E*M)
"""
import trained

dependencies = ['torch', 'torchvision', 'numpy', 'PIL', 'pytorch_metric_learning']


def reir(run, prefix=None, image_size=None, exact_pipeline=None, data_path=None, device='cpu'):
    """(model, transform) of a trained run, this repository's or the original REIR's: see trained.load_run."""
    return trained.load_run(run, prefix, image_size, exact_pipeline, data_path, device)
