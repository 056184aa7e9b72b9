from PIL import Image

import architecture
from conftest import run_main


def describe(*flags):
    return architecture.describe(architecture.get_args_parser().parse_args([str(flag) for flag in flags]))


def test_the_figure_describes_the_model_code():
    parts = describe('--ensemble_size', 4, '--image_size', 256)
    assert parts['stem'] == ['conv1', 'bn1', 'relu', 'maxpool', 'layer1']
    assert parts['branch'] == ['layer2', 'layer3', 'layer4']
    assert parts['shared_shape'] == (64, 64, 64) and parts['feature_shape'] == (512, 8, 8)
    assert parts['classifier'] == 'fc'
    parts = describe('--model_type', 'resnet50', '--share_type', 'none', '--ensemble_size', 3, '--meta_class_size', 4,
                     '--image_size', 64, '--loss', 'normsoftmax')
    assert parts['stem'] == [] and parts['branch'][0] == 'conv1' and parts['feature_shape'] == (2048, 2, 2)
    assert parts['classifier'] == 'CosineClassifier'


def test_the_figure_is_drawn(tmp_path):
    output = tmp_path / 'architecture.png'
    result = run_main('architecture', '--ensemble_size', '5', '--with_random', '--output', output)
    assert result.returncode == 0, result.stderr
    with Image.open(output) as image:
        assert image.format == 'PNG' and image.width > 800
